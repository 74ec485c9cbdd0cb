"""`mergewise moe`: recipes checked as mergekit-moe checks them, every output architecture built,
loaded and run by transformers, gates from the layer-by-layer pass equal to the whole model's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergewise.checkpoint import RECORD_FILE
from mergewise.cli import main
from mergewise.errors import MergewiseError, RecipeWarning
from mergewise.layerwise import fast_half_matmuls
from mergewise.moe import MoEConfig, build_moe, load_moe_config, plan_moe
from mergewise.moe.gates import mean_difference_gate, pooled, prompt_batch
from mergewise.moe.outputs import select_output
from tests.support.tiny_models import read_state_dict

PROMPTS = {  # each expert's prompts share words that no other expert's have
    0: ["the cat and the dog", "a cat and a dog ran", "my cat and dog sat", "the cat and dog slept"],
    1: ["one two three", "count one two three four", "one two three five", "six one two three"],
    2: ["hello world again", "hello world my friend", "say hello world", "hello world, good day"],
}


def write_recipe(folder: Path, recipe: dict, name: str = "moe.yml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def recipe_for(family, *, experts: int = 2, gate_mode: str = "hidden", **extra) -> dict:
    return {
        "base_model": str(family.base),
        "gate_mode": gate_mode,
        "experts": [
            {"source_model": str(family.fine_tunes[index]), "positive_prompts": PROMPTS[index]}
            for index in range(experts)
        ],
        **extra,
    }


# ------------------------------------------------------------------------------ recipe checks
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"gate_mode": "hiddn"}, "gate_mode 'hiddn': expected one of"),
        ({"experts_per_token": 0}, "experts_per_token must be at least 1"),
        ({"experts_per_token": 3}, "2 experts, fewer than experts_per_token (3)"),
        (
            {"experts": [{"source_model": "x", "positive_prompts": ["a"]}], "experts_per_token": 1},
            "at least 2 experts, got 1",
        ),
        ({"experts": "one"}, "experts: Input should be a valid list"),
    ],
)
def test_recipe_rules_are_one_error_each(tmp_path, tiny_family, change, message):
    recipe = {**recipe_for(tiny_family("llama", noise=0.05)), **change}
    with pytest.raises(MergewiseError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_moe_config(write_recipe(tmp_path, recipe))


def test_prompt_rules(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    recipe = recipe_for(family)
    recipe["experts"][1].pop("positive_prompts")
    with pytest.raises(MergewiseError, match="expert 1 .* has no positive_prompts; gate_mode hidden"):
        load_moe_config(write_recipe(tmp_path, recipe))
    load_moe_config(write_recipe(tmp_path, {**recipe, "gate_mode": "random"}))  # random gates need none

    same = recipe_for(family)
    same["experts"][1]["positive_prompts"] = PROMPTS[0]
    with pytest.raises(MergewiseError, match="every expert has the same positive and negative prompts"):
        load_moe_config(write_recipe(tmp_path, same))
    same["experts"][1]["negative_prompts"] = ["hello"]
    load_moe_config(write_recipe(tmp_path, same))  # the negative prompts tell them apart

    single = recipe_for(family)
    single["experts"][1]["positive_prompts"] = ["only one"]
    with pytest.raises(MergewiseError, match="1 positive prompt.*gate_mode mediator needs at least 2"):
        load_moe_config(write_recipe(tmp_path, {**single, "gate_mode": "mediator"}))

    mixed = {
        **recipe_for(family),
        "shared_experts": [
            {"source_model": str(family.base), "positive_prompts": ["x"]},
            {"source_model": str(family.base)},
        ],
    }
    with pytest.raises(MergewiseError, match="give prompts to every shared expert or to none"):
        load_moe_config(write_recipe(tmp_path, mixed))


def test_identical_experts_need_the_explicit_flag(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    recipe = recipe_for(family)
    recipe["experts"][1]["source_model"] = recipe["experts"][0]["source_model"]
    path = write_recipe(tmp_path, recipe)
    with pytest.raises(MergewiseError, match="every expert is the same model .*--i-understand-this-is-not-useful"):
        load_moe_config(path)
    assert load_moe_config(path, allow_all_same=True).experts[1].source_model == recipe["experts"][0]["source_model"]


def test_keys_mergekit_moe_ignores_warn_or_fail_with_strict(tmp_path, tiny_family):
    recipe = {**recipe_for(tiny_family("llama", noise=0.05)), "name": "my-moe"}
    recipe["experts"][0]["weight"] = 1.0
    path = write_recipe(tmp_path, recipe)
    with pytest.warns(RecipeWarning) as caught:
        config = load_moe_config(path)
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "key 'name' is not a mergekit-moe key; it is ignored, as mergekit-moe ignores it",
        "expert 0: key 'weight' is not a mergekit-moe key; it is ignored",
    ]
    assert config.gate_mode == "hidden"
    with pytest.raises(MergewiseError, match="key 'name' is not a mergekit-moe key.*refused: --strict"):
        load_moe_config(path, strict=True)


@pytest.mark.parametrize(
    ("architecture", "types", "shared", "message"),
    [
        ("gpt", {"a": "llama"}, 0, "architecture 'gpt' matches no output architecture"),
        ("mixtral", {"a": "llama"}, 1, "Mixtral: Mixtral has no shared experts"),
        ("qwen3", {"a": "llama"}, 0, "Qwen3 MoE takes qwen3 models, these are llama"),
        ("qwen moe", {"a": "llama"}, 0, "Qwen MoE takes exactly one shared expert, the recipe has 0"),
        (
            "mixtral",
            {"a": "llama", "b": "mistral"},
            0,
            "every input model of one architecture \\(a is llama, b is mistral\\)",
        ),
        (None, {"a": "gemma"}, 0, "Mixtral: Mixtral takes llama or mistral models, these are gemma; DeepSeek MoE"),
    ],
)
def test_output_architecture_refusals_give_the_reason(architecture, types, shared, message):
    recipe = MoEConfig(
        base_model="a",
        experts=[{"source_model": "a", "positive_prompts": ["x"]}, {"source_model": "b", "positive_prompts": ["y"]}],
        architecture=architecture,
        shared_experts=[{"source_model": "a"}] * shared or None,
    )
    with pytest.raises(MergewiseError, match=message):
        select_output(recipe, types, "moe.yml")


def test_unnamed_architecture_prefers_mixtral_then_the_first_that_fits():
    make = MoEConfig
    experts = [{"source_model": "a"}, {"source_model": "b"}]
    assert select_output(make(base_model="a", experts=experts), {"a": "llama"}, "x").name == "Mixtral"
    assert select_output(make(base_model="a", experts=experts), {"a": "qwen3"}, "x").name == "Qwen3 MoE"
    with_shared = make(base_model="a", experts=experts, shared_experts=[{"source_model": "a"}])
    assert select_output(with_shared, {"a": "llama"}, "x").name == "DeepSeek MoE"
    # `qwen` is a prefix of both Qwen outputs, as in mergekit-moe: the first that fits is taken
    assert (
        select_output(make(base_model="a", experts=experts, architecture="qwen"), {"a": "qwen3"}, "x").name
        == "Qwen3 MoE"
    )


def test_an_expert_that_does_not_fit_the_base_is_named_before_anything_is_written(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    other = tiny_family("llama", intermediate_size=64)
    recipe = recipe_for(family)
    recipe["experts"][1]["source_model"] = str(other.fine_tunes[0])
    with pytest.raises(
        MergewiseError,
        match=r"model.layers.0.mlp.down_proj.weight has shape \[64, 64\], the base model's is \[64, 128\]",
    ):
        plan_moe(write_recipe(tmp_path, recipe))


# ------------------------------------------------------------------------------ builds
def _generate(folder: Path) -> str:
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("the cat", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4
    return tokenizer.decode(out[0])


@pytest.mark.parametrize(
    ("arch", "extra", "model_class"),
    [
        ("llama", {}, "MixtralForCausalLM"),
        ("mistral", {"architecture": "mixtral"}, "MixtralForCausalLM"),
        ("qwen3", {}, "Qwen3MoeForCausalLM"),
        ("llama", {"architecture": "qwen", "shared": True}, "Qwen2MoeForCausalLM"),
        ("qwen2", {"architecture": "qwen", "shared": True}, "Qwen2MoeForCausalLM"),
    ],
)
def test_each_output_loads_in_transformers_with_the_experts_weights(tmp_path, tiny_family, arch, extra, model_class):
    family = tiny_family(arch, noise=0.05)
    extra = dict(extra)
    recipe = recipe_for(family, experts=3 if not extra.get("shared") else 2)
    if extra.pop("shared", False):
        recipe["shared_experts"] = [{"source_model": str(family.fine_tunes[2]), "positive_prompts": PROMPTS[2]}]
    recipe.update(extra)
    plan = plan_moe(write_recipe(tmp_path, recipe))
    result = build_moe(plan, tmp_path / "out", quiet=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == model_class
    _generate(tmp_path / "out")

    # every expert of every layer is its fine-tune's MLP, as transformers holds it after loading
    params = dict(model.named_parameters())
    for layer in range(2):
        experts = model.model.layers[layer].mlp.experts
        for index, source in enumerate(plan.experts):
            tensors = read_state_dict(source.path)
            parts = {p: tensors[f"model.layers.{layer}.mlp.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
            assert torch.equal(experts.gate_up_proj[index], torch.cat([parts["gate_proj"], parts["up_proj"]]))
            assert torch.equal(experts.down_proj[index], parts["down_proj"])
        assert torch.equal(
            params[f"model.layers.{layer}.mlp.gate.weight"], result.gates[layer].routed.to(torch.bfloat16)
        )
    if recipe.get("shared_experts"):
        shared = read_state_dict(family.fine_tunes[2])
        assert torch.equal(
            model.model.layers[1].mlp.shared_expert.down_proj.weight, shared["model.layers.1.mlp.down_proj.weight"]
        )
        assert model.model.layers[0].mlp.shared_expert_gate.weight.shape == (1, 64)
    if arch == "llama" and recipe.get("architecture") == "qwen":  # Qwen2-MoE has q/k/v biases, Llama none
        assert not model.model.layers[0].self_attn.q_proj.bias.any()
    report = yaml.safe_load((tmp_path / "out" / RECORD_FILE).read_text())["moe"]
    assert report["architecture"] == plan.output.name and len(report["heldout_own_expert_share"]) == 2


def test_deepseek_output_is_written_for_its_own_model_code(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    recipe = {**recipe_for(family), "architecture": "deepseek", "shared_experts": [{"source_model": str(family.base)}]}
    build_moe(plan_moe(write_recipe(tmp_path, recipe)), tmp_path / "out", quiet=True)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["model_type"], config["n_routed_experts"], config["n_shared_experts"]) == ("deepseek", 2, 1)
    assert config["auto_map"]["AutoModelForCausalLM"].endswith("modeling_deepseek.DeepseekForCausalLM")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    ft1, base = read_state_dict(family.fine_tunes[1]), read_state_dict(family.base)
    assert torch.equal(tensors["model.layers.1.mlp.experts.1.up_proj.weight"], ft1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(
        tensors["model.layers.0.mlp.shared_experts.gate_proj.weight"], base["model.layers.0.mlp.gate_proj.weight"]
    )
    assert "model.layers.0.mlp.shared_expert_gate.weight" not in tensors


def test_streamed_gates_equal_the_whole_models(tmp_path, tiny_family):
    """The layer-by-layer pass gives the hidden states transformers' whole-model forward gives (with
    the same matmuls), so mergekit-moe's `hidden` and `hidden_avg` gates come out the same."""
    family = tiny_family("llama", noise=0.05, num_layers=3)
    model = AutoModelForCausalLM.from_pretrained(family.base, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(family.base)
    for mode in ("hidden", "hidden_avg"):
        recipe = recipe_for(family, gate_mode=mode)
        recipe["experts"][0]["negative_prompts"] = PROMPTS[2][:2]
        result = build_moe(plan_moe(write_recipe(tmp_path, recipe, f"{mode}.yml")), tmp_path / mode, quiet=True)
        for index, expert in enumerate(recipe["experts"]):
            states = {}
            for sign in ("positive", "negative"):
                if f"{sign}_prompts" in expert:
                    batch = prompt_batch(tokenizer, expert[f"{sign}_prompts"])
                    with torch.no_grad(), fast_half_matmuls(model, torch.device("cpu")):
                        output = model(batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
                    states[sign] = output.hidden_states[:-1]
            for layer in range(3):
                expected = mean_difference_gate(
                    pooled(states["positive"][layer], mode),
                    pooled(states["negative"][layer], mode) if "negative" in states else None,
                )
                torch.testing.assert_close(result.gates[layer].routed[index], expected, rtol=0, atol=1e-6)


def test_mediator_gates_route_held_out_prompts_and_carry_a_fitted_temperature(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    recipe = recipe_for(family, experts=3, gate_mode="mediator")
    result = build_moe(plan_moe(write_recipe(tmp_path, recipe)), tmp_path / "out", quiet=True)
    report = yaml.safe_load((tmp_path / "out" / RECORD_FILE).read_text())["moe"]
    assert report["gate_mode"] == "mediator" and all(t > 0 for t in report["temperatures"])
    # held out in turn, a prompt goes to the expert whose prompts share its words; mergekit's last-token
    # gates, scored the same way, route far fewer
    assert result.heldout_shares is not None and min(result.heldout_shares) >= 0.9
    hidden = build_moe(
        plan_moe(write_recipe(tmp_path, {**recipe, "gate_mode": "hidden"}, "h.yml")), tmp_path / "h", quiet=True
    )
    assert hidden.heldout_shares is not None and max(hidden.heldout_shares) <= 0.6


def test_noise_and_residual_scale_apply_to_the_experts_mlps_reproducibly(tmp_path, tiny_family):
    family = tiny_family("llama", noise=0.05)
    recipe = recipe_for(family)
    recipe["experts"][0].update(residual_scale=0.5)
    recipe["experts"][1].update(noise_scale=0.01)
    path = write_recipe(tmp_path, recipe)
    for name in ("a", "b"):
        build_moe(plan_moe(path), tmp_path / name, seed=3, quiet=True)
    a, b = (load_file(tmp_path / name / "model.safetensors") for name in ("a", "b"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    ft0, ft1 = read_state_dict(family.fine_tunes[0]), read_state_dict(family.fine_tunes[1])
    down = a["model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(down[0], ft0["model.layers.0.mlp.down_proj.weight"] * 0.5)
    noise = down[1].float() - ft1["model.layers.0.mlp.down_proj.weight"].float()
    assert 0.007 < noise.std().item() < 0.013
    build_moe(plan_moe(path), tmp_path / "c", seed=4, quiet=True)
    assert not torch.equal(
        load_file(tmp_path / "c" / "model.safetensors")["model.layers.0.mlp.experts.down_proj"], down
    )


def test_dry_run_lists_the_plan_and_reads_no_weight_data(tmp_path, tiny_family, monkeypatch, capsys):
    import mergewise.checkpoint.reader as reader

    def refuse(*args, **kwargs):
        raise AssertionError("weight data read during --dry-run")

    monkeypatch.setattr(reader, "read_rows", refuse)
    monkeypatch.setattr(reader, "map_rows", refuse)
    family = tiny_family("llama", noise=0.05)
    path = write_recipe(
        tmp_path,
        {
            **recipe_for(family, experts=3),
            "architecture": "qwen",
            "shared_experts": [{"source_model": str(family.base), "positive_prompts": ["x y"]}],
        },
    )
    assert main(["moe", str(path), str(tmp_path / "out"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "output architecture: Qwen MoE; 3 experts, 2 layers, hidden gates" in out
    assert "model.layers.1.mlp.experts.2.down_proj.weight [64, 128] bfloat16 <- down_proj of ft3" in out
    assert "model.layers.0.self_attn.q_proj.bias [64] bfloat16 <- zeros" in out
    assert "model.layers.0.mlp.shared_expert_gate.weight [1, 64] bfloat16 <- hidden gate" in out
    assert not (tmp_path / "out").exists()


def test_the_command_writes_the_model_and_reports_routing(tmp_path, tiny_family, capsys):
    family = tiny_family("llama", noise=0.05)
    path = write_recipe(tmp_path, recipe_for(family, experts=3))
    assert main(["moe", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert "Mixtral with 3 experts written to" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json",
        "generation_config.json",
        "mergewise.yml",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert main(["moe", str(path), str(tmp_path / "out"), "--quiet"]) == 2  # exists: --overwrite replaces it


def test_every_registered_output_architecture_builds(tmp_path, tiny_family):
    """Each output, from models of the first architecture it takes, with the shared expert it needs."""
    from mergewise.moe.outputs import OUTPUT_ARCHITECTURES

    for output in OUTPUT_ARCHITECTURES:
        family = tiny_family(output.inputs[0], noise=0.05)
        recipe = {**recipe_for(family), "architecture": output.name}
        for shared in (
            None,
            [{"source_model": str(family.base)}],
            [{"source_model": str(family.base), "positive_prompts": ["x y"]}],
        ):
            candidate = {**recipe, **({"shared_experts": shared} if shared else {})}
            if output.refuses_shared(MoEConfig.model_validate(candidate)) is None:
                break
        path = write_recipe(tmp_path, candidate, f"{output.inputs[0]}-{len(output.name)}.yml")
        plan = plan_moe(path)
        assert plan.output == output
        build_moe(plan, tmp_path / output.name.replace(" ", "-"), quiet=True)
        config = json.loads((tmp_path / output.name.replace(" ", "-") / "config.json").read_text())
        tensors = load_file(tmp_path / output.name.replace(" ", "-") / "model.safetensors")
        assert config["architectures"][0].endswith("ForCausalLM") and "model.layers.1.mlp.gate.weight" in tensors
        assert set(tensors) == {entry.tensor.name for entry in plan.tensors}
