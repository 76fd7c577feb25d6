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
"""

import gradio as gr

from .analysis_panel import analyze_config
from .common import AppSettings, hf_token, load_config, user_errors
from .eval_panel import check_in_session, find_merge
from .merge_panel import gpu_task, merge_in_session
from .sessions import SessionStore


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

    @user_errors
    def analyze(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        """Diagnostics of a merge config: per-layer sign conflicts, task-vector norms, similarity, NAN... as JSON,
        with ``advice``: findings and a recommended merge (``merging.advice``)."""
        session = sessions.get(request.session_hash)
        config = load_config(config_yaml, settings, [session.folder])
        from merging.advice import advise

        stats = analyze_config(config, settings, token=hf_token(oauth_token))
        return {**stats, "advice": advise(stats)}

    @user_errors
    def merge(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None):
        """Run a merge config; returns every output file, one zip of them (when small) and a summary."""
        session = sessions.get(request.session_hash)
        config = load_config(config_yaml, settings, [session.folder])
        outcome = merge_in_session(config, session, settings, token=hf_token(oauth_token))
        r = outcome.result
        summary = {"tensors": r.tensors, "bytes_written": r.bytes_written, "seconds": round(r.seconds, 3),
                   "device": r.device, "notes": r.notes, "emr_tasks": outcome.emr_tasks,
                   "files": {p.name: p.stat().st_size for p in outcome.files}}
        return [str(p) for p in outcome.files], str(outcome.archive) if outcome.archive else None, summary

    @gpu_task
    @user_errors
    def evaluate(config_yaml: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        """Check the merged model of a config beside its inputs: perplexity, agreement, continuations, verdict."""
        from merging.evaluate.report import jsonable

        session = sessions.get(request.session_hash)
        config = load_config(config_yaml, settings, [session.folder])
        folder = find_merge(session, config)
        if folder is None:
            folder = merge_in_session(config, session, settings, token=hf_token(oauth_token)).result.out_dir
        return jsonable(check_in_session(folder, session, settings))

    analyze_trigger.click(analyze, config_in, stats_out, api_name="analyze", concurrency_id="analyze")
    merge_trigger.click(merge, config_in, [files_out, archive_out, summary_out], api_name="merge",
                        concurrency_id="merge", concurrency_limit=settings.merge_concurrency)
    evaluate_trigger.click(evaluate, config_in, report_out, api_name="evaluate", concurrency_id="merge",
                           concurrency_limit=settings.merge_concurrency)
