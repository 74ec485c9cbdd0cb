"""Per-sequence task routing with uncertainty (docs/mediator.md, Router).

Prompt features (mean-pooled hidden states, [N, H]) are standardised with calibration statistics and
scored against one prototype (or a linear head) per task. The softmax temperature and both thresholds
are fitted on a held-out share of the calibration prompts, so a confident, in-distribution prompt
selects one expert, an ambiguous one blends them, and one unlike every task falls back to the dense
model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from mergewise.errors import MergewiseError
from mergewise.mediator.settings import MIN_CALIBRATION_PROMPTS, RouterSettings

Decision = Literal["select", "blend", "dense"]

TEMPERATURE_RANGE = (1e-3, 1e3)
TEMPERATURE_GRID = 61  # 10 points per decade, then a golden-section refinement
UNCERTAINTY_FLOOR = 1e-3  # a perfectly confident router must still select, not blend, its own prompts
UNCERTAINTY_CEILING = 0.99  # however the thresholds came out, probabilities this flat never select
# Held-out accuracy below chance + this share of the way to 1 means the features do not tell the
# tasks apart (3 tasks: below 2/3): the build warns and records it.
DISTINGUISHING_MARGIN = 0.5
VARIANCE_PRIOR = 4.0
LOGISTIC_L2 = 1e-2
LOGISTIC_STEPS = 200


@dataclass(frozen=True)
class Route:
    """The router's answer for one prompt; `mix` holds the expert weights w_t in W = D + Σ w_t S_t."""

    decision: Decision
    task: str | None
    probs: dict[str, float]
    uncertainty: float
    ood: float
    mix: dict[str, float] = field(default_factory=dict)

    def weights(self) -> dict[str, float]:
        return dict(self.mix)

    def to_json(self) -> dict:
        return {
            "decision": self.decision,
            "task": self.task,
            "probs": {task: round(p, 4) for task, p in self.probs.items()},
            "uncertainty": round(self.uncertainty, 4),
            "ood": round(self.ood, 4),
        }


class RouterWarning(UserWarning):
    """The router was fitted but cannot route well (its held-out accuracy is near chance)."""


@dataclass
class FitReport:
    heldout_accuracy: float
    temperature: float
    uncertainty_thresholds: dict[str, float]
    ood_thresholds: dict[str, float]
    prompts: dict[str, int]  # calibration prompts per task (fit + held-out)
    distinguishes_tasks: bool = True
    # The fitted rule applied to the held-out calibration prompts: the share selected to their own
    # task's expert, and the share flagged (blend or dense), which `mergewise eval` sets beside the
    # shares it measures.
    heldout_own_selected: float = 0.0
    heldout_flagged: float = 0.0

    def warning(self) -> str:
        chance = 1 / len(self.prompts)
        return (
            f"the router cannot tell the tasks apart: held-out accuracy {self.heldout_accuracy:.2f} against "
            f"{chance:.2f} by chance; most prompts will blend the experts. Give more (or more distinct) "
            "calibration prompts per task, or other router.feature_layers"
        )


class Router:
    """Scores standardised features per task; every tensor it needs is in `state_dict()`."""

    def __init__(
        self, tasks: list[str], settings: RouterSettings, tensors: dict[str, torch.Tensor], temperature: float
    ):
        self.tasks = list(tasks)
        self.settings = settings
        self.mean = tensors["mean"]
        self.std = tensors["std"]
        self.prototypes = tensors["prototypes"]
        self.calibration_distances = tensors["calibration_distances"]
        self.weight = tensors.get("weight")
        self.bias = tensors.get("bias")
        self.variances = tensors.get("variances")
        self.temperature = float(temperature)
        self.uncertainty_thresholds = tensors["uncertainty_thresholds"]  # per predicted task
        self.ood_thresholds = tensors["ood_thresholds"]  # per task: a distance to its prototype

    @classmethod
    def fit(cls, features: dict[str, torch.Tensor], settings: RouterSettings) -> tuple[Router, FitReport]:
        """Prototypes (and head) from the fit share; temperature and thresholds from the held-out share."""
        tasks = list(features)
        data = _validated(features)
        generator = torch.Generator().manual_seed(settings.seed)
        fit_parts, held_parts = [], []
        for x in data:
            order = torch.randperm(len(x), generator=generator)
            held = min(len(x) - 2, max(1, round(settings.holdout * len(x))))  # ≥ 2 fit: leave-one-out below
            held_parts.append(x[order[:held]])
            fit_parts.append(x[order[held:]])
        fit_x, fit_y = _stacked(fit_parts)
        held_x, held_y = _stacked(held_parts)

        mean = fit_x.mean(0)
        std = fit_x.std(0)
        std = std.clamp_min(max(1e-6 * float(std.max()), 1e-8))
        tensors = {"mean": mean, "std": std}
        fit_z, held_z = (fit_x - mean) / std, (held_x - mean) / std
        tensors["prototypes"] = torch.stack([fit_z[fit_y == t].mean(0) for t in range(len(tasks))])
        tensors.update(ROUTER_KINDS[settings.kind].fit(fit_z, fit_y, tensors["prototypes"]))

        router = cls(
            tasks,
            settings,
            {
                **tensors,
                "calibration_distances": torch.empty(0),
                "ood_thresholds": torch.empty(0),
                "uncertainty_thresholds": torch.empty(0),
            },
            1.0,
        )
        held_scores = router._scores(held_z)
        router.temperature = fit_temperature(held_scores, held_y)

        held_probs = router._softmax(held_scores)
        # Some tasks are inherently less certain than others (similar prompt formats): a threshold per
        # predicted task keeps the blended share of each task's own prompts near 1 − quantile. The
        # distance routers' fit prompts count too, scored with their own prompt left out.
        probs = held_probs
        if router.weight is None:  # a distance router
            probs = torch.cat([held_probs, router._softmax(-router._leave_one_out_distances(fit_z, fit_y))])
        uncertainty, predicted = router._uncertainty(probs), probs.argmax(-1)
        overall = _quantile(uncertainty, settings.uncertainty_quantile)
        router.uncertainty_thresholds = torch.tensor(
            [
                max(
                    _quantile(uncertainty[predicted == t], settings.uncertainty_quantile)
                    if (predicted == t).any()
                    else overall,
                    UNCERTAINTY_FLOOR,
                )
                for t in range(len(tasks))
            ]
        )
        # Tasks differ in spread, so each prototype gets its own radius: a quantile of its own
        # prompts' distances (held-out and leave-one-out fit), widened by the margin.
        held_distances = router._distances(held_z, spread=True)
        fit_distances = router._leave_one_out_distances(fit_z, fit_y, spread=True)
        own = torch.cat([fit_distances.gather(1, fit_y[:, None]), held_distances.gather(1, held_y[:, None])])[:, 0]
        labels = torch.cat([fit_y, held_y])
        router.ood_thresholds = torch.tensor(
            [_quantile(own[labels == t], settings.ood_quantile) * settings.ood_margin for t in range(len(tasks))]
        )
        nearest = torch.cat([fit_distances.min(-1).values, held_distances.min(-1).values])
        router.calibration_distances = nearest.sort().values.contiguous()

        accuracy = float((held_probs.argmax(-1) == held_y).float().mean())
        held_routes = router.route(held_x)
        own_selected = sum(
            route.decision == "select" and route.task == tasks[int(task)] for route, task in zip(held_routes, held_y)
        ) / len(held_routes)
        flagged = sum(route.decision != "select" for route in held_routes) / len(held_routes)
        chance = 1 / len(tasks)
        report = FitReport(
            heldout_accuracy=accuracy,
            temperature=router.temperature,
            uncertainty_thresholds=dict(zip(tasks, router.uncertainty_thresholds.tolist())),
            ood_thresholds=dict(zip(tasks, router.ood_thresholds.tolist())),
            prompts={task: len(x) for task, x in zip(tasks, data)},
            distinguishes_tasks=accuracy >= chance + DISTINGUISHING_MARGIN * (1 - chance),
            heldout_own_selected=own_selected,
            heldout_flagged=flagged,
        )
        return router, report

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """Router probabilities p [B, T] over `tasks`."""
        return self._softmax(self._scores(self._standardised(features)))

    def route(self, features: torch.Tensor) -> list[Route]:
        z = self._standardised(features)
        probs = self._softmax(self._scores(z))
        uncertainty = self._uncertainty(probs)
        nearest, nearest_task = self._distances(z, spread=True).min(-1)
        ood = torch.searchsorted(self.calibration_distances, nearest, right=True).double()
        ood = ood / len(self.calibration_distances)
        routes = []
        for row in range(len(z)):
            p = {task: float(value) for task, value in zip(self.tasks, probs[row])}
            u, o = float(uncertainty[row]), float(ood[row])
            top = self.tasks[int(probs[row].argmax())]
            uncertain = u > min(float(self.uncertainty_thresholds[self.tasks.index(top)]), UNCERTAINTY_CEILING)
            # Out of distribution: beyond the nearest task's radius, or uncertain and farther from
            # every prototype than (nearly) all calibration prompts: blending experts there hurt.
            if float(nearest[row]) > float(self.ood_thresholds[nearest_task[row]]) or (
                uncertain and o > self.settings.ood_quantile
            ):
                mix = {task: 1.0 / len(self.tasks) for task in self.tasks} if self.settings.on_ood == "uniform" else {}
                routes.append(Route("dense", None, p, u, o, mix))
            elif uncertain:
                routes.append(Route("blend", top, p, u, o, dict(p)))
            else:
                routes.append(Route("select", top, p, u, o, {top: 1.0}))
        return routes

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {
            "mean": self.mean,
            "std": self.std,
            "prototypes": self.prototypes,
            "calibration_distances": self.calibration_distances,
            "ood_thresholds": self.ood_thresholds,
            "uncertainty_thresholds": self.uncertainty_thresholds,
        }
        if self.weight is not None:
            assert self.bias is not None  # a logistic head has both (from_state checks)
            tensors.update(weight=self.weight, bias=self.bias)
        if self.variances is not None:
            tensors["variances"] = self.variances
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    def metadata(self) -> dict:
        return {
            "tasks": list(self.tasks),
            "temperature": self.temperature,
            "settings": self.settings.model_dump(mode="json"),
        }

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], metadata: dict) -> Router:
        try:
            settings = RouterSettings.model_validate(metadata["settings"])
            tasks = [str(task) for task in metadata["tasks"]]
            scalars = [float(metadata["temperature"])]
        except (KeyError, TypeError, ValueError) as error:
            raise MergewiseError(f"router metadata is incomplete or invalid ({error})") from None
        kind = ROUTER_KINDS[settings.kind]
        needed = ["mean", "std", "prototypes", "calibration_distances", "ood_thresholds", "uncertainty_thresholds"]
        needed += list(kind.tensors)
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise MergewiseError(f"router tensors missing: {', '.join(missing)}")
        loaded = {name: tensors[name].float().cpu() for name in needed}
        if not all(bool(torch.isfinite(tensor).all()) for tensor in loaded.values()) or not (
            math.isfinite(scalars[0]) and scalars[0] > 0
        ):
            raise MergewiseError("router values must be finite (and its temperature positive)")
        if "variances" in loaded and not bool((loaded["variances"] > 0).all()):
            raise MergewiseError("router tensor 'variances' must be positive")
        hidden = loaded["mean"].shape[-1]
        sizes = {"tasks": len(tasks), "width": hidden}
        shapes = {
            "mean": (hidden,),
            "std": (hidden,),
            "prototypes": (len(tasks), hidden),
            "ood_thresholds": (len(tasks),),
            "uncertainty_thresholds": (len(tasks),),
            **{name: tuple(sizes[axis] for axis in axes) for name, axes in kind.tensors.items()},
        }
        if loaded["calibration_distances"].dim() != 1 or not len(loaded["calibration_distances"]):
            raise MergewiseError("router tensor 'calibration_distances' must be a non-empty vector")
        for name, shape in shapes.items():
            if name in loaded and tuple(loaded[name].shape) != shape:
                raise MergewiseError(
                    f"router tensor {name!r} has shape {tuple(loaded[name].shape)}, "
                    f"expected {shape} for {len(tasks)} tasks and width {hidden}"
                )
        return cls(tasks, settings, loaded, *scalars)

    def _standardised(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() != 2 or features.shape[1] != self.mean.shape[0]:
            raise MergewiseError(
                f"router features must have shape [N, {self.mean.shape[0]}], got {list(features.shape)}"
            )
        return (features.detach().to("cpu", torch.float32) - self.mean) / self.std

    def _distances(self, z: torch.Tensor, spread: bool = False) -> torch.Tensor:
        """Distance of each standardised feature to each task [B, T], comparable across widths. With
        `spread` (the out-of-distribution test) a gaussian router scales each feature's squared
        deviation by the task's own variance of it; routing itself always compares with the means."""
        if spread and self.variances is not None:
            return torch.stack(
                [((z - mean).square() / variance).mean(-1) for mean, variance in zip(self.prototypes, self.variances)],
                -1,
            )
        if self.settings.metric == "cosine":
            return 1.0 - F.normalize(z, dim=-1) @ F.normalize(self.prototypes, dim=-1).T
        exact = "donot_use_mm_for_euclid_dist"  # row by row, so a prompt's route does not depend on its batch
        return torch.cdist(z, self.prototypes, compute_mode=exact).square() / z.shape[-1]

    def _leave_one_out_distances(self, z: torch.Tensor, labels: torch.Tensor, spread: bool = False) -> torch.Tensor:
        """`_distances` of fit features with their own prompt left out of their own task's mean.

        A fit prompt is closer to a prototype it helped form, more so the wider the features; without
        this, fresh in-distribution prompts would land high in the calibration percentile."""
        distances = self._distances(z, spread)
        counts = torch.bincount(labels, minlength=len(self.tasks)).float()[labels, None]
        own = (self.prototypes[labels] * counts - z) / (counts - 1)
        if spread and self.variances is not None:
            loo = _leave_one_out_spread(z, labels, self.prototypes)
        elif self.settings.metric == "cosine":
            loo = 1.0 - (F.normalize(z, dim=-1) * F.normalize(own, dim=-1)).sum(-1)
        else:
            loo = (z - own).square().sum(-1) / z.shape[-1]
        return distances.scatter(1, labels[:, None], loo[:, None])

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        """Logits before the temperature."""
        if self.weight is not None:
            assert self.bias is not None  # a logistic head has both (from_state checks)
            return z @ self.weight.T + self.bias
        return -self._distances(z)

    def _softmax(self, scores: torch.Tensor) -> torch.Tensor:
        return torch.softmax(scores / self.temperature, dim=-1)

    def _uncertainty(self, probs: torch.Tensor) -> torch.Tensor:
        return (torch.special.entr(probs).sum(-1) / math.log(len(self.tasks))).clamp(0.0, 1.0)


def _validated(features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    if len(features) < 2:
        raise MergewiseError(f"the router needs at least 2 tasks, got {len(features)} ({', '.join(features)})")
    widths = {}
    data = []
    for task, x in features.items():
        if x.dim() != 2:
            raise MergewiseError(f"router features of task {task!r} must have shape [N, H], got {list(x.shape)}")
        if len(x) < MIN_CALIBRATION_PROMPTS:
            raise MergewiseError(
                f"task {task!r} has {len(x)} calibration prompts; the router needs at least {MIN_CALIBRATION_PROMPTS}"
            )
        x = x.detach().to("cpu", torch.float32)
        if not torch.isfinite(x).all():
            raise MergewiseError(f"router features of task {task!r} contain NaN or infinite values")
        widths[task] = x.shape[1]
        data.append(x)
    if len(set(widths.values())) > 1:
        listed = ", ".join(f"{task}: {width}" for task, width in widths.items())
        raise MergewiseError(f"router features have mismatched widths ({listed})")
    return data


def _class_variances(z: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Each task's per-feature variance, shrunk toward the pooled within-task variance by
    VARIANCE_PRIOR pseudo-prompts (a few prompts cannot pin down every feature's spread), floored."""
    squares, counts, pooled = _spread_sums(z, labels, means)
    return _shrunk(squares, counts[:, None], pooled)


def _spread_sums(
    z: torch.Tensor, labels: torch.Tensor, means: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    deviations = (z - means[labels]).square()
    squares = torch.zeros_like(means).index_add_(0, labels, deviations)
    counts = torch.bincount(labels, minlength=len(means)).to(z.dtype)
    return squares, counts, deviations.mean(0)


def _shrunk(squares: torch.Tensor, counts: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    return ((squares + VARIANCE_PRIOR * pooled) / (counts + VARIANCE_PRIOR)).clamp_min(
        max(1e-6 * float(pooled.max()), 1e-8)
    )


def _leave_one_out_spread(z: torch.Tensor, labels: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Each fit prompt's variance-scaled distance to its own task fitted without it (mean and
    variances both), as a fresh prompt of the task would see it."""
    squares, counts, pooled = _spread_sums(z, labels, means)
    n = counts[labels, None]
    deviation = z - means[labels]
    own_mean = means[labels] - deviation / (n - 1)
    own_squares = squares[labels] - deviation.square() * n / (n - 1)
    return ((z - own_mean).square() / _shrunk(own_squares, n - 1, pooled)).mean(-1)


def _stacked(parts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.cat([torch.full((len(x),), t, dtype=torch.long) for t, x in enumerate(parts)])
    return torch.cat(parts), labels


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q))


def fit_temperature(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimising held-out NLL: a log grid, then golden section (the NLL is unimodal in log T)."""
    scores = scores.double()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(scores / math.exp(log_t), labels))

    grid = torch.linspace(math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1]), TEMPERATURE_GRID).tolist()
    best = min(range(len(grid)), key=lambda i: nll(grid[i]))
    low, high = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def _train_head(z: torch.Tensor, labels: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression with a little L2, full-batch L-BFGS from zeros (deterministic)."""
    with torch.inference_mode(False), torch.enable_grad():
        x, labels = z.double().clone(), labels.clone()
        weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=LOGISTIC_STEPS, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(x @ weight.T + bias, labels) + 0.5 * LOGISTIC_L2 * weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return weight.detach().float(), bias.detach().float()


@dataclass(frozen=True)
class RouterKind:
    """What a kind of router fits beside the shared prototypes (standardised per-task means).

    `fit(z, labels, prototypes)` returns its tensors, named in `tensors` with their axes ("tasks",
    "width"); they are saved in router.safetensors and checked when a folder loads. The router reads
    them by name: `weight`/`bias` score with a linear head instead of the distances to the
    prototypes, `variances` scale the out-of-distribution distances."""

    fit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]
    tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)
    description: str = ""


def _logistic_head(z: torch.Tensor, labels: torch.Tensor, prototypes: torch.Tensor) -> dict[str, torch.Tensor]:
    weight, bias = _train_head(z, labels, len(prototypes))
    return {"weight": weight, "bias": bias}


# `router.kind` in a recipe names one of these (mediator/settings.py reads the names).
ROUTER_KINDS: dict[str, RouterKind] = {
    "gaussian": RouterKind(
        lambda z, labels, prototypes: {"variances": _class_variances(z, labels, prototypes)},
        {"variances": ("tasks", "width")},
        "routes by the distance to each task's mean; the out-of-distribution test scales each feature by "
        "the task's own variance of it",
    ),
    "prototype": RouterKind(lambda z, labels, prototypes: {}, {}, "routes by the distance to each task's mean"),
    "logistic": RouterKind(
        _logistic_head, {"weight": ("tasks", "width"), "bias": ("tasks",)}, "a linear head (logistic regression)"
    ),
    # Where prompts of two tasks differ in a few features (a keyword) and vary alike in the rest, a
    # head learns to read those few; the distance to the means weighs every feature the same.
    "discriminative": RouterKind(
        lambda z, labels, prototypes: {
            **_logistic_head(z, labels, prototypes),
            "variances": _class_variances(z, labels, prototypes),
        },
        {"weight": ("tasks", "width"), "bias": ("tasks",), "variances": ("tasks", "width")},
        "a linear head (logistic regression) routes; the out-of-distribution test scales each feature by the "
        "task's own variance of it, as gaussian's does",
    ),
}
