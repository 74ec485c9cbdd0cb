"""`mergewise serve FOLDER`: an OpenAI-compatible server for a plain or Mediator model folder."""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import threading
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model folder over OpenAI's HTTP API (Mediator folders route each request)",
        description="Serve a plain or Mediator model folder with OpenAI-compatible endpoints: /v1/models, "
        "/v1/chat/completions, /v1/completions (streaming too), /health and /metrics. For a Mediator "
        "folder, `model` picks the route: auto (the router), dense, or a task's expert.",
    )
    parser.add_argument("folder", metavar="FOLDER")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="the weights' dtype in memory (default: as stored; float32 is faster on a CPU "
        "without bf16 instructions, at twice the memory)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the forward passes (default: all cores but one, which is left "
        "to the HTTP server and tokenization)",
    )
    parser.add_argument("--max-batch", type=int, default=8, help="requests of one route decoded together")
    parser.add_argument(
        "--max-queue", type=int, default=64, help="requests that may wait; past it a request gets 429 with Retry-After"
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=2.0,
        help="seconds a request of another route may wait before the weights switch to it",
    )
    parser.add_argument("--max-tokens", type=int, default=16, help="max_tokens of a request that gives none")
    parser.add_argument(
        "--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/ (needed to bind beyond loopback)"
    )
    parser.add_argument("--served-name", default=None, help="the model id clients use (default: the folder's name)")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let the model folder run its own Python code (auto_map); only for code you trust",
    )
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    # Serving allocates no row chunks to reuse (as `generate`).
    parser.set_defaults(handler=run, keep_freed_buffers=False)


def run(args: argparse.Namespace) -> None:
    from mergewise.errors import MergewiseError

    for flag, value in (
        ("--max-batch", args.max_batch),
        ("--max-queue", args.max_queue),
        ("--max-tokens", args.max_tokens),
        ("--threads", args.threads or 1),
    ):
        if value < 1:
            raise MergewiseError(f"{flag}: must be at least 1, got {value}")
    if args.max_wait < 0:
        raise MergewiseError(f"--max-wait: must be at least 0, got {args.max_wait}")
    if not _is_loopback(args.host) and not args.api_key:
        raise MergewiseError(f"--host {args.host}: binding beyond this machine needs --api-key")
    try:
        import uvicorn

        from mergewise.serving.core import ServingCore
        from mergewise.serving.http import create_app
    except ImportError as error:
        raise MergewiseError(
            f"serving needs the serve extra ({error.name} is missing): pip install 'mergewise[serve]'"
        ) from None
    import torch

    from mergewise.mediator.runtime import load

    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) - 1))

    model = load(args.folder, args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    core = ServingCore(
        model,
        served_name=args.served_name or Path(args.folder).resolve().name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_wait=args.max_wait,
    )
    app = create_app(core, api_key=args.api_key, default_max_tokens=args.max_tokens)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.log_level == "debug"
        )
    )
    # uvicorn shuts down gracefully on SIGTERM or Ctrl-C (stops accepting, finishes the requests in
    # flight, closes the core) and then raises the signal again for whoever handled it before: a
    # finished graceful shutdown is a clean exit, so that raise must find no handler that ends it.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = (
        {number: signal.signal(number, lambda *_: None) for number in (signal.SIGTERM, signal.SIGINT)}
        if on_main_thread
        else {}
    )
    try:
        server.run()
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if not server.started:
        raise MergewiseError(f"could not serve on {args.host}:{args.port} (is the port taken?)")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except (OSError, ValueError):
            return False
