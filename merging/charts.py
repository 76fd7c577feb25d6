"""Pure functions from the analysis statistics (``merging.analysis``, schema in its ``JSON_SCHEMA_DOC``) to Plotly
figures. No Gradio here: the app's panels place them, and the standalone HTML report (``merging.report``) embeds
them. Only this module and ``merging.zoo.charts`` import plotly, and nothing in the library imports them at import
time: a merge or an analysis never loads plotly.

Every chart reads the per-group statistics (embeddings, layer 0 … L−1, head, other) in model order, gives each
model the same colour everywhere (``model_colors``), and puts exact values in the hover text. In sampled mode,
rates carry their 95% confidence intervals as error bars. Numbers in legends and hovers have 3 significant digits;
legends sit under the plot, so a phone's width goes to the data. ``captions(stats)`` gives each chart the sentences
shown under it: what it shows, how to read it, and what is high or low for that statistic.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

PALETTE = list(qualitative.Plotly) + list(qualitative.Dark24)
NEUTRAL = ("#2f3e46", "#c1121f")  # model-independent series (sign conflict): not in the model palette
LAYOUT = dict(template="plotly_white", height=400, margin=dict(l=60, r=20, t=60, b=50),
              legend=dict(title="model", orientation="h", yanchor="top", y=-0.18, x=0, xanchor="left"),
              hoverlabel=dict(namelength=-1))
DIGITS = ".3g"  # significant digits of every number in a legend or a hover


def model_colors(names: list[str]) -> dict[str, str]:
    """One colour per model, by its position: the same names give the same colours in every chart."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def _models(stats: dict) -> tuple[list[str], list[str], dict[str, str]]:
    meta = stats["meta"]
    models = list(meta["models"])
    labels = list(meta.get("model_labels") or models)
    return models, labels, model_colors(models)


def _groups(stats: dict) -> tuple[list[dict], list[str]]:
    groups = list(stats.get("groups") or [])
    return groups, [g["name"] for g in groups]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:{DIGITS}}"


def _mode_note(stats: dict, intervals: bool = False) -> str:
    """' (sampled: 5% of rows[, 95% CI])' in sampled mode, else nothing."""
    meta = stats["meta"]
    if meta.get("mode") == "sampled":
        return f" (sampled: {meta['sample_fraction']:.0%} of rows{', 95% CI' if intervals else ''})"
    return ""


def _finish(fig: go.Figure, title: str, x_title: str, y_title: str, **layout: Any) -> go.Figure:
    fig.update_layout(**{**LAYOUT, "title": dict(text=title, x=0.01), **layout})
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def _rate_trace(groups: list[dict], names: list[str], key: str, label: str, color: str, sampled: bool) -> go.Scatter:
    rates = [g[key]["rate"] for g in groups]
    cis = [g[key]["ci95"] for g in groups]
    hover = []
    for g, r, ci in zip(groups, rates, cis):
        text = f"{_fmt(r)}"
        if ci is not None:
            text += f" (95% CI {_fmt(ci[0])} – {_fmt(ci[1])})"
        hover.append(f"{text}<br>rows read {g['rows_read']} of {g['rows']}")
    error_y = None
    if sampled and any(ci is not None for ci in cis):
        error_y = dict(type="data", symmetric=False, visible=True,
                       array=[(ci[1] - r) if ci and r is not None else None for r, ci in zip(rates, cis)],
                       arrayminus=[(r - ci[0]) if ci and r is not None else None for r, ci in zip(rates, cis)])
    return go.Scatter(x=names, y=rates, name=label, mode="lines+markers", line=dict(color=color),
                      marker=dict(color=color), error_y=error_y, customdata=hover,
                      hovertemplate="%{x}<br>" + label + ": %{customdata}<extra></extra>")


def sign_conflict_chart(stats: dict) -> go.Figure:
    """Sign-conflict rate by layer, and the |τ| mass against the elected sign after the TIES trim."""
    groups, names = _groups(stats)
    sampled = stats["meta"].get("mode") == "sampled"
    trim = stats["meta"].get("trim", {})
    densities = sorted(set(trim.get("densities") or []))
    density_text = ", ".join(f"{d:g}" for d in densities) or "?"
    fig = go.Figure([
        _rate_trace(groups, names, "sign_conflict", "sign conflict rate", NEUTRAL[0], sampled),
        _rate_trace(groups, names, "trimmed_sign_disagreement",
                    f"|τ| mass against the elected sign (trim density {density_text})", NEUTRAL[1], sampled),
    ])
    return _finish(fig, "Where the fine-tunes disagree in sign" + _mode_note(stats, intervals=True), "layer group",
                   "fraction", yaxis=dict(range=[0, 1]), legend=dict(title="statistic", orientation="h", y=-0.2))


def task_vector_norm_chart(stats: dict) -> go.Figure:
    """‖τ_i‖ by layer per model; the hover adds ‖τ_i‖ / ‖θ_base‖."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    fig = go.Figure()
    for i, (model, label) in enumerate(zip(models, labels)):
        custom = [[_fmt(g["relative_task_vector_norm"][i]), _fmt(g["base_norm"])] for g in groups]
        fig.add_trace(go.Scatter(
            x=names, y=[g["task_vector_norm"][i] for g in groups], name=label, mode="lines+markers",
            line=dict(color=colors[model]), marker=dict(color=colors[model]), customdata=custom,
            hovertemplate=f"{label}<br>%{{x}}<br>‖τ‖ = %{{y:.3g}}<br>‖τ‖/‖θ_base‖ = %{{customdata[0]}}"
                          "<br>‖θ_base‖ = %{customdata[1]}<extra></extra>"))
    return _finish(fig, "Task-vector norm ‖θ_i − θ_base‖ by layer" + _mode_note(stats), "layer group", "‖τ_i‖_F")


def nan_coefficients_chart(stats: dict) -> go.Figure:
    """NAN's α_i ∝ 1/‖θ_i‖ per layer, stacked to 1."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    on = stats["meta"].get("nan_on", "weights")
    fig = go.Figure()
    for i, (model, label) in enumerate(zip(models, labels)):
        fig.add_trace(go.Bar(
            x=names, y=[g["nan_coefficients"][i] for g in groups], name=label, marker_color=colors[model],
            hovertemplate=f"{label}<br>%{{x}}<br>α = %{{y:.3g}}<extra></extra>"))
    x_name = "θ_i" if on == "weights" else "τ_i"
    return _finish(fig, f"NAN coefficients α_i ∝ 1/‖{x_name}‖ by layer (stacked to 1)" + _mode_note(stats),
                   "layer group", "α_i", barmode="stack", yaxis=dict(range=[0, 1]))


def cosine_similarity_heatmap(stats: dict, group: str = "model") -> go.Figure:
    """cos(τ_i, τ_j) for every pair of models, for the whole model or one group (e.g. ``"layer 3"``)."""
    models, labels, _ = _models(stats)
    if group == "model":
        entry = stats["model"]
    else:
        entry = next((g for g in stats.get("groups", []) if g["name"] == group), None)
        if entry is None:
            raise KeyError(f"no group {group!r} in the statistics")
    matrix = entry["cosine_similarity"]
    text = [[_fmt(v) if v is None else f"{v:.2f}" for v in row] for row in matrix]
    fig = go.Figure(go.Heatmap(
        z=matrix, x=labels, y=labels, zmin=-1, zmax=1, zmid=0, colorscale="RdBu", text=text,
        texttemplate="%{text}", colorbar=dict(title="cos"),
        hovertemplate="cos(τ_%{y}, τ_%{x}) = %{z:.3g}<extra></extra>"))
    where = "whole model" if group == "model" else group
    return _finish(fig, f"Cosine similarity of task vectors ({where})" + _mode_note(stats), "model", "model",
                   yaxis=dict(autorange="reversed"))


def _stacked(rows: int, titles: list[str]) -> go.Figure:
    """Subplots one above the other, sharing the layer axis: readable at a phone's width, no titles overlapping."""
    return make_subplots(rows=rows, cols=1, shared_xaxes=True, vertical_spacing=0.14 if rows == 2 else 0.1,
                         subplot_titles=titles)


def emr_modulators_chart(stats: dict) -> go.Figure:
    """EMR's per-task mask density (top) and rescaler (bottom), by layer; the legend gives each task's whole-model
    values."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    whole = stats["model"]["emr"]
    lambdas = stats["meta"].get("emr_rescalers") or [r["rate"] for r in whole["rescaler"]]
    fig = _stacked(2, ["mask density Σ M_i / n", "rescaler λ = Σ|τ_i| / Σ|M_i ⊙ τ_uni|"])
    for i, (model, label) in enumerate(zip(models, labels)):
        density = whole["mask_density"][i]["rate"]
        name = f"{label} (density {_fmt(density)}, λ {_fmt(lambdas[i])})"
        for row, key in ((1, "mask_density"), (2, "rescaler")):
            values = [g["emr"][key][i]["rate"] for g in groups]
            cis = [g["emr"][key][i]["ci95"] for g in groups]
            hover = [_fmt(v) + (f" (95% CI {_fmt(ci[0])} – {_fmt(ci[1])})" if ci else "") for v, ci in zip(values, cis)]
            fig.add_trace(go.Scatter(
                x=names, y=values, name=name, legendgroup=model, showlegend=row == 1, mode="lines+markers",
                line=dict(color=colors[model]), marker=dict(color=colors[model]), customdata=hover,
                hovertemplate=f"{label}<br>%{{x}}<br>{key.replace('_', ' ')}: %{{customdata}}"
                              f"<br>whole-model λ = {_fmt(lambdas[i])}<extra></extra>"), row=row, col=1)
    title = "EMR per task: mask density and rescaler by layer" + _mode_note(stats, intervals=True)
    fig = _finish(fig, title, "", "", height=560, legend={**LAYOUT["legend"], "y": -0.1})
    fig.update_xaxes(title_text="layer group", row=2, col=1)
    fig.update_yaxes(title_text="density", row=1, col=1)
    fig.update_yaxes(title_text="λ", row=2, col=1)
    return fig


RECONSTRUCTIONS = (("unified", "τ_uni alone"), ("masked", "+ mask"), ("masked_rescaled", "+ mask + rescale"))


def emr_reconstruction_chart(stats: dict) -> go.Figure:
    """‖θ_i − θ̂_i‖ / ‖τ_i‖ by layer for EMR's three steps (one above the other): τ_uni alone, with the mask, with
    mask and rescaler."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    fig = _stacked(3, [f"{t}: ‖θ_i − θ̂_i‖ / ‖τ_i‖" for _, t in RECONSTRUCTIONS])
    for i, (model, label) in enumerate(zip(models, labels)):
        for row, (key, title) in enumerate(RECONSTRUCTIONS, start=1):
            values = [g["emr"]["reconstruction_error"][key][i] for g in groups]
            fig.add_trace(go.Scatter(
                x=names, y=values, name=label, legendgroup=model, showlegend=row == 1, mode="lines+markers",
                line=dict(color=colors[model]), marker=dict(color=colors[model]),
                hovertemplate=f"{label}<br>%{{x}}<br>{title}: ‖θ − θ̂‖/‖τ‖ = %{{y:.3g}}<extra></extra>"),
                row=row, col=1)
    fig = _finish(fig, "EMR rebuild error by layer (lower is closer)" + _mode_note(stats), "", "", height=660,
                  legend={**LAYOUT["legend"], "y": -0.08})
    fig.update_xaxes(title_text="layer group", row=3, col=1)
    return fig


def merged_distance_chart(stats: dict) -> go.Figure:
    """‖θ_merged − θ_i‖ / ‖τ_i‖ by layer per model for the configured method."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    method = stats["meta"].get("method", "")
    fig = go.Figure()
    for i, (model, label) in enumerate(zip(models, labels)):
        values = [g["merged_distance"][i] if g.get("merged_distance") else None for g in groups]
        fig.add_trace(go.Scatter(
            x=names, y=values, name=label, mode="lines+markers", line=dict(color=colors[model]),
            marker=dict(color=colors[model]),
            hovertemplate=f"{label}<br>%{{x}}<br>‖θ_merged − θ_i‖/‖τ_i‖ = %{{y:.3g}}<extra></extra>"))
    return _finish(fig, f"Distance from the {method} merge to each fine-tune, by layer" + _mode_note(stats),
                   "layer group", "‖θ_merged − θ_i‖ / ‖τ_i‖")


def _spectral_values(groups: list[dict], key: str, i: int | None = None) -> list[float | None]:
    out = []
    for g in groups:
        spectral = g.get("spectral")
        value = spectral.get(key) if spectral else None
        out.append(value[i] if value is not None and i is not None else value)
    return out


def spectral_chart(stats: dict) -> go.Figure:
    """The task matrices' spectra (``spectral`` in the statistics): by layer, each task vector's effective rank over
    its rank and the share of its energy in the top 5 % of singular directions; the overlap of the tasks' top
    singular subspaces (the interference TSV-M removes) and the flatness of the summed task vector's spectrum
    (what Iso-C makes 1); and the singular values of the tensor whose tasks overlap most."""
    groups, names = _groups(stats)
    models, labels, colors = _models(stats)
    fig = make_subplots(rows=2, cols=2, vertical_spacing=0.18, horizontal_spacing=0.1, subplot_titles=(
        "effective rank / rank", "energy in the top 5 % of directions", "between tasks and in their sum",
        "singular values of the most overlapping tensor"))
    for i, (model, label) in enumerate(zip(models, labels)):
        for col, key in ((1, "effective_rank_ratio"), (2, "energy_top_5")):
            fig.add_trace(go.Scatter(
                x=names, y=_spectral_values(groups, key, i), name=label, legendgroup=model, showlegend=col == 1,
                mode="lines+markers", line=dict(color=colors[model]), marker=dict(color=colors[model]),
                hovertemplate=f"{label}<br>%{{x}}<br>{key.replace('_', ' ')}: %{{y:.4g}}<extra></extra>"),
                row=1, col=col)
    for key, label, color in (("interference", "subspace overlap (mean over pairs)", NEUTRAL[1]),
                              ("sum_flatness", "flatness of Σ τ_i (1 = isotropic)", NEUTRAL[0])):
        fig.add_trace(go.Scatter(x=names, y=_spectral_values(groups, key), name=label, mode="lines+markers",
                                 line=dict(color=color, dash="dot"), marker=dict(color=color),
                                 hovertemplate=f"%{{x}}<br>{label}: %{{y:.4g}}<extra></extra>"), row=2, col=1)
    tensors = [t for t in stats.get("tensors", []) if t.get("spectral") and t["spectral"].get("interference")
               is not None]
    if tensors:
        worst = max(tensors, key=lambda t: t["spectral"]["interference"])
        for i, (model, label) in enumerate(zip(models, labels)):
            values = worst["spectral"]["singular_values"][i]
            fig.add_trace(go.Scatter(
                x=list(range(1, len(values) + 1)), y=values, name=label, legendgroup=model, showlegend=False,
                mode="lines", line=dict(color=colors[model]),
                hovertemplate=f"{label}<br>σ_%{{x}} / ‖τ‖ = %{{y:.4g}}<br>{worst['name']}<extra></extra>"),
                row=2, col=2)
        fig.update_xaxes(title_text=f"j ({worst['name']})", row=2, col=2)
    whole = (stats.get("model") or {}).get("spectral") or {}
    note = ""
    if whole.get("method") not in (None, "exact"):
        bound = max(whole["error_bound"]) if whole.get("error_bound") else None
        note = " (randomized SVD above 1M elements" + (f", residual ≤ {bound:.2g} of ‖τ‖" if bound else "") + ")"
        if whole.get("method") == "sampled":
            note = " (from the sampled rows)"
    fig = _finish(fig, "Spectra of the task matrices: how low-rank, how overlapping, how flat" + note, "", "",
                  height=720, legend=dict(title="model", orientation="h", y=-0.12))
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_yaxes(title_text="σ_j / ‖τ_i‖_F", row=2, col=2)
    return fig


CHARTS = (sign_conflict_chart, task_vector_norm_chart, nan_coefficients_chart, cosine_similarity_heatmap,
          emr_modulators_chart, emr_reconstruction_chart, merged_distance_chart, spectral_chart)


def all_figures(stats: dict) -> list[go.Figure]:
    """Every chart for these statistics, in the report's order."""
    return [chart(stats) for chart in CHARTS]


# What each chart shows, how to read it, what is high or low: the sentences under it (the app, the report).
CAPTIONS = {
    "sign_conflict_chart": (
        "Per layer group, the share of entries where the fine-tunes' changes differ in sign (dark), and after TIES' "
        "trim the share of the kept mass against the elected sign (red): what TIES' election throws away. "
        "{n} unrelated task vectors give {chance} on the dark line, so only well below that is agreement; on the red "
        "line under 2.5 % the kept entries hardly collide, and tens of percent are real conflicts to settle."),
    "task_vector_norm_chart": (
        "How far each fine-tune moved from the base, ‖θ_i − θ_base‖ per layer group (the hover adds it relative to "
        "the base's norm). A line far above the rest is a dominant model that a sum or average is pulled toward; "
        "relative steps of a few percent add up like independent skills, above about 4 % averaging is safer."),
    "nan_coefficients_chart": (
        "NAN's coefficients α_i ∝ 1/‖θ_i‖ per layer group, stacked to 1. Equal slices (1/{n} each) mean NAN changes "
        "nothing; a thin slice is a model NAN turns down. Fine-tunes of one base usually have near-equal weight "
        "norms; NAN on the task vectors (`nan_on: task_vector`) spreads more."),
    "cosine_similarity_heatmap": (
        "cos(τ_i, τ_j) for every pair of fine-tunes over the whole model. Near 0 (white) is unrelated, the usual "
        "case; near 1 (blue) near duplicates, which count twice in a sum; negative (red) pull in opposite "
        "directions, and a merge trades one for the other."),
    "emr_modulators_chart": (
        "EMR's per-task mask density (the share of entries whose sign agrees with the elected τ_uni) and rescaler λ "
        "(which brings M_i ⊙ τ_uni back to the task's own size), per layer group. A density near 1 means the task "
        "agrees with the election almost everywhere (the EMR paper reports about 0.7); λ under 1 shrinks τ_uni."),
    "emr_reconstruction_chart": (
        "How far each task's EMR rebuild θ_base + λ_i M_i ⊙ τ_uni is from its fine-tune, ‖θ_i − θ̂_i‖ / ‖τ_i‖, after "
        "each of EMR's steps: 0 is the fine-tune itself, 1 as far as the base. Each step should lower it; compare "
        "with the merged-distance chart, the gap one merged model leaves."),
    "merged_distance_chart": (
        "How far the configured {method} merge lands from each fine-tune, ‖θ_merged − θ_i‖ / ‖τ_i‖ per layer group: "
        "0 is that fine-tune, 1 as far as the base, above 1 the merge moved away from that task. Lines far apart "
        "mean the merge favours some models."),
    "spectral_chart": (
        "The task matrices' singular values per layer group. Top: each fine-tune's effective rank over its rank (low "
        "= a few directions carry the change) and its energy in the top 5 % of directions. Bottom left: the overlap "
        "of the tasks' top singular subspaces (0 = disjoint, 1 = the same directions; above about 0.3 the tasks "
        "compete, where TSV-M helps) and the flatness of the summed spectrum (1 = isotropic; low is what Iso-C "
        "flattens). Bottom right: the spectra of the most overlapping tensor."),
}


def captions(stats: dict) -> list[str]:
    """The caption of every chart of ``all_figures``, in its order, with this analysis' numbers filled in."""
    n = len(stats["meta"]["models"])
    values = {"n": n, "chance": f"{100 * (1 - 2 ** (1 - n)):.3g} %" if n >= 2 else "n/a",
              "method": stats["meta"].get("method", "")}
    return [CAPTIONS[chart.__name__].format(**values) for chart in CHARTS]
