"""Mergescope's web app: ``python app.py`` serves on http://127.0.0.1:7860 (also the Hugging Face Space entry point).

This file only assembles the panels of ``components/`` and launches; every handler is a thin call into ``merging``.

    python app.py [--host 0.0.0.0] [--port 7860] [--share]
    env: MERGESCOPE_HOST, MERGESCOPE_PORT (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT), MERGESCOPE_SHARE=1,
         MERGESCOPE_MERGE_CONCURRENCY (merges at once, default 1), MERGESCOPE_MAX_UPLOAD (default 200MB),
         MERGESCOPE_ALLOW_LOCAL_PATHS (default: on on 127.0.0.1; off on a Space, on another --host or --share)
"""

import argparse
import logging
import os
import threading
from pathlib import Path

import gradio as gr

from components import analysis_panel, api, eval_panel, learn_panel, merge_panel, method_form, model_picker, preflight
from components.common import AppSettings, drop_space_owner_token
from components.sessions import SessionStore
from merging import native
from merging.demo import DemoModels, ensure_demo_models
from merging.writer import parse_size

TITLE = "Mergescope: merge fine-tuned models, and see why it works"
INTRO = """# Mergescope
Merge fine-tuned checkpoints of one base model, and see **where they agree and where they fight** before you
merge: sign conflicts, task-vector norms and similarity, NAN coefficients, per layer, what they mean, and which
merge to try. The demo models are already picked: press **Analyze**, then **Apply** and **Merge**."""
CSS = """
#config-yaml .cm-editor { font-size: 12px; }
/* clip, not hidden: no scroll box of its own, so the merge bar can stick to the window */
.gradio-container { max-width: 1400px !important; overflow: clip !important; }
.param-row, .param-row .form { flex-wrap: wrap !important; }
.param-row > *, .param-row .form > * { flex: 1 1 150px !important; min-width: 150px !important; }
#hub-search { flex-wrap: wrap !important; }
.status-error { color: #991b1b; background: #fef2f2; border-left: 3px solid #b91c1c; padding: 6px 10px;
                border-radius: 4px; overflow-wrap: anywhere; }
.status-error code { color: inherit; }
.findings { max-height: 9em; overflow-y: auto; }
.findings ul { margin-top: 0; }
.caption { font-size: 0.9em; opacity: 0.85; }
table.merge-files td:first-child { overflow-wrap: anywhere; }
.model-row, .model-row .form { flex-wrap: nowrap !important; }
.model-row .form { min-width: 0 !important; }
.model-row .form > * { min-width: 76px !important; }
.model-row input[type=number] { padding-left: 6px !important; padding-right: 2px !important; }
.model-row .form > *:first-child { min-width: 100px !important; }
.model-row > .remove-model { min-width: 32px !important; max-width: 40px; align-self: center; padding: 4px !important; }
#merge-bar { position: sticky; bottom: 0; z-index: 20; background: var(--background-fill-primary);
             box-shadow: 0 -4px 8px -6px rgba(0, 0, 0, 0.3); padding: 6px 0 2px 0; }
#merge-status { max-height: 4.5em; overflow-y: auto; }
""" + analysis_panel.CSS


def build_app(settings: AppSettings | None = None, sessions: SessionStore | None = None,
              demo: DemoModels | None = None) -> gr.Blocks:
    """The whole page: models, method and YAML on the left; diagnostics, what they mean, and merge on the right."""
    settings = settings if settings is not None else AppSettings.from_env()
    sessions = sessions if sessions is not None else SessionStore()
    demo = demo if demo is not None else ensure_demo_models()
    settings.allowed_roots.append(Path(demo.base).parent)
    # Gradio's own cache (uploads, copies it makes) is swept hourly of files older than a day.
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as app:
        gr.Markdown(INTRO)
        # Reading order, in the DOM and on screen: Models → Method on the left (or first, on a phone), then
        # Diagnostics → Merge on the right, so Merge sits right under what the diagnostics said.
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, min_width=340):
                gr.Markdown("### 1 · Models", elem_id="h-models")
                picker = model_picker.build_model_picker(demo, settings)
                gr.Markdown("### 2 · Method", elem_id="h-method")
                form = method_form.build_method_form(demo)
                method_form.build_yaml_view(form, method_form.initial_yaml(demo))
                pre_button, pre_out = preflight.build_preflight_panel()
            with gr.Column(scale=6, min_width=340):
                gr.Markdown("### 3 · Diagnostics", elem_id="h-diagnostics")
                analysis = analysis_panel.build_analysis_panel()
                gr.Markdown("### 4 · Merge", elem_id="h-merge")
                merge = merge_panel.build_merge_panel(settings)
        gr.Markdown("### 5 · Check the merged model", elem_id="h-check")
        evaluation = eval_panel.build_eval_panel()
        learn_panel.build_learn_panel()
        api.build_api(settings, sessions)

        config_form = method_form.ConfigForm(picker, form)
        method_form.wire_method_form(config_form)
        method_form.wire_model_list(config_form)
        model_picker.wire_model_picker(picker, settings, sessions, demo)
        preflight.wire_preflight(pre_button, pre_out, config_form, settings, sessions)
        analysis_panel.wire_analysis_panel(analysis, config_form, settings, sessions)
        merge_panel.wire_merge_panel(merge, config_form, settings, sessions)
        eval_panel.wire_eval_panel(evaluation, merge.out_dir, settings, sessions)

        def end_session(request: gr.Request) -> None:
            """The tab closed: stop its job and remove its folder."""
            sessions.close(request.session_hash)

        app.unload(end_session)
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="Mergescope web app")
    parser.add_argument("--host", default=env.get("MERGESCOPE_HOST") or env.get("GRADIO_SERVER_NAME") or "127.0.0.1")
    parser.add_argument("--port", type=int,
                        default=int(env.get("MERGESCOPE_PORT") or env.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--share", action="store_true", default=env.get("MERGESCOPE_SHARE", "") in ("1", "true"),
                        help="also serve through a public gradio.live link")
    parser.add_argument("--max-upload", default=env.get("MERGESCOPE_MAX_UPLOAD", "200MB"),
                        help="largest file a user may upload (default 200MB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    args = parse_args(argv)
    settings = AppSettings.from_env(host=args.host, share=args.share, max_upload_bytes=parse_size(args.max_upload))
    drop_space_owner_token(settings)
    app = build_app(settings)
    # Build the fused merge kernels now (a second or two with the C compiler) rather than in the first merge.
    threading.Thread(target=native.library, name="build-kernels", daemon=True).start()
    # Merges share one concurrency group ("merge", limited per event); everything else runs a few at a time.
    app.queue(default_concurrency_limit=4, max_size=64)
    app.launch(server_name=args.host, server_port=args.port, share=args.share,
               max_file_size=settings.max_upload_bytes, css=CSS, footer_links=["api", "gradio"])


if __name__ == "__main__":
    main()
