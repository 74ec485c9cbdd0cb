"""Injected faults on a real `mergewise merge` process: SIGTERM and SIGKILL mid-merge, a full disk,
an output path under a file. Nothing is left half-written, and a killed merge's staging folder is
swept by the next merge into the same folder."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.tiny_models import read_state_dict

# The child merges with every row write slowed down and announces its first write on stdout, so a
# signal reliably lands in the middle of the merge.
SLOW_MERGE = """
import os, sys, time
from mergewise.checkpoint import writer
write = writer.StreamingShardWriter.write
announce_at = int(os.environ.get("ANNOUNCE_AT_WRITE", "1"))
delay = float(os.environ.get("WRITE_DELAY", "0.02"))
def slow(self, *args, **kwargs):
    slow.count = getattr(slow, "count", 0) + 1
    if slow.count == announce_at:
        print("writing", flush=True)
    time.sleep(delay)
    return write(self, *args, **kwargs)
writer.StreamingShardWriter.write = slow
from mergewise.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def recipe(tiny_family, tmp_path) -> Path:
    family = tiny_family("llama")
    models = [{"model": str(path), "parameters": {"weight": 0.5}} for path in family.fine_tunes[:2]]
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    return path


def leftovers(out_dir: Path) -> list[str]:
    return sorted(path.name for path in out_dir.parent.glob(f".{out_dir.name}.*"))


def start_slow_merge(recipe: Path, out_dir: Path, at_write: int = 1, delay: float = 0.02) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out_dir), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "ANNOUNCE_AT_WRITE": str(at_write), "WRITE_DELAY": str(delay)})
    assert child.stdout.readline().strip() == "writing", child.stderr.read()
    return child


@pytest.mark.parametrize("at_write", [1, 8, 15])  # the first write, mid-merge, near the end
def test_sigterm_mid_merge_cleans_up_like_ctrl_c(recipe, tmp_path, at_write):
    out_dir = tmp_path / "out"
    child = start_slow_merge(recipe, out_dir, at_write)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 143 and stderr.strip().splitlines()[-1] == "error: terminated"
    assert not out_dir.exists() and leftovers(out_dir) == []


@pytest.mark.parametrize("at_write", [1, 15])
def test_a_killed_merge_is_swept_by_the_next_one(recipe, tmp_path, at_write):
    out_dir = tmp_path / "out"
    child = start_slow_merge(recipe, out_dir, at_write)
    child.kill()
    child.communicate(timeout=60)
    assert [name.split("-")[0] for name in leftovers(out_dir)] == [".out.lock", ".out.partial"]  # SIGKILL leaves them
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert leftovers(out_dir) == [] and read_state_dict(out_dir)


def test_a_second_merge_into_the_same_folder_is_refused_while_the_first_runs(recipe, tmp_path):
    out_dir = tmp_path / "out"
    first = start_slow_merge(recipe, out_dir, delay=0.5)  # ~10 s of writes: the second merge starts meanwhile
    second = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "another mergewise process is writing" in second.stderr, second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert read_state_dict(out_dir) and leftovers(out_dir) == []


def test_a_full_disk_is_one_error_line_and_leaves_nothing(recipe, tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG

    out_dir = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
                          capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert not out_dir.exists() and leftovers(out_dir) == []


def test_an_output_under_a_file_is_one_error_line(recipe, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(tmp_path / "a-file" / "out"),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("error: ")], done.stderr
    assert "a-file" in done.stderr


def test_threads_below_one_are_refused(recipe, tmp_path, capsys):
    from mergewise.cli import main

    assert main(["merge", str(recipe), str(tmp_path / "out"), "--threads", "-1", "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads: must be at least 1, got -1"


def test_output_permissions_follow_the_umask(recipe, tmp_path):
    previous = os.umask(0o027)
    try:
        from mergewise.cli import main

        assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


# ------------------------------------------------------------------------------------------- resume
def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}


def test_resume_keeps_the_finished_shards_and_gives_the_uninterrupted_bytes(tiny_family, tmp_path):
    family = tiny_family("llama")
    recipe = tmp_path / "recipe.yml"
    models = [{"model": str(path), "parameters": {"weight": 0.5, "density": 0.5}} for path in family.fine_tunes[:2]]
    recipe.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(family.base), "models": models}))
    flags = ["--quiet", "--seed", "7", "--shard-size", "60KB"]
    reference = tmp_path / "reference"
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(reference), *flags],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    out_dir = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out_dir), *flags],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    finished: dict = {}
    while len(finished) < 2:  # wait until two shards are recorded as finished, then kill
        journals = list(tmp_path.glob(".out.partial-*/.mergewise-progress.json"))
        try:
            finished = json.loads(journals[0].read_text())["finished"] if journals else {}
        except ValueError:
            finished = {}
        assert child.poll() is None, "the merge ended before it could be killed"
    child.kill()
    child.communicate(timeout=60)
    staged = next(tmp_path.glob(".out.partial-*"))
    kept = {name: (staged / name).stat().st_mtime_ns for name in finished}

    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--resume",
                           "--quiet", "--shard-size", "60KB"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert shard_bytes(out_dir) == shard_bytes(reference)
    assert {name: (out_dir / name).stat().st_mtime_ns for name in kept} == kept  # not computed again
    assert yaml.safe_load((out_dir / "mergewise.yml").read_text())["seed"] == 7
    assert leftovers(out_dir) == [] and not (out_dir / ".mergewise-progress.json").exists()


def test_resume_refuses_a_staged_merge_of_another_recipe(recipe, tmp_path):
    out_dir = tmp_path / "out"
    child = start_slow_merge(recipe, out_dir)
    child.kill()
    child.communicate(timeout=60)
    changed = tmp_path / "changed.yml"
    data = yaml.safe_load(recipe.read_text())
    data["models"][0]["parameters"]["weight"] = 0.25
    changed.write_text(yaml.safe_dump(data))
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(changed), str(out_dir), "--resume",
                           "--quiet"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "staged from another recipe" in done.stderr, done.stderr
    assert not out_dir.exists() and [name.split("-")[0] for name in leftovers(out_dir)] == [".out.partial"]
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--resume",
                           "--quiet"], capture_output=True, text=True, timeout=120)  # the staged work was kept
    assert done.returncode == 0 and leftovers(out_dir) == [], done.stderr


def test_an_unwritable_parent_is_one_error_line(recipe, tmp_path):
    """Root ignores permission bits, so the parent is made immutable (chattr +i) instead."""
    parent = tmp_path / "locked"
    parent.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode != 0:
        pytest.skip("no chattr, or a file system without the immutable attribute")
    try:
        done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(parent / "out"),
                               "--quiet"], capture_output=True, text=True, timeout=120)
    finally:
        subprocess.run(["chattr", "-i", str(parent)])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(parent) in lines[0] and list(parent.iterdir()) == []
