"""The recipe (config.py) and the plan (plan.py) on their own: what a YAML file becomes before any
tensor data is read."""

from __future__ import annotations

import math

import pytest
import yaml

from mergewise.config import MergeConfig, load_recipe
from mergewise.errors import MergewiseError, RecipeWarning
from mergewise.plan import build_plan


def test_a_yaml_recipe_reads_relative_paths_from_its_folder_and_validates_its_blocks(tmp_path):
    path = tmp_path / "recipes" / "aim.yml"
    path.parent.mkdir()
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "ties",
                "base_model": "../base",
                "dtype": "bfloat16",
                "models": [{"model": "../ft1", "parameters": {"weight": 0.5, "density": 0.4}}],
                "aim": {"omega": 0.3, "stats": "stats.safetensors"},
            }
        )
    )
    recipe = load_recipe(path)
    assert recipe.config_dir == path.parent.resolve() and recipe.origin == str(path)
    assert list(recipe.blocks) == ["aim"] and recipe.blocks["aim"].omega == 0.3
    assert recipe.base_model == "../base"
    assert recipe.record()["aim"] == {
        "omega": 0.3,
        "exponent": 1.0,
        "allow_fingerprint_mismatch": False,
        "stats": "stats.safetensors",
    }
    assert load_recipe(recipe) is recipe
    assert load_recipe(recipe.config).blocks == {}


@pytest.mark.parametrize(
    "data,message",
    [
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "aim": {"omega": 2}},
            r"aim\.omega: .*less than or equal to 1",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "aim": {"omega": 0.4}},
            "exactly one of 'stats' or 'calibration'",
        ),
        ({"merge_method": "ties"}, "exactly one of 'models', 'slices' or 'modules'"),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "tokenizer_source": "union", "tokenizer": {}},
            "at most one of 'tokenizer_source' or 'tokenizer'",
        ),
        (
            {"merge_method": "ties", "models": [{"model": "a"}], "tokenizer": {"pad_to_multiple_of": 0}},
            r"tokenizer\.pad_to_multiple_of: .*greater than 0",
        ),
        (
            {
                "merge_method": "ties",
                "models": [{"model": "a"}],
                "tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "a"}}}},
            },
            "exactly one of 'token' or 'token_id'",
        ),
        (
            {"merge_method": "linear", "base_model": "b", "mediator": {"experts": [{"model": "a", "task": "x"}] * 2}},
            "task names must be unique",
        ),
    ],
)
def test_bad_recipes_fail_as_they_load_naming_the_key(data, message):
    with pytest.raises(MergewiseError, match=message):
        load_recipe(data)


def test_a_mediator_block_lists_the_models_and_keeps_its_base(tmp_path):
    experts = [{"model": f"./e{i}", "task": f"t{i}", "prompts": "p.txt"} for i in range(3)]
    recipe = load_recipe({"merge_method": "linear", "base_model": "./base", "mediator": {"experts": experts}})
    assert [entry.model for entry in recipe.config.models] == ["./e0", "./e1", "./e2"]
    assert recipe.config.base_model is None  # linear averages the experts alone
    assert recipe.base_model == "./base" == recipe.blocks["mediator"].base_model
    assert [entry.parameters["weight"] for entry in recipe.config.models] == pytest.approx([1 / 3] * 3)


def test_the_plan_resolves_gradients_filters_and_the_base(tiny_family):
    family = tiny_family("llama", num_layers=4)
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(family.base),
        models=[
            {"model": str(family.fine_tunes[0]), "parameters": {"weight": [0.0, 1.0]}},
            {
                "model": str(family.fine_tunes[1]),
                "parameters": {"weight": [{"filter": "mlp", "value": 0.25}, {"value": 0.75}]},
            },
        ],
    )
    plan = build_plan(config, family.base.parent)
    assert plan.base_model is not None and plan.base_model.path == family.base.resolve()
    jobs = {job.name: job for job in plan.jobs}
    assert set(jobs) == set(plan.base_model.tensors)
    for layer in range(4):
        weights = jobs[f"model.layers.{layer}.mlp.up_proj.weight"].per_model["weight"]
        assert weights == pytest.approx((layer / 3, 0.25))
        assert jobs[f"model.layers.{layer}.self_attn.q_proj.weight"].per_model["weight"][1] == 0.75
    assert all(job.base.model is plan.base_model for job in plan.jobs)


def test_the_plan_refuses_models_of_another_architecture(tiny_family):
    llama, qwen = tiny_family("llama"), tiny_family("qwen2")
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model=str(llama.base),
        models=[{"model": str(qwen.fine_tunes[0]), "parameters": {"weight": 1.0}}],
    )
    with pytest.raises(MergewiseError, match="is a qwen2 model but the base .* is a llama model"):
        build_plan(config, llama.base.parent)


def test_keys_mergekit_ignores_are_named_kept_out_of_the_record_and_refused_under_strict():
    data = {
        "merge_method": "ties",
        "name": "stage-1",
        "normalize": True,
        "base_model": "b",
        "models": [
            {"model": "org/a", "revision": "v2", "parameters": {"weight": 1.0}},
            {"model": "c", "parameters": {"weight": [{"filter": "mlp", "value": 1, "pattern": "x"}]}},
        ],
    }
    with pytest.warns(RecipeWarning) as warned:
        recipe = load_recipe(data, origin="r.yml")
    assert [str(warning.message) for warning in warned] == [
        "r.yml: name: unknown key, ignored, as mergekit ignores it (it names one stage of a multi-stage recipe)",
        "r.yml: normalize: a parameter of ties written at the top level is ignored, as mergekit ignores it; put it "
        "under parameters: to apply it",
        "r.yml: models[0].revision: read as the model's revision (org/a@v2); mergekit ignores it and reads the "
        "model's default revision",
        "r.yml: models[1].parameters.weight[0].pattern: unknown key, ignored, as mergekit ignores it",
    ]
    assert recipe.config.models[0].model == "org/a@v2"
    assert recipe.record() == {
        "merge_method": "ties",
        "base_model": "b",
        "models": [
            {"model": "org/a@v2", "parameters": {"weight": 1.0}},
            {"model": "c", "parameters": {"weight": [{"filter": "mlp", "value": 1}]}},
        ],
    }
    with pytest.raises(MergewiseError, match=r"r\.yml: name: unknown key.*\(refused: --strict\)"):
        load_recipe(data, origin="r.yml", strict=True)


def test_a_near_miss_names_the_key_it_resembles():
    with pytest.warns(RecipeWarning, match=r"tokenizer_sourc: unknown key.*did you mean tokenizer_source\?"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "tokenizer_sourc": "base"})
    with pytest.warns(RecipeWarning, match=r"mediatr: unknown key.*did you mean mediator\?"):
        load_recipe({"merge_method": "linear", "models": [{"model": "a"}], "mediatr": {}})


def test_one_folder_however_the_recipe_spells_it(tiny_family):
    """`./base`, `base` and `base@main` are one input, so a slice of the base and a fine-tune has a
    base even when one source names a revision."""
    family = tiny_family("llama", num_layers=4)
    config = MergeConfig(
        merge_method="slerp",
        base_model="base",
        parameters={"t": 0.5},
        slices=[
            {"sources": [{"model": "./base@main", "layer_range": [0, 4]}, {"model": "ft1", "layer_range": [0, 4]}]}
        ],
    )
    with pytest.warns(RecipeWarning, match="base is a local folder; its revision 'main' is ignored"):
        plan = build_plan(config, family.base.parent)
    assert len(plan.models) == 2
    assert all(job.base.model is plan.base_model and len(job.inputs) == 1 for job in plan.jobs)


def test_a_slice_of_the_base_alone_copies_the_base_and_the_head_follows_mergekit(tiny_family):
    family = tiny_family("llama", num_layers=4)
    config = MergeConfig(
        merge_method="task_arithmetic",
        base_model="base",
        slices=[
            {"sources": [{"model": "base", "layer_range": [0, 2]}]},
            {
                "sources": [
                    {"model": "base", "layer_range": [2, 4]},
                    {"model": "ft1", "layer_range": [2, 4], "parameters": {"weight": 0.5}},
                ]
            },
        ],
    )
    with pytest.warns(RecipeWarning) as warned:
        plan = build_plan(config, family.base.parent)
    messages = {str(warning.message) for warning in warned}
    assert any("slices[0]: merge_method task_arithmetic gets only the base model here" in m for m in messages)
    jobs = {job.name: job for job in plan.jobs}
    assert jobs["model.layers.0.mlp.up_proj.weight"].inputs == []
    assert len(jobs["model.layers.3.mlp.up_proj.weight"].inputs) == 1
    # The head and final norm: the last slice's first source only (the first slice has one), the base.
    assert jobs["lm_head.weight"].inputs == [] and jobs["model.norm.weight"].inputs == []
    with pytest.raises(MergewiseError, match=r"slices\[0\]: .*only the base.*refused: --strict"):
        build_plan(config, family.base.parent, strict=True)


def test_the_peak_memory_estimate_is_the_method_s_working_memory_for_the_largest_tensor(tiny_family):
    """Whole-tensor selections hold scratch sized by the largest tensor; a plain weighted sum does not."""
    from mergewise.methods.registry import get_method

    family = tiny_family("llama")
    models = [{"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}} for path in family.fine_tunes[:2]]
    estimates = {}
    for method in ("task_arithmetic", "ties"):
        plan = build_plan(
            MergeConfig(merge_method=method, base_model=str(family.base), models=models), family.base.parent
        )
        largest = max(math.prod(job.shape) for job in plan.jobs)
        declared = get_method(method).working_memory
        assert plan.working_memory() == round(declared.fixed_mib * 2**20 + declared.per_entry * largest)
        estimates[method] = plan.working_memory()
        for model in plan.models:
            model.close()
    assert estimates["ties"] > estimates["task_arithmetic"]


def test_every_method_declares_its_working_memory():
    from mergewise.methods.registry import METHODS

    for name, method in METHODS.items():
        memory = method.working_memory
        assert memory.fixed_mib > 0 and memory.per_entry >= 0, name
        assert memory.bytes(10**8) >= memory.bytes(10**6), name
