"""What every benchmark shares: where reports and caches go, a command run as a measured child process,
the peak RSS of servers while they run, repeated runs taking turns, and the report files.

Peak memory is measured one way: the kernel's high-water mark of each process's resident set (VmHWM;
`ru_maxrss` is the same counter), never a sample. A command that runs to its end is started by a small
launcher that reads it from `os.wait4` (`run_measured`); servers still running have it read from /proc,
reset as the measured span starts (`PeakRss`). The launcher is how the comparisons with mergekit
measured before; the other ways the benchmarks used were each wrong somewhere: sampling RSS (the
serving benchmark, every 20 ms) misses a peak between two samples; a child reading its own VmHWM at
exit (the Mediator benchmarks) misses the processes it starts and needs its exit handlers to run;
`ru_maxrss` of a child spawned by the benchmark itself (the calibration benchmark) also counts the
benchmark's memory, which Linux carries across exec.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
RESULTS = BENCHMARKS / "results"
WORK = BENCHMARKS / ".work"  # caches of workloads and outputs (git-ignored)
TOOLS = ("mergekit", "mergewise")  # the peer first, in every comparison


def mergewise_command(*args: str) -> list[str]:
    """`mergewise ARGS…` run by this interpreter, so that the mergewise it imports is the one measured."""
    return [sys.executable, "-m", "mergewise.cli", *args]


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_rss_mib: float


class CommandFailed(SystemExit):
    """A measured command that failed: a SystemExit, so that the benchmark ends with this message unless
    the caller catches it (as `workloads.build_mediator` does, to report a setting the build refuses)."""


# Stands between the benchmark and the measured command. A child's ru_maxrss also counts the memory of
# the process it was spawned from (Linux carries the pre-exec peak across exec), so the command starts
# from this small process rather than from the benchmark, which may hold torch and whole tensors. The
# command's stdout and stderr both go to the launcher's stderr; the launcher's stdout says the wall
# time, the peak in KiB and the exit status.
LAUNCHER = """
import os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, 2, 1)])
_, status, usage = os.wait4(pid, 0)
print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))
"""


def run_measured(command: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None) -> Measured:
    """Run `command` to its end: its wall time and peak RSS (the largest of its own and of the processes
    it waited for). Its output goes to `log` when given; a failure raises CommandFailed, whose message
    names the log or, without one, ends with the command's output (its last line is the command's)."""
    launch = [sys.executable, "-c", LAUNCHER, *command]
    if log is None:
        done = subprocess.run(launch, capture_output=True, env=env, check=True)
        detail = done.stderr.decode(errors="replace").strip()
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as output:
            done = subprocess.run(launch, stdout=subprocess.PIPE, stderr=output, env=env, check=True)
        detail = f"see {log}"
    wall_s, max_rss_kib, exit_code = done.stdout.split()
    if int(exit_code) != 0:
        raise CommandFailed(f"{' '.join(command)} failed (exit {exit_code}):\n{detail}")
    return Measured(float(wall_s), int(max_rss_kib) / 1024)  # ru_maxrss is in KiB on Linux


class PeakRss:
    """The peak RSS of running processes and of every process they started, over a `with` block: the sum
    of each one's high-water mark (VmHWM), reset as the block starts. For several processes a sum of
    peaks: never below what they held together at any moment, above it where their peaks fell apart.
    A process that ends within the block is not counted (servers and their model processes do not)."""

    def __init__(self, pids: Iterable[int]):
        self.pids = list(pids)
        self.mib = 0.0

    def __enter__(self) -> PeakRss:
        for pid in self._tree():
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset VmHWM to the current RSS
            except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
                pass
        return self

    def __exit__(self, *exc) -> None:
        self.mib = sum(_vm_hwm_kib(pid) for pid in self._tree()) / 1024

    def _tree(self) -> Iterator[int]:
        import psutil  # the test extra; only the serving benchmark measures running processes

        for pid in self.pids:
            try:
                children = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            yield pid
            yield from (child.pid for child in children)


def _vm_hwm_kib(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):  # it ended meanwhile
        return 0
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


@dataclass(frozen=True)
class Run:
    """Repeated measurements of one tool on one task; tables give the medians."""

    method: str
    tool: str
    walls_s: tuple[float, ...]
    peaks_rss_mb: tuple[float, ...]

    @property
    def wall_s(self) -> float:
        return statistics.median(self.walls_s)

    @property
    def peak_rss_mb(self) -> float:
        return statistics.median(self.peaks_rss_mb)

    @property
    def wall_range(self) -> str:
        return f"{min(self.walls_s):.1f}–{max(self.walls_s):.1f}" if len(self.walls_s) > 1 else ""


def repeated(label: str, tools: list[str], measure: Callable[[str], Measured], repeats: int) -> list[Run]:
    """`repeats` rounds of `measure(tool)`, the tools taking turns within each round, so that a slow
    spell of the machine falls on both rather than on one tool's runs."""
    rounds = [[measure(tool) for tool in tools] for _ in range(repeats)]
    return [
        Run(label, tool, tuple(r[index].wall_s for r in rounds), tuple(r[index].peak_rss_mib for r in rounds))
        for index, tool in enumerate(tools)
    ]


def comparison_table(
    runs: list[Run], agreement: dict[str, str], targets: dict[str, tuple[float, float | None]] | None = None
) -> str:
    """Markdown: one row per run; mergewise rows also give speed-up and RSS ratio against mergekit, the
    (speed-up, RSS ratio) `targets` of their method, and how the output compares with mergekit's."""
    targets = targets or {}
    mergekit = {run.method: run for run in runs if run.tool == "mergekit"}
    lines = [
        "| method | tool | wall s (median) | range | peak RSS MB | speed-up vs mergekit | RSS vs mergekit "
        "| target (speed-up, RSS) | output vs mergekit |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in runs:
        speed = rss = target = ""
        reference = mergekit.get(run.method)
        if run.tool == "mergewise" and reference is not None:
            speed = f"{reference.wall_s / run.wall_s:.2f}×"
            rss = f"{run.peak_rss_mb / reference.peak_rss_mb:.2f}×"
        if run.tool == "mergewise" and run.method in targets:
            speed_target, rss_target = targets[run.method]
            target = f"≥ {speed_target:g}×" + ("" if rss_target is None else f", ≤ {rss_target:g}×")
        measured = f"{run.wall_s:.1f} | {run.wall_range} | {run.peak_rss_mb:.0f}"
        same = agreement.get(run.method, "") if run.tool == "mergewise" else ""
        lines.append(f"| {run.method} | {run.tool} | {measured} | {speed} | {rss} | {target} | {same} |")
    return "\n".join(lines)


def machine_line(threads: int | None) -> str:
    """CPUs, architecture, torch, threads, the 15-minute load average (above the CPU count, other work
    skewed the timings) and the date."""
    import torch

    load = os.getloadavg()[2]
    return (
        f"{os.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}, "
        f"threads: {threads if threads is not None else 'default'}, load {load:.1f}, "
        f"measured {time.strftime('%Y-%m-%d')}"
    )


def write_result(path: Path, text: str) -> None:
    """Write a report (or replace it), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_report(path: Path, title: str, body: str, threads: int | None) -> None:
    """A titled report with the machine line, written to `path` and printed."""
    write_result(path, f"# {title}\n\n{machine_line(threads)}\n\n{body}\n")
    print(f"\n{body}\n\nwritten to {path}")
