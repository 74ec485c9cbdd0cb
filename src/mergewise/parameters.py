"""A merge method's parameter values for one tensor, from the recipe's scopes (a source's, a slice's,
the recipe's `parameters`): filters pick, numeric lists interpolate over depth, the method's
defaults fill in."""

from __future__ import annotations

import difflib
from typing import Any

from mergewise.config import ConditionalParameter, MergeConfig
from mergewise.errors import MergewiseError, tolerated
from mergewise.methods import MergeMethod, Parameter
from mergewise.methods.base import REQUIRED


class ParameterResolver:
    """Resolves `method`'s parameters over a recipe; names the method does not take are reported
    once, when it is made."""

    def __init__(self, config: MergeConfig, method: MergeMethod, *, strict: bool = False):
        self.config = config
        self.method = method
        self.schema = method.parameters
        self.strict = strict
        self._misspelled: dict[str, str] = {}  # parameter → where a name close to it was ignored
        self._check_names()

    def _check_names(self) -> None:
        scopes: list[tuple[str, dict | None]] = [("parameters", self.config.parameters)]
        modules = self.config.modules or {}
        parts = [("", self.config)] + [(f"modules.{name}.", module) for name, module in modules.items()]
        for prefix, part in parts:
            if part is not self.config:
                scopes.append((f"{prefix}parameters", part.parameters))
            for index, entry in enumerate(part.models or []):
                scopes.append((f"{prefix}models[{index}].parameters", entry.parameters))
            for index, output_slice in enumerate(part.slices or []):
                scopes.append((f"{prefix}slices[{index}].parameters", output_slice.parameters))
                for source_index, source in enumerate(output_slice.sources):
                    scopes.append((f"{prefix}slices[{index}].sources[{source_index}].parameters", source.parameters))
        for key, settings in scopes:
            for name in settings or {}:
                if name not in self.schema:
                    close = difflib.get_close_matches(name, list(self.schema), n=1, cutoff=0.75)
                    hint = f"did you mean {close[0]}? " if close else ""
                    tolerated(
                        f"{key}.{name}: unknown parameter for merge_method {self.method.name}, ignored, as "
                        f"mergekit ignores it ({hint}it takes: {', '.join(self.schema) or 'none'})",
                        strict=self.strict,
                    )
                    if close:
                        self._misspelled.setdefault(close[0], f"{key}.{name}")

    def resolve(self, parameter: Parameter, scopes: list[dict | None], tensor: str, t: float, where: str) -> Any:
        for settings in scopes:
            if settings and parameter.name in settings:
                value = _evaluate(settings[parameter.name], tensor, t)
                if value is not None:
                    try:
                        return parameter.coerce(value)
                    except ValueError as error:
                        raise MergewiseError(f"parameter {parameter.name} for {where}: {error}") from None
        if parameter.default is REQUIRED:
            misspelled = self._misspelled.get(parameter.name)
            hint = f" ({misspelled} looks like a misspelling of it)" if misspelled else ""
            raise MergewiseError(f"missing required parameter {parameter.name} for {where}{hint}")
        return parameter.default

    def job_parameters(
        self, sources, shared_scopes: list[dict | None], name: str, t: float
    ) -> tuple[dict[str, Any], dict[str, tuple]]:
        """The shared and the per-model parameters of output tensor `name` at depth `t`, `sources` being
        its (model, tensor, the model's own parameters) in input order."""
        shared, per_model = {}, {}
        for parameter in self.schema.values():
            if parameter.per_model:
                per_model[parameter.name] = tuple(
                    self.resolve(parameter, [params, *shared_scopes], tensor, t, f"{model.name}:{tensor}")
                    for model, tensor, params in sources
                )
            else:
                shared[parameter.name] = self.resolve(parameter, shared_scopes, name, t, name)
        return shared, per_model


def _evaluate(setting, tensor: str, t: float) -> Any:
    """A setting's value for one tensor: filters pick, numeric lists interpolate over depth."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if not isinstance(setting, list):
        return setting
    if not setting:
        return None
    if all(isinstance(item, ConditionalParameter) for item in setting):
        for condition in setting:
            if condition.filter in (None, "*") or condition.filter in tensor:
                return _evaluate(condition.value, tensor, t)
        return None
    numeric = all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in setting)
    if not numeric:
        return setting[int(t * (len(setting) - 1))]
    position = t * (len(setting) - 1)
    low = int(position)
    high = min(len(setting) - 1, low + 1)
    fraction = position - low
    return (1 - fraction) * setting[low] + fraction * setting[high]
