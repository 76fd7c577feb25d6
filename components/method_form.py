"""The method form and the YAML view: two editable faces of one mergekit-format config.

Every registered method is in the dropdown; its parameters are rendered from the registry's ``Param`` schema
(type, default, range, help) with the paper cited. The NAN switch sets ``coefficients: nan`` (Si et al. 2025).

Round trip: every change of a form field rewrites the YAML, whatever made it (typing, paste, drag and drop, browser
autofill, a programmatic fill, the Hub search's Add, an upload): the form listens to ``change``, which Gradio fires
for all of them, where ``input`` misses a paste. A change of the YAML rewrites the form. The config is the one source
of truth that Analyze and Merge read (``ConfigForm.config_text``), so keys the form cannot show (``slices``,
``tokenizer_source``, per-layer parameter lists, filters) survive form edits: the form starts from the YAML's
current mapping and only replaces what it shows.

Each direction also fires the other's ``change`` (the app sets the values); ``ConfigForm.synced`` (session state:
the fields and the YAML text last written) tells such an echo from an edit, so an echo does nothing and a user typing
in one face is never overwritten with the other's older state.

The form's state and both directions are plain data in ``form_state``; this module builds the components and binds
them to the state's field names (``ConfigForm``). Handlers take a *set* of components as inputs, so Gradio passes
one dict {component: value}, and return a dict {component: update}: none depends on the order of its inputs or
outputs, and adding a field is one entry in the binding.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr

from merging.config import parse_config
from merging.demo import DemoModels
from merging.errors import MergeError
from merging.methods import REGISTRY
from merging.methods.registry import Param

from .form_state import (
    DTYPE_CHOICES,
    NAN_PARAMS,
    FormState,
    FormView,
    apply_preset,
    comparable,
    config_from_form,
    dump_yaml,
    form_from_config,
    form_view,
    global_field,
    global_form_params,
    keep_first,
    method_markdown,
    model_field,
    nan_field,
    param_info,
    presets_for,
    remove_row,
    safe_mapping,
)
from .model_picker import ModelPicker

__all__ = ["ConfigForm", "MethodForm", "build_method_form", "build_yaml_view", "initial_yaml", "presets_for",
           "validation_message", "wire_method_form", "wire_model_list"]


PRESET_PROMPT = "choose a preset…"  # the dropdown's first entry, in place of a placeholder (it applies nothing)


def _param_component(p: Param, method: str, visible: bool = True):
    kwargs = dict(label=p.name, info=param_info(p), elem_id=f"param-{method}-{p.name}", visible=visible)
    if p.type is list:  # a list of strings (name filters): one comma-separated line
        kwargs["info"] += " · comma-separated"
        return gr.Textbox(", ".join(p.default), lines=1, max_lines=1, **kwargs)
    if p.type is bool:
        return gr.Checkbox(p.default, **kwargs)
    if p.type is str:
        return gr.Dropdown(list(p.choices or [p.default]), value=p.default, allow_custom_value=not p.choices, **kwargs)
    bounded = p.min is not None and p.max is not None and math.isfinite(p.min) and math.isfinite(p.max)
    if bounded and p.type is float:
        return gr.Slider(p.min, p.max, value=p.default, step=(p.max - p.min) / 100, **kwargs)
    return gr.Number(p.default, precision=0 if p.type is int else None, minimum=p.min, maximum=p.max, **kwargs)


@dataclass
class MethodForm:
    method: gr.Dropdown
    summary: gr.Markdown
    preset: gr.Dropdown
    groups: dict[str, gr.Group]
    fields: dict[str, dict[str, Any]]  # method -> global parameter -> component (NAN ones excluded)
    nan_row: gr.Row
    nan: dict[str, Any]  # coefficients (a checkbox), nan_scope, nan_on
    out_dtype: gr.Dropdown
    seed: gr.Number
    vocab: gr.Checkbox
    yaml: gr.Code
    yaml_status: gr.Markdown


def build_method_form(demo: DemoModels) -> MethodForm:
    """The method dropdown, one parameter group per method (only the chosen one visible), NAN, advanced options."""
    names = sorted(REGISTRY)
    initial = demo.method if demo.method in REGISTRY else names[0]
    with gr.Row(equal_height=True):
        method = gr.Dropdown(names, value=initial, label="Merge method", scale=2, elem_id="method")
        preset = gr.Dropdown([PRESET_PROMPT, *presets_for(REGISTRY[initial])], value=PRESET_PROMPT, label="Preset",
                             info="fill the form with a paper's settings, or the defaults", scale=2, elem_id="preset")
    summary = gr.Markdown(method_markdown(REGISTRY[initial]), elem_id="method-summary")
    groups, fields = {}, {}
    for name in names:
        with gr.Group(visible=name == initial) as group:
            fields[name] = {}
            with gr.Row(elem_classes=["param-row"]):
                for p in global_form_params(REGISTRY[name]):
                    value = demo.parameters.get(p.name, p.default) if name == initial else p.default
                    comp = _param_component(p, name)
                    comp.value = ", ".join(value) if p.type is list else value
                    fields[name][p.name] = comp
        groups[name] = group
    nan_params = {p.name: p for m in REGISTRY.values() for p in m.params if p.name in NAN_PARAMS}
    with gr.Row(visible="coefficients" in {p.name for p in REGISTRY[initial].params}, equal_height=True,
                elem_classes=["param-row"]) as nan_row:
        nan = {"coefficients": gr.Checkbox(False, label="NAN coefficients",
                                           info="weights ∝ 1/‖θ_i‖ (Si et al. 2025, arXiv:2505.16148), replacing the "
                                                "per-model weights", elem_id="nan-switch")}
        for key in ("nan_scope", "nan_on"):
            if key in nan_params:
                nan[key] = _param_component(nan_params[key], "nan")
    with gr.Accordion("Advanced", open=False):
        with gr.Row(elem_classes=["param-row"]):
            out_dtype = gr.Dropdown(DTYPE_CHOICES, value=DTYPE_CHOICES[0], label="Output dtype")
            seed = gr.Number(0, precision=0, label="Seed", info="for the random methods (DARE, DELLA, sampling)")
            vocab = gr.Checkbox(False, label="Allow vocabulary mismatch",
                                info="merge the shared embedding rows, keep the base's others")
    return MethodForm(method, summary, preset, groups, fields, nan_row, nan, out_dtype, seed, vocab,
                      yaml=None, yaml_status=None)  # type: ignore[arg-type]  (the YAML view is placed later)


def build_yaml_view(form: MethodForm, initial_yaml: str) -> None:
    form.yaml = gr.Code(initial_yaml, language="yaml", label="Config (YAML, mergekit format): edit here or in the form",
                        interactive=True, lines=12, max_lines=40, elem_id="config-yaml")
    form.yaml_status = gr.Markdown(elem_id="yaml-status")


# --- the binding: state field names <-> components -------------------------------------------------------------

class ConfigForm:
    """The form's components bound to the names of ``FormState.to_fields()``: reads a {component: value} dict into
    a state, and writes a state (values) or its ``FormView`` (visibility, labels) back as {component: update}.

    ``synced`` holds {"fields": comparable(state), "yaml": text} as last written by either direction; the panels
    read the config with ``config_text`` over ``inputs()``."""

    def __init__(self, picker: ModelPicker, form: MethodForm) -> None:
        self.picker = picker
        self.form = form
        bound: dict[str, gr.components.Component] = {"method": form.method, "base": picker.base,
                                                     "out_dtype": form.out_dtype, "seed": form.seed,
                                                     "allow_vocab_mismatch": form.vocab}
        for i, slot in enumerate(picker.slots):
            bound[model_field(i, "model")] = slot.model
            bound.update({model_field(i, name): comp for name, comp in slot.fields.items()})
        for method, fields in form.fields.items():
            bound.update({global_field(method, name): comp for name, comp in fields.items()})
        bound.update({nan_field(key): comp for key, comp in form.nan.items()})
        self.components = bound
        initial = self.read({comp: comp.value for comp in bound.values()})
        self.synced = gr.State({"fields": comparable(initial), "yaml": form.yaml.value})

    def value_components(self) -> list:
        """Every component holding a field of the state: what the user edits, and what a YAML edit may write."""
        return list(self.components.values())

    def inputs(self) -> set:
        """What the handlers read, as a set: Gradio then passes one dict {component: value}."""
        return {*self.components.values(), self.form.yaml, self.synced}

    def view_components(self) -> list:
        """What depends on the method: groups, summary, preset choices, NAN row, base label, model rows and fields,
        the remove buttons and what the list says about the method's model count."""
        form, picker = self.form, self.picker
        out = [*form.groups.values(), form.summary, form.preset, form.nan_row, picker.base, picker.count_note,
               picker.keep_first]
        for slot in picker.slots:
            out += [slot.row, *slot.fields.values(), slot.remove]
        return out

    def all_outputs(self) -> list:
        """Everything a handler that shows a whole config may update, each once."""
        return list(dict.fromkeys([*self.value_components(), *self.view_components(), self.form.yaml,
                                   self.form.yaml_status, self.synced]))

    def read(self, values: Mapping) -> FormState:
        return FormState.from_fields({name: values[comp] for name, comp in self.components.items() if comp in values})

    def current_config(self, values: Mapping) -> dict:
        """The YAML view's mapping, which the form is laid over ({} while it is not valid YAML)."""
        return safe_mapping(values.get(self.form.yaml))

    def config_text(self, values: Mapping) -> str:
        """The config Analyze, Merge and the pre-flight run: the YAML, or the form laid over it when a form edit has
        not reached the YAML yet (a click right after a paste)."""
        state = self.read(values)
        synced = values.get(self.synced) or {}
        if state.method in REGISTRY and synced.get("fields") is not None and comparable(state) != synced["fields"]:
            return dump_yaml(config_from_form(state, self.current_config(values)))
        return values.get(self.form.yaml) or ""

    def value_updates(self, state: FormState, held: Mapping | None = None) -> dict:
        """Updates that make the components show ``state``; with ``held`` (the values they hold now) only where they
        differ, so a field the user is still typing in is not set back to the value it held when the event fired."""
        out = {}
        for name, value in state.to_fields().items():
            comp = self.components.get(name)
            if comp is not None and (held is None or comp not in held or held[comp] != value):
                out[comp] = gr.update(value=value)
        return out

    def shown_state(self, values: Mapping) -> FormState | None:
        """The state the page shows the view of: the last one synced (every handler keeps the view in step)."""
        fields = (values.get(self.synced) or {}).get("fields")
        return FormState.from_fields(fields) if fields else None

    def view_updates(self, view: FormView, state: FormState | None = None, values: Mapping | None = None) -> dict:
        """Updates that make the page show ``view``; with the event's ``values``, only what differs from the view
        the page shows now (``shown_state``): a few updates, not a hundred."""
        form, picker = self.form, self.picker
        rows = state.models if state is not None else []
        old = old_rows = None
        before = self.shown_state(values) if values is not None else None
        if before is not None and before.method in REGISTRY:
            old, old_rows = form_view(before), before.models
        out = {}
        if old is None or old.method != view.method:
            out.update({group: gr.update(visible=name == view.method) for name, group in form.groups.items()})
            out[form.summary] = gr.update(value=view.summary)
            out[form.preset] = gr.update(choices=[PRESET_PROMPT, *view.preset_choices], value=PRESET_PROMPT)
        if old is None or old.nan_visible != view.nan_visible:
            out[form.nan_row] = gr.update(visible=view.nan_visible)
        if old is None or old.base_label != view.base_label:
            out[picker.base] = gr.update(label=view.base_label)
        if old is None or (old.count_note, old.keep_first) != (view.count_note, view.keep_first):
            out[picker.count_note] = gr.update(value=view.count_note)
            out[picker.keep_first] = gr.update(visible=view.keep_first is not None,
                                               value=f"Keep the first {view.keep_first}" if view.keep_first else None)
        for i, (slot, visible) in enumerate(zip(picker.slots, view.rows_visible)):
            if old is None or old.rows_visible[i] != visible:
                out[slot.row] = gr.update(visible=visible)
            filled = i < len(rows) and bool(rows[i].model)
            if old_rows is None or (i < len(old_rows) and bool(old_rows[i].model)) != filled:
                out[slot.remove] = gr.update(visible=filled)
            for name, comp in slot.fields.items():
                shown = view.model_fields[name]
                if old is None or old.model_fields[name] != shown:
                    out[comp] = gr.update(visible=shown.visible, label=shown.label)
        return out

    def show_state(self, state: FormState, values: Mapping, text: str | None = None) -> dict:
        """Every update that shows ``state`` in the form and its config (``text``, else the form's) in the YAML."""
        if text is None:
            text = dump_yaml(config_from_form(state, self.current_config(values)))
        return merged_updates(self.value_updates(state, values), self.view_updates(form_view(state), state, values),
                              {self.form.yaml: text, self.form.yaml_status: validation_message(text),
                               self.synced: {"fields": comparable(state), "yaml": text}})

    def show_config(self, values: Mapping, text: str) -> dict:
        """Every update that puts the config ``text`` in the YAML and the form (Apply, presets)."""
        state, _ = form_from_config(safe_mapping(text), self.read(values))
        return self.show_state(state, values, text)


def merged_updates(*parts: Mapping) -> dict:
    """One update per component (a returned dict holds each output once): a new value and a new label, say."""
    out: dict = {}
    for part in parts:
        for comp, update in part.items():
            both_updates = isinstance(out.get(comp), dict) and isinstance(update, dict)
            out[comp] = {**out[comp], **update} if both_updates else update
    return out


def validation_message(text: str) -> str:
    """One line under the YAML view: valid, or the library's message for what is wrong."""
    try:
        config = parse_config(text, source="config")
    except MergeError as exc:
        return f"**Invalid config:** {exc}"
    return f"Valid config: {config.merge_method} over {len(config.model_refs())} checkpoint(s)."


def wire_method_form(cf: ConfigForm) -> None:
    """Form changes → YAML (and the method-dependent view); YAML changes → form; presets → form and YAML."""
    form = cf.form
    inputs = cf.inputs()
    form_outputs = [*cf.view_components(), form.yaml, form.yaml_status, cf.synced]

    def form_changed(values: dict) -> dict:
        state = cf.read(values)
        if state.method not in REGISTRY:
            return {form.yaml_status: ""}
        fields = comparable(state)
        if fields == (values.get(cf.synced) or {}).get("fields"):
            return gr.skip()  # the echo of a value the app set, or no change: the YAML already says it
        text = dump_yaml(config_from_form(state, cf.current_config(values)))
        return cf.view_updates(form_view(state), state, values) | {
            form.yaml: text, form.yaml_status: validation_message(text), cf.synced: {"fields": fields, "yaml": text}}

    def yaml_changed(values: dict) -> dict:
        text = values[form.yaml] or ""
        if text == (values.get(cf.synced) or {}).get("yaml"):
            return gr.skip()  # the form wrote it
        status = validation_message(text)
        data = safe_mapping(text)
        if not data:
            return {form.yaml_status: status}
        state, notes = form_from_config(data, cf.read(values))
        if notes:
            status += "  \n" + "  \n".join(f"Note: {n}" for n in notes[:6])
        return merged_updates(cf.value_updates(state, values), cf.view_updates(form_view(state), state, values),
                              {form.yaml_status: status, cf.synced: {"fields": comparable(state), "yaml": text}})

    def preset_chosen(values: dict) -> dict:
        chosen = apply_preset(cf.read(values), values[form.preset])
        if chosen is None:
            return gr.skip()
        config = config_from_form(chosen, cf.current_config(values))
        text = dump_yaml(config)
        # The form then shows that config, as after a YAML edit: rows in the order of `models`, and the rows
        # without a model (which have no entry) back at the schema defaults.
        shown, _ = form_from_config(config, chosen)
        return cf.value_updates(shown, values) | {form.yaml: text, form.yaml_status: validation_message(text),
                                                  cf.synced: {"fields": comparable(shown), "yaml": text}}

    def field_changed(name: str):
        """A field's change: an echo when the field now holds what the app last synced for it (the app set it:
        a YAML edit, Apply, a removed row). Judged field by field, so the events of many fields set at once (each
        carrying values the page is still updating) never write a half-updated config."""
        def handler(values: dict):
            synced = (values.get(cf.synced) or {}).get("fields") or {}
            now = comparable(FormState.from_fields({"method": "", name: values[cf.components[name]]}))
            if name in synced and now.get(name) == synced[name]:
                return gr.skip()
            return form_changed(values)
        return handler

    for name, comp in cf.components.items():
        comp.change(field_changed(name), inputs, form_outputs, queue=False, api_visibility="private",
                    trigger_mode="always_last", show_progress="hidden")
    form.yaml.change(yaml_changed, inputs, list(dict.fromkeys([*cf.value_components(), *cf.view_components(),
                                                               form.yaml_status, cf.synced])),
                     queue=False, api_visibility="private", trigger_mode="always_last", show_progress="hidden")
    form.preset.input(preset_chosen, inputs | {form.preset},
                      [*cf.value_components(), form.yaml, form.yaml_status, cf.synced], queue=False,
                      api_visibility="private", show_progress="hidden")


def wire_model_list(cf: ConfigForm) -> None:
    """The model list shrinking: a row's remove button, and "keep the first N" for a method that takes N."""
    outputs = cf.all_outputs()

    def remover(index: int):
        def remove(values: dict) -> dict:
            return cf.show_state(remove_row(cf.read(values), index), values)
        return remove

    def keep(values: dict) -> dict:
        state = cf.read(values)
        n = REGISTRY[state.method].max_models if state.method in REGISTRY else None
        return cf.show_state(keep_first(state, n), values) if n else gr.skip()

    for i, slot in enumerate(cf.picker.slots):
        slot.remove.click(remover(i), cf.inputs(), outputs, queue=False, api_visibility="private",
                          show_progress="hidden")
    cf.picker.keep_first.click(keep, cf.inputs(), outputs, queue=False, api_visibility="private",
                               show_progress="hidden")


def initial_yaml(demo: DemoModels) -> str:
    return dump_yaml(demo.config_dict())
