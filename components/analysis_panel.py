"""Analyze: the diagnostics of a merge config, what they mean, and the charts behind them.

``merging.analysis`` computes the statistics (one streaming pass, or sampled rows read by range requests) with a
progress bar like a merge's; ``merging.advice`` reads them into findings and a recommended merge, shown in "What this
means" with an **Apply** button that puts the recommended config into the form; ``merging.charts`` draws them, one
tab per chart with its caption. The status line says "Done" only once the browser has drawn every chart of this run
(a ``js`` step after the handler waits for them). A failed Analyze shows its error in the status line and keeps the
previous run's findings and charts, marked as the previous run's.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

import gradio as gr

from merging.analysis import DEFAULT_SAMPLE_FRACTION
from merging.config import MergeConfig

from .common import AppSettings, failure, hf_token, hub_resolver, human_bytes, load_config, progress_text
from .sessions import SessionStore

# One tab per chart of merging.charts.CHARTS, in its order (tests/test_app_api.py checks they agree).
CHART_TABS = ("Signs", "Norms", "NAN", "Cosine", "EMR masks", "EMR rebuild", "Distance", "Spectra")
N_PLOTS = len(CHART_TABS)
SAMPLED = f"sampled ({100 * DEFAULT_SAMPLE_FRACTION:g} % of rows)"
MODES = ["auto", "exact", SAMPLED]

# After the handler: wait until every chart of this run (its layout.meta.run) is drawn, then say "Done".
DONE_WHEN_DRAWN = """async (pending, status) => {
  if (!pending) return status;
  const p = JSON.parse(pending);
  const drawn = () => [...document.querySelectorAll('#diagnostics-charts .js-plotly-plot')].filter(
    (d) => d.layout && d.layout.meta && d.layout.meta.run === p.run && d.querySelector('.main-svg')).length;
  const until = Date.now() + 60000;
  while (drawn() < p.n && Date.now() < until) await new Promise((r) => setTimeout(r, 50));
  return drawn() >= p.n ? p.done : p.done + ' (some charts did not draw: reload the page)';
}"""


# The chart chooser: every chart is drawn (at the column's width), one is shown; ``CSS`` below does the showing.
SHOW_CHART = ("(choice) => { document.querySelector('#diagnostics-charts').dataset.active = "
              f"String({list(CHART_TABS)!r}.indexOf(choice)); return []; }}")
CSS = (".chart-stack { position: relative; max-height: 56vh; overflow-y: auto; } "
       ".chart-panel { position: absolute !important; top: 0; left: 0; right: 0; height: 0; overflow: hidden; "
       "visibility: hidden; } "
       + ", ".join(['#diagnostics-charts:not([data-active]) #chart-panel-0']
                   + [f'#diagnostics-charts[data-active="{i}"] #chart-panel-{i}' for i in range(N_PLOTS)])
       + " { position: relative !important; height: auto; overflow: visible; visibility: visible; }"
       " #chart-choice .wrap { gap: 4px; } #chart-choice label { padding: 2px 8px; }")


def analyze_config(config: MergeConfig, settings: AppSettings, *, token: str | None = None, mode: str = "auto",
                   progress=None, cancel=None) -> dict:
    """The statistics as JSON-ready data (what ``/analyze`` returns, with the advice, and the charts read)."""
    from merging import analysis

    kwargs = {}
    if mode == "exact":
        kwargs["exact"] = True
    elif mode.startswith("sampled"):
        kwargs["sample"] = DEFAULT_SAMPLE_FRACTION
    return analysis.analyze(config, device="auto", resolver=hub_resolver(token), progress=progress, cancel=cancel,
                            sample_threshold_bytes=settings.sample_threshold_bytes, **kwargs)


def figures_for(stats: dict, run: str = "") -> list:
    """Every chart the charts module builds for these statistics, in its order, tagged with the run's id."""
    from merging import charts

    figures = list(charts.all_figures(stats))
    for fig in figures:
        fig.update_layout(meta={"run": run})
    return figures


def summary_markdown(stats: dict, seconds: float) -> str:
    meta = stats.get("meta") or {}
    whole = stats.get("model") or {}
    n_models = len(meta.get("models") or [])
    bits = [f"**Done:** {meta.get('mode', 'exact')} analysis of {n_models} models in {seconds:.1f} s",
            f"read {human_bytes(meta.get('bytes_read') or 0)} of {human_bytes(meta.get('bytes_total') or 0)}"]
    if meta.get("mode") == "sampled":
        bits.append(f"{100 * meta['sample_fraction']:.3g} % of rows; rates with 95 % intervals")
    rate = (whole.get("sign_conflict") or {}).get("rate") if isinstance(whole.get("sign_conflict"), dict) else None
    if isinstance(rate, (int, float)):
        bits.append(f"whole-model sign-conflict rate {100 * rate:.3g} %")
    lines = [" · ".join(bits)]
    lines += [f"- note: {n}" for n in (meta.get("notes") or [])[:6]]
    return "\n".join(lines)


def advice_markdown(advice: dict) -> tuple[str, str]:
    """(the recommendation, the findings) as Markdown for "What this means"."""
    rec = advice["recommendation"]
    head = f"**What this means** · try **{rec['summary']}**: {rec['reason']}"
    if advice.get("alternative"):
        head += f"  \n*Also:* {advice['alternative']}"
    findings = "\n".join(f"- {'⚠ ' if f['level'] == 'warn' else ''}{f['text']}" for f in advice["findings"])
    return head, findings


@dataclass
class AnalysisPanel:
    button: gr.Button
    mode: gr.Dropdown
    status: gr.Markdown
    pending: gr.Textbox  # the "Done" line of a run, until its charts are drawn
    meaning: gr.Group
    recommendation: gr.Markdown
    apply: gr.Button
    apply_status: gr.Markdown
    findings: gr.Markdown
    recommended: gr.State  # the recommended config's YAML
    charts: gr.Column
    charts_note: gr.Markdown
    plots: list
    captions: list
    stats_file: gr.DownloadButton
    last_run: gr.State  # a line naming the last good analysis, to mark what stays after a failure


def build_analysis_panel() -> AnalysisPanel:
    with gr.Row(equal_height=True):
        button = gr.Button("Analyze", variant="primary", elem_id="analyze-button", scale=1, min_width=120)
        mode = gr.Dropdown(MODES, value=MODES[0], show_label=False, scale=1, min_width=160, elem_id="analyze-mode",
                           info="auto: exact ≤ 2 GB of input", container=False)
        stats_file = gr.DownloadButton("Statistics (JSON)", visible=False, size="sm", scale=0, min_width=130,
                                       elem_id="stats-file")
    status = gr.Markdown(elem_id="analyze-status")
    pending = gr.Textbox(visible="hidden", elem_id="analyze-pending")
    with gr.Group(visible=False, elem_id="advice-panel") as meaning:
        with gr.Row(equal_height=False):
            recommendation = gr.Markdown(elem_id="advice-recommendation", padding=True, min_width=240)
            apply = gr.Button("Apply", variant="primary", size="sm", scale=0, min_width=80, elem_id="apply-advice")
        apply_status = gr.Markdown(elem_id="apply-status", padding=False)
        findings = gr.Markdown(elem_id="advice-findings", elem_classes=["findings"], padding=True)
    recommended = gr.State("")
    with gr.Column(visible="hidden", elem_id="diagnostics-charts") as charts:
        charts_note = gr.Markdown(elem_id="charts-note")
        choice = gr.Radio(list(CHART_TABS), value=CHART_TABS[0], show_label=False, elem_id="chart-choice")
        plots, captions = [], []
        with gr.Column(elem_classes=["chart-stack"]):
            for i in range(N_PLOTS):
                with gr.Column(elem_id=f"chart-panel-{i}", elem_classes=["chart-panel"]):
                    plots.append(gr.Plot(show_label=False, elem_id=f"chart-{i}"))
                    captions.append(gr.Markdown(elem_id=f"caption-{i}", elem_classes=["caption"]))
    choice.change(None, choice, None, js=SHOW_CHART, api_visibility="private")
    return AnalysisPanel(button, mode, status, pending, meaning, recommendation, apply, apply_status, findings,
                         recommended, charts, charts_note, plots, captions, stats_file, gr.State(""))


def wire_analysis_panel(panel: AnalysisPanel, cf, settings: AppSettings, sessions: SessionStore) -> None:
    """``cf``: the method form's ``ConfigForm`` (the config to analyze, and the form Apply fills)."""
    outputs = [panel.status, panel.pending, panel.meaning, panel.recommendation, panel.apply_status, panel.findings,
               panel.recommended, panel.charts, panel.charts_note, *panel.plots, *panel.captions, panel.stats_file,
               panel.last_run]

    def analyze(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
                progress=gr.Progress()):  # noqa: B008 - Gradio's way of asking for a progress bar
        yield {panel.status: "Analyzing…", panel.pending: ""}  # the last run's "Done" does not stay up meanwhile
        yield run_analysis(values, request, oauth_token, progress)

    def run_analysis(values: dict, request: gr.Request, oauth_token, progress) -> dict:
        from merging import charts
        from merging.advice import advise, recommended_yaml

        started = time.monotonic()
        try:
            session = sessions.get(request.session_hash)
            config = load_config(cf.config_text(values), settings, [session.folder])
            session.cancel.clear()
            progress(0, desc="reading headers")

            def on_progress(p) -> None:
                progress(p.fraction, desc=progress_text(p, "analyzing"))
                if settings.tensor_delay_s:
                    time.sleep(settings.tensor_delay_s)

            stats = analyze_config(config, settings, token=hf_token(oauth_token), mode=values[panel.mode],
                                   progress=on_progress, cancel=session.cancel.is_set)
            advice = advise(stats)
            run = uuid.uuid4().hex[:12]
            figures = figures_for(stats, run)[:N_PLOTS]
            for old in session.folder.glob("stats-*.json"):  # one analysis' statistics per session
                old.unlink(missing_ok=True)
            path = session.new_dir("stats").with_suffix(".json")
            path.write_text(settings.redact(json.dumps(stats, indent=1, default=str)))
        except Exception as exc:  # noqa: BLE001 - shown where it happened (failure() logs bugs with their traceback)
            previous = values[panel.last_run]
            status = failure("analyze", exc, settings)
            if previous:
                status += f"\n\nThe findings and charts below are from the previous analysis ({previous})."
            out = {panel.status: status, panel.pending: ""}
            if previous:
                out[panel.charts_note] = f"**From the previous analysis** ({previous}); the last Analyze failed."
            return out
        seconds = time.monotonic() - started
        meta = stats["meta"]
        run_line = (f"{time.strftime('%H:%M:%S')}: {meta['method']}, {len(meta['models'])} models, "
                    f"{meta['mode']}")
        head, findings = advice_markdown(advice)
        out = {panel.status: f"Drawing the charts of the {meta['mode']} analysis…",
               panel.pending: json.dumps({"run": run, "n": len(figures), "done": summary_markdown(stats, seconds)}),
               panel.meaning: gr.update(visible=True), panel.recommendation: head, panel.apply_status: "",
               panel.findings: findings, panel.recommended: settings.redact(recommended_yaml(advice)),
               panel.charts: gr.update(visible=True), panel.charts_note: "",
               panel.stats_file: gr.update(value=str(path), visible=True), panel.last_run: run_line}
        texts = charts.captions(stats)
        for i, (plot, caption) in enumerate(zip(panel.plots, panel.captions)):
            out[plot] = figures[i] if i < len(figures) else None
            out[caption] = texts[i] if i < len(texts) else ""
        return out

    def apply(values: dict) -> dict:
        text = values[panel.recommended]
        if not text:
            return {panel.apply_status: "Analyze first: there is no recommendation yet."}
        return cf.show_config(values, text) | {
            panel.apply_status: "Applied: the form and the YAML hold the recommended config; press Merge."}

    panel.button.click(analyze, cf.inputs() | {panel.mode, panel.last_run}, outputs, concurrency_id="analyze",
                       api_visibility="private", show_progress_on=[panel.status]).then(
        None, [panel.pending, panel.status], [panel.status], js=DONE_WHEN_DRAWN, api_visibility="private")
    panel.apply.click(apply, cf.inputs() | {panel.recommended}, [*cf.all_outputs(), panel.apply_status],
                      queue=False, api_visibility="private", show_progress="hidden")
