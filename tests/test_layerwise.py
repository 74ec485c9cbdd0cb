"""The layer-by-layer pass against transformers' whole model in memory: every hidden state it
numbers as `output_hidden_states` does, pooled features as the in-memory router computes them, one
decoder layer's weights loaded at a time, and a clear error for what it cannot run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from mergewise import layerwise
from mergewise.checkpoint import ModelFolder
from mergewise.errors import MergewiseError
from mergewise.layerwise import (
    Batch,
    LayerwiseModel,
    fast_half_matmuls,
    native_half_matmuls,
    pooled_hidden_states,
    return_freed_memory,
)
from tests.support.tiny_models import MOE_ARCHITECTURES, build_tiny_model
from tests.test_remote_code import add_code, answers_yes  # noqa: F401 (answers_yes is a fixture)

NUM_LAYERS = 4
BATCH_SIZE = 4
PAD_ID = 2


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """make(arch, **options): a bfloat16 tiny model of NUM_LAYERS decoder layers, built once."""
    built: dict[tuple, Path] = {}

    def make(arch: str, **options) -> Path:
        key = (arch, tuple(sorted(options.items())))
        if key not in built:
            options = {"num_layers": NUM_LAYERS, **options}
            built[key] = build_tiny_model(arch, tmp_path_factory.mktemp(f"layerwise-{arch}") / "model", **options)
        return built[key]

    return make


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    """Prompts of different lengths, so every batch of BATCH_SIZE is right-padded."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(4, 256, (length,), generator=generator).tolist() for length in (5, 9, 1, 12, 7, 3, 10, 4, 6)]


def in_memory_pooled(
    folder: Path,
    prompts: list[list[int]],
    layer: int,
    dtype: torch.dtype,
    max_tokens: int | None = None,
    device: str = "meta",
) -> torch.Tensor:
    """The whole model in memory: right-padded batches with their attention mask, the mean over each
    prompt's tokens of `output_hidden_states[layer]`, its matmuls as `fast_half_matmuls` runs them for
    `device` (the default: the model's own)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    pooled = []
    for start in range(0, len(prompts), BATCH_SIZE):
        batch = [ids[-max_tokens:] if max_tokens else ids for ids in prompts[start : start + BATCH_SIZE]]
        input_ids = torch.full((len(batch), max(map(len, batch))), PAD_ID)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with torch.no_grad(), fast_half_matmuls(model, torch.device(device)):
            hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        weights = mask[..., None].float()
        pooled.append((hidden.float() * weights).sum(1) / weights.sum(1))
    return torch.cat(pooled)


def runner_for(folder: Path, dtype: torch.dtype = torch.float32) -> LayerwiseModel:
    model_folder = ModelFolder(folder)
    return LayerwiseModel(model_folder, AutoConfig.from_pretrained(folder), dtype=dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "gemma2", "gpt2", *MOE_ARCHITECTURES])
@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layer", [-1, 0, NUM_LAYERS // 2, -NUM_LAYERS])
def test_pooled_hidden_states_match_the_model_in_memory(arch, dtype, tolerance, layer, tiny_model, prompts):
    folder = tiny_model(arch)
    streamed = pooled_hidden_states(
        folder, prompts, layer, dtype=dtype, batch_size=BATCH_SIZE, pad_id=PAD_ID, quiet=True
    )
    expected = in_memory_pooled(folder, prompts, layer, dtype)
    assert streamed.dtype == torch.float32 and streamed.shape == expected.shape
    torch.testing.assert_close(streamed, expected, atol=tolerance, rtol=tolerance)


def test_max_tokens_keeps_the_last_ids(tiny_model, prompts):
    folder = tiny_model("llama")
    streamed = pooled_hidden_states(
        folder, prompts, -2, dtype=torch.float32, batch_size=BATCH_SIZE, pad_id=PAD_ID, max_tokens=4, quiet=True
    )
    torch.testing.assert_close(
        streamed, in_memory_pooled(folder, prompts, -2, torch.float32, max_tokens=4), atol=1e-5, rtol=1e-5
    )
    truncated = [ids[-4:] for ids in prompts]
    assert torch.equal(
        streamed,
        pooled_hidden_states(
            folder, truncated, -2, dtype=torch.float32, batch_size=BATCH_SIZE, pad_id=PAD_ID, quiet=True
        ),
    )


def test_no_dtype_computes_in_the_stored_one(tiny_model, prompts, tmp_path):
    folder = tiny_model("llama")
    assert ModelFolder(folder).stored_dtype == torch.bfloat16
    assert torch.equal(
        pooled_hidden_states(folder, prompts, quiet=True),
        pooled_hidden_states(folder, prompts, dtype=torch.bfloat16, quiet=True),
    )
    float_folder = build_tiny_model("llama", tmp_path / "fp32", dtype=torch.float32, num_layers=1)
    assert ModelFolder(float_folder).stored_dtype == torch.float32


@pytest.fixture(params=[False, True], ids=["float32-matmuls", "native-matmuls"])
def cpu_instructions(request, monkeypatch):
    """Both sides of `native_half_matmuls`, whatever this CPU has: without, then with, instructions
    for every half-precision dtype."""
    monkeypatch.setattr(layerwise, "native_half_matmuls", lambda dtype: request.param)
    return request.param


@pytest.fixture
def without_half_instructions(monkeypatch):
    """A CPU without matmul instructions for any half-precision dtype, whatever this one has."""
    monkeypatch.setattr(layerwise, "native_half_matmuls", lambda dtype: False)


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS // 2])
def test_bf16_features_equal_the_in_memory_models_with_the_same_matmuls(layer, tiny_model, prompts, cpu_instructions):
    folder = tiny_model("llama")
    streamed = pooled_hidden_states(folder, prompts, layer, batch_size=BATCH_SIZE, pad_id=PAD_ID, quiet=True)
    assert torch.equal(streamed, in_memory_pooled(folder, prompts, layer, torch.bfloat16, device="cpu"))


def float32_product(linear: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return (inputs.float() @ linear.weight.float().T + linear.bias.float()).to(linear.weight.dtype)


def half_model(dtype: torch.dtype) -> tuple[torch.nn.Sequential, torch.Tensor]:
    """Two Linears in `dtype`, the second turned float32, and inputs for the first."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.Linear(48, 32)).to(dtype)
    model[1].float()
    return model, torch.randn(5, 7, 64).to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_linears_multiply_in_float32_on_a_cpu_without_instructions_for_them(
    dtype, without_half_instructions
):
    """There a half-precision Linear gives the float32 product rounded once to its dtype, the model's
    own forward is back afterwards (an exception inside too), and float32 Linears are untouched."""
    model, inputs = half_model(dtype)
    native = model[0](inputs)
    with fast_half_matmuls(model, torch.device("cpu")):
        upcast = model[0](inputs)
        assert "forward" in vars(model[0]) and "forward" not in vars(model[1])
    assert upcast.dtype == dtype and torch.equal(upcast, float32_product(model[0], inputs))
    torch.testing.assert_close(upcast, native, atol=2e-2, rtol=2e-2)  # the same product, summed in another order
    with pytest.raises(RuntimeError, match="inside"):
        with fast_half_matmuls(model, torch.device("cpu")):
            raise RuntimeError("inside")
    assert all("forward" not in vars(module) for module in model) and torch.equal(model[0](inputs), native)


def test_a_cpu_with_instructions_for_one_dtype_runs_its_matmuls_natively(monkeypatch):
    """The other side of the switch, per dtype: bf16 Linears keep their own forward on a CPU with bf16
    instructions while fp16 ones, which it lacks, multiply in float32."""
    monkeypatch.setattr(layerwise, "native_half_matmuls", lambda dtype: dtype == torch.bfloat16)
    model, inputs = half_model(torch.bfloat16)
    model.append(torch.nn.Linear(32, 8).to(torch.float16))
    native = model[0](inputs)
    with fast_half_matmuls(model, torch.device("cpu")):
        assert [("forward" in vars(module)) for module in model] == [False, False, True]
        assert torch.equal(model[0](inputs), native)
    assert all("forward" not in vars(module) for module in model)


def test_native_half_matmuls_follows_the_cpus_instructions():
    """bf16 is native exactly where the CPU lists AVX-512 BF16 (Linux x86 lists its flags); float32 is
    no half-precision dtype."""
    assert native_half_matmuls(torch.float32) is False
    assert isinstance(native_half_matmuls(torch.float16), bool)
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists() or " avx2" not in cpuinfo.read_text():
        pytest.skip("not a Linux x86 machine")
    assert native_half_matmuls(torch.bfloat16) is (" avx512_bf16" in cpuinfo.read_text())


def test_a_linear_with_a_forward_of_its_own_keeps_it(without_half_instructions):
    """A Linear another library already gave an instance `forward` (an offload hook) is left alone,
    during and after; its neighbours still multiply in float32."""
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4)).to(torch.bfloat16)
    hooked = model[0].forward = lambda inputs: torch.zeros(*inputs.shape[:-1], 8, dtype=torch.bfloat16)
    with fast_half_matmuls(model, torch.device("cpu")):
        assert model[0].forward is hooked and "forward" in vars(model[1])
        assert torch.equal(
            model(torch.ones(2, 16, dtype=torch.bfloat16)),
            float32_product(model[1], torch.zeros(2, 8, dtype=torch.bfloat16)),
        )
    assert model[0].forward is hooked and "forward" not in vars(model[1])


def test_off_the_cpu_linears_multiply_in_their_dtype(without_half_instructions):
    """On an accelerator the model's matmuls are its own, whatever the CPU has."""
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    with fast_half_matmuls(linear, torch.device("meta")):
        assert "forward" not in vars(linear)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_hidden_state_is_observed_with_the_attention_mask(arch, tiny_model):
    """Left padding, where the mask changes every real token's hidden states: the first layer's
    captured arguments carry it, and `observe` sees hidden states 0..num_layers in order."""
    folder = tiny_model(arch)
    input_ids = torch.randint(4, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[0, :3] = mask[2, :1] = 0
    observed = []
    runner_for(folder).run(
        [Batch(input_ids, mask)], observe=lambda index, states: observed.append((index, states)), quiet=True
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        expected = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert [index for index, _ in observed] == list(range(NUM_LAYERS + 1)) == list(range(len(expected)))
    tokens = mask.bool()
    for index, states in observed:
        torch.testing.assert_close(states[0][tokens], expected[index][tokens], atol=1e-5, rtol=1e-5)


def test_one_decoder_layer_is_loaded_at_a_time(tiny_model, monkeypatch):
    """A spy on every decoder layer and the final norm lists the weights loaded while it runs: one
    layer's (in the compute dtype, in one read), only up to the requested hidden state, nothing
    afterwards; the heap's free pages go back to the system after each layer."""
    import mergewise.layerwise as layerwise

    runner = runner_for(tiny_model("llama", num_layers=6), torch.bfloat16)
    loaded: list[tuple[str, set[str]]] = []
    reads, trims = [], []
    read_together = runner.folder.read_together
    monkeypatch.setattr(runner.folder, "read_together", lambda names: reads.append(names) or read_together(names))
    monkeypatch.setattr(layerwise, "return_freed_memory", lambda: trims.append(len(reads)) or return_freed_memory())

    def spy(name):
        def record(module, args):
            weights = {key: value for key, value in runner.model.named_parameters() if value.device.type != "meta"}
            assert all(value.dtype == torch.bfloat16 for value in weights.values())
            loaded.append((name, set(weights)))

        return record

    for index, layer in enumerate(runner.layers):
        layer.register_forward_pre_hook(spy(f"{runner.layers_name}.{index}"))
    runner.model.get_input_embeddings().register_forward_pre_hook(spy("stem"))
    runner.tail.register_forward_pre_hook(spy("norm"))
    batches = [Batch(torch.tensor([[5, 6, 7]])), Batch(torch.tensor([[8, 9]]))]

    def layer_weights(name):
        return {f"{name}.{key}" for key, _ in runner.model.get_submodule(name).named_parameters()}

    runner.run(batches, through=3, quiet=True)
    assert loaded == [("stem", {"model.embed_tokens.weight"})] * 2 + [
        (f"model.layers.{index}", layer_weights(f"model.layers.{index}")) for index in range(3) for _ in batches
    ]
    assert [set(names) for names in reads[1:]] == [
        {name for name in runner.folder.tensors if name.startswith(f"model.layers.{index}.")} for index in range(3)
    ]
    assert trims == [2, 3, 4]  # after each layer's weights are dropped
    loaded.clear()
    runner.run(batches, quiet=True)
    assert [name for name, _ in loaded] == ["stem"] * 2 + [
        f"model.layers.{index}" for index in range(6) for _ in batches
    ] + ["norm"] * 2
    assert loaded[-1] == ("norm", {"model.norm.weight"})
    assert all(parameter.device.type == "meta" for parameter in runner.model.parameters())


@pytest.mark.parametrize("layer", [-1, NUM_LAYERS // 2])  # after a sliding-window layer
def test_layers_of_different_attention_types_get_each_their_own_mask(tiny_model, tmp_path, prompts, layer):
    """Sliding-window layers between full-attention ones (as Gemma 2 and 3 alternate them): each layer
    gets the mask of its type, so prompts longer than the window give the whole model's states."""
    folder = Path(shutil.copytree(tiny_model("qwen2"), tmp_path / "mixed"))
    config = json.loads((folder / "config.json").read_text())
    config.update(
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"] * (NUM_LAYERS // 2),
    )
    (folder / "config.json").write_text(json.dumps(config))
    streamed = pooled_hidden_states(
        folder, prompts, layer, dtype=torch.float32, batch_size=BATCH_SIZE, pad_id=PAD_ID, quiet=True
    )
    expected = in_memory_pooled(folder, prompts, layer, torch.float32)
    torch.testing.assert_close(streamed, expected, atol=1e-5, rtol=1e-5)
    unmasked = dict(config, use_sliding_window=False, layer_types=["full_attention"] * NUM_LAYERS)
    (folder / "config.json").write_text(json.dumps(unmasked))  # the window matters to these prompts
    assert not torch.allclose(in_memory_pooled(folder, prompts, layer, torch.float32), expected, atol=1e-3)


def test_a_missing_tensor_is_named(tiny_model, tmp_path, prompts):
    folder = Path(shutil.copytree(tiny_model("llama"), tmp_path / "broken"))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    missing = r"broken: tensor model\.layers\.1\.mlp\.up_proj\.weight is missing .* a llama model's weights\)"
    with pytest.raises(MergewiseError, match=missing):
        pooled_hidden_states(folder, prompts, quiet=True)


@pytest.mark.parametrize(
    "options,message",
    [
        (
            {"layer": NUM_LAYERS + 1},
            rf"hidden state {NUM_LAYERS + 1} does not exist; .* -{NUM_LAYERS + 1}\.\.{NUM_LAYERS}",
        ),
        ({"layer": -NUM_LAYERS - 2}, "does not exist"),
        ({"max_tokens": 0}, "max_tokens 0: expected at least 1"),
        ({"batch_size": 0}, "batch_size 0: expected at least 1"),
        ({"prompt_ids": [[5], []]}, "prompt 1 has no token ids"),
        ({"prompt_ids": []}, "no prompts"),
        ({"dtype": torch.int8}, "dtype torch.int8: expected a floating-point dtype"),
    ],
)
def test_bad_arguments_are_one_clear_error(options, message, tiny_model, prompts):
    arguments = {"prompt_ids": prompts, **options}
    with pytest.raises(MergewiseError, match=message):
        pooled_hidden_states(tiny_model("llama"), quiet=True, **arguments)


def test_folder_code_runs_only_when_trusted(tmp_path, prompts, answers_yes):  # noqa: F811 (the fixture)
    folder = add_code(build_tiny_model("llama", tmp_path / "model", num_layers=1), "config")
    with pytest.raises(MergewiseError, match="trust_remote_code=True"):
        pooled_hidden_states(folder, prompts, quiet=True)
    assert not (folder / "PWNED").exists()
