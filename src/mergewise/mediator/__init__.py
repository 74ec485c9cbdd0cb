"""Mediator: route the layers where fine-tunes conflict, average the rest (see `mergewise mediator`).

analysis  — per-unit sign conflict, cancellation and cosines of the task vectors
build     — dense merge + per-task sparse experts + fitted router, written as one model folder
router    — prototype/logistic task router with uncertainty and out-of-distribution decisions
runtime   — `mergewise.load`: a model whose `generate()` routes every sequence
"""
