"""Streaming that fills the link: the shaped loopback link, connections kept alive and bounded, several requests in
flight, statistics passes that never read a band twice. Everything is checked by counting (requests, connections,
bytes, requests at once) or on a virtual clock, never by timing."""

from __future__ import annotations

import threading

import pytest
from hub_world import file_bytes, resolver, ta_config, total_size

from merging import parse_config, run_merge
from merging.hub import link as link_module
from merging.hub.link import Link, LinkShape
from merging.sources import connections
from merging.sources.hub import HEADER_PREFETCH
from merging.sources.readahead import ReadAhead

pytestmark = pytest.mark.usefixtures("no_ambient_token")


# ----- the shaped link -----
def test_link_shapes_parse_and_refuse_in_one_line():
    assert LinkShape.parse("100MB/s,50ms") == LinkShape(100e6, None, 0.05)
    assert LinkShape.parse("300MB/s, 20ms, per=100MB/s") == LinkShape(300e6, 100e6, 0.02)
    assert LinkShape.parse("rtt=0.1s,total=1GB/s") == LinkShape(1e9, None, 0.1)
    assert LinkShape.parse("inf,0ms") == LinkShape(None, None, 0.0) and not LinkShape.parse("inf").shaped
    assert LinkShape.parse("50MB/s,100ms").describe() == "50 MB/s, RTT 100 ms"
    for bad in ("100Mb", "fast", "per=20ms", "100MB/s,50"):
        with pytest.raises(ValueError, match="is not a bandwidth like 100MB/s"):
            LinkShape.parse(bad)


class VirtualClock:
    """time.monotonic and time.sleep for the link module: sleeping advances the clock, per thread of a scenario."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def test_link_paces_each_connection_and_the_total(monkeypatch):
    clock = VirtualClock()
    monkeypatch.setattr(link_module, "time", clock)
    # one connection, capped at 10 MB/s on a 100 MB/s link: 50 MB take 5 s, and the handshake and request 2 RTTs
    shaped = Link(LinkShape(100e6, 10e6, 0.05))
    conn = shaped.connect()
    shaped.request()
    for _ in range(50):
        shaped.pace(conn, 1_000_000)
    assert clock.now == pytest.approx(0.1 + 5.0)
    # four connections taking turns on a 20 MB/s link (no per-connection cap): the total is what counts
    clock.now = 0.0
    shared = Link(LinkShape(20e6, None, 0.0))
    conns = [shared.connect() for _ in range(4)]
    for _ in range(10):
        for c in conns:
            shared.pace(c, 500_000)
    assert clock.now == pytest.approx(4 * 10 * 500_000 / 20e6)
    # an idle link earns no credit: after a pause, bytes still go at the shaped rate
    clock.now += 10.0
    before = clock.now
    shared.pace(conns[0], 2_000_000)
    assert clock.now - before == pytest.approx(0.1)
    assert shared.counts()["connections"] == 4 and shaped.counts()["requests"] == 1


# ----- the read-ahead -----
def test_read_ahead_keeps_its_budget_and_hands_each_unit_out_once():
    started = []
    gate = threading.Event()

    def read(tag):
        def go():
            started.append(tag)
            gate.wait(5)
            return tag
        return go

    with ReadAhead(workers=4, window=100) as ahead:
        units = [(k, (lambda k=k: [read(f"{k}.base"), read(f"{k}.model")]), 40) for k in range(5)]
        ahead.top_up(units)
        assert [ahead.has(k) for k in range(5)] == [True, True, False, False, False]  # 80 of 100 bytes
        assert ahead.bytes_pending == 80
        gate.set()
        assert ahead.take(0) == ["0.base", "0.model"] and ahead.take(0) is None
        ahead.top_up(units[1:])  # what comes after the unit taken
        assert ahead.has(2) and not ahead.has(3) and not ahead.has(0)
        assert ahead.take(9) is None
    with ReadAhead(workers=1, window=0) as one:  # a local disk: one unit ahead, whatever its size
        one.top_up([(k, (lambda k=k: [lambda: k]), 10**12) for k in range(3)])
        assert one.has(0) and not one.has(1) and one.take(0) == [0]


# ----- streamed merges from the fake Hub -----
@pytest.fixture
def fresh_connections(monkeypatch, world):
    """The process's Hub connections, made anew with this test's environment (and closed after it), to a Hub
    10 ms away: requests then overlap at the server whenever the client keeps several in flight."""
    connections.reset()
    monkeypatch.setattr(world["hub"].link, "shape", LinkShape(rtt_s=0.01))
    yield monkeypatch
    connections.reset()


def test_streamed_merge_reuses_connections_and_keeps_requests_in_flight(world, tmp_path, fresh_connections):
    hub = world["hub"]
    fresh_connections.setenv(connections.CONNECTIONS_ENV, "4")
    cfg = parse_config(ta_config("acme/base", "acme/ft0@v2", "acme/ft1"))
    hub.reset_counts()
    run_merge(cfg, tmp_path / "hub", resolver=resolver(world))
    counts = hub.counts()
    ranges = [r for r in hub.requests if r["range"]]
    print(f"\nstreamed merge: {counts['requests']} requests ({len(ranges)} ranges) on {counts['connections']} "
          f"connections, at most {counts['max_in_flight']} at once")
    # Before: a new connection for almost every request. Now the ranges share kept-alive connections, at most one
    # per request allowed in flight to the Hub and one to its CDN (plus huggingface_hub's own for the API), and
    # several requests are answered at once.
    assert len(ranges) >= 40
    assert counts["connections"] <= 2 * 4 + 2
    # (the server may still be finishing an answer the client has already read: one more, briefly)
    assert 4 <= counts["max_in_flight"] <= 5
    run_merge(parse_config(ta_config(str(world["base"]), str(world["ft2"]), str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")


def test_the_connection_limit_bounds_requests_in_flight(world, tmp_path, fresh_connections):
    hub = world["hub"]
    fresh_connections.setenv(connections.CONNECTIONS_ENV, "2")
    hub.reset_counts()
    run_merge(parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1")), tmp_path / "hub",
              resolver=resolver(world))
    assert 2 <= hub.counts()["max_in_flight"] <= 3  # (one answer may be finishing, as above)
    fresh_connections.setenv(connections.CONNECTIONS_ENV, "lots")
    connections.reset()
    from merging.errors import SourceError

    with pytest.raises(SourceError, match="MERGESCOPE_HUB_CONNECTIONS='lots': give a number of connections"):
        run_merge(parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1")), tmp_path / "no",
                  resolver=resolver(world))
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("method, params", [("ties", "{density: 0.3}"),
                                            ("dare_ties", "{density: 0.5, rescale: true}"),
                                            ("breadcrumbs_ties", "{density: 0.5, gamma: 0.1}")])
def test_statistics_passes_never_read_a_band_twice(world, tmp_path, monkeypatch, method, params):
    """A sparsifying merge's statistics passes (top-k cuts, L1 norms) and its merge pass share one read of each band:
    the band read ahead for the merge is the one the passes take (it used to be read again), and bands of tensors
    that fit ``HOLD_BYTES`` are held between the passes. Counted by what the server sent."""
    import merging.bands as bands

    hub = world["hub"]
    monkeypatch.setattr(bands, "BAND_ELEMENTS", 20_000)  # the 2048×128 embeddings and head in 14 bands each
    text = (f"merge_method: {method}\nbase_model: acme/base\nmodels: [{{model: acme/ft0}}, {{model: acme/ft1}}]\n"
            f"parameters: {params}\n")
    hub.reset_counts()
    run_merge(parse_config(text), tmp_path / "hub", resolver=resolver(world))
    served, files = hub.served(), total_size(world["base"], world["ft0"], world["ft1_sharded"])
    assert files <= served <= files + 5 * HEADER_PREFETCH  # each tensor once, plus the header prefetches
    local = text.replace("acme/base", str(world["base"])).replace("acme/ft0", str(world["ft0"]))
    run_merge(parse_config(local.replace("acme/ft1", str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")
