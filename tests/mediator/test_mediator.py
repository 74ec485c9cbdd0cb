"""Mediator end to end on tiny models: build, the stored experts, the routed runtime (in-place
switching), export, eval and the CLI, and the recipe and folder errors. (Codes and allocation:
test_mediator_codes; router maths: test_mediator_router; conflict maths: test_mediator_analysis.)"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergewise
from mergewise.checkpoint import StreamingShardWriter
from mergewise.cli import main
from mergewise.errors import MergewiseError
from mergewise.mediator.build import build
from mergewise.mediator.codes import get_code, matrix_shape
from mergewise.mediator.runtime import load
from tests.support.processes import run_measured
from tests.support.tiny_mediator import (
    HELD_BACK_WORDS,
    TASK_WORDS,
    build_mediator_family,
    build_tiny_mediator,
    mediator_recipe,
    prompts_for,
)
from tests.support.tiny_models import build_tiny_model, read_state_dict


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return build_mediator_family(tmp_path_factory.mktemp("mediator-family"))


def built_mediator(family, tmp_path_factory, **mediator) -> Path:
    out = tmp_path_factory.mktemp("mediator-out") / "model"
    build_tiny_mediator(family, out, **mediator)
    return out


@pytest.fixture(scope="module")
def mediator_dir(family, tmp_path_factory):
    """The default build: `code: auto` within a budget of 1.5."""
    return built_mediator(family, tmp_path_factory)


@pytest.fixture(scope="module")
def sparse_mediator_dir(family, tmp_path_factory):
    return built_mediator(family, tmp_path_factory, memory_budget=2.0, code="sparse", density=0.25)


def data_bytes(path: Path) -> dict[str, int]:
    """Each stored tensor's bytes, from the safetensors header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return {
        name: entry["data_offsets"][1] - entry["data_offsets"][0]
        for name, entry in header.items()
        if name != "__metadata__"
    }


# ------------------------------------------------------------------------------------------- build
def test_build_writes_dense_model_coded_experts_and_router(mediator_dir, family):
    manifest = json.loads((mediator_dir / "mediator" / "mediator.json").read_text())
    assert manifest["format"] == 2 and manifest["tasks"] == list(TASK_WORDS) and manifest["code"] == "auto"
    assert manifest["routed_units"], "a 1.5x budget must route some units"
    assert manifest["memory"]["ratio"] <= 1.5
    assert manifest["router_fit"]["heldout_accuracy"] >= 0.9 and manifest["router_fit"]["distinguishes_tasks"]
    stored = data_bytes(mediator_dir / "mediator" / "experts.safetensors")
    dense = load_file(mediator_dir / "model.safetensors")
    accounted = 0
    for name, spec in manifest["routed_tensors"].items():
        code = get_code(spec["code"])
        assert (spec["code"] == "full") == (dense[name].dim() == 1)
        layout = code.layout(*matrix_shape(tuple(dense[name].shape)), dense[name].dtype, spec["level"])
        for task in TASK_WORDS:
            for suffix, part in layout.items():
                assert stored[f"{task}/{name}.{suffix}"] == part.nbytes
                accounted += part.nbytes
    assert sum(stored.values()) == accounted  # the stored bytes are exactly what the budget counted
    routed_units = [unit for unit in manifest["units"] if unit["routed"]]
    assert {unit["unit"] for unit in routed_units} == set(manifest["routed_units"])
    for unit in routed_units:
        assert all(0 < share <= 1.0 for share in unit["retained"].values())
        assert all(0 < share <= 1.0 for share in unit["estimated"].values())
    # the folder is a plain model too: the dense average of the experts
    _, built = family
    experts = [read_state_dict(path) for path in built.fine_tunes]
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(
        read_state_dict(mediator_dir)[name], sum(expert[name] for expert in experts) / 3, rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("budget", [1.1, 1.3, 2.5])
def test_auto_code_stays_within_the_budget(family, tmp_path, budget):
    root, built = family
    summary = build(mediator_recipe(root, built, memory_budget=budget), tmp_path / "auto", quiet=True)
    assert summary.ratio <= budget and summary.routed_units
    manifest = json.loads((tmp_path / "auto" / "mediator" / "mediator.json").read_text())
    assert manifest["memory"]["stored_bytes"] <= budget * manifest["memory"]["dense_bytes"]


def test_the_dense_average_kept_share_matches_the_estimate(mediator_dir):
    """With a linear D the analysis' proxy residual is the real one: estimate and build agree."""
    manifest = json.loads((mediator_dir / "mediator" / "mediator.json").read_text())
    for unit in (unit for unit in manifest["units"] if unit["routed"]):
        for task, share in unit["retained"].items():
            assert share == pytest.approx(unit["estimated"][task], abs=0.02)


def test_sparse_at_density_one_exports_each_expert_exactly(family, tmp_path):
    root, built = family
    out = tmp_path / "full"
    build(mediator_recipe(root, built, route_threshold=0.0, code="sparse", density=1.0), out, quiet=True)
    manifest = json.loads((out / "mediator" / "mediator.json").read_text())
    assert len(manifest["routed_units"]) == len(manifest["units"])
    for path, task in zip(built.fine_tunes, TASK_WORDS):
        assert main(["mediator", "export", str(out), str(tmp_path / task), "--task", task, "--quiet"]) == 0
        exported, expert = read_state_dict(tmp_path / task), read_state_dict(path)
        for name, tensor in expert.items():  # float32: θ − D and D + r each round once
            torch.testing.assert_close(exported[name], tensor, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- runtime
def test_routes_in_distribution_prompts_to_their_expert(mediator_dir):
    model = load(mediator_dir)
    prompts = {task: prompts_for(words, 20, 100 + index) for index, (task, words) in enumerate(TASK_WORDS.items())}
    for task, texts in prompts.items():
        routes = model.route_texts(texts)
        top = [max(route.probs, key=route.probs.get) for route in routes]
        assert sum(choice == task for choice in top) >= 19
        assert all(abs(sum(route.probs.values()) - 1) < 1e-5 for route in routes)


def test_mixed_batch_is_routed_per_sequence_like_the_exported_experts(mediator_dir, tmp_path):
    model = load(mediator_dir)
    prompts = []
    for index, (task, words) in enumerate(TASK_WORDS.items()):  # one prompt the router selects per task
        candidates = prompts_for(words, 10, 7 + index)
        routes = model.route_texts(candidates)
        prompts.append(
            next(text for text, route in zip(candidates, routes) if route.decision == "select" and route.task == task)
        )
    prompts.append(prompts[0][::-1])  # reversed words: whatever route it gets, it runs in the same batch
    results = model.generate_text(prompts, max_new_tokens=6)
    for prompt, (text, route) in zip(prompts, results):
        assert route is not None and route.decision in ("select", "blend", "dense")
        if route.decision != "select":
            continue
        exported = tmp_path / route.task
        if not exported.exists():
            assert main(["mediator", "export", str(mediator_dir), str(exported), "--task", route.task, "--quiet"]) == 0
        [(alone, plain_route)] = load(exported).generate_text([prompt], max_new_tokens=6)
        assert plain_route is None and alone == text
    assert {route.task for _, route in results if route.decision == "select"} == set(TASK_WORDS)


@pytest.mark.parametrize("folder", ["mediator_dir", "sparse_mediator_dir"])
def test_random_route_switches_leave_the_dense_weights_bit_identical(folder, request):
    """Every switch writes D + Σ w_t decode(r_t) in the same memory, through the fused CPU kernels or
    torch's operations alike; a sparse select touches only its entries and puts D's back; D returns
    bit for bit."""
    model = load(request.getfixturevalue(folder))
    routed = {name: dict(model.model.named_parameters())[name] for name in model.experts.tensors}
    dense = {name: parameter.detach().clone() for name, parameter in routed.items()}
    pointers = {name: parameter.data_ptr() for name, parameter in routed.items()}
    rng = random.Random(0)
    for _ in range(100):
        weights = [rng.random() for _ in TASK_WORDS]
        mix = rng.choice([{}, {rng.choice(list(TASK_WORDS)): 1.0}, dict(zip(TASK_WORDS, weights))])
        model.fused_switches = rng.random() < 0.5  # the CPU kernels and torch's operations, in any order
        model.use_weights(mix)
        for name, parameter in routed.items():  # D + Σ w_t decode(r_t), rounded once, in the same memory
            expected = dense[name].reshape(model._routed[name].shape).float()
            for task, weight in mix.items():
                expected = expected + weight * model.experts.decode(task, name, slice(None), torch.device("cpu"))
            assert torch.equal(parameter.detach(), expected.to(dense[name].dtype).reshape(dense[name].shape))
            assert parameter.data_ptr() == pointers[name]
    model.use_weights({})
    assert all(torch.equal(routed[name].detach(), dense[name]) for name in routed)


def test_experts_left_on_disk_decode_as_those_held_in_memory(mediator_dir):
    """The default `offload="disk"` keeps no expert tensor in the process, and switches to the same
    weights as experts held in memory."""
    from mergewise.checkpoint import TensorInfo

    on_disk, in_memory = load(mediator_dir), load(mediator_dir, offload="cpu")
    assert all(isinstance(part, TensorInfo) for parts in on_disk.experts.stored.values() for part in parts.values())
    assert all(isinstance(part, torch.Tensor) for parts in in_memory.experts.stored.values() for part in parts.values())
    mix = {"merging": 0.25, "numbers": 0.75}
    for model in (on_disk, in_memory):
        model.use_weights(mix)
    first, second = dict(on_disk.model.named_parameters()), dict(in_memory.model.named_parameters())
    assert all(torch.equal(first[name], second[name]) for name in on_disk.experts.tensors)


def test_a_route_keeps_its_expert_until_a_route_needs_other_weights(mediator_dir, monkeypatch):
    """The same expert again switches nothing: routing sees D without writing it back."""
    model = load(mediator_dir)
    name = model.experts.tensors[0]
    parameter = dict(model.model.named_parameters())[name]
    dense = parameter.detach().clone()
    prompt = prompts_for(TASK_WORDS["numbers"], 1, 3)[0]
    [route] = model.route_texts([prompt])
    assert route.decision == "select"
    with model.weights_for(route):
        selected = parameter.detach().clone()
    assert not torch.equal(selected, dense) and torch.equal(parameter.detach(), selected)
    switches = []
    monkeypatch.setattr(model, "_apply", lambda mix: switches.append(mix))
    [again] = model.route_texts([prompt])
    with model.weights_for(again):
        pass
    assert again == route and not switches and torch.equal(parameter.detach(), selected)
    monkeypatch.undo()
    model.use_weights({})
    assert torch.equal(parameter.detach(), dense)


@pytest.mark.parametrize("folder", ["mediator_dir", "sparse_mediator_dir"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_routing_with_an_expert_in_place_sees_the_dense_model(folder, dtype, request):
    """With any weights in the routed tensors, the routing prefill gets D's values, bit for bit (an
    embedding's rows too), and leaves those weights as they were."""
    model = load(request.getfixturevalue(folder), dtype=dtype)
    embedding_routed = any(isinstance(module, torch.nn.Embedding) for module, _ in model._dense_blocks)
    layers = list(model.model.base_model.layers)  # a decoder layer's routed tensors are swapped in together
    assert all(
        any(module is layer for layer in layers) == (".layers." in names[0]) for module, names in model._dense_blocks
    )
    assert embedding_routed == (folder == "mediator_dir")
    assert model.model.get_input_embeddings().padding_idx is not None  # renumbered ids never reach it
    ids = model.encode(
        [text for words in TASK_WORDS.values() for text in prompts_for(words, 4, 5)]
        + prompts_for(HELD_BACK_WORDS, 3, 6)
    )
    layers = model.router.settings.hidden_states(model.model.config.num_hidden_layers)
    dense_features, dense_routes = model.features(ids, layers), model.routes(ids)

    def hooks():
        return [(len(module._forward_hooks), len(module._forward_pre_hooks)) for module in model.model.modules()]

    before = hooks()
    for mix in ({"numbers": 1.0}, {"merging": 0.3, "numbers": 0.7}):
        model.use_weights(mix)
        held = {name: parameter.detach().clone() for name, parameter in model._parameters.items()}
        assert not torch.equal(model.features(ids, layers), dense_features)
        with model._dense_forward():
            assert torch.equal(model.features(ids, layers), dense_features)
        assert model.routes(ids) == dense_routes
        assert all(torch.equal(model._parameters[name].detach(), held[name]) for name in held)
        assert hooks() == before


def test_a_switch_cut_short_puts_the_dense_model_back(mediator_dir, monkeypatch):
    model = load(mediator_dir)
    dense = {name: parameter.detach().clone() for name, parameter in model._parameters.items()}
    model.use_weights({"merging": 1.0})
    decoded, calls = model.experts.expert_rows, []

    def failing(*args):
        calls.append(args[0])
        if len(calls) == 3:
            raise MergewiseError("experts file changed")
        return decoded(*args)

    monkeypatch.setattr(model.experts, "expert_rows", failing)
    monkeypatch.setattr(model, "fused_switches", False)
    with pytest.raises(MergewiseError, match="experts file changed"):
        model.use_weights({"merging": 0.5, "numbers": 0.5})
    assert model._mix == {}
    assert all(torch.equal(model._parameters[name].detach(), dense[name]) for name in dense)


def test_a_folder_of_the_first_format_names_its_version(mediator_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "old"))
    manifest_path = folder / "mediator" / "mediator.json"
    manifest = json.loads(manifest_path.read_text())
    manifest.update(format=1, mergewise_version="0.1.0")
    manifest_path.write_text(json.dumps(manifest))
    error = cli_error(capsys, "generate", str(folder), "--prompt", "one two")
    assert "Mediator format 1 (built by mergewise 0.1.0)" in error and "reads format 2" in error


@pytest.mark.parametrize(
    "dtype,native",
    [(None, False), (torch.bfloat16, False), (torch.bfloat16, True)],
    ids=["stored", "bf16-float32-matmuls", "bf16-native-matmuls"],
)
@pytest.mark.parametrize("layer", [-1, 1, [2, 1]])
def test_the_builds_layer_streamed_features_are_the_runtimes(mediator_dir, layer, dtype, native, monkeypatch):
    """The router is fitted on features from a layer-by-layer pass; routing computes them with the
    whole model in memory: the two are the same numbers, in half precision on either kind of CPU."""
    from mergewise import layerwise

    monkeypatch.setattr(layerwise, "native_half_matmuls", lambda half: native)
    model = load(mediator_dir, dtype=dtype)
    ids = model.encode([text for words in TASK_WORDS.values() for text in prompts_for(words, 5, 9)])
    streamed = layerwise.pooled_hidden_states(
        mediator_dir, ids, layer, dtype=dtype, pad_id=model.tokenizer.pad_token_id, max_tokens=6
    )
    assert torch.equal(streamed, model.features(ids, layer, max_tokens=6))


def test_plain_folder_generates_without_route(family):
    _, built = family
    [(text, route)] = load(built.base).generate_text(["model merging"], max_new_tokens=3)
    assert route is None and isinstance(text, str)


def test_generate_cli_prints_route_json(mediator_dir, capsys):
    prompt = prompts_for(TASK_WORDS["animals"], 1, 11)[0]
    assert main(["generate", str(mediator_dir), "--prompt", prompt, "--max-new-tokens", "3", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert set(record) == {"text", "route"}
    assert record["route"]["decision"] in ("select", "blend", "dense")
    assert set(record["route"]["probs"]) == set(TASK_WORDS)


def test_eval_reports_routing_for_mediator_folders(mediator_dir, tmp_path, capsys):
    zoo = tmp_path / "zoo"
    (zoo / "general").mkdir(parents=True)
    (zoo / "general" / "eval.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    tasks = {}
    for index, (task, words) in enumerate({**TASK_WORDS, "held": HELD_BACK_WORDS}.items()):
        folder = zoo / "tasks" / task
        folder.mkdir(parents=True)
        records = [{"prompt": prompt, "answer": " one"} for prompt in prompts_for(words, 12, 50 + index)]
        (folder / "eval.jsonl").write_text("\n".join(json.dumps(record) for record in records) + "\n")
        (folder / "calib.txt").write_text("\n".join(prompts_for(words, 16, 80 + index)) + "\n")
        tasks[task] = {
            "expert": None,
            "calibration": f"tasks/{task}/calib.txt",
            "eval": f"tasks/{task}/eval.jsonl",
            "metric": "exact_match",
        }
    (zoo / "zoo.json").write_text(
        json.dumps(
            {"size": "test", "base": "base", "tasks": tasks, "general": {"eval": "general/eval.txt", "metric": "nll"}}
        )
    )
    out = tmp_path / "results.json"
    assert main(["eval", str(mediator_dir), "--zoo", str(zoo), "--out", str(out), "--batch-size", "5"]) == 0
    results = json.loads(out.read_text())
    assert set(results["routing"]) == {*TASK_WORDS, "held"}
    model = load(mediator_dir)
    for index, task in enumerate(TASK_WORDS):  # the summary is what the router decides for those prompts
        routes = model.route_texts(prompts_for(TASK_WORDS[task], 12, 50 + index))
        top = [max(route.probs, key=route.probs.get) for route in routes]
        assert results["routing"][task]["correct"] == round(top.count(task) / 12, 4) >= 0.75
        assert results["routing"][task]["select"] == round(sum(r.decision == "select" for r in routes) / 12, 4)
        own = sum(r.decision == "select" and r.task == task for r in routes)
        assert results["routing"][task]["own_selected"] == round(own / 12, 4)
    held = results["routing"]["held"]
    assert "correct" not in held and "own_selected" not in held and sum(held.values()) == pytest.approx(1.0)
    # the build's own estimate, from its held-out calibration prompts, beside the measured shares
    fit = json.loads((mediator_dir / "mediator" / "mediator.json").read_text())["router_fit"]
    assert 0 <= fit["heldout_flagged"] <= 1 and 0 <= fit["heldout_own_selected"] <= 1 - fit["heldout_flagged"] + 1e-9
    assert results["routing_estimate"] == {key: fit[key] for key in ("heldout_own_selected", "heldout_flagged")}
    table = capsys.readouterr().out
    assert "own selected" in table and f"{fit['heldout_own_selected']:.3f}" in table.split("build's estimate")[1]


# ------------------------------------------------------------------------------------------ errors
def cli_error(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    return capsys.readouterr().err


def test_budget_too_small_to_route_anything(family, tmp_path, capsys):
    root, built = family
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(mediator_recipe(root, built, memory_budget=1.01)))
    error = cli_error(capsys, "mediator", "build", str(config), str(tmp_path / "out"), "--quiet")
    assert "memory_budget 1.01 is too small to route any unit with any code" in error
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["mediator.yml"]
    smallest = float(error.rsplit("the smallest budget that routes one is ", 1)[1].split()[0])
    summary = build(mediator_recipe(root, built, memory_budget=smallest), tmp_path / "smallest", quiet=True)
    assert len(summary.routed_units) == 1 and summary.ratio <= smallest


def test_task_without_prompts(family, tmp_path, capsys):
    root, built = family
    data = mediator_recipe(root, built)
    del data["mediator"]["experts"][1]["prompts"]
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    assert "task 'animals' has no prompts" in cli_error(capsys, "mediator", "build", str(config), str(tmp_path / "o"))


def test_task_with_too_few_prompts(family, tmp_path, capsys):
    root, built = family
    data = mediator_recipe(root, built)
    few = tmp_path / "few.txt"
    few.write_text("one two\nthree four\n")
    data["mediator"]["experts"][2]["prompts"] = str(few)
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    assert "has 2 calibration prompts" in cli_error(capsys, "mediator", "build", str(config), str(tmp_path / "o"))


def test_expert_of_another_architecture(family, tmp_path, capsys):
    root, built = family
    other = build_tiny_model("qwen2", tmp_path / "qwen", dtype=torch.float32)
    data = mediator_recipe(root, built)
    data["mediator"]["experts"][0]["model"] = str(other)
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    error = cli_error(capsys, "mediator", "build", str(config), str(tmp_path / "o"))
    assert "is a qwen2 model" in error and "must share one architecture" in error


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda data: data["mediator"].update(memory_budget=1.5, route_threshold=0.2), "not both"),
        (lambda data: data["mediator"].update(experts=data["mediator"]["experts"][:1]), "at least 2"),
        (lambda data: data["mediator"]["experts"][1].update(task="merging"), "task names must be unique"),
        (lambda data: data["mediator"].update(densty=0.1), "mediator.densty: unknown key"),
        (lambda data: data.update(models=[]), "lists its models under mediator.experts"),
        (lambda data: data.pop("base_model"), "base_model: required"),
    ],
)
def test_recipe_errors(family, tmp_path, capsys, change, message):
    root, built = family
    data = mediator_recipe(root, built)
    change(data)
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    assert message in cli_error(capsys, "mediator", "build", str(config), str(tmp_path / "o"))


def test_export_refuses_unknown_task(mediator_dir, tmp_path, capsys):
    error = cli_error(capsys, "mediator", "export", str(mediator_dir), str(tmp_path / "x"), "--task", "poetry")
    assert "--task poetry: not an expert" in error and not (tmp_path / "x").exists()


def test_mediator_folder_errors_are_named(mediator_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in mediator_dir.rglob("*"):
        target = broken / path.relative_to(mediator_dir)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.name != "router.safetensors":
            target.write_bytes(path.read_bytes())
    with pytest.raises(MergewiseError, match="router.safetensors: cannot read the router"):
        load(broken)


def test_an_aim_block_relaxes_the_dense_model_of_a_mediator_build(family, tmp_path):
    """The aim: stage runs before the Mediator stage: D is the relaxed merge, bit for bit as merging
    then `mergewise aim`, and the experts' residuals are taken against it."""
    from mergewise.aim import AimSettings, CalibrationSettings, calibrate, relax_folder

    root, built = family
    stats = calibrate(built.base, tmp_path / "stats.safetensors", CalibrationSettings(samples=2, seq_len=8), quiet=True)
    data = mediator_recipe(root, built, memory_budget=2.0) | {"aim": {"omega": 0.5, "stats": str(stats)}}
    summary = build(data, tmp_path / "mediator", quiet=True, seed=0)
    plain = {key: value for key, value in data.items() if key not in ("mediator", "aim")}
    plain["models"] = [
        {"model": expert["model"], "parameters": {"weight": 1 / 3}} for expert in data["mediator"]["experts"]
    ]
    plain.pop("base_model")
    mergewise.merge(plain, tmp_path / "merged", quiet=True, seed=0)
    relax_folder(built.base, tmp_path / "merged", stats, tmp_path / "relaxed", AimSettings(omega=0.5), quiet=True)

    dense, relaxed = read_state_dict(summary.out_dir), read_state_dict(tmp_path / "relaxed")
    assert dense.keys() == relaxed.keys()
    assert all(torch.equal(dense[name], relaxed[name]) for name in dense)
    assert not all(torch.equal(dense[name], read_state_dict(tmp_path / "merged")[name]) for name in dense)
    assert yaml.safe_load((summary.out_dir / "mergewise.yml").read_text())["aim"]["omega"] == 0.5


def tampered_copy(mediator_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of the built Mediator folder whose experts file went through `change(tensors)`."""
    from safetensors.torch import load_file, save_file

    folder = Path(shutil.copytree(mediator_dir, tmp_path / "tampered"))
    experts = folder / "mediator" / "experts.safetensors"
    tensors = load_file(experts)
    change(tensors)
    save_file(tensors, experts)
    return folder


def first_expert_tensor(tensors: dict, suffix: str) -> str:
    return next(name for name in sorted(tensors) if name.startswith("merging/") and name.endswith(suffix))


@pytest.mark.parametrize(
    "tamper, message",
    [
        ("index past the end", "indices must be ascending column positions"),
        ("negative index", "indices must be ascending column positions"),
        ("one value short", ".values must be"),
        ("nan value", ".values holds NaN"),
        ("part missing", ".indices is missing"),
    ],
)
def test_a_tampered_mediator_folder_is_one_clear_error(tamper, message, sparse_mediator_dir, tmp_path, capsys):
    def change(tensors):
        name = first_expert_tensor(tensors, ".indices")
        values = name.removesuffix(".indices") + ".values"
        if tamper == "index past the end":
            tensors[name] = tensors[name].clone()
            tensors[name][0, -1] = 30000
        elif tamper == "negative index":
            tensors[name] = tensors[name].clone()
            tensors[name][0, 0] = -1
        elif tamper == "one value short":
            tensors[values] = tensors[values][:, :-1].clone()
        elif tamper == "part missing":
            del tensors[name]
        else:
            tensors[values] = tensors[values].clone()
            tensors[values][0, 0] = float("nan")

    folder = tampered_copy(sparse_mediator_dir, tmp_path, change)
    for command in (
        ["generate", str(folder), "--prompt", "one two three"],
        ["mediator", "export", str(folder), str(tmp_path / "out"), "--task", "merging"],
    ):
        error = cli_error(capsys, *command)
        assert message in error and "experts.safetensors" in error
    assert not (tmp_path / "out").exists()


def test_a_truncated_experts_file_is_one_clear_error(mediator_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "truncated"))
    experts = folder / "mediator" / "experts.safetensors"
    experts.write_bytes(experts.read_bytes()[:-100])
    error = cli_error(capsys, "generate", str(folder), "--prompt", "one two three")
    [line] = [line for line in error.splitlines() if line.startswith("error:")]
    assert "experts.safetensors: corrupt safetensors file" in line and "truncated" in line


def test_an_unknown_code_in_the_manifest_is_named(mediator_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "unknown-code"))
    manifest_path = folder / "mediator" / "mediator.json"
    manifest = json.loads(manifest_path.read_text())
    name = next(iter(manifest["routed_tensors"]))
    manifest["routed_tensors"][name]["code"] = "int3"
    manifest_path.write_text(json.dumps(manifest))
    error = cli_error(capsys, "generate", str(folder), "--prompt", "one two")
    assert f"routed tensor {name}: unknown residual code 'int3'" in error


def test_a_router_of_other_tasks_is_refused(mediator_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "other-tasks"))
    manifest_path = folder / "mediator" / "mediator.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["router"]["tasks"] = list(reversed(manifest["router"]["tasks"]))
    manifest_path.write_text(json.dumps(manifest))
    assert "are not the manifest's" in cli_error(capsys, "generate", str(folder), "--prompt", "one two")


@pytest.mark.parametrize("code", ["sign2", "lowrank", "lowrank4"])
def test_experts_built_in_row_chunks_equal_those_built_whole(family, tmp_path, code):
    """Both sides of the row-chunk switch: small chunks (4 rows of a 128-wide tensor) give the same experts
    file and kept shares as chunks holding whole tensors."""
    root, built = family
    data = mediator_recipe(root, built, memory_budget=1.6, code=code)
    build(data, tmp_path / "whole", quiet=True, seed=0)
    build(data, tmp_path / "chunked", quiet=True, seed=0, chunk_elements=512)
    whole, chunked = (load_file(tmp_path / name / "mediator" / "experts.safetensors") for name in ("whole", "chunked"))
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[name], chunked[name]) for name in whole)
    manifests = [
        json.loads((tmp_path / name / "mediator" / "mediator.json").read_text()) for name in ("whole", "chunked")
    ]
    for first, second in zip(*(manifest["units"] for manifest in manifests)):
        if first["routed"]:
            assert first["retained"] == pytest.approx(second["retained"], abs=1e-5)


@pytest.mark.parametrize("name", ["experts.safetensors", "router.safetensors", "mediator.json"])
def test_a_mediator_file_linked_from_outside_the_folder_is_refused(mediator_dir, tmp_path, capsys, name):
    """A downloaded folder is untrusted: a symlink in mediator/ must not make mergewise read elsewhere."""
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "linked"))
    outside = tmp_path / f"outside-{name}"
    shutil.move(folder / "mediator" / name, outside)
    (folder / "mediator" / name).symlink_to(outside)
    error = cli_error(capsys, "generate", str(folder), "--prompt", "one two")
    assert f"mediator/{name}" in error and "outside the model folder" in error


# ------------------------------------------------------------------------ what a downloaded folder may hold
def one_error_line(capsys, *argv: str) -> str:
    """The command's single `error:` line (transformers' loading progress may come before it)."""
    status = main(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and [line for line in lines if line.startswith("error: ")] == lines[-1:], lines
    return lines[-1]


def with_manifest(mediator_dir: Path, tmp_path: Path, content: bytes) -> Path:
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "downloaded"))
    (folder / "mediator" / "mediator.json").write_bytes(content)
    return folder


@pytest.mark.parametrize(
    "content, named",
    [
        (b"[" * 20_000 + b"]" * 20_000, "nested more than 64 levels deep"),
        (bytes(range(256)), "not UTF-8 text"),
        (
            b'{"format": 2, "tasks": "merging", "routed_tensors": {}, "router": {}, "settings": {}}',
            "tasks: Input should be a valid list",
        ),
    ],
)
def test_a_broken_manifest_is_one_error_line_naming_it(content, named, mediator_dir, tmp_path, capsys):
    folder = with_manifest(mediator_dir, tmp_path, content)
    for command in (
        ["generate", str(folder), "--prompt", "one two"],
        ["mediator", "export", str(folder), str(tmp_path / "out"), "--task", "merging", "--quiet"],
    ):
        error = one_error_line(capsys, *command)
        assert str(folder / "mediator" / "mediator.json") in error and named in error
    assert not (tmp_path / "out").exists()


def test_feature_layers_the_model_lacks_are_refused(mediator_dir, family, tmp_path, capsys, monkeypatch):
    """In a folder's manifest (an IndexError while routing), and in a recipe (found after the merge)."""
    manifest = json.loads((mediator_dir / "mediator" / "mediator.json").read_text())
    manifest["router"]["settings"]["feature_layers"] = [999]
    folder = with_manifest(mediator_dir, tmp_path, json.dumps(manifest).encode())
    error = one_error_line(capsys, "generate", str(folder), "--prompt", "one two")
    assert "mediator.json: router.settings.feature_layers: hidden state 999 does not exist" in error
    root, built = family
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(mediator_recipe(root, built, router={"feature_layers": [999]})))
    monkeypatch.setattr(StreamingShardWriter, "write", refuse_writes)
    error = one_error_line(capsys, "mediator", "build", str(config), str(tmp_path / "out"), "--quiet")
    assert error == (
        f"error: {config}: mediator.router.feature_layers: hidden state 999 does not exist; a model "
        "of 2 decoder layers has -3..2"
    )


def refuse_writes(*args, **kwargs):
    raise AssertionError("a tensor was merged before the bad input was refused")


@pytest.mark.parametrize(
    "name, content, named",
    [
        ("binary.txt", bytes(range(256)), "not UTF-8 text"),
        ("nested.jsonl", b'{"prompt": "one"}\n' + b"[" * 20_000 + b"]" * 20_000 + b"\n", ":2: nested more than 64"),
        ("digits.jsonl", b'{"prompt": "one", "n": ' + b"9" * 5000 + b"}\n", ":1: an integer of 5000 digits"),
    ],
)
def test_a_broken_prompts_file_is_one_error_line_naming_it(name, content, named, family, tmp_path, capsys):
    root, built = family
    data = mediator_recipe(root, built)
    prompts = tmp_path / name
    prompts.write_bytes(content)
    data["mediator"]["experts"][0]["prompts"] = str(prompts)
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    error = one_error_line(capsys, "mediator", "build", str(config), str(tmp_path / "out"), "--quiet")
    assert error.startswith(f"error: {prompts}") and named in error
    assert not (tmp_path / "out").exists()


def test_export_carries_over_no_record_from_outside_the_folder(mediator_dir, tmp_path, capsys):
    folder = Path(shutil.copytree(mediator_dir, tmp_path / "downloaded"))
    (tmp_path / "token").write_text("token: hf_secret\n")
    (folder / "mergewise.yml").unlink()
    (folder / "mergewise.yml").symlink_to(tmp_path / "token")
    error = one_error_line(
        capsys, "mediator", "export", str(folder), str(tmp_path / "out"), "--task", "merging", "--quiet"
    )
    assert str(folder / "mergewise.yml") in error and "outside the model folder" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_export_onto_a_full_disk_names_the_file(mediator_dir, tmp_path):
    run_measured(
        "mediator",
        "export",
        str(mediator_dir),
        str(tmp_path / "out"),
        "--task",
        "merging",
        "--quiet",
        file_size_limit=20_000,
    ).assert_one_error("model.safetensors: cannot write")
    assert not (tmp_path / "out").exists() and sorted(tmp_path.glob(".out.*")) == []


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "tokenizer_config.json"])
def test_generate_follows_no_symlink_out_of_the_folder(family, tmp_path, capsys, name):
    """The rule `merge` and `calibrate` keep: a downloaded folder's files resolve inside it."""
    _, built = family
    folder = Path(shutil.copytree(built.fine_tunes[0], tmp_path / "downloaded"))
    outside = tmp_path / f"outside-{name}"
    shutil.move(folder / name, outside)
    (folder / name).symlink_to(outside)
    error = one_error_line(capsys, "generate", str(folder), "--prompt", "one two")
    assert f"{folder / name}" in error and "outside the model folder" in error


def test_a_prompts_file_is_an_input_no_output_may_replace(family, tmp_path, capsys):
    root, built = family
    old_out = tmp_path / "old-out"
    old_out.mkdir()
    (old_out / "mergewise.yml").write_text("recipe: {}\n")
    prompts = Path(shutil.copy(root / "merging.txt", old_out / "merging.txt"))
    data = mediator_recipe(root, built)
    data["mediator"]["experts"][0]["prompts"] = str(prompts)
    config = tmp_path / "mediator.yml"
    config.write_text(yaml.safe_dump(data))
    error = one_error_line(capsys, "mediator", "build", str(config), str(old_out), "--overwrite", "--quiet")
    assert error == f"error: output folder {old_out} contains input model {prompts}; choose another"
    assert prompts.read_text() == (root / "merging.txt").read_text()
