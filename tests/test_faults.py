"""Injected faults on a real `mergewise merge` process: SIGTERM and SIGKILL mid-merge, a full disk,
an output path under a file. Nothing is left half-written, and a killed merge's staging folder is
swept by the next merge into the same folder."""

from __future__ import annotations

import hashlib
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

pytestmark = pytest.mark.integration  # merges killed, signalled and starved in processes of their own

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
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out_dir), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "ANNOUNCE_AT_WRITE": str(at_write), "WRITE_DELAY": str(delay)},
    )
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
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert leftovers(out_dir) == [] and read_state_dict(out_dir)


def test_a_second_merge_into_the_same_folder_is_refused_while_the_first_runs(recipe, tmp_path):
    out_dir = tmp_path / "out"
    first = start_slow_merge(recipe, out_dir, delay=0.5)  # ~10 s of writes: the second merge starts meanwhile
    second = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2 and "another mergewise process is writing" in second.stderr, second.stderr
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert read_state_dict(out_dir) and leftovers(out_dir) == []


def test_a_full_disk_is_one_error_line_and_leaves_nothing(recipe, tmp_path):
    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG

    out_dir = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=small_files,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "Traceback" not in done.stderr
    assert not out_dir.exists() and leftovers(out_dir) == []


def test_an_output_under_a_file_is_one_error_line(recipe, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(tmp_path / "a-file" / "out"), "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if line.startswith("error: ")
    ], done.stderr
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
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(reference), *flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr

    out_dir = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-c", SLOW_MERGE, "merge", str(recipe), str(out_dir), *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
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

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergewise.cli",
            "merge",
            str(recipe),
            str(out_dir),
            "--resume",
            "--quiet",
            "--shard-size",
            "60KB",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
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
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(changed), str(out_dir), "--resume", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "staged from another recipe" in done.stderr, done.stderr
    assert not out_dir.exists() and [name.split("-")[0] for name in leftovers(out_dir)] == [".out.partial"]
    done = subprocess.run(
        [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(out_dir), "--resume", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
    )  # the staged work was kept
    assert done.returncode == 0 and leftovers(out_dir) == [], done.stderr


def test_an_unwritable_parent_is_one_error_line(recipe, tmp_path):
    """Root ignores permission bits, so the parent is made immutable (chattr +i) instead."""
    parent = tmp_path / "locked"
    parent.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode != 0:
        pytest.skip("no chattr, or a file system without the immutable attribute")
    try:
        done = subprocess.run(
            [sys.executable, "-m", "mergewise.cli", "merge", str(recipe), str(parent / "out"), "--quiet"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        subprocess.run(["chattr", "-i", str(parent)])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert str(parent) in lines[0] and list(parent.iterdir()) == []


# ------------------------------------------------------------------------------- kill at every call
# A merge of 3 MB (four shards) is killed just before each call that changes a file, one kill
# point per run: shard headers and rows, journal updates, metadata files, the journal's removal, each
# rename and removal. From each killed state the same merge is run again, plainly and with --resume.
KILL_HARNESS = Path(__file__).parent / "support" / "kill_harness.py"
SWEEP_FLAGS = ["--quiet", "--seed", "7", "--shard-size", "1MB", "--threads", "1"]
STAGED_MTIME_NS = 10**9


class KillHarness:
    """The server of tests/support/kill_harness.py: each run is a fork of one process that has
    imported mergewise, so that a run costs a fork, not a Python start-up."""

    def __init__(self):
        self.process = subprocess.Popen(
            [sys.executable, str(KILL_HARNESS)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, argv: list, cwd: Path, kill_at: int | None = None) -> dict:
        """Run `mergewise ARGV` in `cwd` (killed before its `kill_at`th call that changes a file; one
        that hangs is ended by SIGALRM after two minutes)."""
        request = {"argv": [str(argument) for argument in argv], "cwd": str(cwd), "kill_at": kill_at, "timeout": 120}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def harness():
    server = KillHarness()
    yield server
    server.close()


@pytest.fixture(scope="module")
def few_mb(tiny_family, tmp_path_factory) -> dict[str, Path]:
    """Two linear recipes over a family of 3 MB models: `new`, and `old` (other weights, another output)."""
    family = tiny_family("llama", hidden_size=384, intermediate_size=768, num_layers=1)
    folder = tmp_path_factory.mktemp("few-mb")
    recipes = {}
    for name, weights in (("new", (0.5, 0.5)), ("old", (0.8, 0.2))):
        models = [
            {"model": str(path), "parameters": {"weight": weight}} for path, weight in zip(family.fine_tunes, weights)
        ]
        recipes[name] = folder / f"{name}.yml"
        recipes[name].write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    return {**recipes, "inputs": family.base.parent, "recipes": folder}


def output_files(folder: Path) -> dict[str, object]:
    """What an output holds, by file: bytes, but mergewise.yml's creation time."""
    files: dict[str, object] = {path.name: path.read_bytes() for path in sorted(folder.iterdir())}
    if "mergewise.yml" in files:
        files["mergewise.yml"] = {
            key: value for key, value in yaml.safe_load(files["mergewise.yml"]).items() if key != "created"
        }
    return files


def tree_digest(*folders: Path) -> dict[str, str]:
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def beside(out_dir: Path) -> str:
    """The hidden names beside OUT_DIR, process ids and random suffixes left out; "+journal" marks
    a staging folder that still holds its journal, "(old kept)" a retired folder holding the output
    it set aside."""
    names = []
    for path in sorted(out_dir.parent.glob(f".{out_dir.name}.*")):
        name = path.name.removeprefix(f".{out_dir.name}.").split("-")[0]
        if (path / ".mergewise-progress.json").exists():
            name += "+journal"
        if (path / out_dir.name).is_dir():
            name += "(old kept)"
        names.append(name)
    return ",".join(names) or "-"


class Sweep:
    """Kills one merge at each of its calls that change a file, and runs it again from each state."""

    def __init__(self, harness: KillHarness, few_mb: dict, tmp_path: Path, flags: list[str]):
        self.harness, self.tmp_path, self.flags = harness, tmp_path, flags
        self.outside = [few_mb["inputs"], few_mb["recipes"], tmp_path]
        self.recipe = few_mb["new"]
        reference = tmp_path / "reference"
        assert harness.run(["merge", self.recipe, reference / "out", *SWEEP_FLAGS], tmp_path)["status"] == 0
        self.states: dict[str, dict | None] = {"absent": None, "new": output_files(reference / "out")}
        self.matrix = ["| # | killed before | OUT_DIR, beside it | plain merge | --resume |", "|---|---|---|---|---|"]

    def merge(self, work: Path, flags: list[str], kill_at: int | None = None) -> dict:
        return self.harness.run(["merge", self.recipe, work / "out", *SWEEP_FLAGS, *flags], self.tmp_path, kill_at)

    def state(self, out_dir: Path) -> str:
        if not out_dir.exists():
            return "absent"
        found = output_files(out_dir)
        return next((name for name, files in self.states.items() if files == found), "MIXED")

    def run(self, prepare) -> None:
        """`prepare(folder)` lays out the state the merge starts from in `folder` (OUT_DIR is folder/out)."""
        outside = tree_digest(*self.outside)
        start = self.tmp_path / "start"
        prepare(start)
        calls = self.merge(start, self.flags)["calls"]
        assert calls and self.state(start / "out") == "new"
        for kill_at, call in enumerate(calls, start=1):
            work = self.tmp_path / "killed"
            shutil.rmtree(work, ignore_errors=True)
            prepare(work)
            assert self.merge(work, self.flags, kill_at)["status"] == -signal.SIGKILL
            killed = self.state(work / "out")
            assert killed != "MIXED", (kill_at, call)
            if killed == "absent" and "old" in self.states:  # between the renames: the old one set aside whole
                assert [output_files(path) for path in work.glob(".out.old-*/out")] == [self.states["old"]]
            plain = [flag for flag in self.flags if flag != "--resume"]
            outcomes = [self.rerun(work, kill_at, flags) for flags in (plain, [*plain, "--resume"])]
            self.matrix.append(f"| {kill_at} | `{call}` | {killed}; {beside(work / 'out')} | {' | '.join(outcomes)} |")
        print("\n".join(self.matrix))
        for work in ("start", "killed", "rerun"):
            shutil.rmtree(self.tmp_path / work)
        assert tree_digest(*self.outside) == outside  # inputs, recipes, the outputs merged before: unchanged

    def rerun(self, killed: Path, kill_at: int, flags: list[str]) -> str:
        work = self.tmp_path / "rerun"
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(killed, work, symlinks=True)
        for shard in work.glob(".out.partial-*/*.safetensors"):
            os.utime(shard, ns=(STAGED_MTIME_NS, STAGED_MTIME_NS))  # a kept shard is never written again
        before = self.state(work / "out")
        done = self.merge(work, flags)
        lines = done["stderr"].strip().splitlines()
        if done["status"] == 2:  # only a finished output, without --overwrite
            assert before == "new" and "--overwrite" not in flags, (kill_at, flags, done["stderr"])
            assert len(lines) == 1 and "already exists" in lines[0], (kill_at, flags, done["stderr"])
            outcome = "refused: exists"
        else:
            assert done["status"] == 0 and all(line.startswith("warning: ") for line in lines), (kill_at, done)
            shards = list((work / "out").glob("*.safetensors"))
            kept = sum(shard.stat().st_mtime_ns == STAGED_MTIME_NS for shard in shards)
            outcome = f"resumed, kept {kept}/{len(shards)} shards" if kept else "merged"
            if lines:
                outcome += " (restored old first)" if "put back" in done["stderr"] else f" ({lines})"
        assert self.state(work / "out") == "new", (kill_at, flags)
        leftover = beside(work / "out")
        assert leftover in ("-", "lock") and (leftover == "-" or done["status"] == 2), (kill_at, flags, leftover)
        return outcome + ("; lock stays" if leftover == "lock" else "")


@pytest.fixture
def sweep(harness, few_mb, tmp_path):
    return lambda *flags: Sweep(harness, few_mb, tmp_path, list(flags))


def test_a_merge_killed_at_any_call_leaves_no_output_or_the_whole_one(sweep):
    sweep().run(lambda folder: folder.mkdir())


def test_an_overwrite_killed_at_any_call_leaves_the_old_output_or_the_new_one(sweep, harness, few_mb, tmp_path):
    merged = sweep("--overwrite")
    old = tmp_path / "old"
    assert harness.run(["merge", few_mb["old"], old / "out", *SWEEP_FLAGS], tmp_path)["status"] == 0
    merged.states["old"] = output_files(old / "out")
    merged.run(lambda folder: shutil.copytree(old, folder))


def test_a_resume_killed_at_any_call_leaves_the_old_output_or_the_new_one(sweep, harness, few_mb, tmp_path):
    """A resumed --overwrite of a merge killed with one shard finished."""
    resumed = sweep("--overwrite", "--resume")
    half = tmp_path / "half"
    assert harness.run(["merge", few_mb["old"], half / "out", *SWEEP_FLAGS], tmp_path)["status"] == 0
    resumed.states["old"] = output_files(half / "out")
    kill_after_the_first_shard(harness, few_mb["new"], half / "out", "--overwrite")
    resumed.run(lambda folder: shutil.copytree(half, folder))


def merge_calls(harness: KillHarness, recipe: Path, out_dir: Path, *flags: str) -> list[str]:
    """The calls that change files of an uninterrupted merge, run on a copy of `out_dir`'s folder."""
    scratch = out_dir.parent.parent / f"{out_dir.parent.name}-traced"
    if out_dir.parent.exists():
        shutil.copytree(out_dir.parent, scratch, symlinks=True)
    done = harness.run(["merge", recipe, scratch / out_dir.name, *SWEEP_FLAGS, *flags], out_dir.parent.parent)
    shutil.rmtree(scratch)
    return done["calls"]


def kill_after_the_first_shard(harness: KillHarness, recipe: Path, out_dir: Path, *flags: str) -> Path:
    """Kill a merge once its journal records its first shard; its staging folder."""
    calls = merge_calls(harness, recipe, out_dir, *flags)
    recorded = [index for index, call in enumerate(calls, start=1) if call.startswith("os.replace")][1]
    assert (
        harness.run(["merge", recipe, out_dir, *SWEEP_FLAGS, *flags], out_dir.parent.parent, recorded + 1)["status"]
        == -signal.SIGKILL
    )
    assert beside(out_dir) == "lock,partial+journal"
    return next(out_dir.parent.glob(f".{out_dir.name}.partial-*"))


def test_resume_of_another_recipe_never_builds_on_a_finished_merge(harness, few_mb, tmp_path):
    """Killed anywhere from its last tensor write to its move into place, a merge's staged output is
    refused by a --resume of another recipe (and kept), or swept: never the start of that recipe's output."""
    reference = tmp_path / "reference" / "out"
    assert harness.run(["merge", few_mb["old"], reference, "--quiet", "--seed", "7"], tmp_path)["status"] == 0
    calls = merge_calls(harness, few_mb["new"], tmp_path / "work" / "out")
    last_write = max(index for index, call in enumerate(calls, start=1) if call.startswith("os.pwrite"))
    into_place = next(index for index, call in enumerate(calls, start=1) if call.startswith("os.rename"))
    outcomes = set()
    for kill_at in range(last_write, into_place + 1):
        work = tmp_path / "work"
        shutil.rmtree(work, ignore_errors=True)
        assert harness.run(["merge", few_mb["new"], work / "out", *SWEEP_FLAGS], tmp_path, kill_at)["status"] < 0
        staged_before = tree_digest(*work.glob(".out.partial-*"))
        done = harness.run(["merge", few_mb["old"], work / "out", "--quiet", "--seed", "7", "--resume"], tmp_path)
        if done["status"] == 2:
            assert done["stderr"].count("\n") == 1 and "staged from another recipe" in done["stderr"], done["stderr"]
            assert not (work / "out").exists() and tree_digest(*work.glob(".out.partial-*")) == staged_before
        else:
            assert done["status"] == 0 and output_files(work / "out") == output_files(reference), calls[kill_at - 1]
            assert beside(work / "out") == "-"
        outcomes.add(done["status"])
    assert outcomes == {0, 2}


@pytest.mark.parametrize(
    "planted",
    [
        "symlinked shard",
        "hard-linked shard",
        "FIFO shard",
        "subfolder",
        "symlinked staging folder",
        "another user's staging folder",
    ],
)
def test_resume_refuses_a_staging_folder_that_leads_elsewhere(harness, few_mb, tmp_path, planted):
    """A resumed merge would write its unfinished shard through a symlink or a hard link (into a file
    outside OUT_DIR), hang on a FIFO, or publish what it did not write."""
    out_dir = tmp_path / "work" / "out"
    staging = kill_after_the_first_shard(harness, few_mb["new"], out_dir)
    unfinished = staging / "model-00004-of-00004.safetensors"
    precious = tmp_path / "precious.bin"
    precious.write_bytes(b"precious")
    if planted == "symlinked shard":
        unfinished.unlink()
        unfinished.symlink_to(precious)
    elif planted == "hard-linked shard":
        unfinished.unlink()
        os.link(precious, unfinished)
    elif planted == "FIFO shard":
        unfinished.unlink()
        os.mkfifo(unfinished)
    elif planted == "subfolder":
        (staging / "extra").mkdir()
    elif planted == "another user's staging folder":
        if os.geteuid() != 0:
            pytest.skip("only root can give a folder to another user")
        os.chown(staging, os.geteuid() + 4242, -1)
    else:
        elsewhere = shutil.move(staging, tmp_path / "elsewhere")
        staging.symlink_to(elsewhere)
    done = harness.run(["merge", few_mb["new"], out_dir, *SWEEP_FLAGS, "--resume"], tmp_path)
    lines = done["stderr"].strip().splitlines()
    assert done["status"] == 2 and len(lines) == 1 and lines[0].startswith("error: --resume: "), done["stderr"]
    assert precious.read_bytes() == b"precious" and not out_dir.exists()
    assert os.path.lexists(staging)  # kept: merging again without --resume removes it
    done = harness.run(["merge", few_mb["new"], out_dir, *SWEEP_FLAGS], tmp_path)
    assert done["status"] == 0 and beside(out_dir) == "-" and precious.read_bytes() == b"precious", done["stderr"]


@pytest.mark.parametrize("planted", ["FIFO", "symlink to a new file", "symlink to a file", "folder"])
def test_a_lock_path_that_is_not_a_regular_file_is_one_error_line(harness, few_mb, tmp_path, planted):
    lock = tmp_path / ".out.lock"
    target = tmp_path / "target"
    if planted == "FIFO":
        os.mkfifo(lock)
    elif planted == "folder":
        lock.mkdir()
    else:
        if planted == "symlink to a file":
            target.write_text("kept")
        lock.symlink_to(target)
    done = harness.run(["merge", few_mb["new"], tmp_path / "out", *SWEEP_FLAGS], tmp_path)
    lines = done["stderr"].strip().splitlines()
    assert done["status"] == 2 and len(lines) == 1 and lines[0].startswith("error: lock file "), done["stderr"]
    assert str(lock) in lines[0] and not (tmp_path / "out").exists() and os.path.lexists(lock)
    assert (target.read_text() == "kept") if planted == "symlink to a file" else not target.exists()


def test_an_overwrite_killed_between_its_renames_is_put_back_by_the_next_merge(harness, few_mb, tmp_path):
    """Killed after the old output is set aside and before the new one is in place, OUT_DIR is missing:
    the next merge into it puts the old output back first (so that a merge without --overwrite refuses
    to replace it)."""
    out_dir = tmp_path / "work" / "out"
    assert harness.run(["merge", few_mb["old"], out_dir, *SWEEP_FLAGS], tmp_path)["status"] == 0
    old = output_files(out_dir)
    calls = merge_calls(harness, few_mb["new"], out_dir, "--overwrite")
    second_rename = [index for index, call in enumerate(calls, start=1) if call.startswith("os.rename")][1]
    assert calls[second_rename - 1].startswith("os.rename .out.partial-")
    killed = harness.run(["merge", few_mb["new"], out_dir, *SWEEP_FLAGS, "--overwrite"], tmp_path, second_rename)
    assert killed["status"] == -signal.SIGKILL and not out_dir.exists()
    assert beside(out_dir) == "lock,old(old kept),partial"
    retired = next(out_dir.parent.glob(".out.old-*"))
    done = harness.run(["merge", few_mb["new"], out_dir, *SWEEP_FLAGS], tmp_path)
    assert done["status"] == 2 and done["stderr"].splitlines() == [
        f"warning: {out_dir}: put back the output that an interrupted --overwrite had moved to {retired.name}",
        f"error: output folder {out_dir} already exists (use --overwrite to replace it)",
    ], done["stderr"]
    assert output_files(out_dir) == old and beside(out_dir) == "partial"  # swept by a merge that runs
    done = harness.run(["merge", few_mb["new"], out_dir, *SWEEP_FLAGS, "--overwrite"], tmp_path)
    assert done["status"] == 0 and beside(out_dir) == "-" and output_files(out_dir) != old, done["stderr"]


def test_a_staging_folder_named_with_this_process_id_is_an_orphan(recipe, tmp_path):
    """Process ids are reused (a container restarted runs its merge with the same small id): under
    the lock, a staging folder of this id is a killed merge's."""
    from mergewise.cli import main

    leftover = tmp_path / f".out.partial-{os.getpid()}-abcdefgh"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--quiet"]) == 0
    assert leftovers(tmp_path / "out") == [] and read_state_dict(tmp_path / "out")
