"""The model picker: a base and up to MAX_MODELS models, from the demo set, the Hub, pasted ids, paths or uploads.

Each model slot is a text field (a Hub repo id ``org/name[@rev]``, or a local path when the server allows it) plus
one number per per-model parameter of the chosen method (weight, density ...); the method form shows only the
fields its method uses. Slots appear as they fill: the first empty one is always visible.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from merging import hub
from merging.demo import DemoModels
from merging.errors import SourceError
from merging.methods import REGISTRY
from merging.safetensors_io import read_local_header

from .common import AppSettings, hf_token, human_bytes, user_errors
from .form_state import MAX_MODEL_ROWS, first_empty_row, per_model_params
from .sessions import SessionStore

MAX_MODELS = MAX_MODEL_ROWS  # the model rows the page holds (the state itself takes any number)


@dataclass
class ModelSlot:
    row: gr.Row
    model: gr.Textbox
    fields: dict[str, gr.Number]  # per-model parameter name -> its number field


@dataclass
class ModelPicker:
    base: gr.Textbox
    slots: list[ModelSlot]
    demo_button: gr.Button
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
            with gr.Row(visible=i <= len(demo_models), equal_height=True) as row:
                model = gr.Textbox(demo_models[i] if filled else "", label=f"Model {i + 1}", scale=5, lines=1,
                                   max_lines=1,
                                   placeholder="org/name[@revision] or a local path", elem_id=f"model-{i}")
                fields = {}
                for name, p in sorted(params.items()):
                    value = demo.model_parameters.get(name, p.default)
                    fields[name] = gr.Number(value, label=name, scale=1, min_width=90, info=None,
                                             minimum=p.min, maximum=p.max, step=0.05,
                                             visible=name in _per_model_names(demo.method),
                                             elem_id=f"model-{i}-{name}")
            slots.append(ModelSlot(row, model, fields))
    status = gr.Markdown(elem_id="picker-status")
    with gr.Accordion("Find models on the Hub, or upload small ones", open=False):
        with gr.Row(equal_height=True):
            search_box = gr.Textbox(label="Search the Hub", placeholder="e.g. llama 1B instruct", scale=4,
                                    elem_id="search-box")
            search_button = gr.Button("Search", scale=1, size="sm", elem_id="search-button")
            finetunes_button = gr.Button("Fine-tunes of the base", scale=1, size="sm")
        with gr.Row(equal_height=True):
            search_results = gr.Dropdown([], label="Results (by downloads)", scale=4, allow_custom_value=True,
                                         elem_id="search-results")
            add_button = gr.Button("Add as model", scale=1, size="sm", elem_id="add-model-button")
            as_base_button = gr.Button("Use as base", scale=1, size="sm")
        limit = human_bytes(settings.max_upload_bytes)
        upload = gr.File(label=f"Upload .safetensors files (each becomes a model; up to {limit})",
                         file_count="multiple", file_types=[".safetensors"], elem_id="upload")
    return ModelPicker(base, slots, demo_button, search_box, search_results, status, upload,
                       {"search": search_button, "finetunes": finetunes_button, "add": add_button,
                        "as_base": as_base_button})


def _per_model_names(method_name: str) -> set[str]:
    method = REGISTRY.get(method_name)
    return {p.name for p in method.params if p.per_model} if method else set()


def wire_model_picker(picker: ModelPicker, settings: AppSettings, sessions: SessionStore, demo: DemoModels,
                      on_models_changed) -> None:
    """Events of the picker itself. ``on_models_changed(trigger)`` attaches the form's resync to a dependency.

    Like the method form's, these handlers take a set of inputs (one dict {component: value}) and return
    {component: update}: a model goes to the first empty row by looking the rows up, not by argument position.
    """
    slot_models = [s.model for s in picker.slots]
    found = [picker.search_results, picker.status]

    @user_errors
    def search(query: str, oauth_token: gr.OAuthToken | None = None):
        results = hub.search_models(query or "", limit=30, token=hf_token(oauth_token))
        return {picker.search_results: gr.update(choices=[_result_label(r) for r in results], value=None),
                picker.status: f"{len(results)} models found"}

    @user_errors
    def finetunes(base_ref: str, oauth_token: gr.OAuthToken | None = None):
        if not base_ref.strip():
            raise gr.Error("Enter a base model (a Hub repo id) first")
        results = hub.fine_tunes_of(base_ref.strip(), limit=30, token=hf_token(oauth_token))
        return {picker.search_results: gr.update(choices=[_result_label(r) for r in results], value=None),
                picker.status: f"{len(results)} fine-tunes of `{base_ref.strip()}`"}

    def add_result(values: dict) -> dict:
        repo = (values[picker.search_results] or "").split(" ")[0]
        if not repo:
            raise gr.Error("Pick a search result first")
        free = first_empty_row([values[m] for m in slot_models])
        if free is None:
            raise gr.Error(f"All {MAX_MODELS} model slots are used")
        return {slot_models[free]: repo}

    @user_errors
    def upload(values: dict, request: gr.Request) -> dict:
        files = values[picker.upload]
        if not files:
            return {picker.status: ""}
        refs = [values[m] for m in slot_models]
        session = sessions.get(request.session_hash)
        target = session.folder / "uploads"
        target.mkdir(exist_ok=True)
        added = []
        for path in files:
            path = Path(path)
            if path.stat().st_size > settings.max_upload_bytes:
                raise SourceError(f"{path.name}: {human_bytes(path.stat().st_size)} is over the upload limit")
            read_local_header(path)  # a SourceError names the file when it is not safetensors
            dest = target / path.name
            shutil.copyfile(path, dest)
            free = first_empty_row(refs)
            if free is None:
                raise gr.Error(f"All {MAX_MODELS} model slots are used")
            refs[free] = str(dest)
            added.append(path.name)
        filled = {comp: ref for comp, ref in zip(slot_models, refs) if ref != values[comp]}
        return filled | {picker.status: f"uploaded: {', '.join(added)}"}

    def load_demo() -> dict:
        demo_models = list(demo.models.values())
        return {picker.base: demo.base} | {comp: demo_models[i] if i < len(demo_models) else ""
                                           for i, comp in enumerate(slot_models)}

    picker.buttons["search"].click(search, picker.search_box, found, api_visibility="private")
    picker.search_box.submit(search, picker.search_box, found, api_visibility="private")
    picker.buttons["finetunes"].click(finetunes, picker.base, found, api_visibility="private")
    on_models_changed(picker.buttons["add"].click(add_result, {picker.search_results, *slot_models}, slot_models,
                                                  api_visibility="private"))
    on_models_changed(picker.buttons["as_base"].click(lambda c: (c or "").split(" ")[0], picker.search_results,
                                                      picker.base, api_visibility="private"))
    on_models_changed(picker.upload.upload(upload, {picker.upload, *slot_models}, [*slot_models, picker.status],
                                           api_visibility="private"))
    on_models_changed(picker.demo_button.click(load_demo, None, [picker.base, *slot_models], api_visibility="private"))


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
