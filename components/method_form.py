"""The method form and the YAML view: two editable faces of one mergekit-format config.

Every registered method is in the dropdown; its parameters are rendered from the registry's ``Param`` schema
(type, default, range, help) with the paper cited. The NAN switch sets ``coefficients: nan`` (Si et al. 2025).

Round trip: a user edit in the form (an ``input`` event: programmatic updates do not fire it) rewrites the YAML; a
user edit in the YAML rewrites the form. The YAML is the source of truth that Analyze and Merge read, so keys the
form cannot show (``slices``, ``tokenizer_source``, per-layer parameter lists, filters) survive form edits: the
form starts from the YAML's current mapping and only replaces what it shows.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import gradio as gr
import yaml

from merging.config import parse_config
from merging.demo import DemoModels
from merging.errors import MergeError
from merging.methods import REGISTRY
from merging.methods.registry import MergeMethod, Param

from .model_picker import MAX_MODELS, ModelPicker

NAN_PARAMS = ("coefficients", "nan_scope", "nan_on")
DTYPE_CHOICES = ["as the base", "float32", "float16", "bfloat16"]
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "seed", "allow_vocab_mismatch")

DEFAULTS_PRESET = "schema defaults"


def presets_for(method: MergeMethod) -> dict[str, dict[str, Any]]:
    names = {p.name for p in method.params}
    out = {DEFAULTS_PRESET: {p.name: p.default for p in method.params if p.name not in NAN_PARAMS}}
    for preset in method.presets:
        out[f"{preset.name}: {preset.label}"] = {k: v for k, v in preset.values.items() if k in names}
    return out


def method_markdown(method: MergeMethod) -> str:
    base = {"required": "a base model is required", "optional": "a base model is optional",
            "none": "no base model"}[method.base]
    count = (f"exactly {method.min_models}" if method.min_models == method.max_models
             else f"at least {method.min_models}" + (f", at most {method.max_models}" if method.max_models else ""))
    return f"**{method.name}**: {method.summary}.  \n*{method.paper}* · {base}; {count} model(s)"


def param_info(p: Param) -> str:
    info = p.help
    if p.type in (int, float) and (p.min is not None or p.max is not None):
        info += f" · range {p.range_text()}"
    return info


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
        preset = gr.Dropdown(list(presets_for(REGISTRY[initial])), value=None, label="Preset (papers' defaults)",
                             scale=2, elem_id="preset")
    summary = gr.Markdown(method_markdown(REGISTRY[initial]), elem_id="method-summary")
    groups, fields = {}, {}
    for name in names:
        m = REGISTRY[name]
        global_params = [p for p in m.params if not p.per_model and p.name not in NAN_PARAMS]
        with gr.Group(visible=name == initial) as group:
            fields[name] = {}
            with gr.Row():
                for p in global_params:
                    value = demo.parameters.get(p.name, p.default) if name == initial else p.default
                    comp = _param_component(p, name)
                    comp.value = ", ".join(value) if p.type is list else value
                    fields[name][p.name] = comp
        groups[name] = group
    nan_params = {p.name: p for m in REGISTRY.values() for p in m.params if p.name in NAN_PARAMS}
    with gr.Row(visible="coefficients" in {p.name for p in REGISTRY[initial].params}, equal_height=True) as nan_row:
        nan = {"coefficients": gr.Checkbox(False, label="NAN coefficients",
                                           info="weights ∝ 1/‖θ_i‖ (Si et al. 2025, arXiv:2505.16148), replacing the "
                                                "per-model weights", elem_id="nan-switch")}
        for key in ("nan_scope", "nan_on"):
            if key in nan_params:
                nan[key] = _param_component(nan_params[key], "nan")
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
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


# --- the round trip ---------------------------------------------------------------------------------------------

@dataclass
class FormValues:
    method: str
    base: str
    slots: list[tuple[str, dict[str, float]]]
    globals: dict[str, dict[str, Any]]
    nan: dict[str, Any]
    out_dtype: str
    seed: int
    vocab: bool
    yaml_text: str = ""
    notes: list[str] = field(default_factory=list)


class ConfigForm:
    """Knows the order of every form input, reads them into a config dict and writes a config dict back."""

    def __init__(self, picker: ModelPicker, form: MethodForm) -> None:
        self.picker = picker
        self.form = form
        self.field_order = [(m, p) for m in sorted(form.fields) for p in form.fields[m]]
        self.nan_order = list(form.nan)

    # Components, in the order handlers receive them.
    def inputs(self) -> list:
        return ([self.form.yaml, self.form.method, self.picker.base, *self.picker.slot_components()]
                + [self.form.fields[m][p] for m, p in self.field_order]
                + [self.form.nan[k] for k in self.nan_order]
                + [self.form.out_dtype, self.form.seed, self.form.vocab])

    def value_outputs(self) -> list:
        """What a YAML edit or a preset writes: every input except the YAML itself."""
        return self.inputs()[1:]

    def view_outputs(self) -> list:
        """What depends on the method: groups, summary, preset choices, NAN row, slot rows and fields, labels."""
        out = [self.form.groups[m] for m in sorted(self.form.groups)]
        out += [self.form.summary, self.form.preset, self.form.nan_row, self.picker.base]
        for slot in self.picker.slots:
            out.append(slot.row)
            out += [slot.fields[n] for n in sorted(slot.fields)]
        return out

    def read(self, values: list) -> FormValues:
        values = list(values)
        yaml_text, method, base = values[0], values[1], values[2]
        n_slot = len(self.picker.slot_components())
        slots = self.picker.read_slots(values[3:3 + n_slot])
        rest = values[3 + n_slot:]
        globals_: dict[str, dict[str, Any]] = {}
        for (m, p), v in zip(self.field_order, rest):
            globals_.setdefault(m, {})[p] = v
        rest = rest[len(self.field_order):]
        nan = dict(zip(self.nan_order, rest))
        out_dtype, seed, vocab = rest[len(self.nan_order):]
        return FormValues(method, (base or "").strip(), slots, globals_, nan, out_dtype, int(seed or 0), bool(vocab),
                          yaml_text or "")

    def to_dict(self, fv: FormValues) -> dict:
        """The config the form shows, laid over the current YAML (whose extra keys and list values survive)."""
        current = _safe_mapping(fv.yaml_text)
        method = REGISTRY[fv.method]
        per_model = [p for p in method.params if p.per_model]
        config: dict[str, Any] = {"merge_method": method.name}
        if fv.base:
            config["base_model"] = fv.base
        old_models = {m.get("model"): m for m in current.get("models") or [] if isinstance(m, dict)}
        models = []
        for ref, params in fv.slots:
            if not ref:
                continue
            old_params = (old_models.get(ref) or {}).get("parameters") or {}
            entry_params = {}
            for p in per_model:
                entry_params[p.name] = _keep_complex(old_params.get(p.name), _typed(p, params.get(p.name)), p)
            models.append({"model": ref, "parameters": entry_params} if entry_params else {"model": ref})
        extra_models = [m for m in (current.get("models") or [])[MAX_MODELS:]]  # beyond the form's slots
        if models or extra_models:
            config["models"] = models + extra_models
        old_params = current.get("parameters") if isinstance(current.get("parameters"), dict) else {}
        params = {}
        for p in method.params:
            if p.per_model:
                continue
            if p.name in NAN_PARAMS:
                value = fv.nan.get(p.name, p.default)
                if p.name == "coefficients":
                    value = "nan" if value else "weights"
            else:
                value = fv.globals.get(method.name, {}).get(p.name, p.default)
            value = _keep_complex(old_params.get(p.name), _typed(p, value), p)
            if not _same(value, p.default) or p.name in old_params:
                params[p.name] = value
        if params.get("coefficients") != "nan":  # NAN's options mean nothing without NAN: keep the YAML short
            for key in ("nan_scope", "nan_on"):
                if key in params and params[key] == method.param(key).default:
                    params.pop(key)
        if params:
            config["parameters"] = params
        for key in ("slices", "tokenizer_source", "dtype"):
            if key in current:
                config[key] = current[key]
        if fv.out_dtype and fv.out_dtype != DTYPE_CHOICES[0]:
            config["out_dtype"] = fv.out_dtype
        if fv.seed:
            config["seed"] = fv.seed
        if fv.vocab:
            config["allow_vocab_mismatch"] = True
        for key, value in current.items():  # keys of later versions, kept as they are
            if key not in TOP_KEYS:
                config[key] = value
        return config

    def to_yaml(self, fv: FormValues) -> str:
        return dump_yaml(self.to_dict(fv))

    def from_dict(self, data: dict, current: FormValues) -> tuple[list, list[str]]:
        """Updates for value_outputs() from a config mapping, and notes on what the form cannot show."""
        notes: list[str] = []
        method_name = data.get("merge_method")
        method = REGISTRY.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            method = REGISTRY[current.method]
        updates: list = [gr.update(value=method.name), gr.update(value=str(data.get("base_model") or ""))]
        entries = [m for m in (data.get("models") or []) if isinstance(m, dict)]
        if len(entries) > MAX_MODELS:
            notes.append(f"{len(entries)} models: the form shows the first {MAX_MODELS}; the YAML keeps all")
        if data.get("slices"):
            notes.append("`slices` are kept in the YAML; the form shows only `models`")
        names = sorted(self.picker.slots[0].fields)
        params_by_name = {p.name: p for p in method.params}
        for i in range(MAX_MODELS):
            entry = entries[i] if i < len(entries) else {}
            updates.append(gr.update(value=str(entry.get("model") or "")))
            mparams = entry.get("parameters") if isinstance(entry.get("parameters"), dict) else {}
            for name in names:
                p = params_by_name.get(name)
                value = mparams.get(name, p.default if p else None)
                if not _is_scalar(value):
                    notes.append(f"models[{i}].{name} uses per-layer values or filters (kept; edit them in the YAML)")
                    value = p.default if p else None
                updates.append(gr.update(value=value) if value is not None else gr.update())
        gparams = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
        for m, pname in self.field_order:
            if m != method.name:
                updates.append(gr.update())
                continue
            p = method.param(pname)
            value = gparams.get(pname, p.default)
            if p.type is list:
                value = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value or "")
            elif not _is_scalar(value):
                notes.append(f"`{pname}` uses per-layer values or filters (kept; edit it in the YAML)")
                value = p.default
            updates.append(gr.update(value=value))
        for key in self.nan_order:
            if key == "coefficients":
                updates.append(gr.update(value=gparams.get("coefficients") == "nan"))
            else:
                value = gparams.get(key)
                updates.append(gr.update(value=value) if isinstance(value, str) else gr.update())
        out_dtype = data.get("out_dtype") or data.get("dtype")
        updates.append(gr.update(value=out_dtype if out_dtype in DTYPE_CHOICES else DTYPE_CHOICES[0]))
        updates.append(gr.update(value=int(data["seed"]) if isinstance(data.get("seed"), int) else 0))
        updates.append(gr.update(value=bool(data.get("allow_vocab_mismatch"))))
        return updates, notes

    def view_updates(self, fv: FormValues) -> list:
        method = REGISTRY.get(fv.method) or next(iter(REGISTRY.values()))
        per_model = {p.name for p in method.params if p.per_model}
        nan_on = bool(fv.nan.get("coefficients"))
        out: list = [gr.update(visible=m == method.name) for m in sorted(self.form.groups)]
        out.append(gr.update(value=method_markdown(method)))
        out.append(gr.update(choices=list(presets_for(method)), value=None))
        out.append(gr.update(visible="coefficients" in {p.name for p in method.params}))
        out.append(gr.update(label={"required": "Base model", "optional": "Base model (optional)",
                                    "none": "Base model (optional: the reference for names and files)"}[method.base]))
        last_filled = max((i for i, (ref, _) in enumerate(fv.slots) if ref), default=-1)
        limit = method.max_models or MAX_MODELS
        for i, slot in enumerate(self.picker.slots):
            out.append(gr.update(visible=i <= last_filled + 1 and (i < limit or bool(fv.slots[i][0]))))
            for name in sorted(slot.fields):
                label = f"{name} (NAN replaces it)" if name == "weight" and nan_on else name
                out.append(gr.update(visible=name in per_model, label=label))
        return out


def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, allow_unicode=True, width=1000)


def _safe_mapping(text: str) -> dict:
    try:
        data = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def _typed(p: Param, value: Any) -> Any:
    if p.type is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return list(value) if isinstance(value, (list, tuple)) else list(p.default)
    if value is None:
        return p.default
    if p.type is bool:
        return bool(value)
    if p.type is int:
        return int(value)
    if p.type is float:
        value = float(value)
        return round(value, 6)
    return value


def _keep_complex(old: Any, new: Any, p: Param) -> Any:
    """A per-layer list or filter list from the YAML stays while the form still shows the default in its place."""
    if p.type is not list and old is not None and not _is_scalar(old) and _same(new, p.default):
        return old
    return new


def validation_message(text: str) -> str:
    """One line under the YAML view: valid, or the library's message for what is wrong."""
    try:
        config = parse_config(text, source="config")
    except MergeError as exc:
        return f"**Invalid config:** {exc}"
    return f"Valid config: {config.merge_method} over {len(config.model_refs())} checkpoint(s)."


def wire_method_form(cf: ConfigForm) -> None:
    """Form edits → YAML (and the method-dependent view); YAML edits → form; presets → form and YAML."""
    form = cf.form

    def form_changed(*values):
        fv = cf.read(values)
        if fv.method not in REGISTRY:
            return [gr.update()] * len(cf.view_outputs()) + [gr.update(), ""]
        text = cf.to_yaml(fv)
        return cf.view_updates(fv) + [text, validation_message(text)]

    def yaml_changed(*values):
        fv = cf.read(values)
        data = _safe_mapping(fv.yaml_text)
        status = validation_message(fv.yaml_text)
        if not data:
            return [gr.update()] * len(cf.value_outputs()) + [gr.update()] * len(cf.view_outputs()) + [status]
        updates, notes = cf.from_dict(data, fv)
        # The view follows the new values: re-read them as the form will hold them.
        new_values = [fv.yaml_text] + [u.get("value", old) if isinstance(u, dict) else old
                                       for u, old in zip(updates, values[1:])]
        view = cf.view_updates(cf.read(new_values))
        if notes:
            status += "  \n" + "  \n".join(f"Note: {n}" for n in notes[:6])
        return updates + view + [status]

    def preset_chosen(label, *values):
        fv = cf.read(values)
        method = REGISTRY[fv.method]
        chosen = presets_for(method).get(label or "")
        if not chosen:
            return [gr.update()] * (len(cf.value_outputs()) + 2)
        for name, value in chosen.items():
            p = method.param(name)
            if p.per_model:
                for _, params in fv.slots:
                    params[name] = value
            else:
                fv.globals.setdefault(method.name, {})[name] = value
        text = cf.to_yaml(fv)
        data = yaml.safe_load(text)
        updates, _ = cf.from_dict(data, fv)
        # Empty slots keep the preset's per-model values too, so a model added next starts from them.
        return updates + [text, validation_message(text)]

    form_inputs = cf.inputs()
    for comp in form_inputs[1:]:
        comp.input(form_changed, form_inputs, cf.view_outputs() + [form.yaml, form.yaml_status],
                   queue=False, api_visibility="private", trigger_mode="always_last")
    form.yaml.input(yaml_changed, form_inputs, cf.value_outputs() + cf.view_outputs() + [form.yaml_status],
                    queue=False, api_visibility="private", trigger_mode="always_last")
    form.preset.input(preset_chosen, [form.preset, *form_inputs],
                      cf.value_outputs() + [form.yaml, form.yaml_status], queue=False, api_visibility="private")

    def resync(dependency) -> None:
        """After a programmatic change of models (demo button, uploads, search), rewrite the YAML from the form."""
        dependency.then(form_changed, form_inputs, cf.view_outputs() + [form.yaml, form.yaml_status],
                        queue=False, api_visibility="private")

    cf.resync = resync  # type: ignore[attr-defined]


def initial_yaml(demo: DemoModels) -> str:
    return dump_yaml(demo.config_dict())
