"""A small Hugging Face Hub on 127.0.0.1 for tests and benchmarks: real HTTP, real huggingface_hub client, no
internet, and optionally a shaped link (``merging.hub.link``: bandwidth caps and round-trip latency).

It serves repos from folders on disk and answers the requests that huggingface_hub and merging/sources/hub.py
make, with the headers the client requires:

- ``GET /api/models`` (search, author, filter, sort, limit, expand) and ``GET /api/models/{repo}[/revision/{rev}]``
  (siblings, sha, safetensors parameter counts, tags with the ``base_model`` relations);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (what ``snapshot_download`` lists);
- ``HEAD``/``GET /{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag`` and sizes. Like the real Hub,
  weight files (``.safetensors``, ``.bin``) are answered with a 302 to a "CDN" on a second port (another origin,
  so clients must not forward the token there) carrying ``X-Linked-Size`` and ``X-Linked-Etag``; the CDN honours
  ``Range`` (206, ``Content-Range``, clamped ends, 416);
- errors as the Hub sends them: 404 with ``X-Error-Code`` RepoNotFound / RevisionNotFound / EntryNotFound, 401
  with ``GatedRepo`` for a gated repo's files without the right token, 401 RepoNotFound for a private repo.

For tests it counts the body bytes served per file, connections and requests per server, logs requests, and
injects faults: drop a connection once in the middle of a response (``drop_once``) or answer with a 5xx a few times
(``fail_next``). ``LoopbackHub(link=LinkShape(...))`` serves everything through one shaped link (``python -m
merging bench --hub`` measures streamed merges against it; tests/fakehub.py is this module under its test name).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .link import Link, LinkShape
from .loopback_repo import LFS_SUFFIXES, FakeRepo, blob_oid, file_names, safetensors_parameters, sha256_of

CHUNK = 256 * 1024  # body bytes sent (and paced) at a time


class LoopbackHub:
    """A Hub-compatible server on 127.0.0.1 with a CDN on a second port; use as a context manager.

    ``link``: the shape of the one link both servers are reached through (default: unshaped)."""

    def __init__(self, link: LinkShape | None = None) -> None:
        self.link = Link(link)
        self.repos: dict[str, FakeRepo] = {}
        self.bytes_served: Counter = Counter()  # (repo_id, filename) -> body bytes sent
        self.requests: list[dict] = []
        self.cdn_saw_authorization = False
        self.signature_generation = 0  # signed CDN URLs from older generations are refused (expired)
        self._drops: dict[tuple[str, str], int] = {}  # (repo, file) -> absolute byte offset to cut at
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._then_fail: dict[tuple[str, str], int] = {}
        self.chunk_delay_s = 0.0  # seconds slept after each chunk of a body: a stalling link, for crash tests
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # ----- setup -----
    def add_repo(self, repo_id: str, folder: str | Path, *, revisions: dict[str, str | Path] | None = None,
                 **info) -> FakeRepo:
        revs = {"main": Path(folder), **{k: Path(v) for k, v in (revisions or {}).items()}}
        repo = FakeRepo(repo_id, revs, **info)
        self.repos[repo_id] = repo
        return repo

    def start(self) -> LoopbackHub:
        for repo in self.repos.values():  # the Hub knows its files' hashes: none is computed during a request
            for folder in repo.revisions.values():
                for name in file_names(folder):
                    blob_oid(folder / name)
                    if name.endswith(LFS_SUFFIXES):
                        sha256_of(folder / name)
        hub_handler = type("HubHandler", (_Handler,), {"hub": self, "is_cdn": False})
        cdn_handler = type("CdnHandler", (_Handler,), {"hub": self, "is_cdn": True})
        for handler in (hub_handler, cdn_handler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
            self._servers.append(server)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        self._servers = []

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    # ----- measurements and faults -----
    def served(self, repo_id: str | None = None, filename: str | None = None) -> int:
        with self._lock:
            return sum(n for (r, f), n in self.bytes_served.items()
                       if (repo_id is None or r == repo_id) and (filename is None or f == filename))

    def reset_counts(self) -> None:
        with self._lock:
            self.bytes_served.clear()
            self.requests.clear()
        self.link.reset_counts()

    def counts(self) -> dict[str, int]:
        """Connections opened, requests answered and the most answered at once since the last reset, both
        servers together."""
        return self.link.counts()

    def drop_once(self, repo_id: str, filename: str, at_offset: int, then_fail: int = 0) -> None:
        """The next GET of this file whose body crosses byte ``at_offset`` sends bytes up to it, then hangs up; the
        ``then_fail`` requests after that get a 503 (the link stays down)."""
        self._drops[(repo_id, filename)] = at_offset
        self._then_fail[(repo_id, filename)] = then_fail

    def fail_next(self, repo_id: str, filename: str, status: int = 503, times: int = 1) -> None:
        """The next ``times`` requests for this file are answered with ``status``."""
        self._failures[(repo_id, filename)] = [status] * times

    def expire_signed_urls(self) -> None:
        """Every CDN URL handed out so far now answers 403, as an expired signature does."""
        self.signature_generation += 1

    def pending_faults(self) -> int:
        return len(self._drops) + sum(len(v) for v in self._failures.values())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hub: LoopbackHub
    is_cdn: bool

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate sends: without this, Nagle's algorithm holds the body back until the
        # client's delayed ACK (40 ms per request on Linux), a latency no real server adds.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pacing = self.hub.link.connect()  # one per TCP connection: the handshake's round trip

    # ----- plumbing -----
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), headers)

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._json({"error": message}, status, headers)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def _log(self, **extra) -> None:
        with self.hub._lock:
            self.hub.requests.append({"server": "cdn" if self.is_cdn else "hub", "method": self.command,
                                      "path": self.path, "range": self.headers.get("Range"),
                                      "authorized": self._token() is not None, **extra})

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        self._log()
        self.hub.link.request()
        try:
            if self.is_cdn:
                self._cdn()
            else:
                self._route()
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.hub.link.done()

    def _route(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        raw = parts.path.strip("/").split("/")
        if raw[:2] == ["api", "models"]:
            rest = raw[2:]
            if not rest:
                return self._list_models(query)
            repo_id, tail = _split_repo(rest, ("revision", "tree"))
            repo = self._repo(repo_id)
            if repo is None:
                return
            blobs = (query.get("blobs") or ["false"])[0].lower() == "true"
            if not tail:
                return self._model_info(repo, "main", blobs)
            if tail[0] == "revision" and len(tail) == 2:
                return self._model_info(repo, unquote(tail[1]), blobs)
            if tail[0] == "tree" and len(tail) >= 2:
                return self._tree(repo, unquote(tail[1]), "/".join(unquote(p) for p in tail[2:]), query)
            return self._error(404, None, "Not Found")
        repo_id, tail = _split_repo(raw, ("resolve",))
        if tail and tail[0] == "resolve" and len(tail) >= 3:
            repo = self._repo(repo_id)
            if repo is not None:
                self._resolve(repo, unquote(tail[1]), "/".join(unquote(p) for p in tail[2:]))
            return
        self._error(404, None, "Not Found")

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        if repo.private_token is not None and self._token() != repo.private_token:
            self._error(401, "RepoNotFound", "Invalid username or password.")
            return None
        return repo

    # ----- API -----
    def _summary(self, repo: FakeRepo, expand: list[str] | None) -> dict:
        sha, folder = repo.folder("main")
        params = safetensors_parameters(folder)
        full = {
            "_id": sha[:24], "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0],
            "sha": sha, "downloads": repo.downloads, "likes": repo.likes, "tags": repo.all_tags(),
            "pipeline_tag": repo.pipeline_tag, "library_name": "transformers",
            "private": repo.private_token is not None,
            "gated": "manual" if repo.gated_token else False, "createdAt": "2024-01-01T00:00:00.000Z",
            "lastModified": "2024-01-02T00:00:00.000Z",
            "siblings": [{"rfilename": f} for f in file_names(folder)],
            "cardData": {"base_model": repo.base_models} if repo.base_models else {},
        }
        if params:
            full["safetensors"] = {"parameters": params, "total": sum(params.values())}
        if expand is None:  # the Hub's default listing fields
            keep = ("_id", "id", "modelId", "likes", "downloads", "tags", "pipeline_tag", "library_name",
                    "private", "createdAt")
        else:
            keep = ("_id", "id", *expand)
        return {k: full[k] for k in keep if k in full}

    def _list_models(self, query: dict) -> None:
        token = self._token()
        search = (query.get("search") or [""])[0].lower()
        author = (query.get("author") or [None])[0]
        filters = query.get("filter", [])
        limit = int((query.get("limit") or ["1000"])[0])
        sort = (query.get("sort") or [None])[0]
        repos = [r for r in self.hub.repos.values()
                 if (r.private_token is None or r.private_token == token)
                 and search in r.repo_id.lower()
                 and (author is None or r.repo_id.startswith(author + "/"))
                 and all(f in r.all_tags() for f in filters)]
        if sort in ("downloads", "likes"):
            repos.sort(key=lambda r: getattr(r, sort), reverse=True)
        expand = query.get("expand")
        self._json([self._summary(r, expand) for r in repos[:limit]])

    def _model_info(self, repo: FakeRepo, revision: str, blobs: bool = False) -> None:
        found = repo.folder(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, folder = found
        info = self._summary(repo, None)
        info.update(self._summary(repo, ["sha", "siblings", "safetensors", "gated", "cardData", "lastModified"]))
        params = safetensors_parameters(folder)
        info["sha"] = sha
        info["siblings"] = [{"rfilename": f} for f in file_names(folder)]
        if blobs:  # files_metadata=True: sizes, git oids, LFS info
            for sib in info["siblings"]:
                p = folder / sib["rfilename"]
                sib.update(size=p.stat().st_size, blobId=blob_oid(p))
                if sib["rfilename"].endswith(LFS_SUFFIXES):
                    sib["lfs"] = {"size": p.stat().st_size, "sha256": sha256_of(p), "pointerSize": 134}
        info["safetensors"] = {"parameters": params, "total": sum(params.values())} if params else None
        if info["safetensors"] is None:
            del info["safetensors"]
        self._json(info)

    def _tree(self, repo: FakeRepo, revision: str, path: str, query: dict) -> None:
        found = repo.folder(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        _, folder = found
        recursive = (query.get("recursive") or ["false"])[0].lower() == "true"
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        entries, dirs = [], set()
        for name in file_names(folder):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if "/" in rest and not recursive:
                dirs.add(prefix + rest.split("/")[0])
                continue
            p = folder / name
            entry = {"type": "file", "oid": blob_oid(p), "size": p.stat().st_size, "path": name}
            if name.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": sha256_of(p), "size": p.stat().st_size, "pointerSize": 134}
            entries.append(entry)
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
        self._json(entries)

    # ----- files -----
    def _resolve(self, repo: FakeRepo, revision: str, filename: str) -> None:
        found = repo.folder(revision)
        if found is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        sha, folder = found
        if repo.gated_token is not None and self._token() != repo.gated_token:
            return self._error(401, "GatedRepo", f"Access to model {repo.repo_id} is restricted. You must have "
                                                 "access to it and be authenticated to access it. Please log in.")
        path = folder / filename
        if ".." in filename.split("/") or not path.is_file():
            return self._error(404, "EntryNotFound", f"{filename} does not exist on \"{revision}\"")
        if self._inject_failure(repo.repo_id, filename):
            return
        size = path.stat().st_size
        if filename.endswith(LFS_SUFFIXES):
            etag = sha256_of(path)
            signature = f"g{self.hub.signature_generation}"
            location = f"{self.hub.cdn_url}/{quote(repo.repo_id)}/{sha}/{quote(filename)}?X-Signature={signature}"
            return self._send(302, b"", {"Location": location, "X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                         "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(size)}, "text/plain")
        self._serve_file(repo.repo_id, filename, path, {"X-Repo-Commit": sha, "ETag": f'"{blob_oid(path)}"'})

    def _cdn(self) -> None:
        if self._token() is not None:
            self.hub.cdn_saw_authorization = True
        parts = urlsplit(self.path)
        if parse_qs(parts.query).get("X-Signature") != [f"g{self.hub.signature_generation}"]:
            return self._error(403, None, "Request has expired")
        raw = parts.path.strip("/").split("/")
        repo_id, tail = _split_repo(raw, None, cdn=True)
        repo = self.hub.repos.get(repo_id)
        if repo is None or len(tail) < 2:
            return self._error(404, None, "Not Found")
        found = repo.folder(tail[0])
        filename = "/".join(unquote(p) for p in tail[1:])
        if found is None or not (found[1] / filename).is_file():
            return self._error(404, None, "Not Found")
        if self._inject_failure(repo.repo_id, filename):
            return
        self._serve_file(repo.repo_id, filename, found[1] / filename, {"ETag": f'"{sha256_of(found[1] / filename)}"'})

    def _inject_failure(self, repo_id: str, filename: str) -> bool:
        with self.hub._lock:
            queue = self.hub._failures.get((repo_id, filename))
            status = queue.pop(0) if queue else None
        if status is None:
            return False
        self._error(status, None, "injected failure")
        return True

    def _serve_file(self, repo_id: str, filename: str, path: Path, headers: dict) -> None:
        size = path.stat().st_size
        start, end, status = 0, size, 200
        spec = self.headers.get("Range")
        if spec:
            rng = _parse_range(spec, size)
            if rng is None:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, "text/plain")
            start, end = rng
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{size}"}
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        key = (repo_id, filename)
        cut = None
        with self.hub._lock:
            drop = self.hub._drops.get(key)
            if drop is not None and start < drop < end:
                cut = self.hub._drops.pop(key)
                if self.hub._then_fail.get(key):
                    self.hub._failures[key] = [503] * self.hub._then_fail.pop(key)
        with open(path, "rb") as f:
            pos, stop = start, cut if cut is not None else end
            while pos < stop:
                n = min(CHUNK, stop - pos)
                self.hub.link.pace(self._pacing, n)
                with self.hub._lock:  # counted before sending, so a client never sees bytes not yet counted
                    self.hub.bytes_served[key] += n
                self.connection.sendfile(f, pos, n)  # no copy through Python: the server keeps up at GB/s
                pos += n
                if self.hub.chunk_delay_s:
                    time.sleep(self.hub.chunk_delay_s)
        if cut is not None:  # hang up in the middle of the body, as a dropped connection would
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _split_repo(parts: list[str], markers: tuple[str, ...] | None, cdn: bool = False) -> tuple[str, list[str]]:
    """Split URL segments into a repo id (``name`` or ``org/name``) and the rest."""
    parts = [unquote(p) for p in parts[:2]] + parts[2:]
    if cdn:  # /{org}/{name}/{sha}/{file...} or /{name}/{sha}/{file...}: a sha is 40 hex digits
        if len(parts) > 1 and len(parts[1]) == 40 and all(c in "0123456789abcdef" for c in parts[1]):
            return parts[0], parts[1:]
        return "/".join(parts[:2]), parts[2:]
    if len(parts) > 1 and parts[1] in markers:
        return parts[0], parts[1:]
    return "/".join(parts[:2]), parts[2:]


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` → [start, end), clamped to the file; None if unsatisfiable."""
    if not spec.startswith("bytes=") or "," in spec:
        return None
    first, _, last = spec[6:].strip().partition("-")
    try:
        if first == "":
            n = int(last)
            return (max(0, size - n), size) if n > 0 and size > 0 else None
        start = int(first)
        end = int(last) + 1 if last else size
    except ValueError:
        return None
    if start >= size or end <= start:
        return None
    return start, min(end, size)
