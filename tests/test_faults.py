"""Injected faults on a real `mergewise merge` process: SIGTERM and SIGKILL mid-merge, a full disk,
an output path under a file. Nothing is left half-written, and a killed merge's staging folder is
swept by the next merge into the same folder."""

from __future__ import annotations

import os
import resource
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
import sys, time
from mergewise.checkpoint import writer
write = writer.StreamingShardWriter.write
def slow(self, *args, **kwargs):
    if not getattr(slow, "announced", False):
        slow.announced = True
        print("writing", flush=True)
    time.sleep(0.02)
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


def start_slow_merge(recipe: Path, out_dir: Path, **popen) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out_dir), "--quiet"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    assert child.stdout.readline().strip() == "writing", child.stderr.read()
    return child


def test_sigterm_mid_merge_cleans_up_like_ctrl_c(recipe, tmp_path):
    out_dir = tmp_path / "out"
    child = start_slow_merge(recipe, out_dir)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=60)
    assert child.returncode == 143 and stderr.strip().splitlines()[-1] == "error: terminated"
    assert not out_dir.exists() and leftovers(out_dir) == []


def test_a_killed_merge_is_swept_by_the_next_one(recipe, tmp_path):
    out_dir = tmp_path / "out"
    child = start_slow_merge(recipe, out_dir)
    child.kill()
    child.communicate(timeout=60)
    assert [name.split("-")[0] for name in leftovers(out_dir)] == [".out.lock", ".out.partial"]  # SIGKILL leaves them
    done = subprocess.run([sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert leftovers(out_dir) == [] and read_state_dict(out_dir)


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
