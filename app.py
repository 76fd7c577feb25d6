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
merge: sign conflicts, task-vector norms and similarity, NAN coefficients, per layer. The demo models are already
picked: press **Analyze**, then **Merge**."""
CSS = """
#config-yaml .cm-editor { font-size: 12px; }
.gradio-container { max-width: 1400px !important; }
"""


def build_app(settings: AppSettings | None = None, sessions: SessionStore | None = None,
              demo: DemoModels | None = None) -> gr.Blocks:
    """The whole page: models, method, YAML and merge on the left; the diagnostics charts on the right."""
    settings = settings if settings is not None else AppSettings.from_env()
    sessions = sessions if sessions is not None else SessionStore()
    demo = demo if demo is not None else ensure_demo_models()
    settings.allowed_roots.append(Path(demo.base).parent)
    # Gradio's own cache (uploads, copies it makes) is swept hourly of files older than a day.
    with gr.Blocks(title=TITLE, delete_cache=(3600, 86400)) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=5):
                gr.Markdown("### 1 · Models")
                picker = model_picker.build_model_picker(demo, settings)
                gr.Markdown("### 2 · Method")
                form = method_form.build_method_form(demo)
                method_form.build_yaml_view(form, method_form.initial_yaml(demo))
                pre_button, pre_out = preflight.build_preflight_panel()
                gr.Markdown("### 4 · Merge")
                merge = merge_panel.build_merge_panel(settings)
            with gr.Column(scale=6):
                gr.Markdown("### 3 · Diagnostics")
                analysis = analysis_panel.build_analysis_panel()
        gr.Markdown("### 5 · Check the merged model")
        evaluation = eval_panel.build_eval_panel()
        learn_panel.build_learn_panel()
        api.build_api(settings, sessions)

        config_form = method_form.ConfigForm(picker, form)
        resync_form = method_form.wire_method_form(config_form)
        model_picker.wire_model_picker(picker, settings, sessions, demo, resync_form)
        preflight.wire_preflight(pre_button, pre_out, form.yaml, settings, sessions)
        analysis_panel.wire_analysis_panel(analysis, form.yaml, settings, sessions)
        merge_panel.wire_merge_panel(merge, form.yaml, settings, sessions)
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
