"""What a plan is made of: tensor tasks and their references, the compatibility report, and the ``Planner`` the
parts of a plan share (``merging.plan`` for whole models and modules, ``merging.slices`` for layer ranges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .architectures import Layers, tied_partner
from .config import MergeConfig
from .methods.registry import MergeMethod
from .sources import CheckpointSource, TensorSpec

_VOCAB_HINTS = ("embed", "lm_head", "wte", "word_embeddings", "output.weight", "shared.weight")


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
    architectures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # not problems: vocabulary handling, dtype conversions

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.shapes or self.dtypes or self.architectures)

    def groups(self) -> dict[str, list[str]]:
        return {"architecture mismatches": self.architectures, "missing tensors": self.missing,
                "extra tensors": self.extra, "shape mismatches": self.shapes, "dtype mismatches": self.dtypes}

    def text(self, limit: int = 8) -> str:
        parts_ = []
        for title, items in self.groups().items():
            if items:
                shown = "; ".join(items[:limit]) + (f"; and {len(items) - limit} more" if len(items) > limit else "")
                parts_.append(f"{title} ({len(items)}): {shown}")
        return " | ".join(parts_)

    def to_dict(self) -> dict:
        return {**{k.replace(" ", "_"): v for k, v in self.groups().items()}, "notes": self.notes, "ok": self.ok}


@dataclass
class Planner:
    """What every part of a plan shares: the config, the method, the opened sources, the reference, the report."""

    config: MergeConfig
    method: MergeMethod
    sources: dict[str, CheckpointSource]
    reference: str
    report: CompatibilityReport
    layers: Layers
    untied: set[str] = field(default_factory=set)  # tied heads the output writes as tensors of their own
    layer_counts: dict[str, int] = field(default_factory=dict)  # output blocks per stack, when slices change them

    def specs(self, model: str) -> dict[str, TensorSpec]:
        return self.sources[model].specs()

    def output_spec(self, spec: TensorSpec) -> TensorSpec:
        if spec.is_float and self.config.output_dtype:
            return TensorSpec(self.config.output_dtype, spec.shape)
        return spec

    def input_name(self, model: str, name: str) -> str:
        """The name ``model`` holds ``name`` under: itself, or the embedding a tied head stands for."""
        specs = self.specs(model)
        if name in specs:
            return name
        alt = tied_partner(name, specs)
        if alt is not None:
            self.report.notes.append(f"{model}: `{name}` read as its tied `{alt}`")
            return alt
        return name

    def check_input(self, task: TensorTask, ref: TensorSpec, model: str, name: str) -> None:
        spec = self.specs(model).get(name)
        if spec is None:
            self.report.missing.append(f"{name} (in {model})")
            return
        if not spec.is_float:
            self.report.dtypes.append(f"{name}: {spec.dtype} in {model}, a float in the reference")
            return
        if spec.shape == ref.shape:
            return
        if (self.config.allow_vocab_mismatch and any(h in name for h in _VOCAB_HINTS)
                and len(spec.shape) == len(ref.shape) and spec.shape[1:] == ref.shape[1:]):
            rows = min(spec.shape[0], ref.shape[0], task.shared_rows or ref.shape[0])
            task.shared_rows = rows
            note = (f"{name}: {model} has {spec.shape[0]} rows, the reference {ref.shape[0]}; the first {rows} "
                    "are merged")
            if rows < ref.shape[0]:
                note += f" and the reference's last {ref.shape[0] - rows} kept"
            self.report.notes.append(note)
            return
        self.report.shapes.append(f"{name}: {list(spec.shape)} in {model} vs {list(ref.shape)}")
