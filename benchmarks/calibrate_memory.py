"""Peak memory of `mergewise calibrate`: layer-streamed vs in-memory, at two depths of the same width.

Each run is a child process; its peak resident set comes from `os.wait4` (ru_maxrss). The models are
random bf16 Llamas written directly with safetensors (a few shards and an index) by another child, so
this parent stays small: a child's ru_maxrss also counts the parent pages it was forked with.
Writes benchmarks/results/calibrate_memory.md.

    python benchmarks/calibrate_memory.py [--depths 8 32] [--hidden 768] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "calibrate_memory.md"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository: tests.support builds the models
LAYERS_PER_SHARD = 8


def build_random_llama(folder: Path, depth: int, hidden: int) -> int:
    """A random bf16 Llama of `depth` layers; returns its size in bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests.support.tiny_models import save_tokenizer, tiny_config

    config = tiny_config("llama", num_layers=depth, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_heads=hidden // 64, num_kv_heads=hidden // 256, vocab_size=256, max_positions=512)
    with torch.device("meta"):
        shapes = {name: p.shape for name, p in AutoModelForCausalLM.from_config(config).named_parameters()}
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in shapes.items():
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else 0
        tensor = torch.ones(shape) if len(shape) == 1 else 0.02 * torch.randn(shape, generator=generator)
        shards.setdefault(f"model-{layer // LAYERS_PER_SHARD:05d}.safetensors", {})[name] = tensor.to(torch.bfloat16)
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    save_tokenizer(folder)
    return sum(file.stat().st_size for file in folder.glob("*.safetensors"))


def peak_rss(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of a child process."""
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    error = child.stderr.read().decode()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{error}")
    return usage.ru_maxrss / 1024, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)  # child: build one model and exit
    args = parser.parse_args()
    if args.build:
        build_random_llama(args.build, args.depths[0], args.hidden)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="calibrate-memory-"))
    text = work / "calibration.txt"
    work.mkdir(parents=True, exist_ok=True)
    text.write_text("\n\n".join(f"model merging adds the task vectors of fine tunes number {i} to the base "
                                "while attention heads share keys and values" for i in range(400)))
    rows = []
    for depth in args.depths:
        model = work / f"llama-{depth}"
        subprocess.run([sys.executable, __file__, "--build", str(model), "--depths", str(depth), str(depth),
                        "--hidden", str(args.hidden)], check=True)
        size = sum(file.stat().st_size for file in model.glob("*.safetensors"))
        for label, extra in (("--stream-layers", ["--stream-layers"]), ("in-memory", [])):
            command = [sys.executable, "-m", "mergewise.cli", "calibrate", str(model), str(work / "stats.safetensors"),
                       "--data", str(text), "--samples", str(args.samples), "--seq-len", str(args.seq_len),
                       "--quiet", *extra]
            rss, seconds = peak_rss(command)
            rows.append((depth, label, size / 2**20, rss, seconds))
            print(f"depth {depth:3d} {label:16s} checkpoint {size / 2**20:7.0f} MiB  peak RSS {rss:7.0f} MiB  {seconds:5.1f} s")
    streamed = [rss for _, label, _, rss, _ in rows if label == "--stream-layers"]
    ratio = max(streamed) / min(streamed)
    lines = [
        "# Peak memory of `mergewise calibrate`",
        "",
        f"Random bf16 Llama, hidden {args.hidden}, intermediate {args.hidden * 8 // 3}, vocab 256; "
        f"{args.samples} blocks × {args.seq_len} tokens from a text file; CPU; peak RSS of the child process "
        "(`os.wait4` ru_maxrss), including Python, torch and transformers themselves.",
        "",
        "| layers | pass | checkpoint (MiB) | peak RSS (MiB) | wall (s) |",
        "|---:|---|---:|---:|---:|",
        *(f"| {depth} | {label} | {size:.0f} | {rss:.0f} | {seconds:.1f} |" for depth, label, size, rss, seconds in rows),
        "",
        f"`--stream-layers` peak RSS, deepest / shallowest: **{ratio:.2f}×** (flat means within 1.20×).",
        "",
    ]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print(f"ratio {ratio:.2f}; written to {RESULTS}")


if __name__ == "__main__":
    main()
