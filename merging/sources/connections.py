"""The HTTP connections every Hub read shares: a bounded number of requests in flight, connections kept alive.

A streamed merge is limited by the link, not the disk: on a link of B bytes/s and round-trip time r, a request
of S bytes keeps its connection busy for r + S/B', so the link is full only when enough bytes are requested at
once (several times B·r). The engine's read-ahead (``merging.sources.readahead``) asks for several tensors and
models at once; this module bounds how many requests actually run (``MERGESCOPE_HUB_CONNECTIONS``, default
``DEFAULT_CONNECTIONS``) and keeps each connection alive for the next request, so that a request costs one round
trip, not a TCP (and TLS) handshake as well.

Range bodies are received straight into the caller's buffer (``http.client``'s ``readinto``: the kernel copies
the bytes once, no Python object per chunk), which costs a fifth to a tenth of the CPU time of a general client
(measured: 0.5 s against 2-4 s for 0.7 GB): at hundreds of MB/s the client, not the link, would otherwise be
the limit on a 2-core Space. Redirects are followed here (the Hub answers weight files with a redirect to its
CDN), and ``Authorization`` is never sent to an origin other than the one first asked: the token stays with
the Hub. Certificates are checked against ``SSL_CERT_FILE``, else certifi's bundle (what huggingface_hub's client
uses), else the system's. When a proxy is configured for a URL (``HTTPS_PROXY`` and the like, ``NO_PROXY``
honoured), the request goes through huggingface_hub's HTTP client instead, which implements proxies.
"""

from __future__ import annotations

import http.client
import os
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from urllib.parse import urljoin, urlsplit

try:  # huggingface_hub >= 1.0 ships its HTTP client as httpx (2.x renamed it httpx2)
    import httpx2 as httpx
except ImportError:  # pragma: no cover - older huggingface_hub
    import httpx  # type: ignore[no-redef]

from ..errors import SourceError

CONNECTIONS_ENV = "MERGESCOPE_HUB_CONNECTIONS"
DEFAULT_CONNECTIONS = 16
MAX_REDIRECTS = 10
# What a dropped, refused, reset or timed-out connection raises, on either client: worth another try.
TRANSPORT_ERRORS = (OSError, http.client.HTTPException, httpx.TransportError)

Origin = tuple[str, str, int]


def connection_limit() -> int:
    """How many range requests may run at once (``MERGESCOPE_HUB_CONNECTIONS``, read when the pool is made)."""
    text = os.environ.get(CONNECTIONS_ENV, "").strip()
    if not text:
        return DEFAULT_CONNECTIONS
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 256:
        raise SourceError(f"{CONNECTIONS_ENV}={text!r}: give a number of connections from 1 to 256")
    return value


def origin(url: str) -> Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


class Response:
    """A response whose body is read into buffers: ``status``, ``headers`` (case-insensitive ``get``), the final
    ``url`` after redirects, whether it was ``redirected``, and ``readinto(view)`` (0 at the end of the body)."""

    def __init__(self, status: int, headers, url: str, redirected: bool, readinto) -> None:
        self.status, self.headers, self.url, self.redirected = status, headers, url, redirected
        self.readinto = readinto


class Connections:
    """The process's pool: idle connections per origin, slots bounding requests in flight, a thread pool for reads
    split into several requests."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.slots = threading.BoundedSemaphore(limit)
        self.pool = ThreadPoolExecutor(limit, thread_name_prefix="hub-range")
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._tls: ssl.SSLContext | None = None
        self.opened = 0  # connections made, for tests and the bench

    @contextmanager
    def get(self, url: str, headers: dict[str, str], timeout: float) -> Iterator[Response]:
        """GET ``url`` on a pooled connection, following redirects (``Authorization`` only to the first origin)."""
        with self.slots:
            if _proxied(url):
                with _through_proxy(url, headers, timeout) as resp:
                    yield resp
                return
            first, redirected = origin(url), False
            for _ in range(MAX_REDIRECTS + 1):
                conn, resp = self._request(url, headers, timeout)
                location = resp.getheader("Location")
                if resp.status in (301, 302, 303, 307, 308) and location:
                    resp.read()
                    self._release(url, conn, resp)
                    url, redirected = urljoin(url, location), True
                    if origin(url) != first:
                        headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                    continue
                try:
                    yield Response(resp.status, resp.headers, url, redirected, resp.readinto)
                except BaseException:
                    conn.close()
                    raise
                self._release(url, conn, resp)
                return
            raise SourceError(f"{urlsplit(url).hostname}: more than {MAX_REDIRECTS} redirects")

    def _request(self, url: str, headers: dict[str, str], timeout: float):
        """Send the request on an idle connection to the URL's origin, or on a new one if that fails before any
        answer (the server may have closed an idle connection: no fault of this request)."""
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        key = origin(url)
        while True:
            conn, reused = self._connection(key, timeout)
            try:
                conn.request("GET", target, headers=headers)
                return conn, conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if not reused:
                    raise
            except BaseException:
                conn.close()
                raise

    def _connection(self, key: Origin, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(key)
            if idle:
                conn = idle.pop()
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                return conn, True
            self.opened += 1
        scheme, host, port = key
        if scheme == "https":
            conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=self._tls_context())
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        else:
            raise SourceError(f"{host}: unsupported URL scheme {scheme!r}")
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, False

    def _release(self, url: str, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        """Back to the idle pool when the body was read to its end and the server keeps the connection open."""
        if resp.isclosed() and not resp.will_close and conn.sock is not None:
            with self._lock:
                self._idle.setdefault(origin(url), []).append(conn)
        else:
            conn.close()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            cafile = os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
            if not cafile:
                try:
                    import certifi

                    cafile = certifi.where()
                except ImportError:
                    cafile = None
            self._tls = ssl.create_default_context(cafile=cafile)
        return self._tls

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _proxied(url: str) -> bool:
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    return bool(proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(
        parts.hostname or "")


@contextmanager
def _through_proxy(url: str, headers: dict[str, str], timeout: float) -> Iterator[Response]:
    """The request through huggingface_hub's client (httpx honours the proxy variables; it drops Authorization on a
    redirect to another origin)."""
    from huggingface_hub.utils import get_session

    with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=True) as resp:
        chunks = resp.iter_bytes()
        left = memoryview(b"")

        def readinto(view: memoryview) -> int:
            nonlocal left
            if not left:
                left = memoryview(next(chunks, b""))
            n = min(len(view), len(left))
            view[:n] = left[:n]
            left = left[n:]
            return n

        yield Response(resp.status_code, resp.headers, str(resp.url), bool(resp.history), readinto)


_shared: Connections | None = None
_lock = threading.Lock()


def shared() -> Connections:
    """The process's connections, made on first use with the limit the environment gives then."""
    global _shared
    with _lock:
        if _shared is None:
            _shared = Connections(connection_limit())
        return _shared


def reset() -> None:
    """Close the shared connections (tests, or after changing ``MERGESCOPE_HUB_CONNECTIONS``)."""
    global _shared
    with _lock:
        old, _shared = _shared, None
    if old is not None:
        old.close()


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()
