"""A local stand-in for the Hugging Face Hub: a real HTTP server on 127.0.0.1.

The real ``huggingface_hub`` client talks to it through ``HF_ENDPOINT``. It serves the routes
``snapshot_download`` / ``hf_hub_download`` / ``HfApi`` use, answering the way the Hub does,
error headers included, so the client raises its real exceptions:

* ``GET /api/{models,datasets}/{repo}[/revision/{rev}]``: repo info (sha, siblings, gated)
* ``GET /api/{models,datasets}/{repo}/tree/{rev}[/{path}]``: file listing
* ``POST /api/{models,datasets}/{repo}/paths-info/{rev}``: listing of given paths
* ``HEAD|GET /[datasets/]{repo}/resolve/{rev}/{path}``: file metadata / bytes (Range aware)

Access rules follow the Hub: an unknown token is refused everywhere (401 "Invalid
credentials"); a missing or private repo is 401 without a token, 404 with one (RepoNotFound);
a gated repo lists its files to anyone but serves them only to its accepted tokens (401
GatedRepo without a token, 403 GatedRepo with another); an unknown branch or commit is 404
RevisionNotFound; an unknown file 404 EntryNotFound. Faults for tests: ``tamper`` serves other
bytes than a file's listing announces (or announces another size), ``fail`` answers every
request for a file with an error status.

Example::

    server = HubServer().start()
    server.add_repo("meta-llama/Llama-2-7b", {"params.json": "{...}", "consolidated.00.pth":
                    Path("ckpt/consolidated.00.pth")}, gated=True, tokens=["hf_good"])
    os.environ["HF_ENDPOINT"] = server.url
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

_LFS_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".model", ".gguf", ".parquet")
_DATE = "2024-01-01T00:00:00.000Z"


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class HubRepo:
    """One repository: its files at one commit, reachable by branch name or commit sha."""

    repo_id: str
    files: dict[str, bytes]
    repo_type: str = "model"
    gated: bool = False
    private: bool = False
    tokens: set[str] = field(default_factory=set)
    branches: tuple[str, ...] = ("main",)
    # Faults (see HubServer.tamper and HubServer.fail): bytes served instead of a file's own
    # (its listing, ETag and sha256 stay those of the file), a size the listing announces
    # instead of the file's, and a status every request for a file is answered with.
    served: dict[str, bytes] = field(default_factory=dict)
    listed_sizes: dict[str, int] = field(default_factory=dict)
    failures: dict[str, tuple[int, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        digest = hashlib.sha1()
        for path in sorted(self.files):
            digest.update(path.encode() + b"\0" + _git_blob_sha(self.files[path]).encode())
        self.sha = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(_LFS_SUFFIXES) or len(self.files[path]) > 100_000

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else _git_blob_sha(data)

    def entry(self, path: str) -> dict:
        data = self.files[path]
        size = self.listed_sizes.get(path, len(data))
        out = {"type": "file", "oid": _git_blob_sha(data), "size": size, "path": path}
        if self.is_lfs(path):
            out["lfs"] = {"oid": self.etag(path), "size": size, "pointerSize": 134}
        return out

    def info(self) -> dict:
        owner = self.repo_id.split("/")[0] if "/" in self.repo_id else None
        return {
            "_id": self.sha[:24], "id": self.repo_id, "modelId": self.repo_id, "author": owner,
            "sha": self.sha, "lastModified": _DATE, "createdAt": _DATE, "private": self.private,
            "gated": "manual" if self.gated else False, "disabled": False, "tags": [],
            "downloads": 0, "likes": 0, "siblings": [{"rfilename": p} for p in sorted(self.files)],
        }


@dataclass
class RequestRecord:
    """One request the server answered (tokens are not recorded)."""

    method: str
    path: str
    status: int
    range: str | None
    authorized: bool


class _Stall:
    def __init__(self, after_bytes: int):
        self.after_bytes = after_bytes
        self.reached = threading.Event()
        self.release = threading.Event()


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        # Clients hanging up mid-transfer (interrupted downloads) are part of the tests.
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class HubServer:
    """The server; start() it, add repos, point HF_ENDPOINT at ``url``."""

    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], HubRepo] = {}
        self.valid_tokens: set[str] = set()
        self.requests: list[RequestRecord] = []
        self._stalls: dict[tuple[str, str, str], _Stall] = {}
        self._lock = threading.Lock()
        self._httpd: _QuietServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = _QuietServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True,
                                        name="hub-server")
        self._thread.start()
        return self

    def stop(self) -> None:
        for stall in self._stalls.values():
            stall.release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every repo, token, stall and logged request."""
        for stall in self._stalls.values():
            stall.release.set()
        with self._lock:
            self.repos.clear()
            self.valid_tokens.clear()
            self.requests.clear()
            self._stalls.clear()

    # -- content

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | Path],
        *,
        gated: bool = False,
        private: bool = False,
        tokens: Iterable[str] = (),
        repo_type: str = "model",
        branches: Iterable[str] = ("main",),
    ) -> HubRepo:
        """Serve a repository.

        Args:
            repo_id: ``owner/name``.
            files: Repository path -> content: bytes, text, or a local file to read.
            gated: Serve files only to ``tokens`` (the listing stays public, as on the Hub).
            private: Hide the repo entirely from anyone without one of ``tokens``.
            tokens: Tokens with access; they become valid tokens of this server.
            repo_type: "model" or "dataset".
            branches: Branch names that resolve to the repo's commit.

        Returns:
            The repo (its ``sha`` is the commit id).
        """
        content = {}
        for path, value in files.items():
            if isinstance(value, Path):
                value = value.read_bytes()
            elif isinstance(value, str):
                value = value.encode()
            content[path] = value
        repo = HubRepo(repo_id, content, repo_type, gated, private, set(tokens), tuple(branches))
        with self._lock:
            self.repos[(repo_type, repo_id)] = repo
            self.valid_tokens |= repo.tokens
        return repo

    def add_folder(self, repo_id: str, folder: Path, **kwargs) -> HubRepo:
        """Serve every file under ``folder`` (paths relative to it) as a repository."""
        files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*"))
                 if p.is_file()}
        return self.add_repo(repo_id, files, **kwargs)

    def add_token(self, token: str) -> None:
        """A valid token of an account with access to no gated or private repo."""
        with self._lock:
            self.valid_tokens.add(token)

    def stall(self, repo_id: str, path: str, after_bytes: int,
              repo_type: str = "model") -> _Stall:
        """Make the next download of ``path`` stop after ``after_bytes`` bytes.

        The connection hangs until ``stall.release.set()`` (or 60 s), then closes without the
        rest: an interrupted download. ``stall.reached`` is set when the bytes are sent.
        """
        stall = _Stall(after_bytes)
        with self._lock:
            self._stalls[(repo_type, repo_id, path)] = stall
        return stall

    def tamper(self, repo_id: str, path: str, *, serve: bytes | None = None,
               listed_size: int | None = None, repo_type: str = "model") -> None:
        """Serve other bytes for ``path`` than the listing announces (its sha256, ETag and
        size stay the file's own), or announce another size in the listing."""
        repo = self.repos[(repo_type, repo_id)]
        with self._lock:
            if serve is not None:
                repo.served[path] = serve
            if listed_size is not None:
                repo.listed_sizes[path] = listed_size

    def fail(self, repo_id: str, path: str, status: int, message: str = "Service Unavailable",
             repo_type: str = "model") -> None:
        """Answer every request for the file ``path`` (HEAD and GET) with ``status``."""
        with self._lock:
            self.repos[(repo_type, repo_id)].failures[path] = (status, message)

    def downloads(self, repo_id: str | None = None) -> list[str]:
        """Paths whose bytes were requested with GET (``repo/path``), in order."""
        out = []
        for r in self.requests:
            if r.method == "GET" and "/resolve/" in r.path:
                repo, _, rest = r.path.lstrip("/").partition("/resolve/")
                if repo_id is None or repo.removeprefix("datasets/") == repo_id:
                    out.append(rest.split("/", 1)[1])
        return out


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # keep test output clean
        pass

    # -- responses

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status)

    def _json(self, data: object, status: int = 200) -> None:
        self._send(status, json.dumps(data).encode())

    def _error(self, status: int, code: str | None, message: str,
               extra: Mapping[str, str] | None = None) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers)

    def _record(self, status: int) -> None:
        with self.hub._lock:
            self.hub.requests.append(RequestRecord(
                self.command, unquote(urlsplit(self.path).path), status,
                self.headers.get("Range"), "Authorization" in self.headers,
            ))

    # -- routing

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def do_POST(self) -> None:
        self._route()

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _find(self, repo_type: str, parts: list[str]) -> tuple[HubRepo | None, str, list[str]]:
        """Split path parts into a repo id (one or two parts) and the rest."""
        for n in (2, 1):
            repo = self.hub.repos.get((repo_type, "/".join(parts[:n])))
            if repo is not None:
                return repo, repo.repo_id, parts[n:]
        return None, "/".join(parts[:2]), parts[2:]

    def _allowed(self, repo: HubRepo | None, repo_id: str, files: bool) -> bool:
        """Apply the Hub's access rules; on refusal send the error and return False."""
        token = self._token()
        if token is not None and token not in self.hub.valid_tokens:
            self._error(401, None, "Invalid credentials in Authorization header")
            return False
        if repo is None or (repo.private and token not in repo.tokens):
            self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
            return False
        if files and repo.gated and token not in repo.tokens:
            kind = "model" if repo.repo_type == "model" else repo.repo_type
            if token is None:
                self._error(401, "GatedRepo", f"Access to {kind} {repo_id} is restricted. You "
                            "must have access to it and be authenticated to access it. Please "
                            "log in.")
            else:
                self._error(403, "GatedRepo", f"Access to {kind} {repo_id} is restricted and you "
                            f"are not in the authorized list. Visit https://huggingface.co/"
                            f"{repo_id} to ask for access.")
            return False
        return True

    def _revision_ok(self, repo: HubRepo, revision: str) -> bool:
        if revision in repo.branches or revision == repo.sha:
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    def _route(self) -> None:
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/") if p]
        if len(parts) >= 3 and parts[0] == "api" and parts[1] in ("models", "datasets"):
            self._api(parts[1][:-1], parts[2:], parse_qs(url.query))
            return
        repo_type = "model"
        if parts and parts[0] == "datasets":
            repo_type, parts = "dataset", parts[1:]
        if "resolve" in parts[1:3]:
            self._resolve(repo_type, parts)
            return
        self._error(404, None, f"no route for {url.path}")

    def _api(self, repo_type: str, parts: list[str], query: dict) -> None:
        repo, repo_id, rest = self._find(repo_type, parts)
        if not self._allowed(repo, repo_id, files=False):
            return
        action = rest[0] if rest else "revision"
        revision = rest[1] if len(rest) > 1 else "main"
        if not self._revision_ok(repo, revision):
            return
        if action == "revision":
            self._json(repo.info())
        elif action == "tree":
            prefix = "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            self._json(self._tree(repo, prefix, recursive))
        elif action == "paths-info" and self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            try:
                paths = json.loads(body)["paths"]
            except ValueError:
                paths = parse_qs(body).get("paths", [])
            self._json([e for p in paths for e in self._paths_info(repo, p)])
        else:
            self._error(404, None, f"unknown API route {action}")

    @staticmethod
    def _tree(repo: HubRepo, prefix: str, recursive: bool) -> list[dict]:
        base = f"{prefix}/" if prefix else ""
        entries, folders = [], set()
        for path in sorted(repo.files):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                top = base + rest.split("/")[0]
                if top not in folders:
                    folders.add(top)
                    entries.append({"type": "directory", "oid": "0" * 40, "size": 0,
                                    "path": top})
                if not recursive:
                    continue
            entries.append(repo.entry(path))
        return entries

    @staticmethod
    def _paths_info(repo: HubRepo, path: str) -> list[dict]:
        path = path.strip("/")
        if path in repo.files:
            return [repo.entry(path)]
        if any(p.startswith(path + "/") for p in repo.files):
            return [{"type": "directory", "oid": "0" * 40, "size": 0, "path": path}]
        return []

    def _resolve(self, repo_type: str, parts: list[str]) -> None:
        at = parts.index("resolve", 1)
        repo, repo_id, _ = self._find(repo_type, parts[:at])
        if len(parts) < at + 3:
            self._error(404, None, "bad resolve URL")
            return
        revision, path = parts[at + 1], "/".join(parts[at + 2:])
        if not self._allowed(repo, repo_id, files=True) or not self._revision_ok(repo, revision):
            return
        if path not in repo.files:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{revision}\"",
                        {"X-Repo-Commit": repo.sha})
            return
        if path in repo.failures:
            status, message = repo.failures[path]
            self._error(status, None, message)
            return
        data = repo.served.get(path, repo.files[path])
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{repo.etag(path)}"',
                   "Accept-Ranges": "bytes"}
        start, end = 0, len(data)
        requested = self.headers.get("Range")
        if requested and self.command == "GET":
            first, _, last = requested.removeprefix("bytes=").partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            if start >= len(data) > 0:
                self._error(416, None, "Range Not Satisfiable",
                            {"Content-Range": f"bytes */{len(data)}"})
                return
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        status = 206 if "Content-Range" in headers else 200
        stall = None
        if self.command == "GET":
            with self.hub._lock:
                stall = self.hub._stalls.pop((repo_type, repo_id, path), None)
        if stall is None:
            self._send(status, data[start:end], headers, "application/octet-stream")
            return
        # An interrupted transfer: announce the full length, send part, hang, then hang up.
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self._record(status)
        cut = min(start + stall.after_bytes, end)
        self.wfile.write(data[start:cut])
        self.wfile.flush()
        stall.reached.set()
        stall.release.wait(60)
        time.sleep(0.01)
        self.close_connection = True
