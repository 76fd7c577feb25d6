"""The standalone HTML report of an analysis: one file, plotly.js inlined, so it opens offline.

The charts come from ``merging.charts`` (pure Plotly), imported when a report is written so that the rest of
``merging`` never needs plotly. The first figure carries the whole plotly.js bundle
(``include_plotlyjs=True``, about 4.5 MB); the others reuse it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .errors import MergeError


def _charts():
    """``merging.charts``, imported on first use: plotly is loaded only when a report is written."""
    from . import charts

    return charts


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def _num(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, dict):  # a rate with its interval
        text = _num(value.get("rate"))
        if value.get("ci95"):
            text += f" [{value['ci95'][0]:.4g}, {value['ci95'][1]:.4g}]"
        return text
    return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))


def _summary_table(stats: dict) -> str:
    """Whole-model numbers per model: the table a reader checks before the charts."""
    meta, whole = stats["meta"], stats["model"]
    colors = _charts().model_colors(meta["models"])
    method_lams = meta.get("method_rescalers")
    head = ["model", "‖τ‖", "‖τ‖/‖θ_base‖", "NAN α", "EMR mask density", "EMR λ", "EMR error (mask+rescale)",
            f"distance of the {meta['method']} merge"]
    if method_lams:
        head.insert(6, f"{meta['method']} λ")
    rows = []
    for i, (model, label) in enumerate(zip(meta["models"], meta["model_labels"])):
        cells = [f'<span class="swatch" style="background:{colors[model]}"></span>{html.escape(label)}',
                 _num(whole["task_vector_norm"][i]), _num(whole["relative_task_vector_norm"][i]),
                 _num(whole["nan_coefficients"][i]), _num(whole["emr"]["mask_density"][i]),
                 _num(meta["emr_rescalers"][i]), _num(whole["emr"]["reconstruction_error"]["masked_rescaled"][i]),
                 _num(whole["merged_distance"][i] if whole.get("merged_distance") else None)]
        if method_lams:
            cells.insert(6, _num(method_lams[i]))
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1b1b1b; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.92em; }
td, th { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; border-radius: 2px;
          vertical-align: middle; }
.meta td { text-align: left; } pre { background: #f6f8fa; padding: 1em; overflow-x: auto; }
.chart { margin: 1.5em 0; } .caption { color: #444; max-width: 60em; margin: 0.2em 0 0 0; }
"""


def report_html(stats: dict, title: str = "Mergescope merge diagnostics") -> str:
    """The report as one HTML string (plotly.js inlined once, with the first chart)."""
    meta = stats["meta"]
    from .advice import advise

    charts = []
    captions = _charts().captions(stats)
    for i, fig in enumerate(_charts().all_figures(stats)):
        charts.append('<div class="chart">' + fig.to_html(full_html=False, include_plotlyjs=(i == 0),
                                                          default_width="100%", div_id=f"chart-{i}")
                      + f'<p class="caption">{html.escape(captions[i])}</p></div>')
    advice = advise(stats)
    rec = advice["recommendation"]
    findings = "".join(f"<li>{html.escape(f['text'])}</li>" for f in advice["findings"])
    meaning = (f"<ul>{findings}</ul><p><b>Try:</b> {html.escape(rec['summary'])}: {html.escape(rec['reason'])}</p>"
               + (f"<p>{html.escape(advice['alternative'])}</p>" if advice.get("alternative") else ""))
    mode = meta["mode"] + (f" ({meta['sample_fraction']:.1%} of rows; rates with {html.escape(meta['interval'])})"
                           if meta["mode"] == "sampled" else " (every element)")
    info = [
        ("method", meta["method"]), ("base model", meta["base_model"]), ("mode", mode),
        ("tensors", str(stats["model"]["tensors"])), ("elements per model", f"{stats['model']['elements']:,}"),
        ("bytes read", f"{_bytes(meta['bytes_read'])} of {_bytes(meta['bytes_total'])}"),
        ("time", f"{meta['seconds']:.2f} s on {meta['device']}" + (" (2 passes)" if meta.get("passes") == 2 else "")),
        ("TIES trim density", f"{', '.join(f'{d:g}' for d in meta['trim']['densities'])} "
                              f"({'from the config' if meta['trim']['density_from'] == 'config' else 'default'})"),
    ]
    meta_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in meta.get("notes", []))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<table class="meta">{meta_rows}</table>
{f"<h2>Notes</h2><ul>{notes}</ul>" if notes else ""}
<h2>What this means</h2>
{meaning}
<h2>Whole model</h2>
{_summary_table(stats)}
<h2>By layer</h2>
{"".join(charts)}
<h2>Config</h2>
<pre>{html.escape(stats.get("config_yaml", ""))}</pre>
</body></html>
"""


def write_report(stats: dict, path: str | Path, title: str = "Mergescope merge diagnostics") -> Path:
    """Write the standalone report to ``path``; returns the path."""
    path = Path(path)
    if not path.parent.exists():
        raise MergeError(f"{path}: the folder {path.parent} does not exist")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(report_html(stats, title), encoding="utf-8")
    tmp.replace(path)
    return path
