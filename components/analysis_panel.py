"""Analyze: the diagnostics of a merge config as charts, with a progress bar; exact, or sampled for big models.

``merging.analysis`` computes the statistics (one streaming pass, or sampled rows read by range requests);
``merging.charts`` turns them into Plotly figures. This panel only calls the two and lays the figures out.
"""

import json
import time

import gradio as gr

from merging.config import MergeConfig

from .common import AppSettings, hf_token, hub_resolver, human_bytes, load_config, user_errors
from .sessions import SessionStore

N_PLOTS = 8  # chart slots; the charts module decides which figures a config gets
MODES = ["auto", "exact", "sampled (10 % of rows)"]


def analyze_config(config: MergeConfig, settings: AppSettings, *, token: str | None = None, mode: str = "auto",
                   progress=None, cancel=None) -> dict:
    """The statistics as JSON-ready data (what ``/analyze`` returns and the charts read)."""
    from merging import analysis

    kwargs = {}
    if mode == "exact":
        kwargs["exact"] = True
    elif mode.startswith("sampled"):
        kwargs["sample"] = 0.1
    return analysis.analyze(config, device="auto", resolver=hub_resolver(token), progress=progress, cancel=cancel,
                            sample_threshold_bytes=settings.sample_threshold_bytes, **kwargs)


def figures_for(stats: dict) -> list:
    """Every chart the charts module builds for these statistics, in its order."""
    from merging import charts

    return list(charts.all_figures(stats))


def summary_markdown(stats: dict, seconds: float) -> str:
    meta = stats.get("meta") or {}
    whole = stats.get("model") or {}
    n_models = len(meta.get("models") or [])
    bits = [f"**Done:** {meta.get('mode', 'exact')} analysis of {n_models} models in {seconds:.1f} s",
            f"read {human_bytes(meta.get('bytes_read') or 0)} of {human_bytes(meta.get('bytes_total') or 0)}"]
    if meta.get("mode") == "sampled":
        bits.append(f"{meta['sample_fraction']:.0%} of rows; rates with 95 % intervals")
    rate = (whole.get("sign_conflict") or {}).get("rate") if isinstance(whole.get("sign_conflict"), dict) else None
    if isinstance(rate, (int, float)):
        bits.append(f"whole-model sign-conflict rate {rate:.1%}")
    lines = [" · ".join(bits)]
    lines += [f"- note: {n}" for n in (meta.get("notes") or [])[:6]]
    return "\n".join(lines)


def build_analysis_panel() -> dict:
    with gr.Row(equal_height=False):
        button = gr.Button("Analyze", variant="primary", elem_id="analyze-button", scale=3, size="lg")
        mode = gr.Radio(MODES, value=MODES[0], label="Mode", scale=3, elem_id="analyze-mode",
                        info="auto: exact for small models, sampled above 2 GB")
    status = gr.Markdown(elem_id="analyze-status")
    plots = [gr.Plot(visible=False, show_label=False, elem_id=f"chart-{i}") for i in range(N_PLOTS)]
    stats_file = gr.File(label="Statistics (JSON)", visible=False, interactive=False, elem_id="stats-file")
    return {"button": button, "mode": mode, "status": status, "plots": plots, "stats_file": stats_file}


def wire_analysis_panel(panel: dict, yaml_box, settings: AppSettings, sessions: SessionStore) -> None:
    plots = panel["plots"]

    @user_errors
    def analyze(config_text: str, mode: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
                progress=gr.Progress()):  # noqa: B008 - Gradio's way of asking for a progress bar
        session = sessions.get(request.session_hash)
        config = load_config(config_text, settings, [session.folder])
        session.cancel.clear()
        progress(0, desc="reading headers")

        def on_progress(p) -> None:
            done, total = getattr(p, "tensors_done", None), getattr(p, "tensors_total", None)
            fraction = getattr(p, "fraction", None)
            progress(fraction if fraction is not None else 0,
                     desc=f"analyzing: {done}/{total} tensors" if total else "analyzing")

        started = time.monotonic()
        stats = analyze_config(config, settings, token=hf_token(oauth_token), mode=mode, progress=on_progress,
                               cancel=session.cancel.is_set)
        seconds = time.monotonic() - started
        figures = figures_for(stats)[:N_PLOTS]
        path = session.new_dir("stats").with_suffix(".json")
        path.write_text(json.dumps(stats, indent=1, default=str))
        updates = [gr.update(value=fig, visible=True) for fig in figures]
        updates += [gr.update(value=None, visible=False)] * (N_PLOTS - len(figures))
        return [summary_markdown(stats, seconds), *updates, gr.update(value=str(path), visible=True)]

    panel["button"].click(analyze, [yaml_box, panel["mode"]], [panel["status"], *plots, panel["stats_file"]],
                          concurrency_id="analyze", api_visibility="private")
