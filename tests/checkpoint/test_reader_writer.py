"""The I/O package on its own: what the streaming writer lays out, safetensors reads back bit for bit,
and the lazy reader returns exactly the rows safetensors stores."""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergewise.checkpoint import ModelFolder, PlannedTensor, StreamingShardWriter
from mergewise.errors import MergewiseError

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.uint8]


def random_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for index, dtype in enumerate(DTYPES):
        shape = (7 + index, 5) if index % 2 else (11 + index,)
        values = torch.randn(shape, generator=generator) * 100
        tensors[f"layer.{index}.weight"] = values.to(dtype)
    tensors["scalar"] = torch.tensor(3.5)
    return tensors


def write_streamed(folder, tensors: dict[str, torch.Tensor], shard_size: int) -> StreamingShardWriter:
    """Write every tensor's rows in a shuffled order, in row chunks of 2."""
    writer = StreamingShardWriter(
        folder,
        [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()],
        shard_size,
        metadata={"merged_by": "test"},
    )
    pieces = [
        (name, start)
        for name, tensor in tensors.items()
        for start in (range(0, tensor.shape[0], 2) if tensor.dim() else [0])
    ]
    random.Random(0).shuffle(pieces)
    for name, start in pieces:
        tensor = tensors[name]
        writer.write(name, tensor[start : start + 2] if tensor.dim() else tensor, start)
    return writer


@pytest.mark.parametrize("writeback", ["started early", "where the call is missing"])
@pytest.mark.parametrize("shard_size", [1 << 30, 200])
def test_streamed_shards_read_back_bit_for_bit(tmp_path, shard_size, writeback, monkeypatch):
    from mergewise.checkpoint import writer as writer_module

    started = []
    if writeback == "started early":  # each write asks the kernel to start writing its bytes to disk
        real = writer_module._sync_file_range()
        assert real is not None  # Linux
        monkeypatch.setattr(
            writer_module,
            "_sync_file_range",
            lambda: lambda *arguments: started.append(arguments[1:]) or real(*arguments),
        )
    else:
        monkeypatch.setattr(writer_module, "_sync_file_range", lambda: None)
    tensors = random_tensors()
    writer = write_streamed(tmp_path, tensors, shard_size)
    assert torch.equal(writer.read("layer.1.weight"), tensors["layer.1.weight"])  # before close too
    for name, tensor in tensors.items():  # rows of the first dimension, vectors too
        if tensor.dim():
            for rows in (slice(0, 1), slice(1, 3), slice(2, None), slice(5, 5)):
                assert torch.equal(writer.read(name, rows), tensor[rows]), (name, rows)
    writer.close()
    assert (len(started) > 0) == (writeback == "started early")
    assert all(length > 0 and flags == 2 for _, length, flags in started)  # SYNC_FILE_RANGE_WRITE: no waiting
    files = sorted(tmp_path.glob("*.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    assert (len(files) > 1) == index.exists() == (shard_size == 200)
    loaded = {}
    for file in files:
        loaded.update(load_file(file))
        header_length = struct.unpack("<Q", file.read_bytes()[:8])[0]
        assert (8 + header_length) % 8 == 0  # data starts aligned
        with safe_open(file, "pt") as handle:
            assert handle.metadata()["merged_by"] == "test"
        if shard_size == 200:
            assert file.stat().st_size - 8 - header_length <= 200 or len(load_file(file)) == 1
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        assert {
            name: load_file(tmp_path / file).keys() >= {name} for name, file in weight_map.items()
        } == dict.fromkeys(tensors, True)


def test_reader_returns_the_stored_rows_of_single_and_sharded_folders(tmp_path):
    tensors = random_tensors(1)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, single / "model.safetensors")
    (single / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 4}))
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_streamed(sharded, tensors, 200).close()
    (sharded / "config.json").write_text(json.dumps({"model_type": "llama", "n_layer": 4}))
    for folder in (single, sharded):
        model = ModelFolder(folder)
        assert set(model.tensors) == set(tensors) and model.num_layers == 4
        for name, tensor in tensors.items():
            info = model.tensors[name]
            assert info.dtype == tensor.dtype and tuple(info.shape) == tuple(tensor.shape)
            assert torch.equal(model.read(name), tensor)
            if tensor.dim():
                rows = slice(1, 4)
                assert torch.equal(model.read(name, rows), tensor[rows])
                assert torch.equal(model.map_rows(name, rows), tensor[rows])
                into = torch.empty_like(tensor[rows])
                assert model.read(name, rows, out=into) is into and torch.equal(into, tensor[rows])
        model.close()


def raw_safetensors(path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file laid out in the given order, unpadded (offsets need not be aligned)."""
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int64: "I64"}
    header, data = {}, b""
    for name, tensor in tensors.items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def test_reading_tensors_together_gives_each_tensor_with_one_read_per_run(tmp_path, monkeypatch):
    """Neighbours in a file come in one read; a far one (past READ_TOGETHER_GAP of unread bytes),
    another file, or a view that would start inside an element starts a new read."""
    from mergewise.checkpoint import reader

    gap = torch.zeros(reader.READ_TOGETHER_GAP // 4 + 1)
    first = {
        "a.weight": torch.randn(4, 3).bfloat16(),
        "a.bias": torch.randn(5),
        "a.odd": torch.arange(3, dtype=torch.uint8),
        "a.after_odd": torch.randn(2),
        "skipped": torch.randn(4),
        "far_gap": gap,
        "far": torch.randn(2, 2),
        "a.empty": torch.empty(0, 4),
        "a.scalar": torch.tensor(7, dtype=torch.int64),
    }
    raw_safetensors(tmp_path / "model-1.safetensors", first)
    save_file({"b.weight": torch.randn(3, 3)}, tmp_path / "model-2.safetensors")
    weight_map = {**dict.fromkeys(first, "model-1.safetensors"), "b.weight": "model-2.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text("{}")
    model = ModelFolder(tmp_path)
    reads = []
    read_rows = reader.read_rows
    monkeypatch.setattr(reader, "read_rows", lambda info, *args: reads.append(info.name) or read_rows(info, *args))
    names = ["far", "b.weight", "a.after_odd", "a.weight", "a.odd", "a.bias", "a.scalar", "a.empty"]
    for _ in range(2):
        reads.clear()
        together = model.read_together(names)
        runs = sorted(reads)
        assert [tensor.dtype for tensor in together] == [model.tensors[name].dtype for name in names]
        assert all(torch.equal(tensor, model.read(name)) for name, tensor in zip(names, together))
        # a.weight … a.odd (a.bias and a.odd read through), then a.after_odd (3 bytes in: not a float's
        # start), far (past the gap), b.weight (another file); a.empty and a.scalar follow far
        assert runs == sorted(["a.weight", "a.after_odd", "far", "b.weight"]), runs


def test_reading_into_memory_of_another_size_or_dtype_is_refused_and_a_shrunk_file_is_named(tmp_path):
    save_file({"w": torch.arange(12.0).reshape(4, 3)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    model = ModelFolder(tmp_path)
    for wrong in (torch.empty(2, 3, dtype=torch.float64), torch.empty(3, 3)):
        with pytest.raises(ValueError, match="cannot read"):
            model.read("w", slice(0, 2), out=wrong)
    with open(tmp_path / "model.safetensors", "r+b") as handle:  # changed after its header was read
        handle.truncate(handle.seek(0, 2) - 8)
    with pytest.raises(MergewiseError, match="truncated while reading tensor w"):
        model.map_rows("w", slice(2, 4))
    with pytest.raises(MergewiseError, match="truncated while reading tensor w"):
        model.read("w", slice(2, 4))


def test_reader_names_the_file_of_a_broken_index(tmp_path):
    save_file(random_tensors(), tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"layer.0.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(MergewiseError, match="model-00002-of-00002.safetensors"):
        ModelFolder(tmp_path)


def model_folder(folder, tensors=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    save_file(tensors or random_tensors(), folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("shard", ["../secret.safetensors", "ABSOLUTE"])
def test_an_index_entry_outside_the_folder_is_refused(tmp_path, shard):
    secret = model_folder(tmp_path / "elsewhere") / "model.safetensors"
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "secret.safetensors").write_bytes(secret.read_bytes())
    shard = str(secret) if shard == "ABSOLUTE" else shard
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"layer.0.weight": shard}}))
    with pytest.raises(MergewiseError, match="outside the model folder"):
        ModelFolder(folder)


def test_symlinks_may_point_inside_the_folder_or_its_hub_cache_repository_only(tmp_path):
    outside = model_folder(tmp_path / "outside")
    leaking = tmp_path / "leaking"
    leaking.mkdir()
    (leaking / "config.json").write_text("{}")
    (leaking / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(MergewiseError, match="outside the model folder"):
        ModelFolder(leaking)
    # the Hub cache layout: a snapshot's files are symlinks into the repository's blobs
    repository = tmp_path / "hub" / "models--org--name"
    blobs = model_folder(repository / "blobs")
    snapshot = repository / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(blobs / name)
    assert set(ModelFolder(snapshot).tensors) == set(random_tensors())


def test_a_fifo_named_like_weights_is_refused_without_waiting(tmp_path):
    import os

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    os.mkfifo(folder / "model.safetensors")
    with pytest.raises(MergewiseError, match="not a regular file"):
        ModelFolder(folder)


def test_tokenizer_files_are_copied_only_from_inside_the_source(tmp_path):
    from mergewise.checkpoint import copy_tokenizer

    source = model_folder(tmp_path / "source")
    (source / "tokenizer_config.json").write_text("{}")
    (source / "vocab.txt").symlink_to(source / "tokenizer_config.json")  # inside: fine
    out = tmp_path / "out"
    out.mkdir()
    copy_tokenizer(source, out)
    assert (out / "vocab.txt").read_text() == "{}" and not (out / "vocab.txt").is_symlink()
    (tmp_path / "passwords").write_text("secret")
    (source / "tokenizer.model").symlink_to(tmp_path / "passwords")
    with pytest.raises(MergewiseError, match="tokenizer file resolves to .*outside the model folder"):
        copy_tokenizer(source, tmp_path / "out")


@pytest.mark.parametrize("kernel_copy", [True, False])
def test_stored_tensors_copy_file_to_file_into_any_byte_span(tmp_path, monkeypatch, kernel_copy):
    """A tensor copied as stored lands where `write_at` would have put it, through copy_file_range
    or, where the kernel cannot copy between the files, through this process."""
    import errno
    import os

    if not kernel_copy:

        def cross_device(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "copy_file_range", cross_device)
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.json").write_text("{}")
    gate, up = torch.randn(6, 4).to(torch.bfloat16), torch.randn(6, 4).to(torch.bfloat16)
    save_file({"gate": gate, "up": up, "pad": torch.zeros(3)}, source / "model.safetensors")
    folder = ModelFolder(source)
    out = tmp_path / "out"
    out.mkdir()
    writer = StreamingShardWriter(out, [PlannedTensor("fused", (2, 12, 4), torch.bfloat16)], 10**6)
    row = 12 * 4 * 2
    writer.copy_stored("fused", row, folder.stored("gate"))  # expert 1: gate rows, then up rows
    writer.write_at("fused", up, row + gate.nbytes)
    writer.copy_stored("fused", 0, folder.stored("up"))
    writer.write_at("fused", gate, gate.nbytes)
    writer.close()
    fused = load_file(out / "model.safetensors")["fused"]
    assert torch.equal(fused[1], torch.cat([gate, up])) and torch.equal(fused[0], torch.cat([up, gate]))
    with pytest.raises(MergewiseError, match="48 bytes from byte 160 do not fit its 192"):
        writer.copy_stored("fused", 160, folder.stored("gate"))
    with pytest.raises(MergewiseError, match="tensor pad is torch.float32, fused is torch.bfloat16"):
        writer.copy_stored("fused", 0, folder.stored("pad"))
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)  # a source cut short under the reader
    with pytest.raises(MergewiseError, match="model.safetensors: tensor gate: the file ends 48 bytes early"):
        writer.copy_stored("fused", 0, folder.stored("gate"))


def test_only_tensors_read_exactly_as_stored_offer_their_bytes(tmp_path, tiny_family):
    from mergewise.checkpoint.lora import AdaptedFolder
    from tests.support.tiny_models import build_lora_adapter

    family = tiny_family("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    info = ModelFolder(family.base).stored(name)
    assert info is not None and info.file.suffix == ".safetensors"
    build_lora_adapter(family.base, tmp_path / "adapter", seed=1)
    assert AdaptedFolder(family.base, tmp_path / "adapter").stored(name) is None
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((family.base / "config.json").read_text())
    torch.save(load_file(family.base / "model.safetensors"), pickled / "pytorch_model.bin")
    assert ModelFolder(pickled, allow_pickle=True).stored(name) is None
