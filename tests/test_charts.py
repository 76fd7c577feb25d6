"""Chart builders: each returns a figure with the expected traces for 2 and for 8 models, one colour per model kept
across every chart, exact values in the hover; the standalone report inlines plotly.js."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
from checkpoints import write_family

from merging import charts
from merging.analysis import analyze
from merging.config import parse_config
from merging.report import report_html, write_report


def _stats(root, n_models: int, sample: float | None = None) -> dict:
    base, tunes = write_family(root, n_models=n_models)
    lines = ["merge_method: ties", f"base_model: {base}", "models:"]
    lines += [f"  - model: {t}\n    parameters: {{density: 0.5}}" for t in tunes]
    return analyze(parse_config("\n".join(lines) + "\n"), sample=sample, whole_tensor_bytes=0)


@pytest.fixture(scope="module", params=[2, 8], ids=["2 models", "8 models"])
def stats(request, tmp_path_factory):
    return _stats(tmp_path_factory.mktemp(f"fam{request.param}"), request.param)


@pytest.fixture(scope="module")
def sampled_stats(tmp_path_factory):
    return _stats(tmp_path_factory.mktemp("sampled"), 3, sample=0.5)


GROUPS = ["embeddings", "layer 0", "layer 1", "head", "other"]


def _per_model_traces(fig: go.Figure, stats: dict, per_model: int) -> None:
    """``per_model`` traces per model, in model order, coloured with the model's colour."""
    models = stats["meta"]["models"]
    colors = charts.model_colors(models)
    assert len(fig.data) == per_model * len(models)
    for trace in fig.data:
        assert list(trace.x) == GROUPS
    by_model = [fig.data[i * per_model:(i + 1) * per_model] for i in range(len(models))]
    for model, traces in zip(models, by_model):
        for trace in traces:
            color = trace.marker.color if isinstance(trace, go.Bar) else trace.line.color
            assert color == colors[model]
            assert "%{y:.3g}" in trace.hovertemplate or "%{customdata}" in trace.hovertemplate


def test_model_colors_are_distinct_and_stable():
    names = [f"m{i}" for i in range(8)]
    colors = charts.model_colors(names)
    assert len(set(colors.values())) == 8
    assert charts.model_colors(names[:2]) == {n: colors[n] for n in names[:2]}
    assert set(colors.values()).isdisjoint(charts.NEUTRAL)


def test_sign_conflict_chart_has_both_rates_by_layer(stats):
    fig = charts.sign_conflict_chart(stats)
    assert [t.name.split(" (")[0] for t in fig.data] == ["sign conflict rate", "|τ| mass against the elected sign"]
    assert list(fig.data[0].x) == GROUPS
    assert list(fig.data[0].y) == [g["sign_conflict"]["rate"] for g in stats["groups"]]
    assert fig.layout.title.text and fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_sign_conflict_chart_draws_intervals_when_sampled(sampled_stats):
    fig = charts.sign_conflict_chart(sampled_stats)
    bars = fig.data[0].error_y
    lows = [g["sign_conflict"]["ci95"][0] for g in sampled_stats["groups"]]
    assert bars.visible and list(bars.arrayminus) == pytest.approx(
        [g["sign_conflict"]["rate"] - low for g, low in zip(sampled_stats["groups"], lows)])
    assert "95% CI" in fig.data[0].customdata[1] and "sampled" in fig.layout.title.text


def test_task_vector_norm_chart_one_line_per_model(stats):
    fig = charts.task_vector_norm_chart(stats)
    _per_model_traces(fig, stats, 1)
    assert list(fig.data[-1].y) == [g["task_vector_norm"][-1] for g in stats["groups"]]
    assert "‖τ‖/‖θ_base‖" in fig.data[0].hovertemplate


def test_nan_chart_stacks_to_one(stats):
    fig = charts.nan_coefficients_chart(stats)
    _per_model_traces(fig, stats, 1)
    assert fig.layout.barmode == "stack"
    for k in range(len(GROUPS)):
        assert sum(t.y[k] for t in fig.data) == pytest.approx(1.0)


def test_cosine_heatmap_is_n_by_n_with_ones_on_the_diagonal(stats):
    n = len(stats["meta"]["models"])
    fig = charts.cosine_similarity_heatmap(stats)
    assert len(fig.data) == 1 and isinstance(fig.data[0], go.Heatmap)
    z = fig.data[0].z
    assert len(z) == n and all(len(row) == n for row in z)
    assert [z[i][i] for i in range(n)] == pytest.approx([1.0] * n)
    layer = charts.cosine_similarity_heatmap(stats, "layer 1")
    assert layer.data[0].z == tuple(tuple(r) for r in stats["groups"][2]["cosine_similarity"]) or \
        [list(r) for r in layer.data[0].z] == stats["groups"][2]["cosine_similarity"]
    with pytest.raises(KeyError):
        charts.cosine_similarity_heatmap(stats, "layer 99")


def test_emr_modulators_chart_has_density_and_rescaler_per_model(stats):
    fig = charts.emr_modulators_chart(stats)
    _per_model_traces(fig, stats, 2)
    n = len(stats["meta"]["models"])
    assert sum(t.showlegend is not False for t in fig.data) == n  # one legend entry per model
    assert "λ" in fig.data[0].name


def test_emr_reconstruction_chart_has_three_steps_per_model(stats):
    fig = charts.emr_reconstruction_chart(stats)
    _per_model_traces(fig, stats, 3)
    first = stats["groups"][1]["emr"]["reconstruction_error"]
    n = len(stats["meta"]["models"])
    assert [fig.data[k].y[1] for k in range(3)] == [first[key][0] for key in ("unified", "masked", "masked_rescaled")]
    assert [fig.data[3 * (n - 1) + 2].y[1]] == [first["masked_rescaled"][n - 1]]


def test_merged_distance_chart_one_line_per_model(stats):
    fig = charts.merged_distance_chart(stats)
    _per_model_traces(fig, stats, 1)
    assert "ties" in fig.layout.title.text


def test_spectral_chart_shows_each_models_spectra_by_layer(stats):
    fig = charts.spectral_chart(stats)
    n = len(stats["meta"]["models"])
    names = [g["name"] for g in stats["groups"]]
    ratio = [t for t in fig.data if t.xaxis == "x" and t.yaxis == "y"]
    assert len(ratio) == n and list(ratio[0].x) == names
    want = [g["spectral"]["effective_rank_ratio"][0] if g["spectral"] else None for g in stats["groups"]]
    assert list(ratio[0].y) == want
    overlap = next(t for t in fig.data if t.name.startswith("subspace overlap"))
    assert list(overlap.y) == [g["spectral"]["interference"] if g["spectral"] else None for g in stats["groups"]]
    spectra = [t for t in fig.data if t.xaxis == "x4"]
    assert len(spectra) == n and all(list(t.y) == sorted(t.y, reverse=True) for t in spectra)
    assert "Spectra" in fig.layout.title.text


def test_all_figures_in_order(stats):
    figures = charts.all_figures(stats)
    assert len(figures) == len(charts.CHARTS) == 8
    assert all(isinstance(f, go.Figure) and f.layout.title.text for f in figures)


def test_numbers_in_legends_and_hovers_have_three_significant_digits(stats):
    import re

    for fig in charts.all_figures(stats):
        for trace in fig.data:
            text = " ".join(str(x) for x in [trace.name or "", trace.hovertemplate or "",
                                              *(trace.customdata if isinstance(trace.customdata, tuple)
                                                and trace.customdata and isinstance(trace.customdata[0], str)
                                                else [])])
            assert ".6g" not in text
            for number in re.findall(r"\d+\.\d+(?:e-?\d+)?", text):
                digits = number.split("e")[0].replace(".", "").lstrip("0")
                assert len(digits) <= 3, (fig.layout.title.text, number)


def test_emr_charts_stack_their_panels_without_overlap(stats):
    for fig in (charts.emr_modulators_chart(stats), charts.emr_reconstruction_chart(stats)):
        domains = sorted(fig.layout[name].domain for name in fig.layout if name.startswith("yaxis"))
        assert len(domains) in (2, 3)
        assert all(low[1] < high[0] for low, high in zip(domains, domains[1:]))  # one above the other, with a gap
        assert all(fig.layout[name].domain == (0.0, 1.0) for name in fig.layout if name.startswith("xaxis"))
        assert fig.layout.legend.orientation == "h"  # under the plot: the width goes to the data


def test_every_chart_has_a_caption_that_reads_the_statistic(stats):
    texts = charts.captions(stats)
    assert len(texts) == len(charts.CHARTS)
    n = len(stats["meta"]["models"])
    assert f"{100 * (1 - 2 ** (1 - n)):.3g} %" in texts[0]
    assert "ties merge" in texts[charts.CHARTS.index(charts.merged_distance_chart)]
    assert "TSV-M" in texts[charts.CHARTS.index(charts.spectral_chart)]
    for text in texts:
        assert 100 < len(text) < 600 and "{" not in text


def test_report_is_standalone_with_plotly_inlined(sampled_stats, tmp_path):
    path = write_report(sampled_stats, tmp_path / "report.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "plotly.js v" in page and '<script src="http' not in page
    assert page.count("plotly.js v") <= 2  # the library once (its banner may name itself twice), not per chart
    assert len(page) > 1_000_000  # the bundle itself is inlined
    assert page.count('class="chart"') == 8 and page.count('class="caption"') == 8
    assert "What this means" in page and "<b>Try:</b>" in page
    assert "ft0" in page and "sampled" in page
    assert report_html(sampled_stats) == page
