"""Pure functions from the zoo's "Learn" data (``merging.zoo.learn``: plain dicts) to Plotly figures. No Gradio here.

- ``table_chart``: the merging papers' table on the zoo: average and normalized accuracy per method, and what each
  method's own paper reports.
- ``lambda_chart``: task arithmetic θ = θ_base + λ Σ_i τ_i at one λ, accuracy per task next to each fine-tune's own.
- ``barrier_chart``: accuracy along the interpolation path of two MLPs: naive, re-basin, re-basin + REPAIR.
- ``emr_steps_chart``: EMR-Merging built up step by step (elect, + mask, + rescale), the paper's ablation.

Accuracies are fractions in the data and percentages on the charts (as the papers print them). Tasks get the same
colours as the models in the analysis charts (``charts.model_colors``: colour by position).
"""

from __future__ import annotations

import plotly.graph_objects as go

from ..charts import LAYOUT, NEUTRAL, model_colors

PERCENT_AXIS = dict(range=[0, 100], ticksuffix=" %")
STEP_LABELS = {"elect": "elect (τ_uni only)", "elect+mask": "elect + mask", "elect+rescale": "elect + rescale",
               "elect+mask+rescale": "elect + mask + rescale (EMR)"}
CURVES = (("naive", "naive average", "#8d99ae"), ("rebasin", "after Git Re-Basin", "#457b9d"),
          ("rebasin_repair", "Re-Basin + REPAIR", "#e76f51"))


def _pct(value: float | None) -> float | None:
    return None if value is None else 100.0 * value


def _finish(fig: go.Figure, title: str, x_title: str, y_title: str, **layout) -> go.Figure:
    fig.update_layout(**{**LAYOUT, "title": dict(text=title, x=0.01), **layout})
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def table_chart(table: dict) -> go.Figure:
    """One row per method of the table (``merging.zoo.learn.table_data``): horizontal bars of the average accuracy
    over the tasks and of the normalized accuracy (1/T Σ_t acc_merged(t) / acc_individual(t)); the average each
    method's paper reports on ViT-B/32 with eight tasks (``merging.zoo.rows.PAPER_VIT_B32``: EMR's Table 2 and the
    newer methods' own tables; the hover names the table) as a marker where there is one."""
    rows = [r for r in table.get("rows", []) if r.get("status", "ok") == "ok" and r.get("average") is not None]
    labels = [r["label"] for r in rows]
    tasks = table.get("tasks") or []
    hover = ["<br>".join(f"{t}: {100 * r['accuracy'][t]:.1f} %" for t in tasks if t in r.get("accuracy", {}))
             for r in rows]
    fig = go.Figure([
        go.Bar(y=labels, x=[_pct(r["average"]) for r in rows], name="average accuracy", orientation="h",
               marker_color=NEUTRAL[0], customdata=hover,
               hovertemplate="%{y}<br>average %{x:.1f} %<br>%{customdata}<extra></extra>"),
        go.Bar(y=labels, x=[_pct(r.get("normalized")) for r in rows], name="normalized (merged / individual)",
               orientation="h", marker_color="#84a98c",
               hovertemplate="%{y}<br>normalized %{x:.1f} %<extra></extra>"),
    ])
    paper = [(r["label"], r.get("paper_vit_b32_average"), r.get("paper_source") or "")
             for r in rows if r.get("paper_vit_b32_average") is not None]
    if paper:
        fig.add_trace(go.Scatter(
            y=[label for label, _, _ in paper], x=[v for _, v, _ in paper], name="paper-reported, ViT-B/32 average",
            mode="markers", marker=dict(symbol="diamond", size=10, color=NEUTRAL[1]),
            customdata=[source for _, _, source in paper],
            hovertemplate="%{y}<br>paper (ViT-B/32, 8 tasks): %{x:.1f} %<br>%{customdata}<extra></extra>"))
    split = table.get("split", "test")
    return _finish(fig, f"Merging methods on the zoo ({len(tasks)} tasks, {split} split)", "accuracy", "",
                   barmode="group", height=max(440, 34 * len(rows) + 160), xaxis=dict(range=[0, 105], ticksuffix=" %"),
                   yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.12))


def lambda_chart(result: dict) -> go.Figure:
    """Task arithmetic at one λ (``merging.zoo.learn.lambda_sweep``): a bar per task, each task's own fine-tune as a
    marker (the ceiling a merge aims for)."""
    tasks = list(result["accuracy"])
    colors = model_colors(tasks)
    lam = result["lambda"]
    fig = go.Figure([
        go.Bar(x=tasks, y=[_pct(result["accuracy"][t]) for t in tasks], name=f"task arithmetic, λ = {lam:.2f}",
               marker_color=[colors[t] for t in tasks], showlegend=False,  # the title names it; a legend entry
               hovertemplate="%{x}<br>merged: %{y:.1f} %<extra></extra>"),  # would show only the first colour
        go.Scatter(x=tasks, y=[_pct(result["individual"][t]) for t in tasks], name="the task's own fine-tune",
                   mode="markers", marker=dict(symbol="line-ew-open", size=28, line=dict(width=3, color=NEUTRAL[1])),
                   hovertemplate="%{x}<br>own fine-tune: %{y:.1f} %<extra></extra>"),
    ])
    title = (f"Task arithmetic at λ = {lam:.2f}: average {100 * result['average']:.1f} %, "
             f"normalized {100 * result['normalized']:.1f} %")
    return _finish(fig, title, "task", "accuracy", yaxis=PERCENT_AXIS, legend=dict(orientation="h", y=-0.2))


def barrier_chart(curve: dict) -> go.Figure:
    """Accuracy of θ(α) = (1 − α) θ_A + α θ_B (``merging.zoo.learn.barrier_curve``) for the three ways of lining the
    two networks up; the legend gives each curve's barrier (largest drop below the straight line between the ends)."""
    alphas = curve["alpha"]
    a, b = (curve.get("models") or ["A", "B"])[:2]
    fig = go.Figure()
    for key, label, color in CURVES:
        if key not in curve:
            continue
        drop = (curve.get("barrier") or {}).get(key)
        name = label + (f" (barrier {100 * drop:.1f} points)" if drop is not None else "")
        fig.add_trace(go.Scatter(x=alphas, y=[_pct(v) for v in curve[key]], name=name, mode="lines+markers",
                                 line=dict(color=color), marker=dict(color=color),
                                 hovertemplate=f"{label}<br>α = %{{x:.2f}}<br>accuracy %{{y:.1f}} %<extra></extra>"))
    return _finish(fig, f"Interpolating two independently trained MLPs: {a} (α = 0) → {b} (α = 1)",
                   "α (0 = model A, 1 = model B)", "accuracy", yaxis=PERCENT_AXIS,
                   legend=dict(orientation="h", y=-0.2))


def emr_steps_chart(steps: dict) -> go.Figure:
    """EMR-Merging one step at a time (``merging.zoo.learn.emr_steps``): average accuracy after each step on the
    zoo, next to the paper's ablation on ViT-B/32 (Huang et al. 2024, Table 7); the fine-tunes' average as a line."""
    rows = steps["steps"]
    names = [STEP_LABELS.get(r["step"], r["step"]) for r in rows]
    hover = ["<br>".join(f"{t}: {100 * v:.1f} %" for t, v in r["accuracy"].items()) for r in rows]
    fig = go.Figure([go.Bar(
        x=names, y=[_pct(r["average"]) for r in rows], name="our zoo (average over the tasks)",
        marker_color=NEUTRAL[0], customdata=[[100 * r["normalized"], h] for r, h in zip(rows, hover)],
        hovertemplate="%{x}<br>average %{y:.1f} % (normalized %{customdata[0]:.1f} %)<br>%{customdata[1]}"
                      "<extra></extra>")])
    paper = steps.get("paper_vit_b32") or {}
    if paper:
        fig.add_trace(go.Bar(x=names, y=[paper.get(r["step"]) for r in rows], name="EMR paper, ViT-B/32",
                             marker_color="#b8c0c8", hovertemplate="%{x}<br>paper: %{y:.1f} %<extra></extra>"))
    individual = steps.get("individual") or {}
    if individual:
        ceiling = 100 * sum(individual.values()) / len(individual)
        fig.add_trace(go.Scatter(x=names, y=[ceiling] * len(names), name=f"individual fine-tunes ({ceiling:.1f} %)",
                                 mode="lines", line=dict(color=NEUTRAL[1], dash="dash"),
                                 hovertemplate="individual fine-tunes: %{y:.1f} %<extra></extra>"))
    return _finish(fig, "EMR-Merging step by step: accuracy after each step", "step", "average accuracy",
                   barmode="group", yaxis=PERCENT_AXIS, legend=dict(orientation="h", y=-0.2))
