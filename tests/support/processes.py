"""The `mergewise` command in a process of its own, measured: its exit status, stderr, wall time and
peak resident memory (what a small crafted input must not be able to take), optionally with a small
file size limit (a full disk)."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

LIMIT_SECONDS = 60
LIMIT_RSS = 1 << 30


@dataclass(frozen=True)
class Measured:
    status: int
    stderr: str
    seconds: float
    peak_rss: int  # bytes

    def assert_one_error(self, *named: str) -> str:
        """Exit 2 with a single `error:` line, the last, naming each of `named` (before it, only
        transformers' loading progress), within the time and memory limits; the line is returned."""
        lines = self.stderr.strip().splitlines()
        assert self.status == 2 and "Traceback" not in self.stderr, self.stderr
        assert [line for line in lines if line.startswith("error: ")] == lines[-1:], self.stderr
        for fragment in named:
            assert fragment in lines[-1], f"{fragment!r} not named in {lines[-1]!r}"
        self.assert_bounded()
        return lines[-1]

    def assert_bounded(self) -> None:
        assert self.seconds < LIMIT_SECONDS, f"took {self.seconds:.0f} s"
        assert self.peak_rss < LIMIT_RSS, f"peak RSS {self.peak_rss / 2**20:.0f} MiB"


# The command, then its peak resident memory (VmHWM, kB) written to the file named first. Measured by
# the process itself: a child's ru_maxrss starts at the resident size of the process it was forked from.
MEASURED_COMMAND = """
import sys
from mergewise.cli import main
status = main(sys.argv[2:])
with open("/proc/self/status") as status_file, open(sys.argv[1], "w") as report:
    report.write(next(line.split()[1] for line in status_file if line.startswith("VmHWM:")))
sys.exit(status)
"""


def run_measured(*argv: str, file_size_limit: int | None = None) -> Measured:
    """`mergewise ARGV` run to its end (killed past twice LIMIT_SECONDS); with `file_size_limit`, no
    file it writes may grow past that many bytes (a write past it fails as on a full disk)."""

    def limits():
        if file_size_limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    with tempfile.NamedTemporaryFile("r") as report:
        started = time.perf_counter()
        try:
            done = subprocess.run(
                [sys.executable, "-c", MEASURED_COMMAND, report.name, *argv],
                text=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=limits,
                timeout=2 * LIMIT_SECONDS,
            )
        except subprocess.TimeoutExpired as expired:
            return Measured(-9, expired.stderr or "", time.perf_counter() - started, 0)
        peak = report.read().strip()
    return Measured(done.returncode, done.stderr, time.perf_counter() - started, int(peak or 0) * 1024)
