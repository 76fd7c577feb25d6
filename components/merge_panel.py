"""Merge: run the engine with a progress bar, a Cancel that really stops, then downloads, Push to Hub and EMR tasks.

The merge runs in Gradio's worker thread; the engine calls our progress callback after every tensor, and checks
the session's cancel flag (a ``threading.Event``) between tensors. Cancel sets that flag (Gradio's ``cancels=``
cannot stop a plain function), the engine raises ``Cancelled`` and its atomic output folder removes everything it
wrote. Closing the tab ends the session, which sets the flag too.

On a ZeroGPU Space the merge is wrapped in ``spaces.GPU`` (a GPU is attached for its duration); elsewhere that
decorator is an identity, and the engine uses CUDA when it sees one.
"""

import json
import os
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging import hub
from merging.config import MergeConfig
from merging.engine import MergeResult, Progress, run_merge
from merging.errors import Cancelled

from .common import AppSettings, hf_token, hub_resolver, human_bytes, human_seconds, load_config, user_errors
from .sessions import Session, SessionStore

try:  # Hugging Face ZeroGPU; absent (and unneeded) everywhere else
    import spaces

    gpu_task: Callable = spaces.GPU(duration=300)
except ImportError:
    def gpu_task(fn: Callable) -> Callable:
        return fn


@dataclass
class MergeOutcome:
    result: MergeResult
    files: list[Path]  # every file of the output folder
    weights: list[Path]  # its .safetensors files
    archive: Path | None  # one zip of everything, when small enough
    emr_tasks: list[str]


def progress_text(p: Progress) -> str:
    phase = "reduction pass" if p.phase == "reduce" else "merging"
    return (f"{phase}: {p.tensors_done}/{p.tensors_total} tensors · {human_bytes(p.bytes_done)} of "
            f"{human_bytes(p.bytes_total)} · {human_seconds(p.eta_s)} left")


def merge_in_session(config: MergeConfig, session: Session, settings: AppSettings, *, token: str | None = None,
                     on_progress: Callable[[Progress], None] | None = None) -> MergeOutcome:
    """Merge into a fresh folder of the session; zip it when small. Raises Cancelled (nothing left) on cancel."""
    session.cancel.clear()
    out_dir = session.new_dir("merge")
    delay = settings.tensor_delay_s

    def progress(p: Progress) -> None:
        if on_progress is not None:
            on_progress(p)
        if delay:
            time.sleep(delay)

    result = run_merge(config, out_dir, device="auto", progress=progress, cancel=session.cancel.is_set,
                       resolver=hub_resolver(token))
    files = sorted(p for p in out_dir.iterdir() if p.is_file())
    weights = [p for p in files if p.suffix == ".safetensors"]
    total = sum(p.stat().st_size for p in files)
    archive = None
    if len(files) > 1 and total <= settings.archive_limit_bytes:
        archive = make_archive(out_dir, out_dir.with_suffix(".zip"))
    emr_tasks = []
    if (out_dir / "emr.json").is_file():
        meta = json.loads((out_dir / "emr.json").read_text(encoding="utf-8"))
        emr_tasks = [t["model"] for t in meta.get("tasks", [])]
    return MergeOutcome(result, files, weights, archive, emr_tasks)


def make_archive(folder: Path, zip_path: Path) -> Path:
    """Every file of ``folder`` in one zip under the folder's name; weights stored (they do not compress)."""
    tmp = zip_path.with_name(zip_path.name + ".part")
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for path in sorted(folder.iterdir()):
                method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                zf.write(path, f"{folder.name}/{path.name}", compress_type=method)
        os.replace(tmp, zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


def files_markdown(outcome: MergeOutcome) -> str:
    r = outcome.result
    lines = [f"**Merged** {r.tensors} tensors ({human_bytes(r.bytes_written)}) in {r.seconds:.1f} s on {r.device}", "",
             "| file | size |", "|---|---:|"]
    lines += [f"| `{p.name}` | {human_bytes(p.stat().st_size)} |" for p in outcome.files]
    if outcome.archive:
        lines.append(f"| `{outcome.archive.name}` (everything) | {human_bytes(outcome.archive.stat().st_size)} |")
    lines += [f"- note: {n}" for n in r.notes[:8]]
    return "\n".join(lines)


@dataclass
class MergePanel:
    merge_button: gr.Button
    cancel_button: gr.Button
    status: gr.Markdown
    download: gr.DownloadButton
    files: gr.File
    archive: gr.File
    out_dir: gr.State
    push_repo: gr.Textbox
    push_private: gr.Checkbox
    push_button: gr.Button
    push_status: gr.Markdown
    emr_group: gr.Group
    emr_task: gr.Dropdown
    emr_button: gr.Button
    emr_files: gr.File


def build_merge_panel(settings: AppSettings) -> MergePanel:
    with gr.Row():
        merge_button = gr.Button("Merge", variant="primary", elem_id="merge-button", scale=3)
        cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button", scale=1)
    status = gr.Markdown("Merging runs on the GPU when one is attached, else on the CPU.", elem_id="merge-status")
    download = gr.DownloadButton("Download the merged weights", visible=False, elem_id="download-weights")
    with gr.Row():
        files = gr.File(label="Files (each downloads on its own)", file_count="multiple", interactive=False,
                        visible=False, elem_id="merge-files")
        archive = gr.File(label="Everything as one .zip", interactive=False, visible=False, elem_id="merge-archive")
    out_dir = gr.State(None)
    with gr.Accordion("Push to the Hugging Face Hub", open=False):
        if settings.on_space:
            gr.LoginButton()
            hint = "Sign in above; the merge is pushed with your account (write scope)."
        else:
            hint = "Locally, pushing uses the `HF_TOKEN` environment variable (or your `hf auth login`)."
        gr.Markdown(hint)
        with gr.Row(equal_height=True):
            push_repo = gr.Textbox(label="Repository", placeholder="your-name/merged-model", scale=3,
                                   elem_id="push-repo")
            push_private = gr.Checkbox(True, label="Private", scale=1)
            push_button = gr.Button("Push", scale=1, elem_id="push-button")
        push_status = gr.Markdown(elem_id="push-status")
    with gr.Group(visible=False) as emr_group:
        gr.Markdown("**EMR-Merging:** rebuild one task's model θ_base + λ_k·(M_k ⊙ τ_uni) and download it.")
        with gr.Row(equal_height=True):
            emr_task = gr.Dropdown([], label="Task", scale=3, elem_id="emr-task")
            emr_button = gr.Button("Materialize and download", scale=1, elem_id="emr-button")
        emr_files = gr.File(label="Task model", file_count="multiple", interactive=False, elem_id="emr-files")
    return MergePanel(merge_button, cancel_button, status, download, files, archive, out_dir, push_repo, push_private,
                      push_button, push_status, emr_group, emr_task, emr_button, emr_files)


def wire_merge_panel(panel: MergePanel, yaml_box, settings: AppSettings, sessions: SessionStore) -> None:
    outputs = [panel.status, panel.download, panel.files, panel.archive, panel.out_dir, panel.emr_group,
               panel.emr_task]

    @gpu_task
    @user_errors
    def merge(config_text: str, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
              progress=gr.Progress()):  # noqa: B008 - Gradio's way of asking for a progress bar
        session = sessions.get(request.session_hash)
        config = load_config(config_text, settings, [session.folder])
        progress(0, desc="opening the checkpoints")

        def on_progress(p: Progress) -> None:
            progress(p.fraction, desc=progress_text(p))

        try:
            outcome = merge_in_session(config, session, settings, token=hf_token(oauth_token),
                                       on_progress=on_progress)
        except Cancelled:
            gr.Info("Merge cancelled; nothing was written.")
            return ("**Cancelled:** the merge stopped and nothing was written.", gr.update(visible=False),
                    gr.update(value=None, visible=False),
                    gr.update(value=None, visible=False), None, gr.update(visible=False), gr.update())
        single = outcome.weights[0] if len(outcome.weights) == 1 else None
        return (files_markdown(outcome),
                gr.update(value=str(single), visible=True, label=f"Download {single.name}") if single
                else gr.update(visible=False),
                gr.update(value=[str(p) for p in outcome.files], visible=True),
                gr.update(value=str(outcome.archive) if outcome.archive else None, visible=bool(outcome.archive)),
                str(outcome.result.out_dir),
                gr.update(visible=bool(outcome.emr_tasks)),
                gr.update(choices=outcome.emr_tasks, value=outcome.emr_tasks[0] if outcome.emr_tasks else None))

    def cancel(request: gr.Request) -> str:
        sessions.get(request.session_hash).cancel.set()
        return "Cancelling after the current tensor…"

    @user_errors
    def push(out_dir: str | None, repo_id: str, private: bool, oauth_token: gr.OAuthToken | None = None) -> str:
        if not out_dir or not Path(out_dir).is_dir():
            raise gr.Error("Merge first: there is nothing to push yet")
        if not (repo_id or "").strip():
            raise gr.Error("Enter a repository id such as your-name/merged-model")
        if settings.on_space and oauth_token is None:
            raise gr.Error("Sign in with Hugging Face (the button above) to push to your account")
        url = hub.push_merge(out_dir, repo_id.strip(), token=hf_token(oauth_token), private=bool(private))
        return f"**Pushed** to {url}"

    @user_errors
    def materialize(out_dir: str | None, task: str, request: gr.Request,
                    oauth_token: gr.OAuthToken | None = None) -> list[str]:
        from merging.emr_store import extract_task

        if not out_dir or not task:
            raise gr.Error("Run an EMR merge and pick a task first")
        session = sessions.get(request.session_hash)
        target = session.new_dir("task")
        extract_task(out_dir, task, target, resolver=hub_resolver(hf_token(oauth_token)))
        return [str(p) for p in sorted(target.iterdir()) if p.is_file()]

    panel.merge_button.click(merge, yaml_box, outputs, concurrency_limit=settings.merge_concurrency,
                             concurrency_id="merge", api_visibility="private")
    # Not queued behind merges: a Cancel must get through while the merge it cancels holds the queue.
    panel.cancel_button.click(cancel, None, panel.status, queue=False, api_visibility="private",
                              show_progress="hidden")
    panel.push_button.click(push, [panel.out_dir, panel.push_repo, panel.push_private], panel.push_status,
                            api_visibility="private")
    panel.emr_button.click(materialize, [panel.out_dir, panel.emr_task], panel.emr_files,
                           concurrency_id="merge", concurrency_limit=settings.merge_concurrency,
                           api_visibility="private")

