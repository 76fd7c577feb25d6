"""The plan: every output tensor with its inputs and parameters, checked before anything is read or written.

The compatibility check is part of planning: every input tensor a task needs must exist with the reference's
shape; tensors that no task uses are reported too. All problems go into one grouped report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .config import MergeConfig, input_entries
from .errors import CompatibilityError, ConfigError
from .methods.registry import MergeMethod, get_method
from .params import resolve
from .sources import CheckpointSource, TensorSpec, read_json_file

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_VOCAB_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "output.weight")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    """The block index in a tensor name (``model.layers.7.mlp...`` → 7), or None outside the blocks."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def with_layer_index(name: str, index: int) -> str:
    m = _LAYER.search(name)
    assert m is not None
    return name[: m.start(1)] + str(index) + name[m.end(1):]


@dataclass(frozen=True)
class TensorRef:
    model: str  # the model reference as written in the config
    name: str


@dataclass
class TensorTask:
    """One output tensor: merged from ``inputs`` (and ``base``) by the method, or copied from ``base``."""

    name: str
    spec: TensorSpec  # output dtype and shape
    base: TensorRef | None
    inputs: list[TensorRef]
    params: dict[str, Any] = field(default_factory=dict)
    copy: bool = False  # integer buffers and passthrough: taken verbatim from base
    shared_rows: int | None = None  # vocabulary mismatch: merge only these leading rows, keep the base's rest

    @property
    def model_names(self) -> tuple[str, ...]:
        return tuple(r.model for r in self.inputs)


@dataclass
class CompatibilityReport:
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems: vocabulary handling, dtype conversions

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.shapes or self.dtypes)

    def groups(self) -> dict[str, list[str]]:
        return {"missing tensors": self.missing, "extra tensors": self.extra, "shape mismatches": self.shapes,
                "dtype mismatches": self.dtypes}

    def text(self, limit: int = 8) -> str:
        parts = []
        for title, items in self.groups().items():
            if items:
                shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
                parts.append(f"{title} ({len(items)}): {shown}")
        return " | ".join(parts)

    def to_dict(self) -> dict:
        return {**{k.replace(" ", "_"): v for k, v in self.groups().items()}, "notes": self.notes, "ok": self.ok}


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    reference: str  # the model whose names, side files and non-float tensors the output follows
    tasks: list[TensorTask]
    report: CompatibilityReport
    num_layers: int | None
    out_config: dict | None  # config.json for the output (layer count updated for slices)

    def require_compatible(self) -> None:
        if not self.report.ok:
            raise CompatibilityError(f"inputs do not match {self.reference}: {self.report.text()}")

    @property
    def total_bytes_out(self) -> int:
        return sum(t.spec.nbytes for t in self.tasks)


def build_plan(config: MergeConfig, sources: dict[str, CheckpointSource]) -> MergePlan:
    """Plan a merge from already-opened sources (keyed by the config's model references)."""
    method = get_method(config.merge_method)
    if config.slices:
        return _plan_slices(config, method, sources)
    entries = input_entries(config, method)
    reference = config.base_model or entries[0].model
    ref_specs = sources[reference].specs()
    ref_cfg = read_json_file(sources[reference], "config.json")
    num_layers = _num_layers(ref_cfg, ref_specs)
    report = CompatibilityReport()
    input_specs = {e.model: sources[e.model].specs() for e in entries}
    model_params = [e.parameters for e in entries]
    base = config.base_model if method.base != "none" else None
    tasks = []
    for name, spec in ref_specs.items():
        out_spec = _output_spec(spec, config)
        if not spec.is_float:
            tasks.append(TensorTask(name, out_spec, TensorRef(reference, name), [], copy=True))
            continue
        task = TensorTask(name, out_spec, TensorRef(base, name) if base else None,
                          [TensorRef(e.model, name) for e in entries],
                          resolve(method, config.parameters, model_params, name, _depth(name, num_layers)))
        for e in entries:
            _check_input(task, spec, input_specs[e.model].get(name), e.model, config, report)
        tasks.append(task)
    for model, specs in input_specs.items():
        report.extra += [f"{name} (in {model})" for name in specs if name not in ref_specs]
    _validate_tasks(method, tasks)
    return MergePlan(config, method, reference, tasks, report, num_layers, ref_cfg)


def _plan_slices(config: MergeConfig, method: MergeMethod, sources: dict[str, CheckpointSource]) -> MergePlan:
    first = config.slices[0].sources
    base_in_first = config.base_model and any(s.model == config.base_model for s in first)
    reference = config.base_model if base_in_first else first[0].model
    ref_specs = sources[reference].specs()
    ref_cfg = read_json_file(sources[reference], "config.json")
    report = CompatibilityReport()
    tasks: list[TensorTask] = []
    passthrough = method.name == "passthrough"
    templates = [n for n in ref_specs if layer_index(n) is not None and layer_index(n) == min(
        layer_index(m) for m in ref_specs if layer_index(m) is not None)]

    def add_task(out_name: str, slice_sources, in_of, t: float) -> None:
        lead = slice_sources[0]
        lead_spec = sources[lead.model].specs().get(in_of(lead))
        if lead_spec is None:
            report.missing.append(f"{in_of(lead)} (in {lead.model})")
            return
        out_spec = _output_spec(lead_spec, config)
        if passthrough and lead_spec.is_float:
            params = resolve(method, config.parameters, [lead.parameters], out_name, t)
            if params.get("scale", [None])[0] is not None:  # mergekit's `scale`: computed, not copied
                tasks.append(TensorTask(out_name, out_spec, None, [TensorRef(lead.model, in_of(lead))], params))
                return
        if passthrough or not lead_spec.is_float:
            tasks.append(TensorTask(out_name, out_spec, TensorRef(lead.model, in_of(lead)), [], copy=True))
            return
        base_src = next((s for s in slice_sources if s.model == config.base_model), None)
        others = [s for s in slice_sources if s is not base_src] if method.base == "required" else list(slice_sources)
        params = resolve(method, config.parameters, [s.parameters for s in others], out_name, t)
        task = TensorTask(out_name, out_spec, TensorRef(base_src.model, in_of(base_src)) if base_src else None,
                          [TensorRef(s.model, in_of(s)) for s in others], params)
        for s in slice_sources:
            _check_input(task, lead_spec, sources[s.model].specs().get(in_of(s)), s.model, config, report,
                         name=in_of(s))
        tasks.append(task)

    non_layer = [n for n in ref_specs if layer_index(n) is None]
    pre = [n for n in non_layer if any(h in n for h in ("embed", "wte", "wpe", "patch", "cls_token", "pos_"))]
    post = [n for n in non_layer if n not in pre]
    for name in pre:
        add_task(name, first, lambda s, n=name: n, 0.0)
    out_layer = 0
    for sl in config.slices:
        start = sl.sources[0].layer_range[0]
        length = sl.sources[0].layer_range[1] - start
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for template in templates:
                out_name = with_layer_index(template, out_layer)
                add_task(out_name, sl.sources,
                         lambda s, tpl=template, i=idx: with_layer_index(tpl, s.layer_range[0] + i), t)
            out_layer += 1
        if not templates:
            raise ConfigError(f"config: slices need layered tensors, but {reference} has no `layers.N.` names")
    for name in post:
        add_task(name, config.slices[-1].sources, lambda s, n=name: n, 0.0)
    out_cfg = dict(ref_cfg) if ref_cfg else None
    if out_cfg is not None:
        for key in _LAYER_COUNT_KEYS:
            if key in out_cfg:
                out_cfg[key] = out_layer
    _validate_tasks(method, tasks)
    return MergePlan(config, method, reference, tasks, report, out_layer, out_cfg)


def _validate_tasks(method: MergeMethod, tasks: list[TensorTask]) -> None:
    """The method's cross-parameter rules on each tensor's resolved values, before any tensor is read (the config's
    validation checked them at probe points; per-layer lists and filters are exact only here)."""
    if method.validate is None:
        return
    checked: set[str] = set()
    for task in tasks:
        key = repr(sorted(task.params.items()))
        if not task.copy and key not in checked:
            checked.add(key)
            method.validate(task.params, task.name)


def _check_input(task: TensorTask, ref: TensorSpec, spec: TensorSpec | None, model: str, config: MergeConfig,
                 report: CompatibilityReport, name: str | None = None) -> None:
    name = name or task.name
    if spec is None:
        report.missing.append(f"{name} (in {model})")
        return
    if not spec.is_float:
        report.dtypes.append(f"{name}: {spec.dtype} in {model}, a float in the reference")
        return
    if spec.shape == ref.shape:
        return
    if (config.allow_vocab_mismatch and any(h in name for h in _VOCAB_HINTS) and len(spec.shape) == len(ref.shape)
            and spec.shape[1:] == ref.shape[1:]):
        rows = min(spec.shape[0], ref.shape[0], task.shared_rows or ref.shape[0])
        task.shared_rows = rows
        note = f"{name}: {model} has {spec.shape[0]} rows, the reference {ref.shape[0]}; the first {rows} are merged"
        if rows < ref.shape[0]:
            note += f" and the reference's last {ref.shape[0] - rows} kept"
        report.notes.append(note)
        return
    report.shapes.append(f"{name}: {list(spec.shape)} in {model} vs {list(ref.shape)}")


def _output_spec(spec: TensorSpec, config: MergeConfig) -> TensorSpec:
    if spec.is_float and config.output_dtype:
        return TensorSpec(config.output_dtype, spec.shape)
    return spec


def _depth(name: str, num_layers: int | None) -> float:
    """mergekit's ``t`` for anchors: layer / (layers - 1) inside the blocks, 0 outside them."""
    idx = layer_index(name)
    if idx is None or not num_layers:
        return 0.0
    return idx / (num_layers - 1) if num_layers > 1 else 1.0


def _num_layers(cfg: dict | None, specs: dict[str, TensorSpec]) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        if cfg and isinstance(cfg.get(key), int):
            return cfg[key]
    indices = {layer_index(n) for n in specs} - {None}
    return max(indices) + 1 if indices else None
