"""Merge: run the engine with a progress bar, a Cancel that really stops, then downloads, Push to Hub and EMR tasks.

The merge runs in Gradio's worker thread; the engine calls our progress callback after every tensor, and checks
the session's cancel flag (a ``threading.Event``) between tensors. Cancel sets that flag (Gradio's ``cancels=``
cannot stop a plain function), the engine raises ``Cancelled`` and its atomic output folder removes everything it
wrote. Closing the tab ends the session, which sets the flag too.

On a ZeroGPU Space the merge is wrapped in ``spaces.GPU`` (a GPU is attached for its duration); elsewhere that
decorator is an identity, and the engine uses CUDA when it sees one.

The result is one table of the output's files, each name a download link, with the sizes the merge reports; an EMR
merge says what it is (one unified task vector with a mask and a rescaler per task, not a model on its own) and
Materialize rebuilds one task's model and downloads it. Merge, Push and Materialize each show their errors in their
own status line and keep the previous result, marked as such.
"""

import html
import json
import os
import time
import urllib.parse
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging import hub
from merging.config import MergeConfig
from merging.engine import MergeResult, Progress, run_merge
from merging.errors import Cancelled, MergeError

from .common import AppSettings, failure, hf_token, hub_resolver, human_bytes, load_config, progress_text
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


def file_link(path: Path, name: str | None = None, auto: bool = False) -> str:
    """A link that downloads ``path`` (a file of the session folder, under Gradio's temp dir, which Gradio serves)."""
    name = name or path.name
    url = "gradio_api/file=" + urllib.parse.quote(str(path))
    extra = ' data-autodownload="1"' if auto else ""
    return f'<a href="{html.escape(url)}" download="{html.escape(name)}"{extra}>{html.escape(name)}</a>'


def files_table(files: list[Path], archive: Path | None = None, auto: Path | None = None) -> str:
    """The files as one table: each full name a download link, the size as the merge summary counts it."""
    rows = [f"<tr><td>{file_link(p, auto=p == auto)}</td><td>{human_bytes(p.stat().st_size)}</td></tr>"
            for p in files]
    if archive:
        rows.append(f"<tr><td>{file_link(archive, auto=archive == auto)} (everything)</td>"
                    f"<td>{human_bytes(archive.stat().st_size)}</td></tr>")
    return ('<table class="merge-files"><thead><tr><th>file (click to download)</th><th>size</th></tr></thead>'
            "<tbody>" + "".join(rows) + "</tbody></table>")


def merge_markdown(outcome: MergeOutcome) -> str:
    r = outcome.result
    names = ", ".join(f"`{p.name}`" for p in outcome.files)
    lines = [f"**Merged** {r.tensors} tensors ({human_bytes(r.bytes_written)}) in {r.seconds:.1f} s on {r.device}: "
             f"{names} (below)."]
    if outcome.emr_tasks:
        lines.append("An EMR merge: see below for each task's model.")
    lines += [f"- note: {n}" for n in r.notes[:8]]
    return "\n".join(lines)


EMR_NOTE = ("An **EMR merge is not a model on its own**: it holds one unified task vector τ_uni and, per task, a 1-bit "
            "mask and a rescaler (`emr.json`). To get a task's model, pick the task below and press Materialize "
            "(θ_base + λ_k · M_k ⊙ τ_uni, downloaded as one .zip), or run "
            "`python -m merging emr-extract MERGED --task NAME OUT`.")


@dataclass
class MergePanel:
    merge_button: gr.Button
    cancel_button: gr.Button
    status: gr.Markdown
    download: gr.DownloadButton
    files: gr.HTML
    archive: gr.DownloadButton
    out_dir: gr.State
    push_repo: gr.Textbox
    push_private: gr.Checkbox
    push_button: gr.Button
    push_status: gr.Markdown
    emr_group: gr.Group
    emr_task: gr.Dropdown
    emr_button: gr.Button
    emr_status: gr.Markdown
    emr_files: gr.HTML


def build_merge_panel(settings: AppSettings) -> MergePanel:
    # The button row and the status stay in view while the diagnostics above them scroll (CSS: #merge-bar).
    with gr.Column(elem_id="merge-bar"):
        with gr.Row(equal_height=True):
            merge_button = gr.Button("Merge", variant="primary", elem_id="merge-button", scale=3, min_width=100)
            cancel_button = gr.Button("Cancel", variant="stop", elem_id="cancel-button", scale=1, min_width=80)
        status = gr.Markdown("Merging runs on the GPU when one is attached, else on the CPU.",
                             elem_id="merge-status")
    with gr.Row(equal_height=True):
        download = gr.DownloadButton("Download the merged weights", visible=False, elem_id="download-weights",
                                     size="sm")
        archive = gr.DownloadButton("Everything as one .zip", visible=False, elem_id="merge-archive", size="sm")
    files = gr.HTML(visible=False, elem_id="merge-files", js_on_load=None)
    out_dir = gr.State(None)
    with gr.Group(visible=False) as emr_group:
        gr.Markdown(EMR_NOTE, elem_id="emr-note")
        with gr.Row(equal_height=True):
            emr_task = gr.Dropdown([], label="Task", scale=3, elem_id="emr-task")
            emr_button = gr.Button("Materialize and download", scale=1, elem_id="emr-button")
        emr_status = gr.Markdown(elem_id="emr-status")
        emr_files = gr.HTML(elem_id="emr-files", js_on_load=None)
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
    return MergePanel(merge_button, cancel_button, status, download, files, archive, out_dir, push_repo, push_private,
                      push_button, push_status, emr_group, emr_task, emr_button, emr_status, emr_files)


# After Materialize: click the link it marked, so the task's model downloads at once.
AUTO_DOWNLOAD = """() => { const a = document.querySelector('#emr-files a[data-autodownload]'); if (a) a.click(); }"""


def wire_merge_panel(panel: MergePanel, cf, settings: AppSettings, sessions: SessionStore) -> None:
    """``cf``: the method form's ``ConfigForm`` (``config_text`` is the config to merge)."""
    outputs = [panel.status, panel.download, panel.files, panel.archive, panel.out_dir, panel.emr_group,
               panel.emr_task, panel.emr_files, panel.emr_status]

    @gpu_task
    def merge(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None,
              progress=gr.Progress()) -> dict:  # noqa: B008 - Gradio's way of asking for a progress bar
        previous = values[panel.out_dir]
        try:
            session = sessions.get(request.session_hash)
            config = load_config(cf.config_text(values), settings, [session.folder])
            progress(0, desc="opening the checkpoints")

            def on_progress(p: Progress) -> None:
                progress(p.fraction, desc=progress_text(p))

            outcome = merge_in_session(config, session, settings, token=hf_token(oauth_token),
                                       on_progress=on_progress)
        except Cancelled:
            return {panel.status: "**Cancelled:** the merge stopped and nothing was written."
                                  + (" The files below are from the previous merge." if previous else "")}
        except Exception as exc:  # noqa: BLE001 - shown where it happened (failure() logs bugs with their traceback)
            status = failure("merge", exc)
            if previous:
                status += "\n\nThe files below are from the previous merge."
            return {panel.status: status}
        single = outcome.weights[0] if len(outcome.weights) == 1 and not outcome.emr_tasks else None
        archive = outcome.archive
        return {
            panel.status: merge_markdown(outcome),
            panel.download: gr.update(value=str(single), visible=True, label=f"Download {single.name}") if single
            else gr.update(visible=False),
            panel.files: gr.update(value=files_table(outcome.files), visible=True),
            panel.archive: gr.update(value=str(archive), visible=True,
                                     label=f"Everything as one .zip ({human_bytes(archive.stat().st_size)})")
            if archive else gr.update(visible=False),
            panel.out_dir: str(outcome.result.out_dir),
            panel.emr_group: gr.update(visible=bool(outcome.emr_tasks)),
            panel.emr_task: gr.update(choices=outcome.emr_tasks, value=outcome.emr_tasks[0] if outcome.emr_tasks
                                      else None),
            panel.emr_files: "", panel.emr_status: "",
        }

    def cancel(request: gr.Request) -> str:
        sessions.get(request.session_hash).cancel.set()
        return "Cancelling after the current tensor…"

    def push(out_dir: str | None, repo_id: str, private: bool, oauth_token: gr.OAuthToken | None = None) -> str:
        try:
            if not out_dir or not Path(out_dir).is_dir():
                raise MergeError("push: merge first, there is nothing to push yet")
            if not (repo_id or "").strip():
                raise MergeError("push: enter a repository id such as your-name/merged-model")
            if settings.on_space and oauth_token is None:
                raise MergeError("push: sign in with Hugging Face (the button above) to push to your account")
            url = hub.push_merge(out_dir, repo_id.strip(), token=hf_token(oauth_token), private=bool(private))
        except Exception as exc:  # noqa: BLE001 - shown where it happened
            return failure("push", exc)
        return f"**Pushed** to {url}"

    def materialize(values: dict, request: gr.Request, oauth_token: gr.OAuthToken | None = None) -> dict:
        from merging.emr_store import extract_task

        out_dir, task = values[panel.out_dir], values[panel.emr_task]
        try:
            if not out_dir or not task:
                raise MergeError("materialize: run an EMR merge and pick a task first")
            session = sessions.get(request.session_hash)
            target = session.new_dir("task")
            extract_task(out_dir, task, target, resolver=hub_resolver(hf_token(oauth_token)))
            files = sorted(p for p in target.iterdir() if p.is_file())
            archive = make_archive(target, target.with_suffix(".zip"))
        except Exception as exc:  # noqa: BLE001 - shown where it happened
            return {panel.emr_status: failure("materialize", exc)}
        return {panel.emr_status: f"**Task model** of `{task}`: downloading {archive.name}; or one file at a time:",
                panel.emr_files: files_table(files, archive, auto=archive)}

    panel.merge_button.click(merge, cf.inputs() | {panel.out_dir}, outputs,
                             concurrency_limit=settings.merge_concurrency, concurrency_id="merge",
                             api_visibility="private", show_progress_on=[panel.status])
    # Not queued behind merges: a Cancel must get through while the merge it cancels holds the queue.
    panel.cancel_button.click(cancel, None, panel.status, queue=False, api_visibility="private",
                              show_progress="hidden")
    panel.push_button.click(push, [panel.out_dir, panel.push_repo, panel.push_private], panel.push_status,
                            api_visibility="private", show_progress_on=[panel.push_status])
    panel.emr_button.click(materialize, {panel.out_dir, panel.emr_task}, [panel.emr_status, panel.emr_files],
                           concurrency_id="merge", concurrency_limit=settings.merge_concurrency,
                           api_visibility="private", show_progress_on=[panel.emr_status]).then(
        None, None, None, js=AUTO_DOWNLOAD, api_visibility="private")
