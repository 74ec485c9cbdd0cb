"""AIM: self-calibration, the relaxation against its formula, and the `aim:` recipe block against
merge-then-`mergewise aim`. Calibration on documents is checked in test_aim_calibration.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from mergewise.aim import AimSettings, CalibrationStats, Relaxation, load_statistics
from mergewise.aim.data import SAMPLED_CONVENTIONS
from mergewise.cli import main
from tests.support.processes import run_measured
from tests.support.tiny_models import build_lora_adapter, read_state_dict


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "the",
        "lazy",
        "dog",
        "while",
        "model",
        "merging",
        "adds",
        "task",
        "vectors",
    ]
    documents = [" ".join(words[i % 7 :] + words[: i % 5]) for i in range(40)]
    path = tmp_path_factory.mktemp("aim-data") / "calibration.txt"
    path.write_text("\n\n".join(documents))
    return path


def calibrate_cli(base: Path, out: Path, *more: str) -> CalibrationStats:
    assert main(["calibrate", str(base), str(out), "--quiet", *more]) == 0
    return load_statistics(out)


def test_self_calibration_is_seeded_and_pass_independent(tiny_family, tmp_path):
    base = tiny_family("llama").base
    options = ["--samples", "3", "--seq-len", "16"]
    first = calibrate_cli(base, tmp_path / "a.safetensors", *options)
    streamed = calibrate_cli(base, tmp_path / "b.safetensors", *options, "--stream-layers")
    for name, vector in first.vectors.items():
        torch.testing.assert_close(streamed.vectors[name], vector, rtol=1e-5, atol=0)
    assert first.metadata["data"] == "self" and int(first.metadata["tokens"]) == 3 * 16
    assert SAMPLED_CONVENTIONS.items() <= first.metadata.items()


# ------------------------------------------------------------------------------------ relaxation
def direct_formula(base, merged, activation, omega, axis):
    importance = activation / activation.max()
    shape = [1] * merged.dim()
    shape[axis] = -1
    return base + (merged - base) * (1 - (1 - omega) * importance.reshape(shape))


@pytest.mark.parametrize("omega", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("shape,axis", [((6, 10), -1), ((10,), 0), ((10, 6), 0)], ids=["linear", "norm", "conv1d"])
def test_relaxation_matches_formula_on_row_chunks(shape, axis, omega):
    generator = torch.Generator().manual_seed(0)
    base, merged = (torch.randn(shape, generator=generator) for _ in range(2))
    activation = torch.rand(10, generator=generator) + 0.1
    stats = CalibrationStats({"w": activation}, {"input_axis": json.dumps({"w": 0} if axis == 0 else {})})
    relaxation = Relaxation(stats, AimSettings(omega=omega))
    chunks = [slice(0, 4), slice(4, shape[0])]
    relaxed = torch.cat([relaxation.apply("w", merged[rows], base[rows], rows) for rows in chunks])
    torch.testing.assert_close(relaxed, direct_formula(base, merged, activation, omega, axis))
    if omega == 1.0:
        assert torch.equal(relaxed, merged)


@pytest.mark.parametrize("omega", [0.0, 0.4])
def test_a_fused_expert_tensor_is_relaxed_with_each_experts_own_vector(omega):
    """Statistics of a fused (experts, rows, channels) tensor are one vector per expert, each scaled
    by its own peak; an expert no token reached (zeros) keeps its merged values."""
    generator = torch.Generator().manual_seed(0)
    base, merged = (torch.randn(3, 4, 5, generator=generator) for _ in range(2))
    activation = torch.rand(3, 5, generator=generator) + 0.1
    activation[1] = 0.0
    relaxation = Relaxation(CalibrationStats({"experts": activation}, {}), AimSettings(omega=omega))
    chunks = [slice(0, 2), slice(2, 3)]  # whole experts per row chunk, as the engine reads them
    relaxed = torch.cat([relaxation.apply("experts", merged[rows], base[rows], rows) for rows in chunks])
    for expert in (0, 2):
        expected = direct_formula(base[expert], merged[expert], activation[expert], omega, -1)
        torch.testing.assert_close(relaxed[expert], expected)
    assert torch.equal(relaxed[1], merged[1])


def test_options_exponent_and_module_filter():
    activation = torch.tensor([1.0, 2.0, 4.0])
    stats = CalibrationStats({"layers.0.mlp.weight": activation}, {})
    sharpened = Relaxation(stats, AimSettings(omega=0.0, exponent=2.0))
    torch.testing.assert_close(sharpened.importance("layers.0.mlp.weight"), torch.tensor([1 / 16, 1 / 4, 1.0]))
    assert not Relaxation(stats, AimSettings(modules=r"self_attn")).covers("layers.0.mlp.weight")
    assert Relaxation(stats, AimSettings(modules=r"\.mlp\.")).covers("layers.0.mlp.weight")


# ------------------------------------------------------------------------------ merge integration
def write_recipe(path: Path, family, aim: dict | None, method="ties") -> Path:
    recipe = {
        "merge_method": method,
        "base_model": str(family.base),
        "dtype": "bfloat16",
        "models": [
            {"model": str(model), "parameters": {"weight": w, "density": 0.5}}
            for model, w in zip(family.fine_tunes, (1.0, 0.6, 0.3))
        ],
    }
    if method == "linear":
        recipe["models"] = [
            {"model": str(model), "parameters": {"weight": 1.0}} for model in (family.base, *family.fine_tunes)
        ]
    if aim is not None:
        recipe["aim"] = aim
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("method", ["ties", "linear"])
def test_aim_block_equals_merge_then_aim(method, tiny_family, calibration_text, tmp_path):
    family = tiny_family("llama")
    stats = tmp_path / "stats.safetensors"
    calibrate_cli(family.base, stats, "--data", str(calibration_text), "--samples", "8", "--seq-len", "32")
    run = ["--quiet", "--seed", "1"]
    plain_recipe = write_recipe(tmp_path / "plain.yml", family, None, method)
    assert main(["merge", str(plain_recipe), str(tmp_path / "m"), *run]) == 0
    assert (
        main(
            [
                "aim",
                "--base",
                str(family.base),
                "--merged",
                str(tmp_path / "m"),
                "--stats",
                str(stats),
                "--omega",
                "0.4",
                "--quiet",
                str(tmp_path / "two_step"),
            ]
        )
        == 0
    )
    aim_recipe = write_recipe(tmp_path / "aim.yml", family, {"omega": 0.4, "stats": str(stats)}, method)
    assert main(["merge", str(aim_recipe), str(tmp_path / "one_pass"), *run]) == 0

    merged, two_step, one_pass = (read_state_dict(tmp_path / name) for name in ("m", "two_step", "one_pass"))
    assert two_step.keys() == one_pass.keys() == merged.keys()
    for name in merged:
        assert torch.equal(one_pass[name], two_step[name]), name
    assert torch.equal(one_pass["model.embed_tokens.weight"], merged["model.embed_tokens.weight"])
    relaxed = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(one_pass[relaxed], merged[relaxed])
    assert yaml.safe_load((tmp_path / "one_pass" / "mergewise.yml").read_text())["aim"]["omega"] == 0.4
    assert yaml.safe_load((tmp_path / "two_step" / "mergewise.yml").read_text())["aim"]["relaxed_tensors"] > 0
    assert (tmp_path / "two_step" / "tokenizer.json").is_file()


def fused_copy(folder: Path, out_dir: Path) -> Path:
    """`folder` saved as transformers 5 holds it in memory: each layer's experts fused into 3-D tensors."""
    model = AutoModelForCausalLM.from_pretrained(folder)
    shutil.copytree(folder, out_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({name: tensor.contiguous() for name, tensor in model.state_dict().items()}, out_dir / "model.safetensors")
    return out_dir


@pytest.mark.parametrize("layout", ["one-matrix-per-expert", "fused"])
def test_aim_relaxes_every_experts_matrices_of_a_mixture_of_experts(layout, tiny_family, calibration_text, tmp_path):
    family = tiny_family("qwen3_moe")
    if layout == "fused":
        family = type(family)(
            fused_copy(family.base, tmp_path / "base"),
            tuple(fused_copy(model, tmp_path / model.name) for model in family.fine_tunes),
        )
    stats_path = tmp_path / "stats.safetensors"
    stats = calibrate_cli(family.base, stats_path, "--data", str(calibration_text), "--samples", "8", "--seq-len", "32")
    streamed = calibrate_cli(
        family.base,
        tmp_path / "streamed.safetensors",
        "--data",
        str(calibration_text),
        "--samples",
        "8",
        "--seq-len",
        "32",
        "--stream-layers",
    )
    assert stats.vectors.keys() == streamed.vectors.keys()
    for name, vector in stats.vectors.items():
        torch.testing.assert_close(streamed.vectors[name], vector, rtol=1e-5, atol=1e-7)
    run = ["--quiet", "--seed", "1"]
    assert main(["merge", str(write_recipe(tmp_path / "plain.yml", family, None)), str(tmp_path / "m"), *run]) == 0
    aim_recipe = write_recipe(tmp_path / "aim.yml", family, {"omega": 0.4, "stats": str(stats_path)})
    assert main(["merge", str(aim_recipe), str(tmp_path / "aim"), *run]) == 0
    merged, relaxed, base = (read_state_dict(folder) for folder in (tmp_path / "m", tmp_path / "aim", family.base))
    experts = [name for name in merged if ".experts." in name]
    assert experts and set(experts) <= stats.vectors.keys()
    assert {stats.vectors[name].dim() for name in experts} == ({2} if layout == "fused" else {1})
    for name in experts:
        vector = stats.vectors[name]
        rows = [(expert, vector[expert]) for expert in range(len(vector))] if vector.dim() == 2 else [(..., vector)]
        for expert, activation in rows:
            expected = direct_formula(base[name][expert].float(), merged[name][expert].float(), activation, 0.4, -1)
            torch.testing.assert_close(
                relaxed[name][expert].float(), expected.to(torch.bfloat16).float(), rtol=0, atol=0.02
            )
        assert not torch.equal(relaxed[name], merged[name]), name


def test_aim_block_can_calibrate_first(tiny_family, tmp_path):
    family = tiny_family("llama")
    calibration = {"data": "self", "samples": 2, "seq_len": 16}
    recipe = write_recipe(tmp_path / "aim.yml", family, {"omega": 0.3, "calibration": calibration})
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    stats = tmp_path / "stats.safetensors"
    calibrate_cli(family.base, stats, "--samples", "2", "--seq-len", "16")
    recipe = write_recipe(tmp_path / "aim2.yml", family, {"omega": 0.3, "stats": str(stats)})
    assert main(["merge", str(recipe), str(tmp_path / "out2"), "--quiet"]) == 0
    first, second = read_state_dict(tmp_path / "out"), read_state_dict(tmp_path / "out2")
    assert all(torch.equal(first[name], second[name]) for name in first)


# ------------------------------------------------------------------------------------------ errors
def test_stats_of_another_base_are_refused_unless_allowed(tiny_family, tmp_path, capsys):
    family = tiny_family("llama")
    stats = tmp_path / "stats.safetensors"
    calibrate_cli(family.fine_tunes[0], stats, "--samples", "1", "--seq-len", "8")
    command = [
        "aim",
        "--base",
        str(family.base),
        "--merged",
        str(family.fine_tunes[1]),
        "--stats",
        str(stats),
        "--quiet",
    ]
    assert main([*command, str(tmp_path / "out")]) == 2
    assert "different base model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match="different base model"):
        assert main([*command, "--allow-fingerprint-mismatch", str(tmp_path / "out")]) == 0
    with safe_open(str(stats), "pt") as handle:
        assert set(handle.metadata()) >= {"base_fingerprint", "data", "samples", "seq_len", "statistic"}


@pytest.mark.parametrize(
    "arguments,message",
    [
        (["--data", "hf:no-such/dataset"], "hf:no-such/dataset"),
        (["--data", "missing.txt"], "no such file"),
        (["--samples", "0"], "samples: Input should be greater than or equal to 1"),
        (["--data", "hf:"], "names no data"),
    ],
)
def test_calibrate_errors(arguments, message, tiny_family, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["calibrate", str(tiny_family("llama").base), str(tmp_path / "s.safetensors"), *arguments]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and message in error


@pytest.mark.parametrize(
    "aim,message",
    [
        ({"omega": 0.4}, "exactly one of 'stats' or 'calibration'"),
        ({"omega": 1.5, "stats": "s"}, "aim.omega"),
        ({"omega": 0.4, "stats": "missing.safetensors"}, "statistics file not found"),
    ],
)
def test_aim_block_errors(aim, message, tiny_family, tmp_path, capsys):
    recipe = write_recipe(tmp_path / "aim.yml", tiny_family("llama"), aim)
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- what it may not touch
def test_calibrate_never_writes_into_an_input_and_replaces_only_with_overwrite(
    tiny_family, calibration_text, tmp_path, capsys
):
    """`mergewise calibrate base base/model.safetensors` would replace the weights it measures."""
    base = Path(shutil.copytree(tiny_family("llama").base, tmp_path / "base"))
    data = Path(shutil.copy(calibration_text, tmp_path / "calibration.txt"))
    inputs = {path: path.read_bytes() for path in (base / "model.safetensors", data)}
    options = ["--data", str(data), "--seq-len", "32", "--samples", "4", "--quiet"]
    capsys.readouterr()  # the models' build
    for output in inputs:
        assert main(["calibrate", str(base), str(output), *options]) == 2
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error.startswith("error: statistics file") and "would be written into input" in error
    assert all(path.read_bytes() == content for path, content in inputs.items())
    stats = tmp_path / "stats.safetensors"
    assert main(["calibrate", str(base), str(stats), *options]) == 0
    first = stats.read_bytes()
    assert main(["calibrate", str(base), str(stats), *options, "--samples", "2"]) == 2
    assert "already exists (use --overwrite" in capsys.readouterr().err
    assert stats.read_bytes() == first
    assert main(["calibrate", str(base), str(stats), *options, "--samples", "2", "--overwrite"]) == 0
    assert load_statistics(stats).metadata["samples"] == "2"


@pytest.mark.parametrize(
    "record, named",
    [
        ("symlink", "resolves to"),
        ("recipe: [unclosed\n", "invalid YAML"),
        ("- a list\n", "(top level): Input should be a valid dictionary"),
    ],
)
def test_aim_reads_the_merged_folders_record_only_inside_it(record, named, tiny_family, tmp_path, capsys):
    """`mergewise aim` carries the merged folder's mergewise.yml over into its output: a symlink out of
    the folder (to a token, say) must not be copied into a folder meant for upload."""
    family = tiny_family("llama")
    stats = tmp_path / "stats.safetensors"
    calibrate_cli(family.base, stats, "--samples", "1", "--seq-len", "8")
    merged = Path(shutil.copytree(family.fine_tunes[0], tmp_path / "merged"))
    if record == "symlink":
        (tmp_path / "token").write_text("token: hf_secret\n")
        (merged / "mergewise.yml").symlink_to(tmp_path / "token")
    else:
        (merged / "mergewise.yml").write_text(record)
    capsys.readouterr()  # the calibration's model loading
    status = main(
        [
            "aim",
            "--base",
            str(family.base),
            "--merged",
            str(merged),
            "--stats",
            str(stats),
            "--quiet",
            str(tmp_path / "out"),
        ]
    )
    [error] = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and error.startswith("error: ") and str(merged / "mergewise.yml") in error and named in error
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_full_disk_is_one_error_line_naming_the_file(tiny_family, calibration_text, tmp_path):
    family = tiny_family("llama")
    stats = tmp_path / "stats.safetensors"
    options = ["--data", str(calibration_text), "--seq-len", "32", "--samples", "4", "--quiet"]
    run_measured("calibrate", str(family.base), str(stats), *options, file_size_limit=2000).assert_one_error(
        str(stats), "cannot write"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    calibrate_cli(family.base, stats, *options[:-1])
    out = tmp_path / "out"
    relaxed = run_measured(
        "aim",
        "--base",
        str(family.base),
        "--merged",
        str(family.fine_tunes[0]),
        "--stats",
        str(stats),
        "--quiet",
        str(out),
        file_size_limit=50_000,
    )
    relaxed.assert_one_error("model.safetensors: cannot write")
    assert not out.exists() and sorted(tmp_path.glob(".out.*")) == []


def test_a_statistics_file_is_an_input_no_output_may_replace(tiny_family, tmp_path, capsys):
    """`--overwrite` of an earlier output that holds the statistics the merge reads would delete them."""
    family = tiny_family("llama")
    old_out = tmp_path / "old-out"
    old_out.mkdir()
    (old_out / "mergewise.yml").write_text("recipe: {}\n")
    stats = old_out / "stats.safetensors"
    calibrate_cli(family.base, stats, "--samples", "1", "--seq-len", "8")
    before = stats.read_bytes()
    capsys.readouterr()
    recipe = write_recipe(tmp_path / "aim.yml", family, {"omega": 0.4, "stats": str(stats)})
    for command in (
        ["merge", str(recipe), str(old_out), "--overwrite", "--quiet"],
        [
            "aim",
            "--base",
            str(family.base),
            "--merged",
            str(family.fine_tunes[0]),
            "--stats",
            str(stats),
            str(old_out),
            "--overwrite",
            "--quiet",
        ],
    ):
        assert main(command) == 2
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error == f"error: output folder {old_out} contains input model {stats}; choose another"
    assert stats.read_bytes() == before


def test_aim_calibrates_a_base_with_its_lora_adapter(tiny_family, tmp_path):
    """`base_model: base+adapter` is measured as the merge reads it, adapter merged in: the merge
    equals one whose base is the same weights written as a plain folder (the adapter was dropped)."""
    family = tiny_family("llama")
    build_lora_adapter(family.base, tmp_path / "adapter")
    adapted = f"{family.base}+{tmp_path / 'adapter'}"
    plain = {
        "merge_method": "linear",
        "dtype": "float32",
        "models": [{"model": adapted, "parameters": {"weight": 1.0}}],
    }
    (tmp_path / "plain.yml").write_text(yaml.safe_dump(plain))
    assert main(["merge", str(tmp_path / "plain.yml"), str(tmp_path / "adapted"), "--quiet"]) == 0
    calibration = {"omega": 0.3, "calibration": {"data": "self", "samples": 2, "seq_len": 16}}
    outputs = {}
    for label, base in (("with_adapter", adapted), ("written_out", str(tmp_path / "adapted"))):
        recipe = yaml.safe_load(write_recipe(tmp_path / f"{label}.yml", family, calibration).read_text())
        recipe["base_model"] = base
        (tmp_path / f"{label}.yml").write_text(yaml.safe_dump(recipe))
        assert main(["merge", str(tmp_path / f"{label}.yml"), str(tmp_path / label), "--quiet"]) == 0
        outputs[label] = read_state_dict(tmp_path / label)
    assert outputs["with_adapter"].keys() == outputs["written_out"].keys()
    for name, tensor in outputs["with_adapter"].items():
        assert torch.equal(tensor, outputs["written_out"][name]), name


def test_stats_of_the_base_without_its_adapter_are_refused(tiny_family, tmp_path, capsys):
    """A LoRA adapter changes the base the relaxation pulls toward: its statistics are another base's."""
    family = tiny_family("llama")
    build_lora_adapter(family.base, tmp_path / "adapter")
    stats = tmp_path / "stats.safetensors"
    calibrate_cli(family.base, stats, "--samples", "1", "--seq-len", "8")
    recipe = yaml.safe_load(write_recipe(tmp_path / "aim.yml", family, {"omega": 0.3, "stats": str(stats)}).read_text())
    recipe["base_model"] = f"{family.base}+{tmp_path / 'adapter'}"
    (tmp_path / "aim.yml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "aim.yml"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "different base model" in capsys.readouterr().err
