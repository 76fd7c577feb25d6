"""Plotly figures of an evaluation report (``run.evaluate``): pure functions from the report's JSON to a figure,
placed by the app (components/eval_panel.py). Only the chart modules import plotly, and nothing imports them when
a check runs from the command line."""

from __future__ import annotations

import math

import plotly.graph_objects as go

from .verdict import BROKEN_FACTOR

BASE_COLOR = "#8d99ae"
INPUT_COLORS = ["#636efa", "#ab63fa", "#19d3f3", "#ffa15a", "#b6e880", "#ff97ff", "#fecb52"]  # no red, no green
MERGED_COLORS = {"ok": "#2a9d8f", "warning": "#e9c46a", "broken": "#c1121f", "no comparison": "#6c757d"}
LAYOUT = dict(template="plotly_white", height=380, margin=dict(l=70, r=30, t=60, b=60), showlegend=False,
              hoverlabel=dict(namelength=-1))


def _colors(report: dict, rows: list[dict]) -> list[str]:
    palette = INPUT_COLORS
    status = report.get("verdict", {}).get("status", "ok")
    out, k = [], 0
    for r in rows:
        if r["role"] == "merged":
            out.append(MERGED_COLORS.get(status, MERGED_COLORS["ok"]))
        elif r["role"] == "base":
            out.append(BASE_COLOR)
        else:
            out.append(palette[k % len(palette)])
            k += 1
    return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def perplexity_chart(report: dict) -> go.Figure:
    """One bar per model (base, each input, merged), log-scaled when they span more than 20×, with the
    broken-merge limit (BROKEN_FACTOR × the worst input's perplexity) as a dashed line."""
    rows = [r for r in report["rows"] if not r.get("skipped") and r.get("perplexity") is not None]
    shown = [r["perplexity"] if _finite(r["perplexity"]) else 1e300 for r in rows]
    fig = go.Figure(go.Bar(x=[r["label"] for r in rows], y=shown, marker_color=_colors(report, rows),
                           text=[f"{v:.4g}" for v in shown], textposition="outside", cliponaxis=False,
                           customdata=[[r["role"], r.get("top1"), r.get("agreement")] for r in rows],
                           hovertemplate="%{x} (%{customdata[0]})<br>perplexity %{y:.5g}<br>top-1 accuracy "
                                         "%{customdata[1]:.1%}<br>agrees with merged %{customdata[2]:.1%}"
                                         "<extra></extra>"))
    inputs = [r["perplexity"] for r in rows if r["role"] != "merged" and _finite(r["perplexity"])]
    if inputs:
        limit = BROKEN_FACTOR * max(inputs)
        fig.add_hline(y=limit, line_dash="dash", line_color=MERGED_COLORS["broken"],
                      annotation_text=f"broken above {limit:.4g} ({BROKEN_FACTOR:g}× the worst input)",
                      annotation_position="top left")
    spread = max(shown + inputs) / max(1e-9, min(shown + inputs)) if shown else 1
    name = "perplexity" if report["kind"] == "causal_lm" else "target perplexity"
    fig.update_layout(**LAYOUT, title=dict(text=f"{name.capitalize()} on the held text (lower is better)", x=0.01))
    fig.update_yaxes(title_text=name, type="log" if spread > 20 else "linear", rangemode="tozero")
    fig.update_xaxes(title_text="model")
    return fig


def accuracy_chart(report: dict) -> go.Figure:
    """The demo zoo: each model's average test accuracy over the tasks (per-task figures in the hover)."""
    rows = [r for r in report["rows"] if not r.get("skipped") and r.get("average") is not None]
    hover = ["<br>".join(f"{t}: {a:.1%}" for t, a in (r.get("accuracy") or {}).items()) for r in rows]
    fig = go.Figure(go.Bar(x=[r["label"] for r in rows], y=[r["average"] for r in rows],
                           marker_color=_colors(report, rows), text=[f"{r['average']:.1%}" for r in rows],
                           textposition="outside", customdata=hover, cliponaxis=False,
                           hovertemplate="%{x}: %{y:.1%}<br>%{customdata}<extra></extra>"))
    fig.update_layout(**LAYOUT, title=dict(text="Average test accuracy over the zoo's tasks", x=0.01))
    fig.update_yaxes(title_text="accuracy", tickformat=".0%", range=[0, 1.08])
    fig.update_xaxes(title_text="model")
    return fig


def agreement_chart(report: dict) -> go.Figure:
    """Classifiers: how often each input predicts what the merged model predicts."""
    rows = [r for r in report["rows"] if not r.get("skipped") and r.get("agreement") is not None]
    fig = go.Figure(go.Bar(x=[r["label"] for r in rows], y=[r["agreement"] for r in rows],
                           marker_color=_colors(report, rows), text=[f"{r['agreement']:.1%}" for r in rows],
                           textposition="outside", cliponaxis=False,
                           hovertemplate="%{x}: %{y:.1%} of predictions as the merged model's<extra></extra>"))
    fig.update_layout(**LAYOUT, title=dict(text="Predictions that agree with the merged model's", x=0.01))
    fig.update_yaxes(title_text="agreement", tickformat=".0%", range=[0, 1.08])
    fig.update_xaxes(title_text="model")
    return fig


def evaluation_chart(report: dict) -> go.Figure:
    """The report's main figure: perplexity for language models, accuracy for the zoo, agreement otherwise."""
    if report["kind"] in ("causal_lm", "seq2seq"):
        return perplexity_chart(report)
    if report["kind"] == "zoo":
        return accuracy_chart(report)
    return agreement_chart(report)
