"""A local HTTP server that answers as the Hugging Face Hub does for the calls `huggingface_hub`
makes to download a model (repository info, HEAD and ranged GET of `resolve/` URLs), serving local
folders as repositories and counting the bytes it sends per file. Tests point `HF_ENDPOINT` at it:
no network, and what a command downloaded is measured, not guessed."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "feedfacefeedfacefeedfacefeedfacefeedface"
INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<revision>[^/?]+))?(?:\?.*)?$")
TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/(?P<revision>[^/?]+)[^?]*(?:\?.*)?$")
RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<revision>[^/]+)/(?P<file>[^?]+)(?:\?.*)?$")
RANGE = re.compile(r"^bytes=(?P<first>\d+)-(?P<last>\d*)$")


@dataclass
class FakeHub:
    """Repositories by id (each a local folder, at one commit), and the bytes served of each file."""

    repos: dict[str, Path] = field(default_factory=dict)
    served: Counter = field(default_factory=Counter)  # (repo, file) -> bytes of file content sent
    url: str = ""

    def bytes_served(self, pattern: str = "*") -> int:
        """Bytes sent of files whose name matches `pattern` (e.g. '*.safetensors')."""
        return sum(count for (_, name), count in self.served.items() if Path(name).match(pattern))


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def _answer(self, send_body: bool) -> None:
            if match := INFO.match(self.path):
                self._repo_info(match["repo"], match["revision"] or "main", send_body)
            elif match := TREE.match(self.path):
                self._tree(match["repo"], match["revision"], send_body)
            elif match := RESOLVE.match(self.path):
                self._file(match["repo"], match["revision"], match["file"], send_body)
            else:
                self._send(404, b'{"error": "not found"}', {"Content-Type": "application/json"}, send_body)

        def _known(self, repo: str, revision: str) -> Path | None:
            folder = hub.repos.get(repo)
            if folder is None:
                self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, send_body=True)
                return None
            if revision not in ("main", COMMIT):
                self._send(404, b'{"error": "Invalid rev id"}', {"X-Error-Code": "RevisionNotFound"}, send_body=True)
                return None
            return folder

        def _repo_info(self, repo: str, revision: str, send_body: bool) -> None:
            folder = self._known(repo, revision)
            if folder is None:
                return
            siblings = [
                {"rfilename": path.name, "size": path.stat().st_size}
                for path in sorted(folder.iterdir())
                if path.is_file()
            ]
            body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings})
            self._send(200, body.encode(), {"Content-Type": "application/json"}, send_body)

        def _tree(self, repo: str, revision: str, send_body: bool) -> None:
            folder = self._known(repo, revision)
            if folder is None:
                return
            entries = [
                {"type": "file", "path": path.name, "size": path.stat().st_size, "oid": _digest(path)[:40]}
                for path in sorted(folder.iterdir())
                if path.is_file()
            ]
            self._send(200, json.dumps(entries).encode(), {"Content-Type": "application/json"}, send_body)

        def _file(self, repo: str, revision: str, name: str, send_body: bool) -> None:
            folder = self._known(repo, revision)
            if folder is None:
                return
            path = folder / name
            if not path.is_file():
                self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound"}, send_body)
                return
            data = path.read_bytes()
            headers = {
                "X-Repo-Commit": COMMIT,
                "ETag": f'"{_digest(path)}"',
                "Accept-Ranges": "bytes",
                "Content-Type": "application/octet-stream",
            }
            status, body = 200, data
            wanted = RANGE.match(self.headers.get("Range", "").strip())
            if wanted is not None:
                first = int(wanted["first"])
                last = min(int(wanted["last"]) if wanted["last"] else len(data) - 1, len(data) - 1)
                status, body = 206, data[first : last + 1]
                headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
            if send_body:
                hub.served[(repo, name)] += len(body)
            self._send(status, body, headers, send_body)

        def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

    return Handler


@contextmanager
def fake_hub(repos: dict[str, Path]) -> Iterator[FakeHub]:
    """A running fake Hub serving `repos`, on a free loopback port."""
    hub = FakeHub(dict(repos))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
