"""The public API: ``/analyze``, ``/merge`` and ``/evaluate``, each taking the YAML config as a string.

    from gradio_client import Client
    client = Client("http://127.0.0.1:7860/")
    stats = client.predict(open("merge.yml").read(), api_name="/analyze")  # the statistics (JSON) and "advice"
    files, archive, summary = client.predict(open("merge.yml").read(), api_name="/merge")
    report = client.predict(open("merge.yml").read(), api_name="/evaluate")          # the check's report (JSON)

``/evaluate`` checks this session's merge of that config (the newest one made from exactly this config, else it
merges first), as ``python -m merging evaluate`` would: rows per model, continuations, ``verdict``.

They call the same library functions as the page, in the caller's own session folder (a gradio_client session
has its own session hash), with the same path policy and the same merge concurrency limit.

A cancel (``gradio_client``'s ``job.cancel()``, Gradio's ``/cancel``) stops the work, not only the reply: Gradio
cancels the event's asyncio task, which cannot stop a thread, so each endpoint runs its work in a thread and, when
its await is cancelled, sets the flag the engine (or the check) reads between units; the job then stops as the
page's Cancel stops it, its output folder removed. A wall-clock budget (``merging.budget``: $MERGESCOPE_TIME_BUDGET,
30 minutes by default on a Space) stops it the same way.
"""

import asyncio
import json
import threading

import gradio as gr

from .analysis_panel import analyze_config
from .common import AppSettings, hf_token, load_config, user_errors
from .eval_panel import check_in_session, find_merge
from .merge_panel import gpu_task, merge_in_session
from .sessions import Session, SessionStore


def build_api(settings: AppSettings, sessions: SessionStore) -> None:
    """Hidden components and events that exist only to give the two endpoints their names and types."""
    with gr.Column(visible=False):
        config_in = gr.Textbox(label="config_yaml")
        stats_out = gr.JSON(label="stats")
        files_out = gr.File(label="files", file_count="multiple")
        archive_out = gr.File(label="archive")
        summary_out = gr.JSON(label="summary")
        report_out = gr.JSON(label="report")
        analyze_trigger = gr.Button("analyze")
        merge_trigger = gr.Button("merge")
        evaluate_trigger = gr.Button("evaluate")

    @user_errors(settings=settings)
    def analyze_work(config_yaml: str, session: Session, stop: threading.Event, token: str | None) -> dict:
        config = load_config(config_yaml, settings, [session.folder])
        from merging.advice import advise

        stats = analyze_config(config, settings, token=token, cancel=stop.is_set)
        # server paths as the visitor names them (demo:NAME, upload:NAME): the recommended config pastes back
        return json.loads(settings.redact(json.dumps({**stats, "advice": advise(stats)}, default=str)))

    @user_errors(settings=settings)
    def merge_work(config_yaml: str, session: Session, token: str | None):
        config = load_config(config_yaml, settings, [session.folder])
        outcome = merge_in_session(config, session, settings, token=token)
        r = outcome.result
        summary = {"tensors": r.tensors, "bytes_written": r.bytes_written, "seconds": round(r.seconds, 3),
                   "device": r.device, "notes": [settings.redact(n) for n in r.notes], "emr_tasks": outcome.emr_tasks,
                   "files": {p.name: p.stat().st_size for p in outcome.files}}
        return [str(p) for p in outcome.files], str(outcome.archive) if outcome.archive else None, summary

    @gpu_task
    @user_errors(settings=settings)
    def evaluate_work(config_yaml: str, session: Session, token: str | None) -> dict:
        from merging.evaluate.report import jsonable

        config = load_config(config_yaml, settings, [session.folder])
        folder = find_merge(session, config)
        if folder is None:
            folder = merge_in_session(config, session, settings, token=token).result.out_dir
        return jsonable(check_in_session(folder, session, settings))

    async def analyze(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        """Diagnostics of a merge config: per-layer sign conflicts, task-vector norms, similarity, NAN... as JSON,
        with ``advice``: findings and a recommended merge (``merging.advice``)."""
        session, stop = sessions.get(request.session_hash), threading.Event()
        return await until_cancelled(stop, analyze_work, config_yaml, session, stop, hf_token(oauth_token))

    async def merge(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        """Run a merge config; returns every output file, one zip of them (when small) and a summary."""
        session = sessions.get(request.session_hash)
        return await until_cancelled(session.cancel, merge_work, config_yaml, session, hf_token(oauth_token))

    async def evaluate(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        """Check the merged model of a config beside its inputs: perplexity, agreement, continuations, verdict."""
        session = sessions.get(request.session_hash)
        return await until_cancelled(session.cancel, evaluate_work, config_yaml, session, hf_token(oauth_token))

    analyze_trigger.click(analyze, config_in, stats_out, api_name="analyze", concurrency_id="analyze")
    merge_trigger.click(merge, config_in, [files_out, archive_out, summary_out], api_name="merge",
                        concurrency_id="merge", concurrency_limit=settings.merge_concurrency)
    evaluate_trigger.click(evaluate, config_in, report_out, api_name="evaluate", concurrency_id="merge",
                           concurrency_limit=settings.merge_concurrency)


async def until_cancelled(stop: threading.Event, work, *args):
    """``work(*args)`` in a worker thread; when this await is cancelled, set ``stop`` so the work itself stops."""
    try:
        return await asyncio.to_thread(work, *args)
    except asyncio.CancelledError:
        stop.set()
        raise
