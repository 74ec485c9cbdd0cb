"""The Mediator recipe: a core merge recipe whose inputs are listed under `mediator.experts`.

merge_method: linear
base_model: ./base
mediator:
  memory_budget: 1.5
  code: auto           # or a code of mediator/codes: sparse | sign1 | sign2 | lowrank | lowrank4
  experts:
    - {model: ./expert-add, task: add, prompts: tasks/add/calib.txt}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergewise.config import MergeConfig, Recipe
from mergewise.config import load_recipe as load_core_recipe
from mergewise.errors import MergewiseError
from mergewise.mediator.codes import SELECTABLE
from mergewise.methods import BasePolicy, get_method

MIN_CALIBRATION_PROMPTS = 16
CodeName = Literal[("auto", *SELECTABLE)]  # type: ignore[valid-type]  # the codes' registry names them


class ExpertEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str
    task: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    prompts: str | None = None
    parameters: dict[str, Any] | None = None


class RouterSettings(BaseModel):
    """How prompts are routed; every threshold is fitted on the calibration prompts."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # a name in mediator.router.ROUTER_KINDS (gaussian, prototype, logistic, discriminative: see their descriptions)
    kind: str = "discriminative"
    # Hidden states (as transformers numbers them: -1 is the final norm's output) whose prompt means,
    # side by side, are the features; None: the last and the middle one, which told tasks and
    # unseen prompts apart more reliably across builds than the last alone.
    feature_layers: list[int] | None = Field(None, min_length=1)
    metric: Literal["euclidean", "cosine"] = "euclidean"  # of the prototype router
    holdout: float = Field(0.25, gt=0.0, lt=1.0)  # share of prompts that fits temperature/thresholds
    uncertainty_quantile: float = Field(0.95, gt=0.0, le=1.0)  # in-distribution prompts below it are selected
    ood_quantile: float = Field(0.99, gt=0.0, le=1.0)  # nearest-prototype distance percentile beyond it is OOD
    ood_margin: float = Field(1.25, ge=1.0)  # … times this margin means dense
    on_ood: Literal["dense", "uniform"] = "dense"
    max_prompts: int = Field(256, ge=MIN_CALIBRATION_PROMPTS)  # per task
    max_tokens: int = Field(256, ge=2)  # prompt tokens used for the feature
    seed: int = 0

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        from mergewise.mediator.router import ROUTER_KINDS  # the router imports these settings

        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(ROUTER_KINDS)}")
        return kind

    def hidden_states(self, num_layers: int) -> list[int]:
        """The feature's hidden-state numbers for a model of `num_layers` decoder layers."""
        if self.feature_layers is not None:
            return list(self.feature_layers)
        return [num_layers] if num_layers // 2 == num_layers else [num_layers, num_layers // 2]


class MediatorSettings(BaseModel):
    """The `mediator:` block (docs/mediator.md); all of it is recorded in the output's mediator.json."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    memory_budget: float | None = Field(None, gt=1.0)  # stored bytes ≤ this × one model
    route_threshold: float | None = Field(None, ge=0.0, le=1.0)  # route units with d_l ≥ this
    # How each expert's residual θ_t − D is stored (mediator/codes); "auto": per unit, the code and
    # the routed units that keep the most of ‖θ_t − D‖² within the budget.
    code: CodeName = "auto"
    # The sparse code's share of each row kept, and the low-rank codes' rank; "auto": the largest
    # that lets every unit be routed within the budget (with route_threshold: 0.1 and 16).
    density: Literal["auto"] | Annotated[float, Field(gt=0.0, le=1.0)] = "auto"
    rank: Literal["auto"] | Annotated[int, Field(ge=1)] = "auto"
    conflict_density: float = Field(0.2, gt=0.0, le=1.0)  # top-k share per expert for the sign conflict
    router: RouterSettings = RouterSettings()
    experts: list[ExpertEntry] = Field(min_length=2)
    # Task vectors are measured from it: the recipe's base_model, which the dense merge itself may
    # not take (linear averages the experts alone).
    base_model: str | None = None

    @model_validator(mode="after")
    def _one_selection(self) -> MediatorSettings:
        if self.memory_budget is not None and self.route_threshold is not None:
            raise ValueError("give memory_budget or route_threshold, not both")
        if self.memory_budget is None and self.route_threshold is None:
            object.__setattr__(self, "memory_budget", 1.5)
        tasks = [expert.task for expert in self.experts]
        duplicated = sorted({task for task in tasks if tasks.count(task) > 1})
        if duplicated:
            raise ValueError(f"task names must be unique (repeated: {', '.join(duplicated)})")
        return self

    @property
    def tasks(self) -> list[str]:
        return [expert.task for expert in self.experts]


class MediatorRecipe(BaseModel):
    """A recipe with a `mediator:` block, as the Mediator's passes read it."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    merge: MergeConfig  # the dense merge of the experts (calm units and dense expert D)
    base_model: str
    settings: MediatorSettings
    config_dir: Path
    origin: str

    @classmethod
    def of(cls, recipe: Recipe) -> MediatorRecipe:
        if "mediator" not in recipe.blocks:
            raise MergewiseError(f"{recipe.origin}: mediator: missing (a Mediator recipe lists its experts there)")
        settings = recipe.blocks["mediator"]
        assert isinstance(settings, MediatorSettings)  # the block as its schema validated it
        return cls(
            merge=recipe.config,
            base_model=settings.base_model,
            settings=settings,
            config_dir=recipe.config_dir,
            origin=recipe.origin,
        )

    def prompts_path(self, expert: ExpertEntry) -> Path:
        if expert.prompts is None:
            raise MergewiseError(
                f"{self.origin}: mediator.experts: task {expert.task!r} has no prompts "
                "(the router needs calibration prompts for every expert)"
            )
        path = Path(expert.prompts).expanduser()
        path = path if path.is_absolute() else self.config_dir / path
        if not path.is_file():
            raise MergewiseError(
                f"{self.origin}: mediator.experts: prompts file of task {expert.task!r} not found: {path}"
            )
        return path


def experts_as_models(data: dict, settings: MediatorSettings, origin: str) -> tuple[dict, MediatorSettings]:
    """The core recipe of a Mediator recipe: its experts become the dense merge's `models`."""
    for key in ("models", "slices"):
        if key in data:
            raise MergewiseError(f"{origin}: {key}: a Mediator recipe lists its models under mediator.experts")
    base_model = data.get("base_model")
    if not base_model:
        raise MergewiseError(f"{origin}: base_model: required (task vectors are measured from it)")
    method = get_method(str(data.get("merge_method", "")))  # unknown methods fail here, by name
    data = dict(data)
    if method.base in (BasePolicy.INPUT, BasePolicy.UNUSED):
        data.pop("base_model")  # the dense expert averages the experts, not experts and base
    weight = {"weight": 1.0 / len(settings.experts)} if "weight" in method.parameters else {}
    has_weight = "weight" in (data.get("parameters") or {})
    data["models"] = [
        {"model": expert.model, "parameters": {**({} if has_weight else weight), **(expert.parameters or {})} or None}
        for expert in settings.experts
    ]
    return data, settings.model_copy(update={"base_model": base_model})


def load_recipe(source: str | Path | dict) -> MediatorRecipe:
    """Read a recipe that has a `mediator:` block."""
    return MediatorRecipe.of(load_core_recipe(source))
