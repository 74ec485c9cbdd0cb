"""Recipe blocks run as stages of the one streaming merge: every hook in order, results returned,
and library calls leave the process as they found it."""

from __future__ import annotations

import gc
import os
import sys
import types

import pytest
import torch
import yaml
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file
from torch import nn

import mergewise
from mergewise import stages
from mergewise.errors import MergewiseError


class ProbeBlock(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    scale: float = 1.0
    fail_at_finalize: bool = False


class ProbeStage(stages.Stage):
    """Scales the merged rows of every weight and records what the engine showed it."""

    name = "probe"
    calls: list = []

    def __init__(self, block: ProbeBlock, recipe):
        self.block = block
        self.seen: dict[str, torch.Tensor] = {}

    def on_plan(self, context):
        self.calls.append(("plan", len(context.plan.jobs), context.staging.is_dir()))

    def on_rows(self, job, rows, merged):
        self.calls.append(("rows", job.name, rows.base is not None))
        return merged * self.block.scale

    def wants_tensor(self, job):
        return job.name.endswith("q_proj.weight")

    def on_tensor(self, job, read):
        whole = read()
        halves = torch.cat([read(slice(0, whole.shape[0] // 2)), read(slice(whole.shape[0] // 2, None))])
        assert torch.equal(halves, whole)
        self.seen[job.name] = whole

    def finalize(self, staging):
        if self.block.fail_at_finalize:
            raise MergewiseError("probe: failing on purpose")
        return {"tensors": sorted(self.seen), "scale": self.block.scale}

    def close(self):
        self.calls.append(("close",))


@pytest.fixture
def probe_block(monkeypatch):
    module = types.ModuleType("probe_block")
    module.BLOCK = stages.BlockSpec(schema=ProbeBlock, make_stage=ProbeStage)
    monkeypatch.setitem(sys.modules, "probe_block", module)
    monkeypatch.setattr(stages, "BLOCKS", {**stages.BLOCKS, "probe": "probe_block"})
    ProbeStage.calls = []
    return ProbeStage


def recipe(family, **probe) -> dict:
    models = [{"model": str(path), "parameters": {"weight": 0.5}} for path in family.fine_tunes[:2]]
    data = {"merge_method": "task_arithmetic", "base_model": str(family.base), "dtype": "float32", "models": models}
    return data | ({"probe": probe} if probe else {})


def test_a_registered_block_runs_every_hook_and_returns_its_result(probe_block, tiny_family, tmp_path):
    family = tiny_family("llama")
    plain = mergewise.merge(recipe(family), tmp_path / "plain", quiet=True)
    result = mergewise.merge(recipe(family, scale=2.0), tmp_path / "probed", quiet=True)

    assert result.records["probe"]["scale"] == 2.0
    assert yaml.safe_load((tmp_path / "probed" / "mergewise.yml").read_text())["probe"] == result.records["probe"]
    assert yaml.safe_load((tmp_path / "probed" / "mergewise.yml").read_text())["recipe"]["probe"]["scale"] == 2.0
    calls = probe_block.calls
    assert calls[0][0] == "plan" and calls[0][2] and calls[-1] == ("close",)
    assert all(with_base for kind, *rest in calls if kind == "rows" for with_base in rest[1:])
    written = load_file(tmp_path / "probed" / "model.safetensors")
    expected = load_file(plain.out_dir / "model.safetensors")
    for name, tensor in expected.items():
        assert torch.equal(written[name], tensor * 2)
    stage_seen = result.records["probe"]["tensors"]
    assert stage_seen and all(name.endswith("q_proj.weight") for name in stage_seen)


def test_a_failing_stage_leaves_no_output_and_is_closed(probe_block, tiny_family, tmp_path):
    with pytest.raises(MergewiseError, match="failing on purpose"):
        mergewise.merge(recipe(tiny_family("llama"), fail_at_finalize=True), tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert probe_block.calls[-1] == ("close",)


def test_block_settings_are_validated_when_the_recipe_loads(probe_block, tiny_family, tmp_path):
    with pytest.raises(MergewiseError, match=r"config: probe\.scael: unknown key"):
        mergewise.merge(recipe(tiny_family("llama"), scael=2.0), tmp_path / "out", quiet=True)
    assert probe_block.calls == []


def test_library_merges_leave_the_process_as_they_found_it(tiny_family, tmp_path):
    """Threads, environment, garbage collector and torch's classes are the caller's (the CLI alone
    tunes the process); an `aim:` block calibrating layer by layer included."""
    family = tiny_family("llama")
    aim = {"omega": 0.5, "calibration": {"data": "self", "samples": 2, "seq_len": 8, "stream_layers": True}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = (dict(os.environ), gc.isenabled(), gc.get_freeze_count(), nn.Module.register_parameter)
        mergewise.merge(recipe(family) | {"aim": aim}, tmp_path / "out", threads=2, quiet=True)
        after = (dict(os.environ), gc.isenabled(), gc.get_freeze_count(), nn.Module.register_parameter)
        assert torch.get_num_threads() == 1
        assert after == before
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", list(stages.BLOCKS))
def test_every_registered_block_declares_what_the_recipe_and_the_search_read(name):
    """Adding a block is one package and one `BLOCKS` entry: its spec's schema validates the recipe's
    key, and the settings it declares are fields of that schema."""
    from mergewise.config import load_recipe

    spec = stages.block_spec(name)
    assert isinstance(spec, stages.BlockSpec) and callable(spec.make_stage)
    assert set(spec.fixed_keys) <= set(spec.schema.model_fields)
    assert not spec.carries_base_model or "base_model" in spec.schema.model_fields
    with pytest.raises(MergewiseError, match=rf"config: {name}\."):  # the block's own schema judged it
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], name: {"not_a_setting": 1}})


@pytest.mark.parametrize(
    "declared, flags, message",
    [
        ({"resumable": False}, {"resume": True}, "--resume: a recipe with probe: cannot be resumed yet"),
        ({}, {"resume": True}, None),
    ],
)
def test_the_engine_reads_what_a_block_supports_from_its_spec(
    probe_block, tiny_family, tmp_path, monkeypatch, declared, flags, message
):
    module = sys.modules["probe_block"]
    monkeypatch.setattr(module, "BLOCK", stages.BlockSpec(schema=ProbeBlock, make_stage=ProbeStage, **declared))
    if message is None:
        mergewise.merge(recipe(tiny_family("llama"), scale=2.0), tmp_path / "out", quiet=True, **flags)
        assert (tmp_path / "out" / "model.safetensors").is_file()
        return
    with pytest.raises(MergewiseError, match=message):
        mergewise.merge(recipe(tiny_family("llama"), scale=2.0), tmp_path / "out", quiet=True, **flags)
