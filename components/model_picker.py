"""The model picker: a base and up to MAX_MODELS models, from the demo set, the Hub, pasted ids, paths or uploads.

Each model slot is a text field (a Hub repo id ``org/name[@rev]``, or a local path when the server allows it) plus
one number per per-model parameter of the chosen method (weight, density ...) and a remove button; the method form
shows only the fields its method uses. The list grows as it fills (the first empty row is always there, to add one)
and shrinks when a row is removed (the rows below move up). Next to it, a method that takes a fixed number of models
says so, with "keep the first N". The Hub search is one row: query, results, add.

Every value these handlers set reaches the config through the form's ``change`` events (``method_form``).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging import hub
from merging.demo import DemoModels
from merging.errors import MergeError, SourceError
from merging.methods import REGISTRY
from merging.safetensors_io import read_local_header

from .common import AppSettings, failure, hf_token, human_bytes
from .form_state import MAX_MODEL_ROWS, first_empty_row, per_model_params
from .sessions import SessionStore

MAX_MODELS = MAX_MODEL_ROWS  # the model rows the page holds (the state itself takes any number)


@dataclass
class ModelSlot:
    row: gr.Row
    model: gr.Textbox
    fields: dict[str, gr.Number]  # per-model parameter name -> its number field
    remove: gr.Button


@dataclass
class ModelPicker:
    base: gr.Textbox
    slots: list[ModelSlot]
    demo_button: gr.Button
    count_note: gr.Markdown
    keep_first: gr.Button
    search_box: gr.Textbox
    search_results: gr.Dropdown
    status: gr.Markdown
    upload: gr.File
    buttons: dict[str, gr.Button]


def build_model_picker(demo: DemoModels, settings: AppSettings) -> ModelPicker:
    """The picker's components, filled with the demo models (form_state says how they become a config)."""
    params = per_model_params()
    demo_models = list(demo.models.values())
    with gr.Group():
        with gr.Row(equal_height=True):
            base = gr.Textbox(demo.base, label="Base model", scale=5, elem_id="base-model", lines=1, max_lines=1,
                              info="the pre-trained checkpoint the fine-tunes started from "
                                   "(task vectors are θ − θ_base)")
            demo_button = gr.Button("Demo models", scale=1, min_width=100, size="sm", elem_id="demo-models")
        slots = []
        for i in range(MAX_MODELS):
            filled = i < len(demo_models)
            with gr.Row(visible=i <= len(demo_models), equal_height=True, elem_classes=["model-row"]) as row:
                model = gr.Textbox(demo_models[i] if filled else "", label=f"Model {i + 1}", scale=5, lines=1,
                                   max_lines=1, min_width=160, placeholder="add a model: org/name[@revision] or a path",
                                   elem_id=f"model-{i}")
                fields = {}
                for name, p in sorted(params.items()):
                    value = demo.model_parameters.get(name, p.default)
                    fields[name] = gr.Number(value, label=name, scale=1, min_width=80, info=None,
                                             minimum=p.min, maximum=p.max, step=0.05,
                                             visible=name in _per_model_names(demo.method),
                                             elem_id=f"model-{i}-{name}")
                remove = gr.Button("✕", scale=0, min_width=36, size="sm", visible=filled, variant="secondary",
                                   elem_id=f"model-{i}-remove", elem_classes=["remove-model"])
            slots.append(ModelSlot(row, model, fields, remove))
    with gr.Row(equal_height=True):
        count_note = gr.Markdown(elem_id="model-count")
        keep_first = gr.Button("Keep the first 1", visible=False, size="sm", scale=0, min_width=150,
                               elem_id="keep-first")
    status = gr.Markdown(elem_id="picker-status")
    with gr.Accordion("Find models on the Hub, or upload small ones", open=False):
        with gr.Row(equal_height=True, elem_id="hub-search"):
            search_box = gr.Textbox(show_label=False, scale=3,
                                    placeholder="search the Hub (Enter); empty: fine-tunes of the base",
                                    min_width=160, lines=1, max_lines=1, elem_id="search-box")
            search_button = gr.Button("Search", scale=0, min_width=70, size="sm", elem_id="search-button")
            search_results = gr.Dropdown([], show_label=False, scale=3, min_width=160, allow_custom_value=True,
                                         info=None, elem_id="search-results")
            add_button = gr.Button("Add", scale=0, min_width=56, size="sm", variant="primary",
                                   elem_id="add-model-button")
            as_base_button = gr.Button("As base", scale=0, min_width=70, size="sm", elem_id="as-base-button")
        limit = human_bytes(settings.max_upload_bytes)
        upload = gr.File(label=f"Upload .safetensors files (each becomes a model; up to {limit})",
                         file_count="multiple", file_types=[".safetensors"], height=90, elem_id="upload")
    return ModelPicker(base, slots, demo_button, count_note, keep_first, search_box, search_results, status, upload,
                       {"search": search_button, "add": add_button, "as_base": as_base_button})


def _per_model_names(method_name: str) -> set[str]:
    method = REGISTRY.get(method_name)
    return {p.name for p in method.params if p.per_model} if method else set()


def wire_model_picker(picker: ModelPicker, settings: AppSettings, sessions: SessionStore, demo: DemoModels) -> None:
    """Events of the picker itself. They set model boxes; the form's ``change`` events carry that to the config.

    Like the method form's, these handlers take a set of inputs (one dict {component: value}) and return
    {component: update}: a model goes to the first empty row by looking the rows up, not by argument position.
    Problems are shown in the picker's own status line (and logged as one line), never as a popup that fades.
    """
    slot_models = [s.model for s in picker.slots]
    found = [picker.search_results, picker.status]

    def search(values: dict, oauth_token: gr.OAuthToken | None = None) -> dict:
        query, base = (values[picker.search_box] or "").strip(), (values[picker.base] or "").strip()
        try:
            if query:
                results = hub.search_models(query, limit=30, token=hf_token(oauth_token))
                said = f"{len(results)} models found"
            elif base:
                results = hub.fine_tunes_of(base, limit=30, token=hf_token(oauth_token))
                said = f"{len(results)} fine-tunes of `{base}`"
            else:
                raise MergeError("search: type a query, or enter a base model (a Hub repo id) to list its fine-tunes")
        except Exception as exc:  # noqa: BLE001 - shown where it happened (failure() logs bugs with their traceback)
            return {picker.status: failure("search", exc)}
        return {picker.search_results: gr.update(choices=[_result_label(r) for r in results], value=None),
                picker.status: said}

    def add_result(values: dict) -> dict:
        repo = (values[picker.search_results] or "").split(" ")[0]
        if not repo:
            return {picker.status: failure("add", MergeError("add: pick a search result first"))}
        free = first_empty_row([values[m] for m in slot_models])
        if free is None:
            return {picker.status: failure("add", MergeError(f"add: all {MAX_MODELS} model rows are used"))}
        return {slot_models[free]: repo, picker.status: f"added `{repo}` as model {free + 1}"}

    def use_as_base(values: dict) -> dict:
        repo = (values[picker.search_results] or "").split(" ")[0]
        if not repo:
            return {picker.status: failure("as base", MergeError("as base: pick a search result first"))}
        return {picker.base: repo, picker.status: f"`{repo}` is the base"}

    def upload(values: dict, request: gr.Request) -> dict:
        files = values[picker.upload]
        if not files:
            return {picker.status: ""}
        refs = [values[m] for m in slot_models]
        added = []
        try:
            session = sessions.get(request.session_hash)
            target = session.folder / "uploads"
            target.mkdir(exist_ok=True)
            for path in files:
                path = Path(path)
                if path.stat().st_size > settings.max_upload_bytes:
                    raise SourceError(f"{path.name}: {human_bytes(path.stat().st_size)} is over the upload limit")
                read_local_header(path)  # a SourceError names the file when it is not safetensors
                free = first_empty_row(refs)
                if free is None:
                    raise SourceError(f"{path.name}: all {MAX_MODELS} model rows are used")
                dest = target / path.name
                shutil.copyfile(path, dest)
                refs[free] = str(dest)
                added.append(path.name)
        except Exception as exc:  # noqa: BLE001 - shown where it happened
            status = failure("upload", exc)
        else:
            status = f"uploaded: {', '.join(added)}"
        filled = {comp: ref for comp, ref in zip(slot_models, refs) if ref != values[comp]}
        return filled | {picker.status: status}

    def load_demo() -> dict:
        demo_models = list(demo.models.values())
        return {picker.base: demo.base} | {comp: demo_models[i] if i < len(demo_models) else ""
                                           for i, comp in enumerate(slot_models)}

    search_inputs = {picker.search_box, picker.base}
    picker.buttons["search"].click(search, search_inputs, found, api_visibility="private",
                                   show_progress_on=[picker.status])
    picker.search_box.submit(search, search_inputs, found, api_visibility="private", show_progress_on=[picker.status])
    picker.buttons["add"].click(add_result, {picker.search_results, *slot_models}, [*slot_models, picker.status],
                                api_visibility="private", show_progress_on=[picker.status])
    picker.buttons["as_base"].click(use_as_base, {picker.search_results}, [picker.base, picker.status],
                                    api_visibility="private", show_progress="hidden")
    picker.upload.upload(upload, {picker.upload, *slot_models}, [*slot_models, picker.status],
                         api_visibility="private", show_progress_on=[picker.status])
    picker.demo_button.click(load_demo, None, [picker.base, *slot_models], api_visibility="private",
                             show_progress="hidden")


def _result_label(result) -> str:
    """'org/name  (12.3 M downloads, 1.2 B params, safetensors)' from a search result (object or dict)."""
    get = (lambda k: result.get(k)) if isinstance(result, dict) else (lambda k: getattr(result, k, None))
    repo = get("repo_id") or get("id") or str(result)
    bits = []
    if get("downloads") is not None:
        bits.append(f"{get('downloads'):,} downloads")
    params = get("num_parameters") or get("parameters")
    if params:
        bits.append(f"{params / 1e9:.2f} B params" if params >= 1e8 else f"{params / 1e6:.1f} M params")
    if get("has_safetensors") is False:
        bits.append("no safetensors")
    return f"{repo}  ({', '.join(bits)})" if bits else repo
