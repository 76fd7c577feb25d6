"""The app's Learn view on the committed zoo: chart builders (data → Plotly figure), the fast λ path against
``merging.zoo.learn`` computed the library's way (a real task_arithmetic merge through the engine), and torch's
process-wide thread count left as it was, even with several visitors at once."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from components import learn_panel as lp
from merging.errors import MergeError
from merging.zoo import charts as learn_charts
from merging.zoo import learn

pytestmark = pytest.mark.skipif(not lp.zoo_available(), reason="the committed zoo (assets/zoo) is missing")


@pytest.fixture(scope="module")
def table():
    return lp.table_data()


def test_table_chart_has_average_normalized_and_paper_per_method(table):
    fig = learn_charts.table_chart(table)
    rows = [r for r in table["rows"] if r["status"] == "ok"]
    average, normalized, paper = fig.data
    assert [t.type for t in fig.data] == ["bar", "bar", "scatter"]
    assert list(average.y) == [r["label"] for r in rows] == list(normalized.y)
    assert list(average.x) == pytest.approx([100 * r["average"] for r in rows])
    assert list(normalized.x) == pytest.approx([100 * r["normalized"] for r in rows])
    individual = next(r for r in rows if r["key"] == "individual")
    assert normalized.x[rows.index(individual)] == pytest.approx(100.0)
    in_paper = {r["label"]: r["paper_vit_b32_average"] for r in rows if r.get("paper_vit_b32_average") is not None}
    assert dict(zip(paper.y, paper.x)) == in_paper and in_paper["EMR-Merging"] == 88.7
    # the 2024-2025 rows and the official TIES protocol are in the view, with their papers' averages
    assert {"TSV-M", "Iso-C", "Iso-CTS", "CART", "PCB-Merging", "Consensus TA (TALL masks, k=2)",
            "Task Arithmetic + LiNeS", "TIES, official (whole model, k=20%, sum, λ=0.3)"} <= set(average.y)
    assert (in_paper["TSV-M"], in_paper["Iso-C"], in_paper["Iso-CTS"], in_paper["CART"]) == (85.9, 86.3, 86.2, 84.7)


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.65, 1.0])
def test_lambda_update_matches_the_library_merge(lam):
    ours = lp.lambda_update(lam)
    reference = learn.lambda_sweep(lam)  # run_merge of a task_arithmetic config, then evaluate_state
    assert ours["accuracy"] == reference["accuracy"]  # same θ bit for bit, same model, same data
    assert ours["individual"] == reference["individual"]
    assert ours["average"] == pytest.approx(reference["average"], abs=1e-12)
    assert ours["normalized"] == pytest.approx(reference["normalized"], abs=1e-12)


def test_lambda_zero_is_the_base_and_the_table_row_is_reproduced(table):
    rows = {r["key"]: r for r in table["rows"]}
    assert lp.lambda_update(0.0)["accuracy"] == pytest.approx(rows["pretrained"]["accuracy"], abs=1e-6)
    assert lp.lambda_update(0.3)["accuracy"] == pytest.approx(rows["task_arithmetic"]["accuracy"], abs=1e-6)


def test_one_slider_update_is_fast_and_the_chart_follows():
    lp.lambda_view(0.5)  # builds the cached task vectors, heads and test data
    timings = []
    for i in range(5):
        lam = 0.1 + 0.17 * i + 0.0001  # not on the slider's grid: every one a new computation
        started = time.perf_counter()
        fig, status = lp.lambda_view(lam)
        timings.append(time.perf_counter() - started)
        result = lp.lambda_update(lam)
        bars, own = fig.data
        assert list(bars.x) == list(result["accuracy"]) and len(bars.x) == 8
        assert list(bars.y) == pytest.approx([100 * v for v in result["accuracy"].values()])
        assert list(own.y) == pytest.approx([100 * v for v in result["individual"].values()])
        assert f"λ = {lam:.2f}" in fig.layout.title.text and "ms" in status
    print(f"\nslider update (task arithmetic merge + 8 task evaluations + figure): "
          f"median {1000 * sorted(timings)[2]:.1f} ms, max {1000 * max(timings):.1f} ms")
    with pytest.raises(MergeError, match="from 0 to 1"):
        lp.lambda_update(1.5)


def test_barrier_chart_shows_the_three_curves():
    curve = lp.barrier_data()
    fig = learn_charts.barrier_chart(curve)
    assert len(fig.data) == 3
    for trace, key in zip(fig.data, ("naive", "rebasin", "rebasin_repair")):
        assert list(trace.x) == curve["alpha"]
        assert list(trace.y) == pytest.approx([100 * v for v in curve[key]])
        assert f"barrier {100 * curve['barrier'][key]:.1f} points" in trace.name
    # the classic result on the zoo's MLPs: aligning the units removes most of the barrier, REPAIR more
    assert curve["barrier"]["naive"] > curve["barrier"]["rebasin"] >= curve["barrier"]["rebasin_repair"]


def test_emr_steps_chart_follows_the_ablation():
    steps = lp.emr_data()
    fig = learn_charts.emr_steps_chart(steps)
    ours, paper, ceiling = fig.data
    assert list(ours.x) == [learn_charts.STEP_LABELS[s["step"]] for s in steps["steps"]]
    assert list(ours.y) == pytest.approx([100 * s["average"] for s in steps["steps"]])
    assert list(paper.y) == [59.3, 86.8, 71.9, 88.7]
    individual = steps["individual"]
    assert ceiling.y[0] == pytest.approx(100 * sum(individual.values()) / len(individual))
    by_step = {s["step"]: s["average"] for s in steps["steps"]}
    assert by_step["elect+mask+rescale"] > by_step["elect"]  # the point of the ablation


def test_open_view_builds_every_chart_from_caches():
    out = lp.open_view(0.3)
    table_fig, lambda_fig, lambda_status, barrier_fig, barrier_status, emr_fig = out
    assert len(table_fig.data) == 3 and len(lambda_fig.data) == 2 and len(barrier_fig.data) == 3
    assert f"average {100 * lp.lambda_update(0.3)['average']:.1f} %" in lambda_status
    assert "Barrier" in barrier_status and len(emr_fig.data) == 3
    started = time.perf_counter()
    lp.open_view(0.3)
    assert time.perf_counter() - started < 2.0  # second opening: caches only (loose bound: shared CI cores)


def test_learn_handlers_leave_torch_threads_as_they_were():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # an app setting the zoo's one-thread sections must not clobber
    try:
        lp._barrier.cache_clear()
        lp._emr.cache_clear()
        errors = []

        def visitor(i: int) -> None:
            try:
                lp.open_view(0.05 * i) if i % 2 else lp.lambda_view(0.0501 * i + 0.001)
            except Exception as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=visitor, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_chart_builders_do_not_import_gradio():
    code = "import sys, merging.zoo.charts; assert 'gradio' not in sys.modules, 'gradio imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_without_a_zoo_the_section_says_how_to_build_one(tmp_path):
    import gradio as gr

    with gr.Blocks() as blocks:
        panel = lp.build_learn_panel(tmp_path)
    assert set(panel) == {"section"}
    texts = [c.value for c in blocks.blocks.values() if isinstance(c, gr.Markdown)]
    assert any("python -m merging zoo build" in t for t in texts)
