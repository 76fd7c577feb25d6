"""A shaped network link for the loopback Hub (``merging.hub.loopback``): what a Space's link to the Hub costs.

``LinkShape`` says how fast and how far away the server is: a total bandwidth shared by every connection, a cap
per connection (one TCP stream from a CDN is often slower than the link), and a round-trip time. ``Link`` applies
it on the server side:

- every new connection waits one RTT before its first request is read (the TCP handshake);
- every request waits one RTT before its answer starts (the request's trip there and the answer's first byte
  back); a redirect is a request of its own, so it costs one more;
- body bytes leave in chunks, each at the time both the connection and the shared link have room for it: each
  keeps a clock of when it is next free (a chunk of n bytes occupies the link for n / total and the connection for
  n / per_connection), so many connections share the total fairly and none exceeds its own cap. An idle link
  earns no credit (only a sleep's overshoot of up to ``SLACK_S`` is caught up), so bursts stay at the shaped rate.

The server counts connections and requests, which is how tests check that a client reuses its connections.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass

SLACK_S = 0.005  # a connection that slept too long may catch up this much


@dataclass(frozen=True)
class LinkShape:
    """Bandwidths in bytes per second (None: unlimited) and the round-trip time in seconds."""

    total_bps: float | None = None
    per_connection_bps: float | None = None
    rtt_s: float = 0.0

    @property
    def shaped(self) -> bool:
        return bool(self.total_bps or self.per_connection_bps or self.rtt_s)

    @property
    def floor_bps(self) -> float | None:
        """The link's bandwidth: what a client that keeps enough requests in flight can reach."""
        return self.total_bps

    def describe(self) -> str:
        parts = [f"{self.total_bps / 1e6:g} MB/s" if self.total_bps else "unlimited"]
        if self.per_connection_bps:
            parts.append(f"{self.per_connection_bps / 1e6:g} MB/s per connection")
        parts.append(f"RTT {self.rtt_s * 1000:g} ms")
        return ", ".join(parts)

    @staticmethod
    def parse(text: str) -> LinkShape:
        """``"100MB/s,50ms"``, ``"300MB/s,20ms,per=100MB/s"``; bandwidths in B/KB/MB/GB per second (decimal),
        ``inf`` for none, the RTT in ms or s."""
        total, per, rtt = None, None, 0.0
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, _, value = part.rpartition("=")
            if key in ("", "rtt") and (m := _TIME.fullmatch(value)):
                rtt = float(m[1]) / (1000 if m[2] == "ms" else 1)
            elif key in ("", "total", "per") and (value == "inf" or _RATE.fullmatch(value)):
                rate = None if value == "inf" else _rate(value)
                if key == "per":
                    per = rate
                else:
                    total = rate
            else:
                raise ValueError(f"link shape {text!r}: {part!r} is not a bandwidth like 100MB/s, per=50MB/s, "
                                 "or a round-trip time like 20ms")
        return LinkShape(total, per, rtt)


_RATE = re.compile(r"([0-9.]+)\s*([KMG]?)B/s", re.IGNORECASE)
_TIME = re.compile(r"([0-9.]+)\s*(ms|s)")


def _rate(value: str) -> float:
    m = _RATE.fullmatch(value)
    return float(m[1]) * 1000 ** " KMG".index((m[2] or " ").upper())


def _resume(free_at: float, now: float) -> float:
    """When the next chunk may start on a clock free at ``free_at``: then, if that is at most ``SLACK_S`` ago (a
    sleep that overshot is caught up), else now (an idle clock earns no credit)."""
    return free_at if free_at >= now - SLACK_S else now


class Connection:
    """One connection's clock: when it has room for its next chunk."""

    __slots__ = ("free_at",)

    def __init__(self) -> None:
        self.free_at = 0.0


class Link:
    """The shaped link's shared state (the total bandwidth's clock) and its counters."""

    def __init__(self, shape: LinkShape | None = None) -> None:
        self.shape = shape or LinkShape()
        self._lock = threading.Lock()
        self._free_at = 0.0
        self.connections = 0
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests answered at once since the last reset

    def connect(self) -> Connection:
        """A new connection: counted, and delayed by the handshake's round trip."""
        with self._lock:
            self.connections += 1
        if self.shape.rtt_s:
            time.sleep(self.shape.rtt_s)
        return Connection()

    def request(self) -> None:
        """A request arrived: its answer starts one round trip later (``done`` when it is answered)."""
        with self._lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.shape.rtt_s:
            time.sleep(self.shape.rtt_s)

    def done(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def pace(self, conn: Connection, n: int) -> None:
        """Wait until ``n`` more body bytes of ``conn`` have crossed the link."""
        total, per = self.shape.total_bps, self.shape.per_connection_bps
        if not total and not per:
            return
        now = time.monotonic()
        start = _resume(conn.free_at, now)
        done = start
        if total:
            with self._lock:
                start = max(start, _resume(self._free_at, now))
                self._free_at = start + n / total
            done = start + n / total
        if per:
            done = max(done, start + n / per)
        conn.free_at = done
        wait = done - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"connections": self.connections, "requests": self.requests,
                    "max_in_flight": self.max_in_flight}

    def reset_counts(self) -> None:
        with self._lock:
            self.connections = self.requests = 0
            self.max_in_flight = self.in_flight
