"""The method form's state as plain data, and the two directions between it and a mergekit-format config.

Nothing here imports Gradio, so the round trip is unit-tested without a browser (tests/test_form_state.py);
``method_form.ConfigForm`` binds every field of the state to its component by name (``FormState.to_fields``).

- ``config_from_form(state, current)``: the config the form shows, laid over the YAML's current mapping, so keys the
  form cannot show survive (``slices``, ``tokenizer_source``, per-layer lists, filters, keys of later versions).
- ``form_from_config(data, current)``: the state the form shows for a config, and notes on what it cannot show.
- ``apply_preset(state, label)``: a method's preset (from the registry's ``MergeMethod.presets``) in the state.
- ``form_view(state)``: what depends on the method: which fields show, their labels, which model rows show, and
  what the model list says when the method takes a fixed number of models (``count_note``, ``keep_first``).
- ``remove_row(state, i)``, ``keep_first(state, n)``: the model list shrinking, rows after a removed one moving up.
- ``comparable(state)``: the state's fields in a form two states can be compared by (what the page shows).

Model rows are a plain list, any length: the form's rows are ``MAX_MODEL_ROWS`` today, and a config with more
models keeps the extra ones in the YAML (``capacity`` below says how many rows the form can show).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from merging.methods import REGISTRY
from merging.methods.registry import MergeMethod, Param

MAX_MODEL_ROWS = 10
NAN_PARAMS = ("coefficients", "nan_scope", "nan_on")  # the NAN switch (Si et al. 2025) and its options
DTYPE_AS_BASE = "as the base"
DTYPE_CHOICES = [DTYPE_AS_BASE, "float32", "float16", "bfloat16"]
# The top-level keys the form writes itself (or copies as they are); any other key is kept after them.
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "seed", "allow_vocab_mismatch")
DEFAULTS_PRESET = "schema defaults"
BASE_LABELS = {"required": "Base model", "optional": "Base model (optional)",
               "none": "Base model (optional: the reference for names and files)"}


# --- what the schema says the form shows ---------------------------------------------------------------------------

def per_model_params() -> dict[str, Param]:
    """Every per-model parameter any registered method has, by name (the first method's Param wins): each model
    row holds one field for each, and the view shows those of the chosen method."""
    found: dict[str, Param] = {}
    for method in REGISTRY.values():
        for p in method.params:
            if p.per_model and p.name not in found:
                found[p.name] = p
    return found


def global_form_params(method: MergeMethod) -> list[Param]:
    """The method's parameters in its own group of the form: global ones, the NAN switch and options excluded."""
    return [p for p in method.params if not p.per_model and p.name not in NAN_PARAMS]


def presets_for(method: MergeMethod) -> dict[str, dict[str, Any]]:
    """The preset dropdown's choices, label -> parameter values: the schema defaults, then the method's presets."""
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


# --- the state and its field names ---------------------------------------------------------------------------------

def model_field(row: int, name: str) -> str:
    """The field name of a model row's checkpoint reference (``name`` "model") or of one of its parameters."""
    return f"models.{row}.{name}"


def global_field(method: str, name: str) -> str:
    """The field name of a parameter in a method's own group (every method keeps its values while hidden)."""
    return f"parameters.{method}.{name}"


def nan_field(key: str) -> str:
    return f"nan.{key}"


@dataclass
class ModelRow:
    """One model row: a checkpoint reference (empty: the row is unused) and its per-model parameters."""

    model: str = ""
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class FormState:
    """What the form holds, values as its components hold them (a list parameter as one comma-separated line)."""

    method: str
    base: str = ""
    models: list[ModelRow] = field(default_factory=list)
    global_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> its group's values
    nan: dict[str, Any] = field(default_factory=dict)  # "coefficients" (bool: NAN on), "nan_scope", "nan_on"
    out_dtype: str = DTYPE_AS_BASE
    seed: int = 0
    allow_vocab_mismatch: bool = False

    def to_fields(self) -> dict[str, Any]:
        """Field name -> value, the names a form binds its components to (see model_field, global_field)."""
        out: dict[str, Any] = {"method": self.method, "base": self.base}
        for i, row in enumerate(self.models):
            out[model_field(i, "model")] = row.model
            out.update({model_field(i, name): value for name, value in row.params.items()})
        for method, values in self.global_params.items():
            out.update({global_field(method, name): value for name, value in values.items()})
        out.update({nan_field(key): value for key, value in self.nan.items()})
        out.update(out_dtype=self.out_dtype, seed=self.seed, allow_vocab_mismatch=self.allow_vocab_mismatch)
        return out

    @classmethod
    def from_fields(cls, values: Mapping[str, Any]) -> FormState:
        """The state from field values as the form's components hold them (blank references are unused rows)."""
        state = cls(method=values.get("method") or "", base=(values.get("base") or "").strip(),
                    out_dtype=values.get("out_dtype") or DTYPE_AS_BASE, seed=int(values.get("seed") or 0),
                    allow_vocab_mismatch=bool(values.get("allow_vocab_mismatch")))
        rows: dict[int, ModelRow] = {}
        for name, value in values.items():
            section, _, rest = name.partition(".")
            if section == "models":
                index, _, key = rest.partition(".")
                row = rows.setdefault(int(index), ModelRow())
                if key == "model":
                    row.model = (value or "").strip()
                else:
                    row.params[key] = value
            elif section == "parameters":
                method, _, key = rest.partition(".")
                state.global_params.setdefault(method, {})[key] = value
            elif section == "nan":
                state.nan[rest] = value
        state.models = [rows.get(i, ModelRow()) for i in range(max(rows, default=-1) + 1)]
        return state


def first_empty_row(refs: Sequence[str]) -> int | None:
    """Where a model added by search or upload goes: the first row without a checkpoint."""
    return next((i for i, ref in enumerate(refs) if not (ref or "").strip()), None)


# --- form -> config -----------------------------------------------------------------------------------------------

def config_from_form(state: FormState, current: Mapping | None = None, capacity: int = MAX_MODEL_ROWS) -> dict:
    """The config the form shows, laid over ``current`` (the YAML's mapping): its keys the form cannot show survive,
    its per-layer lists and filters too while the form still shows the default in their place, and its models
    beyond the form's ``capacity`` rows."""
    current = current if isinstance(current, Mapping) else {}
    method = REGISTRY[state.method]
    config: dict[str, Any] = {"merge_method": method.name}
    if state.base:
        config["base_model"] = state.base
    current_models = current.get("models") if isinstance(current.get("models"), list) else []
    models = _model_entries(state, method, current_models) + current_models[capacity:]
    if models:
        config["models"] = models
    params = _global_entries(state, method, current.get("parameters"))
    if params:
        config["parameters"] = params
    for key in ("slices", "tokenizer_source", "dtype"):
        if key in current:
            config[key] = current[key]
    if state.out_dtype and state.out_dtype != DTYPE_AS_BASE:
        config["out_dtype"] = state.out_dtype
    if state.seed:
        config["seed"] = state.seed
    if state.allow_vocab_mismatch:
        config["allow_vocab_mismatch"] = True
    for key, value in current.items():  # keys of later versions, kept as they are
        if key not in TOP_KEYS:
            config[key] = value
    return config


def _model_entries(state: FormState, method: MergeMethod, current_models: list) -> list[dict]:
    """``models`` for the filled rows; a row's per-layer lists in the YAML are found by its checkpoint reference."""
    per_model = [p for p in method.params if p.per_model]
    old_by_ref = {m.get("model"): m for m in current_models if isinstance(m, dict)}
    entries = []
    for row in state.models:
        if not row.model:
            continue
        old = (old_by_ref.get(row.model) or {}).get("parameters")
        old = old if isinstance(old, dict) else {}
        params = {p.name: _keep_complex(old.get(p.name), _typed(p, row.params.get(p.name)), p) for p in per_model}
        entries.append({"model": row.model, "parameters": params} if params else {"model": row.model})
    return entries


def _global_entries(state: FormState, method: MergeMethod, current_params: Any) -> dict:
    """``parameters``: what differs from the schema default, or was written in the YAML already."""
    old = current_params if isinstance(current_params, dict) else {}
    shown = state.global_params.get(method.name, {})
    params = {}
    for p in method.params:
        if p.per_model:
            continue
        if p.name == "coefficients":
            value = "nan" if state.nan.get(p.name) else "weights"  # the switch is a checkbox
        elif p.name in NAN_PARAMS:
            value = state.nan.get(p.name, p.default)
        else:
            value = shown.get(p.name, p.default)
        value = _keep_complex(old.get(p.name), _typed(p, value), p)
        if not _same(value, p.default) or p.name in old:
            params[p.name] = value
    if params.get("coefficients") != "nan":  # NAN's options mean nothing without NAN: keep the YAML short
        for key in ("nan_scope", "nan_on"):
            if key in params and params[key] == method.param(key).default:
                params.pop(key)
    return params


# --- config -> form -----------------------------------------------------------------------------------------------

def form_from_config(data: Mapping, current: FormState,
                     capacity: int = MAX_MODEL_ROWS) -> tuple[FormState, list[str]]:
    """The state the form shows for ``data``, and notes on what it cannot show (kept in the YAML all the same).

    What the config does not say comes from ``current``: an unknown method keeps the form's, the other methods'
    groups keep their values. Rows are filled in order from ``models``; the rest are emptied, with the schema
    defaults in their parameters.
    """
    notes: list[str] = []
    name = data.get("merge_method")
    method = (REGISTRY.get(name) if isinstance(name, str) else None) or REGISTRY[current.method]
    entries = [m for m in (data.get("models") if isinstance(data.get("models"), list) else []) if isinstance(m, dict)]
    if len(entries) > capacity:
        notes.append(f"{len(entries)} models: the form shows the first {capacity}; the YAML keeps all")
    if data.get("slices"):
        notes.append("`slices` are kept in the YAML; the form shows only `models`")
    rows = [_row_from_entry(i, entries[i] if i < len(entries) else {}, current, method, notes)
            for i in range(max(len(current.models), min(len(entries), capacity)))]
    gparams = data.get("parameters") if isinstance(data.get("parameters"), dict) else {}
    global_params = copy.deepcopy(current.global_params)
    shown = global_params.setdefault(method.name, {})
    for p in global_form_params(method):
        value = p.normalized(gparams.get(p.name, p.default))  # mergekit's `rescale: true` is the form's `l1`
        if p.type is list:
            value = ", ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value or "")
        elif not _is_scalar(value):
            notes.append(f"`{p.name}` uses per-layer values or filters (kept; edit it in the YAML)")
            value = p.default
        shown[p.name] = value
    nan = dict(current.nan, coefficients=gparams.get("coefficients") == "nan")
    nan.update({key: gparams[key] for key in NAN_PARAMS[1:] if isinstance(gparams.get(key), str)})
    out_dtype = data.get("out_dtype") or data.get("dtype")
    state = FormState(method=method.name, base=str(data.get("base_model") or ""), models=rows,
                      global_params=global_params, nan=nan,
                      out_dtype=out_dtype if out_dtype in DTYPE_CHOICES else DTYPE_AS_BASE,
                      seed=int(data["seed"]) if isinstance(data.get("seed"), int) else 0,
                      allow_vocab_mismatch=bool(data.get("allow_vocab_mismatch")))
    return state, notes


def _row_from_entry(i: int, entry: dict, current: FormState, method: MergeMethod, notes: list[str]) -> ModelRow:
    """Row ``i`` for one ``models`` entry: the method's parameters from the entry or their defaults; fields of other
    methods keep the row's current value unless the entry sets them."""
    params_by_name = {p.name: p for p in method.params}
    params = dict(current.models[i].params) if i < len(current.models) else {}
    given = entry.get("parameters") if isinstance(entry.get("parameters"), dict) else {}
    for name in sorted(per_model_params()):
        p = params_by_name.get(name)
        value = given.get(name, p.default if p else None)
        if not _is_scalar(value):
            notes.append(f"models[{i}].{name} uses per-layer values or filters (kept; edit them in the YAML)")
            value = p.default if p else None
        if value is not None:
            params[name] = value
    return ModelRow(str(entry.get("model") or ""), params)


def apply_preset(state: FormState, label: str | None) -> FormState | None:
    """A copy of the state with the preset ``label`` of its method applied (per-model values in every row, the
    rest in the method's group), or None when the method has no such preset."""
    method = REGISTRY[state.method]
    chosen = presets_for(method).get(label or "")
    if not chosen:
        return None
    out = copy.deepcopy(state)
    for name, value in chosen.items():
        if method.param(name).per_model:
            for row in out.models:
                row.params[name] = value
        else:
            out.global_params.setdefault(method.name, {})[name] = value
    return out


# --- what depends on the method -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class FieldView:
    visible: bool
    label: str


@dataclass(frozen=True)
class FormView:
    """How the form shows a state: the method's group and summary, its presets, the NAN row, the base's label,
    which model rows show, and how each per-model field shows (the same in every row)."""

    method: str
    summary: str
    preset_choices: tuple[str, ...]
    nan_visible: bool
    base_label: str
    rows_visible: tuple[bool, ...]
    model_fields: dict[str, FieldView]
    count_note: str = ""  # next to the model list: the method's model count, when the list does not fit it
    keep_first: int | None = None  # offer "keep the first N" (the method takes at most N, more are listed)


def form_view(state: FormState) -> FormView:
    method = REGISTRY.get(state.method) or next(iter(REGISTRY.values()))
    per_model = {p.name for p in method.params if p.per_model}
    nan_on = bool(state.nan.get("coefficients"))
    # Rows appear as they fill (the first empty one shows); past a method's most models only filled rows show.
    last_filled = max((i for i, row in enumerate(state.models) if row.model), default=-1)
    limit = method.max_models or math.inf
    rows_visible = tuple(i <= last_filled + 1 and (i < limit or bool(row.model)) for i, row in enumerate(state.models))
    fields = {name: FieldView(name in per_model, f"{name} (NAN replaces it)" if name == "weight" and nan_on else name)
              for name in sorted(per_model_params())}
    note, keep = count_note(method, sum(1 for row in state.models if row.model))
    return FormView(method.name, method_markdown(method), tuple(presets_for(method)),
                    "coefficients" in {p.name for p in method.params}, BASE_LABELS[method.base], rows_visible, fields,
                    note, keep)


def count_note(method: MergeMethod, filled: int) -> tuple[str, int | None]:
    """What the model list says when ``filled`` models do not fit the method's count, and the N of "keep the first
    N" when there are too many."""
    low, high = method.min_models, method.max_models
    if low == high:
        wanted = f"exactly {low} model{'s' if low != 1 else ''}"
    elif high:
        wanted = f"{low} to {high} models"
    else:
        wanted = f"at least {low} model{'s' if low != 1 else ''}"
    listed = f"{filled} {'is' if filled == 1 else 'are'} listed"
    if high and filled > high:
        return f"**{method.name}** takes {wanted} besides the base; {listed}.", high
    if filled < low:
        return f"**{method.name}** takes {wanted} besides the base; {listed}.", None
    return "", None


def blank_row() -> ModelRow:
    """An empty model row, its parameters at the schema defaults."""
    return ModelRow("", {name: p.default for name, p in per_model_params().items()})


def remove_row(state: FormState, index: int) -> FormState:
    """A copy of the state without model row ``index``: the rows after it move up, an empty row joins at the end."""
    out = copy.deepcopy(state)
    if 0 <= index < len(out.models):
        del out.models[index]
        out.models.append(blank_row())
    return out


def keep_first(state: FormState, n: int) -> FormState:
    """A copy of the state with only its first ``n`` models (the method takes no more); the other rows emptied."""
    out = copy.deepcopy(state)
    filled = [row for row in out.models if row.model][:n]
    out.models = filled + [blank_row() for _ in range(len(out.models) - len(filled))]
    return out


def comparable(state: FormState) -> dict[str, Any]:
    """The state's fields as the page shows them, numbers rounded: equal for two states the page shows alike
    (what tells a user's edit from the echo of a value the app set itself)."""
    return {name: round(float(v), 9) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            for name, v in state.to_fields().items()}


# --- YAML and values ----------------------------------------------------------------------------------------------

def dump_yaml(config: dict) -> str:
    return yaml.safe_dump(config, sort_keys=False, default_flow_style=None, allow_unicode=True, width=1000)


def safe_mapping(text: str | None) -> dict:
    """The YAML's top-level mapping, or {} while it is not valid YAML or not a mapping (the user is typing)."""
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
    """A form value as the config holds it: a comma-separated line as a list, numbers rounded to what a field shows."""
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
        return round(float(value), 6)
    return value


def _keep_complex(old: Any, new: Any, p: Param) -> Any:
    """A per-layer list or filter list from the YAML stays while the form still shows the default in its place."""
    if p.type is not list and old is not None and not _is_scalar(old) and _same(new, p.default):
        return old
    return new
