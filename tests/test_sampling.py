"""The sampled analysis' design: whole runs of consecutive rows (clusters), the intervals counting clusters, and,
from the Hub, about as many bytes sent as the rows it uses (random single rows made the Hub send 16 x as many)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import write_family
from fakehub import FakeHub
from hub_world import ta_config

from merging import parse_config
from merging.analysis import RatioStrata, analyze
from merging.analysis.estimate import RowMoments
from merging.analysis.reader import MIN_RUNS, RUN_BYTES, sampled_rows
from merging.hub import hub_resolver
from merging.plan import build_plan
from merging.sources import open_sources
from merging.sources.hub import HEADER_PREFETCH

DIMS = dict(hidden=512, intermediate=2048, vocab=8192, layers=1, dtype="bfloat16")  # matrices of 0.5-8 MB


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("sampling") / "m", n_models=2, **DIMS)


def _tasks_and_sources(base, tunes):
    config = parse_config(ta_config(str(base), str(tunes[0]), str(tunes[1])))
    sources = open_sources(config.model_refs(), config.base_model)
    return build_plan(config, sources).tasks, sources


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_sampled_rows_are_whole_runs_of_about_the_fraction(family, fraction):
    tasks, sources = _tasks_and_sources(*family)
    chosen = sampled_rows(tasks, sources, fraction, seed=0, whole_bytes=1 << 20)
    assert chosen, "no tensor was sampled"
    assert any(sample.run > 1 for sample in chosen.values()), "no tensor was read in runs of rows"
    for task in tasks:
        sample = chosen.get(task.name)
        spec = sources[task.base.model].specs()[task.base.name]
        if sample is None:
            assert spec.nbytes <= 1 << 20 or len(spec.shape) < 2
            continue
        n_rows, row_bytes = spec.shape[0], spec.nbytes // spec.shape[0]
        rows, run = sample.rows, sample.run
        assert rows == sorted(set(rows)) and 0 <= rows[0] and rows[-1] < n_rows
        clusters = sorted({r // run for r in rows})
        # whole clusters only, aligned on multiples of the run
        assert rows == [r for c in clusters for r in range(c * run, min((c + 1) * run, n_rows))]
        assert run * row_bytes <= max(RUN_BYTES, row_bytes)
        wanted = fraction * n_rows
        assert abs(len(rows) - wanted) <= run, (task.name, len(rows), wanted, run)
        assert len(clusters) >= min(MIN_RUNS, round(wanted))
    for src in sources.values():
        src.close()


def test_the_same_seed_draws_the_same_runs_and_another_seed_others(family):
    tasks, sources = _tasks_and_sources(*family)
    one, same, other = (sampled_rows(tasks, sources, 0.05, seed, 1 << 20) for seed in (3, 3, 4))
    assert one == same and one != other and one.keys() == other.keys()
    for src in sources.values():
        src.close()


def test_cluster_moments_are_the_moments_of_the_runs_sums():
    """Rows read in runs of 3 (the tensor's last run, row 9, is shorter), given in two chunks: the strata count 2 of
    ⌈10 / 3⌉ = 4 clusters, with the sums over each run."""
    y = torch.tensor([[1.0, 0.0, 2.0, 5.0]])
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    moments = RowMoments(rows=10, read=4, k=1, run=3)
    moments.add(y[:, :3], x[:, :3])
    moments.add(y[:, 3:], x[:, 3:])
    got = moments.strata()
    cluster_y, cluster_x = np.array([3.0, 5.0]), np.array([3.0, 1.0])
    want = RatioStrata(np.array([4.0]), np.array([2.0]),
                       *(np.array([[v]]) for v in (cluster_y.sum(), cluster_x.sum(), (cluster_y ** 2).sum(),
                                                    (cluster_x ** 2).sum(), (cluster_x * cluster_y).sum())))
    for field in ("rows", "read", "sy", "sx", "syy", "sxx", "sxy"):
        np.testing.assert_allclose(getattr(got, field), getattr(want, field))
    np.testing.assert_allclose(got.estimate(), want.estimate())


def test_a_sampled_analysis_from_the_hub_is_sent_about_the_rows_it_uses(family, tmp_path, monkeypatch):
    """With the Hub's range coalescing as shipped: the rows read plus each file's first request, within 1.5 x, and
    the same statistics as the local analysis of the same files."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MERGESCOPE_HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    base, tunes = family
    hub = FakeHub()
    for name, folder in (("s/base", base), ("s/ft0", tunes[0]), ("s/ft1", tunes[1])):
        hub.add_repo(name, folder)
    options = dict(sample=0.05, seed=1)
    with hub:
        remote = analyze(parse_config(ta_config("s/base", "s/ft0", "s/ft1")),
                         resolver=hub_resolver(endpoint=hub.url, backoff_s=0.01), **options)
        served = hub.served()
    local = analyze(parse_config(ta_config(str(base), str(tunes[0]), str(tunes[1]))), **options)
    assert remote["tensors"] == local["tensors"] and remote["groups"] == local["groups"]
    used = remote["meta"]["bytes_read"]
    assert remote["meta"]["mode"] == "sampled" and used < remote["meta"]["bytes_total"] / 4
    print(f"\nsampled analysis (5% of rows in runs): the Hub sent {served} bytes for {used} bytes of rows")
    assert served <= 1.5 * used + 3 * HEADER_PREFETCH
