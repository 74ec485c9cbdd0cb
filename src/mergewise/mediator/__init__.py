"""Mediator: route the layers where fine-tunes conflict, average the rest (see `mergewise mediator`).

analysis  — per-unit sign conflict, cancellation and cosines of the task vectors
codes     — how each expert's residual θ_t − D is stored (sign1, sign2, sparse, lowrank, lowrank4, full)
allocation — which units are routed with which code, within the memory budget
build     — dense merge + per-task coded experts + fitted router, written as one model folder
router    — task routers (a logistic head or task means) with uncertainty and out-of-distribution decisions
runtime   — `mergewise.load`: a model whose `generate()` routes every sequence, switching experts in place
switching — the CPU route switches through the fused kernels of `kernels` (numba, loaded on first use)
"""
