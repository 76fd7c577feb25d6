"""Check the merged model: after Merge, the same evaluation as ``python -m merging evaluate`` on the session's
merged folder, beside the models that went into it: a chart (perplexity of the base, each fine-tune and the merge;
the zoo's accuracy; classifiers' agreement) with its caption, the table, the continuations side by side and the
verdict line.

It runs on the GPU when one is attached (on ZeroGPU inside the same ``spaces.GPU`` decorator as the merge), is
refused up front with the figures when the largest model cannot fit in memory (``merging.evaluate.loading``), and
stops at the next window when Cancel sets the session's flag. The library computes and draws; this panel places.
"""

from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging.config import MergeConfig
from merging.errors import Cancelled, MergeError

from .common import AppSettings, error_html, failure
from .merge_panel import gpu_task
from .sessions import Session, SessionStore

MAX_TOKENS = 2048  # of the held text: seconds on a small model, and bounded for a big one on a GPU


def check_in_session(out_dir: str | Path, session: Session, settings: AppSettings, *, progress=None,
                     max_tokens: int = MAX_TOKENS) -> dict:
    """The evaluation report of a merged folder of this session (its inputs from its merge_config.yml).

    On a public server (no local paths) Hub inputs are not read from the server's Hub cache: another visitor's
    download of a gated model must not answer this one's check."""
    from merging.evaluate.run import evaluate

    folder = Path(out_dir).resolve()
    if session.folder.resolve() not in folder.parents or not folder.is_dir():
        raise MergeError("Merge first: there is no merged model in this session to check")
    session.cancel.clear()
    report = evaluate(folder, max_tokens=max_tokens, device="auto", hub_cache=settings.allow_local_paths,
                      progress=progress, cancel=session.cancel.is_set)
    report["merged"] = folder.name  # the session's folder is nobody's business, the user's own included
    return report


def find_merge(session: Session, config: MergeConfig) -> Path | None:
    """The session's newest merged folder made from exactly this config, if any (the API reuses it)."""
    wanted = config.to_yaml()
    found = sorted((p for p in session.folder.glob("merge-*") if (p / "merge_config.yml").is_file()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in found if (p / "merge_config.yml").read_text(encoding="utf-8") == wanted), None)


def views(report: dict) -> tuple:
    """(verdict Markdown, figure, caption, table Markdown, continuations Markdown) of a report."""
    from merging.evaluate.charts import evaluation_chart
    from merging.evaluate.report import caption, continuations_markdown, heading, markdown_table

    verdict = report["verdict"]
    others = [f"- {f['level']}: {f['text']}" for f in verdict["findings"] if f["text"] not in verdict["line"]]
    status = "\n".join([f"**{verdict['line']}**", "", f"{heading(report)} · {report['seconds']:.1f} s",
                        *([""] + others[:8] if others else [])])
    conts = continuations_markdown(report)
    conts = f"**Greedy continuations** (at most {report.get('new_tokens')} new tokens)\n\n{conts}" if conts else ""
    return status, evaluation_chart(report), f"*{caption(report)}*", markdown_table(report), conts


@dataclass
class EvalPanel:
    button: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    chart: gr.Plot
    caption: gr.Markdown
    table: gr.Markdown
    continuations: gr.Markdown
    report_file: gr.File


def build_eval_panel() -> EvalPanel:
    with gr.Row():
        button = gr.Button("Check the merged model", variant="primary", elem_id="eval-button", scale=3)
        cancel = gr.Button("Cancel check", variant="stop", elem_id="eval-cancel", scale=1)
    status = gr.Markdown("After a merge: perplexity, agreement and continuations of the merged model beside its "
                         "inputs, and a verdict.", elem_id="eval-status")
    with gr.Row():
        with gr.Column(scale=5):
            chart = gr.Plot(visible=False, show_label=False, elem_id="eval-chart")
            caption = gr.Markdown(elem_id="eval-caption")
        with gr.Column(scale=6):
            table = gr.Markdown(elem_id="eval-table")
    continuations = gr.Markdown(elem_id="eval-continuations")
    report_file = gr.File(label="Report (JSON)", visible=False, interactive=False, elem_id="eval-report")
    return EvalPanel(button, cancel, status, chart, caption, table, continuations, report_file)


def wire_eval_panel(panel: EvalPanel, out_dir: gr.State, settings: AppSettings, sessions: SessionStore) -> None:
    outputs = [panel.status, panel.chart, panel.caption, panel.table, panel.continuations, panel.report_file]

    @gpu_task
    def check(folder: str | None, previous_report, request: gr.Request,
              progress=gr.Progress()):  # noqa: B008 - Gradio's way of asking for a progress bar
        """Errors stay in this panel's status line (the CLI's words); the previous check's results stay, marked."""
        import json

        from merging.evaluate.report import jsonable

        def kept(status: str) -> tuple:
            marked = status + ("\n\nThe results below are from the previous check." if previous_report else "")
            return (marked, *([gr.skip()] * (len(outputs) - 1)))

        if not folder:
            return kept(error_html("Merge first: there is no merged model to check yet"))
        try:
            session = sessions.get(request.session_hash)
            progress(0, desc="loading the merged model")
            report = check_in_session(folder, session, settings,
                                      progress=lambda fraction, text: progress(fraction, desc=text))
        except Cancelled:
            return kept("**Cancelled:** the check stopped.")
        except Exception as exc:  # noqa: BLE001 - shown where it happened (failure() logs bugs with their traceback)
            return kept(failure("check", exc))
        status, figure, caption, table, conts = views(report)
        path = session.new_dir("check").with_suffix(".json")
        path.write_text(json.dumps(jsonable(report), indent=1))
        return (status, gr.update(value=figure, visible=True), caption, table, conts,
                gr.update(value=str(path), visible=True))

    def cancel(request: gr.Request) -> str:
        sessions.get(request.session_hash).cancel.set()
        return "Cancelling at the next window…"

    panel.button.click(check, [out_dir, panel.report_file], outputs, concurrency_id="merge",
                       concurrency_limit=settings.merge_concurrency,
                       api_visibility="private")
    panel.cancel.click(cancel, None, panel.status, queue=False, api_visibility="private", show_progress="hidden")
