"""`mergewise serve` under load, side by side with its peers, on a zoo.

    python benchmarks/serve.py --zoo /path/to/zoo [--concurrency 1 4 16] [--requests 48] [--max-tokens 32]

Serves, one setup after the other on loopback, each in a process of its own:
  (a) the zoo's Mediator folder (default settings, bf16) under `mergewise serve`, `model: auto`;
  (b) the same dense model D under `transformers serve` (the peer), with and without its continuous
      batching, and under `mergewise serve` as a plain folder;
  (c) each expert exported and served plainly by its own `mergewise serve` (the cost of N separate
      models: requests go to their task's server, RSS is the sum).
A bounded load generator (the async `openai` client, streaming) sends the same mixed-task prompts of
the zoo's experts (held-out eval prompts, tasks interleaved) at each concurrency: requests/s, tokens/s,
p50/p99 time to first token and end-to-end latency, failed requests, route switches per 100 requests
(from /metrics), and peak RSS at that concurrency: the sum of the high-water marks of the serving
processes and their children (a peer runs its model in a child process), reset as the level starts
(`common.PeakRss`). For (a) it also records routing accuracy through the server (the share of the
prompts selected to their own task's expert, from the `x-mergewise-*` headers) next to the router's
own decisions on the same prompts in this process (what `mergewise eval` computes).

Writes benchmarks/results/serve-<zoo name>[-<dtype>].md and .png. The Mediator build and the exports are cached
under --work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import openai
from common import RESULTS, WORK, PeakRss, mergewise_command, write_result
from workloads import MEDIATOR_DEFAULT, build_mediator

from mergewise.zoo.manifest import load_zoo

STARTUP_SECONDS = 600


@dataclass
class Outcome:
    ttft: float | None = None
    latency: float = 0.0
    tokens: int = 0
    decision: str | None = None  # the route's headers, for Mediator
    task: str | None = None
    failed: str | None = None


@dataclass
class Level:
    """One setup at one concurrency."""

    concurrency: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    switches: float | None = None
    peak_rss_mib: float = 0.0

    @property
    def done(self) -> list[Outcome]:
        return [outcome for outcome in self.outcomes if outcome.failed is None]

    def row(self, name: str) -> str:
        done = self.done
        tokens = sum(outcome.tokens for outcome in done)
        ttft = sorted(outcome.ttft for outcome in done if outcome.ttft is not None)
        latency = sorted(outcome.latency for outcome in done)
        switches = "—" if self.switches is None else f"{100 * self.switches / max(len(self.outcomes), 1):.1f}"
        return (
            f"| {name} | {self.concurrency} | {len(done) / self.seconds:.2f} | {tokens / self.seconds:.1f} | "
            f"{_quantile(ttft, 0.5) * 1000:.0f} / {_quantile(ttft, 0.99) * 1000:.0f} | "
            f"{_quantile(latency, 0.5) * 1000:.0f} / {_quantile(latency, 0.99) * 1000:.0f} | "
            f"{len(self.outcomes) - len(done)} | {switches} | {self.peak_rss_mib:.0f} |"
        )

    @property
    def tokens_per_second(self) -> float:
        return sum(outcome.tokens for outcome in self.done) / self.seconds


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Served:
    """A serving process on a free loopback port; `model` is the id its requests name."""

    def __init__(self, command: list[str], model: str, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        self.log = log.open("w")
        self.process = subprocess.Popen(
            [*command, "--port", str(self.port)], stdout=self.log, stderr=self.log, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{' '.join(command)} ended; see {log}")
            try:
                if httpx2.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    return
            except httpx2.TransportError:
                time.sleep(0.5)
        raise RuntimeError(f"{' '.join(command)} did not start; see {log}")

    def switches(self) -> float | None:
        metrics = httpx2.get(f"{self.url}/metrics", timeout=10)
        found = re.search(r"^mergewise_route_switches_total (\S+)$", metrics.text, re.M) if metrics.is_success else None
        return float(found.group(1)) if found else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def mergewise_serve(folder: Path, *flags: str) -> list[str]:
    return mergewise_command("serve", str(folder), "--log-level", "warning", *flags)


def transformers_serve(folder: Path, *flags: str) -> list[str]:
    return ["transformers", "serve", str(folder), "--device", "cpu", "--log-level", "warning", *flags]


async def one_request(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> Outcome:
    outcome = Outcome()
    started = time.perf_counter()
    try:
        raw = await client.completions.with_raw_response.create(
            model=model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        outcome.decision, outcome.task = raw.headers.get("x-mergewise-route"), raw.headers.get("x-mergewise-task")
        chunks = 0
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if outcome.ttft is None:
                    outcome.ttft = time.perf_counter() - started
            if chunk.usage is not None:
                outcome.tokens = chunk.usage.completion_tokens
        outcome.tokens = outcome.tokens or chunks
    except Exception as error:  # counted, not raised: a failed request is a result here
        outcome.failed = f"{type(error).__name__}: {error}"[:200]
    outcome.latency = time.perf_counter() - started
    return outcome


async def load(targets: list[tuple[Served, str]], concurrency: int, max_tokens: int) -> tuple[float, list[Outcome]]:
    """Send every (server, prompt) with `concurrency` clients, each waiting for its answer before the
    next; returns the wall time and the outcomes in request order."""
    clients = {
        served.url: openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=600)
        for served, _ in targets
    }
    outcomes: list[Outcome | None] = [None] * len(targets)
    pending = iter(range(len(targets)))

    async def client_loop():
        for index in pending:
            served, prompt = targets[index]
            outcomes[index] = await one_request(clients[served.url], served.model, prompt, max_tokens)

    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    for client in clients.values():
        await client.close()
    return seconds, outcomes


def run_setup(
    name: str, servers: dict[str, Served], prompts: list[tuple[str, str]], levels: list[int], max_tokens: int
) -> list[Level]:
    """Every concurrency level against `servers` (task → server; "*" serves every task)."""
    measured = []
    targets = [(servers.get(task) or servers["*"], prompt) for task, prompt in prompts]
    asyncio.run(load(targets[: min(4, len(targets))], 1, max_tokens))  # warm-up: first-call costs out of the way
    unique = list({id(served): served for served in servers.values()}.values())
    for concurrency in levels:
        before = [served.switches() for served in unique]
        with PeakRss(served.process.pid for served in unique) as peak:
            seconds, outcomes = asyncio.run(load(targets, concurrency, max_tokens))
        after = [served.switches() for served in unique]
        switches = (
            sum(b - a for a, b in zip(before, after)) if all(value is not None for value in before + after) else None
        )
        level = Level(concurrency, seconds, outcomes, switches, peak.mib)
        print(level.row(name), flush=True)
        measured.append(level)
    return measured


def mixed_prompts(zoo, count: int) -> list[tuple[str, str]]:
    """(task, prompt): the held-out prompts of the tasks with experts, interleaved."""
    tasks = [task for task in zoo.tasks.values() if task.expert]
    pools = {task.name: [example["prompt"] for example in zoo.eval_examples(task.name)] for task in tasks}
    return [
        (tasks[index % len(tasks)].name, pools[tasks[index % len(tasks)].name][index // len(tasks)])
        for index in range(count)
    ]


def export_experts(mediator_dir: Path, zoo, work: Path) -> dict[str, Path]:
    exported = {}
    for task in zoo.tasks.values():
        if task.expert:
            out = work / "experts" / task.name
            if not out.is_dir():
                subprocess.run(
                    mergewise_command(
                        "mediator", "export", str(mediator_dir), str(out), "--task", task.name, "--quiet"
                    ),
                    check=True,
                )
            exported[task.name] = out
    return exported


def routing_accuracy(
    mediator_dir: Path, outcomes: list[Outcome], prompts: list[tuple[str, str]]
) -> tuple[float, float]:
    """(through the server, the router in this process) shares of prompts routed to their own task."""
    from mergewise.mediator.runtime import load as load_folder

    routes = load_folder(mediator_dir).route_texts([prompt for _, prompt in prompts])
    served = statistics.mean(
        outcome.decision == "select" and outcome.task == task for outcome, (task, _) in zip(outcomes, prompts)
    )
    local = statistics.mean(
        route.decision == "select" and route.task == task for route, (task, _) in zip(routes, prompts)
    )
    return served, local


def plot(results: dict[str, list[Level]], path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.subplots()
    for name, levels in results.items():
        axes.plot(
            [level.concurrency for level in levels],
            [level.tokens_per_second for level in levels],
            marker="o",
            label=name,
        )
    axes.set_xscale("log", base=2)
    axes.set_xlabel("concurrent clients")
    axes.set_ylabel("generated tokens / s")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", required=True)
    parser.add_argument("--work", default=str(WORK / "serve"))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="every server's weights in this dtype (default: as stored)",
    )
    parser.add_argument("--skip", nargs="*", default=[], help="setups to leave out (by name)")
    args = parser.parse_args()
    zoo = load_zoo(args.zoo)
    work = Path(args.work) / Path(args.zoo).resolve().name
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    mediator_dir, _ = build_mediator(zoo, work, *MEDIATOR_DEFAULT)
    experts = export_experts(mediator_dir, zoo, work)
    prompts = mixed_prompts(zoo, args.requests)
    flags = [
        "--device",
        args.device,
        "--max-batch",
        str(args.max_batch),
        "--max-queue",
        str(4 * args.requests),
        *(["--dtype", args.dtype] if args.dtype else []),
    ]
    peer_flags = ["--dtype", args.dtype] if args.dtype else []
    dense_name = str(mediator_dir)
    setups = {
        "mergewise serve, Mediator (auto)": lambda: {
            "*": Served(mergewise_serve(mediator_dir, *flags), "auto", logs / "mediator.log")
        },
        "mergewise serve, dense D": lambda: {
            "*": Served(mergewise_serve(mediator_dir, *flags), "dense", logs / "dense.log")
        },
        "transformers serve, D": lambda: {
            "*": Served(transformers_serve(mediator_dir, *peer_flags), dense_name, logs / "transformers.log")
        },
        "transformers serve --continuous-batching, D": lambda: {
            "*": Served(
                transformers_serve(mediator_dir, "--continuous-batching", *peer_flags),
                dense_name,
                logs / "transformers-cb.log",
            )
        },
        f"{len(experts)} experts, one mergewise serve each": lambda: {
            task: Served(mergewise_serve(folder, *flags), folder.name, logs / f"expert-{task}.log")
            for task, folder in experts.items()
        },
    }
    results: dict[str, list[Level]] = {}
    failures: dict[str, str] = {}
    header = (
        "| setup | clients | requests/s | tokens/s | TTFT p50 / p99 (ms) | latency p50 / p99 (ms) | failed | "
        "switches / 100 req | peak RSS (MiB) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    print(header, flush=True)
    for name, start in setups.items():
        if name in args.skip:
            continue
        servers = {}
        try:
            servers = start()
            results[name] = run_setup(name, servers, prompts, args.concurrency, args.max_tokens)
        except Exception as error:  # a peer that cannot serve this model here is reported, not fatal
            failures[name] = f"{type(error).__name__}: {error}"
            print(f"{name}: {failures[name]}", flush=True)
        finally:
            for served in {id(served): served for served in servers.values()}.values():
                served.stop()
    write_report(args, zoo, work, mediator_dir, prompts, results, failures, header)


def write_report(args, zoo, work, mediator_dir, prompts, results, failures, header) -> None:
    name = Path(args.zoo).resolve().name
    lines = [
        f"# mergewise serve on {name}",
        "",
        f"{time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"device {args.device}, weights in {args.dtype or 'their stored dtype'}; {len(prompts)} requests "
        f"per level (held-out prompts of "
        f"{', '.join(sorted({task for task, _ in prompts}))}, interleaved), max_tokens {args.max_tokens}, greedy, "
        f"streamed; mergewise --max-batch {args.max_batch}.",
        "",
        header,
    ]
    lines += [level.row(setup) for setup, levels in results.items() for level in levels]
    mediator = results.get("mergewise serve, Mediator (auto)")
    peer = [level for setup, levels in results.items() if setup.startswith("transformers") for level in levels]
    if mediator and peer:
        lines += ["", "Mediator against `transformers serve` on D (same concurrency):", ""]
        for level in mediator:
            same = [other for other in peer if other.concurrency == level.concurrency]
            best = max(other.tokens_per_second for other in same) or float("nan")
            rss = min(other.peak_rss_mib for other in same)
            lines.append(
                f"- {level.concurrency} clients: tokens/s {level.tokens_per_second / best:.2f}× the peer's "
                f"best, peak RSS {level.peak_rss_mib / rss:.2f}× its smaller"
            )
        served, local = routing_accuracy(mediator_dir, mediator[-1].outcomes, prompts)
        lines += [
            "",
            f"Routing accuracy through the server (share of prompts selected to their own task's "
            f"expert, from the `x-mergewise-*` headers): {served:.3f}; the router's own decisions on the "
            f"same prompts in this process (as `mergewise eval` routes): {local:.3f}.",
        ]
    if failures:
        lines += ["", "Setups that could not be measured here:", ""]
        lines += [f"- {setup}: {error}" for setup, error in failures.items()]
    stem = f"serve-{name}" + (f"-{args.dtype}" if args.dtype else "")
    report = RESULTS / f"{stem}.md"
    write_result(report, "\n".join(lines) + "\n")
    if results:
        plot(results, RESULTS / f"{stem}.png")
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
