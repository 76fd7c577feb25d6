"""Checkpoints on the Hugging Face Hub, read with HTTP range requests: only the bytes a job needs cross the network.

A safetensors file is an 8-byte length, a JSON header, then raw tensors at known offsets, so one tensor, or a band
of its rows, is one ``Range: bytes=a-b`` request on the file's ``resolve`` URL. ``HubFile`` is the ``ByteReader``
that does this for ``SafetensorsCheckpoint`` (the same class that reads local files):

- the first request fetches the file's first ``HEADER_PREFETCH`` bytes, which gives the file size (from
  ``Content-Range``) and, for all but the largest models, the whole header: a header costs one or two requests;
- redirects are followed (the Hub sends weights from a CDN); the token goes only to the Hub, never to the CDN,
  because the HTTP client drops ``Authorization`` on a redirect to another origin. The signed CDN URL is then
  reused for a few minutes (one round trip per range instead of two) and renewed through the Hub when refused;
- connection errors, timeouts and 5xx/429 answers are retried with exponential backoff; a body cut off in the
  middle resumes from the last byte received, so a dropped connection costs only the bytes not yet received;
- reads larger than ``PARALLEL_THRESHOLD`` are split into chunks fetched on a few connections at once (one TCP
  stream from a CDN is often slower than the disk it feeds).

``open_hub`` opens a repo at one commit (the revision is resolved once, so every file comes from the same
commit): sharded repos through ``model.safetensors.index.json``, side files (config, tokenizer) fetched whole
when asked for. With ``cache=True`` the weights, config and tokenizer files are instead downloaded into the
huggingface_hub cache with ``snapshot_download(allow_patterns=...)`` and opened from disk.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

try:  # huggingface_hub >= 1.0 ships its HTTP client as httpx (2.x renamed it httpx2)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older huggingface_hub
    import httpx  # type: ignore[no-redef]

from huggingface_hub.errors import OfflineModeIsEnabled

from ..errors import SourceError
from .base import CheckpointSource
from .local import INDEX_NAME, PICKLE_HINT, PICKLE_SUFFIXES, is_side_file, open_local
from .safetensors_files import ByteReader, SafetensorsCheckpoint, shard_files_from_index

HEADER_PREFETCH = 64 * 1024  # bytes fetched by the first request: the size and (usually) the whole header
PARALLEL_THRESHOLD = 32 * 1024 * 1024
PARALLEL_CHUNK = 16 * 1024 * 1024
PARALLEL_CONNECTIONS = 4
MAX_SIDE_FILE = 64 * 1024 * 1024  # tokenizer.json of large-vocabulary models is tens of MB
DIRECT_URL_TTL_S = 300.0  # signed CDN URLs live longer (about an hour on the Hub); renewed after this
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
AUTH_HINT = "gated or private: log in (`hf auth login`), set HF_TOKEN, or pass a token"


class _Retry(Exception):
    """A failure worth another try (connection dropped, timeout, 5xx); ``free`` ones cost no backoff."""

    def __init__(self, message: str, free: bool = False) -> None:
        super().__init__(message)
        self.free = free


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port


def _http_session():
    """huggingface_hub's shared client: honours HF_HUB_OFFLINE, its proxy settings and connection pool."""
    from huggingface_hub.utils import get_session

    return get_session()


def auth_headers(token: str | None) -> dict[str, str]:
    from huggingface_hub.utils import build_hf_headers

    # token=False stops huggingface_hub from adding a stored token on its own: we decide which token is sent.
    return build_hf_headers(token=token if token else False, library_name="mergescope")


def status_error(status: int, code: str | None, repo_id: str, revision: str, filename: str | None,
                 had_token: bool) -> SourceError:
    """The Hub's answer turned into one line that names the repo (and never the token)."""
    where = f"{repo_id}@{revision}" if revision not in ("main", None) else repo_id
    if status in (401, 403):
        refused = " (the token sent was refused)" if had_token else ""
        if code == "RepoNotFound":  # the Hub answers 401 both for private repos and for missing ones
            return SourceError(f"{where}: not found on the Hub, or {AUTH_HINT}{refused}")
        return SourceError(f"{where}: {AUTH_HINT}{refused}")
    if code == "RevisionNotFound":
        return SourceError(f"{repo_id}: revision {revision!r} not found on the Hub")
    if code == "EntryNotFound" and filename:
        return SourceError(f"{where}: file {filename!r} not found in the repo")
    if code == "RepoNotFound" or status == 404:
        if filename:
            return SourceError(f"{where}: {filename!r} not found on the Hub")
        return SourceError(f"{repo_id}: no such local folder, and no such model repo on the Hub")
    return SourceError(f"{where}: the Hub answered HTTP {status}" + (f" for {filename}" if filename else ""))


class HubFile(ByteReader):
    """One file of a Hub repo at a fixed commit, read with range requests."""

    def __init__(self, url: str, repo_id: str, revision: str, filename: str, token: str | None, *,
                 retries: int = 5, backoff_s: float = 0.5, timeout_s: float = 60.0) -> None:
        self.url = url
        self.label = f"{repo_id}/{filename}"
        self.repo_id, self.revision, self.filename = repo_id, revision, filename
        self._headers = auth_headers(token)
        self._had_token = bool(token)
        self._retries = retries
        self._backoff_s = backoff_s
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 15.0))
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._received = 0
        self._count_lock = threading.Lock()
        self.retries_used = 0
        self._direct: tuple[str, float] | None = None  # the CDN URL the Hub redirected to, and until when
        self.size = -1  # learned from the first response's Content-Range
        prefix = bytearray(HEADER_PREFETCH)
        got = self._fetch(0, memoryview(prefix), learn_size=True)
        self._prefix = bytes(prefix[:got])

    def __repr__(self) -> str:  # never shows the headers (they hold the token)
        return f"HubFile({self.label!r}, size={self.size})"

    @property
    def bytes_received(self) -> int:
        """Body bytes received over the network for this file, retries included."""
        return self._received

    def read_into(self, offset: int, buffer: memoryview) -> None:
        n = len(buffer)
        if offset < 0 or offset + n > self.size:
            raise SourceError(f"{self.label}: bytes {offset}..{offset + n} lie outside the file's {self.size} bytes")
        if offset + n <= len(self._prefix):
            buffer[:] = self._prefix[offset:offset + n]
            return
        if n <= PARALLEL_THRESHOLD:
            self._read_exact(offset, buffer)
            return
        pool = self._parallel_pool()
        futures = [pool.submit(self._read_exact, offset + lo, buffer[lo:min(n, lo + PARALLEL_CHUNK)])
                   for lo in range(0, n, PARALLEL_CHUNK)]
        for fut in futures:
            fut.result()

    def read_all(self, limit: int = MAX_SIDE_FILE) -> bytes:
        """The whole file (side files: config, tokenizer, index)."""
        if self.size > limit:
            raise SourceError(f"{self.label}: {self.size} bytes is more than the {limit} allowed for a side file")
        buf = bytearray(self.size)
        self.read_into(0, memoryview(buf))
        return bytes(buf)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ----- internals -----
    def _parallel_pool(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(PARALLEL_CONNECTIONS, thread_name_prefix="hub-range")
            return self._pool

    def _read_exact(self, offset: int, buffer: memoryview) -> None:
        got = self._fetch(offset, buffer)
        if got < len(buffer):
            raise SourceError(f"{self.label}: the file ended early at byte {offset + got}; it changed on the Hub "
                              "while reading")

    def _fetch(self, offset: int, buffer: memoryview, learn_size: bool = False) -> int:
        """Fill ``buffer`` from ``offset``, resuming after drops; returns bytes filled (less only at end of file)."""
        done = 0
        failures = 0
        while done < len(buffer):
            progress = [0]
            try:
                ended = self._get_range(offset + done, buffer[done:], progress, learn_size and done == 0)
                done += progress[0]
                if ended:
                    return done
            except _Retry as exc:
                done += progress[0]
                if exc.free:
                    continue
                failures = 0 if progress[0] else failures + 1
                if failures > self._retries:
                    raise SourceError(f"{self.label}: download failed after {self._retries} retries ({exc})") from None
                self.retries_used += 1
                if progress[0] == 0:  # resume at once after progress; back off when nothing gets through
                    time.sleep(min(self._backoff_s * 2 ** (failures - 1), 30.0))
        return done

    def _get_range(self, start: int, view: memoryview, progress: list[int], learn_size: bool) -> bool:
        """One ranged GET into ``view``; ``progress[0]`` counts bytes stored even if the body is cut off.

        Returns True when the file ended before ``view`` was full (the server clamped the range)."""
        rng = {"Range": f"bytes={start}-{start + len(view) - 1}", "Accept-Encoding": "identity"}
        direct = self._direct_url()
        # The CDN's signed URL needs no token, and must not get one.
        url, headers = (direct, {"User-Agent": self._headers.get("user-agent", "mergescope"), **rng}) if direct \
            else (self.url, {**self._headers, **rng})
        try:
            with _http_session().stream("GET", url, headers=headers, timeout=self._timeout,
                                        follow_redirects=True) as resp:
                status = resp.status_code
                if direct and status in (401, 403, 404, 410):  # the signed URL expired: ask the Hub again
                    self._direct = None
                    raise _Retry(f"signed URL refused (HTTP {status})", free=True)
                if status in RETRY_STATUS:
                    raise _Retry(f"HTTP {status}")
                if status == 416:
                    if learn_size and start == 0:  # an empty file
                        self.size = 0
                        return True
                    raise SourceError(f"{self.label}: byte {start} is past the end of the file; it changed on the Hub")
                if status >= 400:
                    raise status_error(status, resp.headers.get("X-Error-Code"), self.repo_id, self.revision,
                                       self.filename, self._had_token)
                total, expected = self._check_range(resp, start, len(view))
                if learn_size:
                    self.size = total
                if not direct and resp.history and _origin(str(resp.url)) != _origin(self.url):
                    # Remember where the Hub sent us: later ranges skip one round trip to the Hub each.
                    self._direct = (str(resp.url), time.monotonic() + DIRECT_URL_TTL_S)
                for chunk in resp.iter_bytes():
                    take = min(len(chunk), len(view) - progress[0])
                    view[progress[0]:progress[0] + take] = chunk[:take]
                    progress[0] += take
                    with self._count_lock:
                        self._received += len(chunk)
                    if progress[0] >= expected:
                        break
                if progress[0] < expected:
                    raise _Retry(f"connection closed after {progress[0]} of {expected} bytes")
                return expected < len(view)
        except httpx.TransportError as exc:  # dropped, reset, timed out, refused
            raise _Retry(exc.__class__.__name__) from None
        except OfflineModeIsEnabled:
            raise SourceError(f"{self.label}: HF_HUB_OFFLINE is set, so the Hub cannot be reached") from None

    def _direct_url(self) -> str | None:
        direct = self._direct
        if direct is None or time.monotonic() > direct[1]:
            return None
        return direct[0]

    def _check_range(self, resp, start: int, wanted: int) -> tuple[int, int]:
        """(file size, bytes this response will carry) from a 206's Content-Range; a 200 only for the whole file."""
        if resp.status_code == 206:
            content_range = resp.headers.get("Content-Range", "")
            try:
                unit, _, rest = content_range.partition(" ")
                span, _, total = rest.partition("/")
                first, _, last = span.partition("-")
                first, last, total = int(first), int(last), int(total)
            except ValueError:
                raise SourceError(f"{self.label}: the server sent a bad Content-Range {content_range!r}") from None
            if unit != "bytes" or first != start or last < first:
                raise SourceError(f"{self.label}: asked for bytes from {start}, got {content_range!r}")
            return total, min(wanted, last - first + 1)
        length = resp.headers.get("Content-Length")
        if start == 0 and length is not None and int(length) <= wanted:
            return int(length), int(length)  # the server ignored Range but the whole file is what we asked
        raise SourceError(f"{self.label}: the server does not support range requests (HTTP {resp.status_code})")


class HubCheckpoint(SafetensorsCheckpoint):
    """A Hub repo's safetensors weights at one commit, streamed with range requests."""

    def __init__(self, label: str, repo_id: str, revision: str, commit: str, readers: dict[str, HubFile],
                 side_files: dict[str, Callable[[], bytes]], side_sizes: dict[str, int] | None = None) -> None:
        self.repo_id, self.revision, self.commit = repo_id, revision, commit
        self.side_sizes = side_sizes or {}  # side file sizes from the repo listing (pre-flight disk estimate)
        super().__init__(label, readers, side_files)

    def network_bytes(self) -> int:
        """Every body byte received for this checkpoint's weight files (headers, tensors, retries)."""
        return sum(r.bytes_received for r in self._readers.values())

    def retries_used(self) -> int:
        """Requests retried (dropped connections, 5xx) while reading this checkpoint."""
        return sum(r.retries_used for r in self._readers.values())

    def weight_files(self) -> dict[str, int]:
        return {name: r.size for name, r in self._readers.items()}


def _side_loader(make_file: Callable[[], HubFile]) -> Callable[[], bytes]:
    cached: list[bytes] = []

    def load() -> bytes:
        if not cached:
            f = make_file()
            try:
                cached.append(f.read_all())
            finally:
                f.close()
        return cached[0]

    return load


def choose_weight_files(repo_id: str, files: list[str], index_bytes: Callable[[], bytes]) -> list[str]:
    """Which files hold the weights: the index's shards, model.safetensors, or every top-level .safetensors."""
    if INDEX_NAME in files:
        shards = shard_files_from_index(index_bytes(), repo_id)
        missing = [s for s in shards if s not in files]
        if missing:
            raise SourceError(f"{repo_id}: the index lists shard files the repo does not have: "
                              f"{', '.join(missing[:5])}")
        return shards
    if "model.safetensors" in files:
        return ["model.safetensors"]
    return sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)


def open_hub(repo_id: str, revision: str, *, label: str, token: str | None, endpoint: str,
             allow_pickle: bool = False, base: CheckpointSource | None = None, cache: bool = False,
             cache_dir: str | None = None, retries: int = 5, backoff_s: float = 0.5) -> CheckpointSource:
    """Open a Hub repo at ``revision`` (resolved once to a commit) as a CheckpointSource."""
    from huggingface_hub import HfApi, hf_hub_url

    api = HfApi(endpoint=endpoint, token=token if token else False, library_name="mergescope")
    info = hub_call(lambda: api.model_info(repo_id, revision=revision, files_metadata=True), repo_id, revision,
                    bool(token))
    commit = info.sha or revision
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    files = list(sizes)

    def hub_file(filename: str) -> HubFile:
        url = hf_hub_url(repo_id, filename, revision=commit, endpoint=endpoint)
        return HubFile(url, repo_id, revision, filename, token, retries=retries, backoff_s=backoff_s)

    side_names = [f for f in files if is_side_file(f)]

    def download(patterns: list[str]) -> str:
        from huggingface_hub import snapshot_download

        return hub_call(lambda: snapshot_download(repo_id, revision=commit, allow_patterns=patterns,
                                                  endpoint=endpoint, token=token if token else False,
                                                  cache_dir=cache_dir),
                        repo_id, revision, bool(token))

    if "adapter_config.json" in files:  # a PEFT LoRA adapter: small, so always cached
        from .lora import LoraCheckpoint

        if base is None:
            raise SourceError(f"{label}: a LoRA adapter needs the config's `base_model` to apply to")
        src = LoraCheckpoint(download(["adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"]), base)
        src.label = label
        return src
    index_loader = _side_loader(lambda: hub_file(INDEX_NAME))
    weights = choose_weight_files(repo_id, files, index_loader)
    if not weights:
        pickles = [f for f in files if f.endswith(PICKLE_SUFFIXES) and "/" not in f]
        if not pickles:
            raise SourceError(f"{label}: the repo holds no .safetensors weights")
        if not allow_pickle:
            raise SourceError(f"{label}: holds PyTorch pickle weights ({pickles[0]}). {PICKLE_HINT}")
        index = [f for f in files if f.endswith(".bin.index.json")]
        cache = True  # pickles cannot be read by range: download them
        weights = pickles + index
    if cache:
        extra = [INDEX_NAME] if INDEX_NAME in files else []
        src = open_local(download(weights + extra + side_names), allow_pickle=allow_pickle)
        src.label = label
        return src
    readers: dict[str, HubFile] = {}
    try:
        for name in weights:
            readers[name] = hub_file(name)
        side = {name: _side_loader(lambda n=name: hub_file(n)) for name in side_names}
        return HubCheckpoint(label, repo_id, revision, commit, readers, side,
                             {name: sizes[name] for name in side_names if sizes.get(name) is not None})
    except BaseException:
        for reader in readers.values():
            reader.close()
        raise


def hub_call(fn: Callable, repo_id: str, revision: str, had_token: bool):
    """Run a huggingface_hub call, turning its errors into one-line SourceErrors that name the repo."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return fn()
    except HfHubHTTPError as exc:
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else 0
        code = response.headers.get("X-Error-Code") if response is not None else None
        from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

        if code is None and isinstance(exc, RevisionNotFoundError):
            code = "RevisionNotFound"
        if code is None and isinstance(exc, EntryNotFoundError):
            code = "EntryNotFound"
        raise status_error(status, code, repo_id, revision, None, had_token) from None
    except OfflineModeIsEnabled:
        raise SourceError(f"{repo_id}: HF_HUB_OFFLINE is set, so the Hub cannot be reached") from None
    except httpx.TransportError as exc:
        raise SourceError(f"{repo_id}: cannot reach the Hub ({exc.__class__.__name__})") from None
