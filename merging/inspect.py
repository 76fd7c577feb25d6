"""``inspect``: what a checkpoint holds, and how several compare to the first."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .architectures import Layers, describe_family, family, tied_partner
from .plan import CompatibilityReport
from .sources import CheckpointSource, TensorSpec, open_source, read_json_file


def describe(source: CheckpointSource) -> dict:
    specs = source.specs()
    dtypes = Counter(s.dtype for s in specs.values())
    layers = Layers.of(specs)
    cfg = read_json_file(source, "config.json")
    return {
        "label": source.label,
        "architecture": describe_family(cfg),
        "tensors": len(specs),
        "parameters": sum(s.numel for s in specs.values() if s.is_float),
        "bytes": sum(s.nbytes for s in specs.values()),
        "dtypes": dict(dtypes),
        "layers": layers.total,
        "stacks": {layers.labels[s]: n for s, n in layers.counts.items()} if len(layers.counts) > 1 else None,
    }


def compare(reference: dict[str, TensorSpec], other: dict[str, TensorSpec], label: str) -> CompatibilityReport:
    """Missing and extra tensors, shape and dtype differences of ``other`` against ``reference`` (a head a tied
    checkpoint does not store is its embedding, as a merge reads it)."""
    report = CompatibilityReport()
    for name, spec in reference.items():
        theirs = other.get(name)
        if theirs is None and tied_partner(name, other):
            theirs = other[tied_partner(name, other)]
            report.notes.append(f"{name}: tied to {tied_partner(name, other)} in {label}")
        if theirs is None:
            report.missing.append(f"{name} (in {label})")
        elif theirs.shape != spec.shape:
            report.shapes.append(f"{name}: {list(theirs.shape)} in {label} vs {list(spec.shape)}")
        elif theirs.is_float != spec.is_float:
            report.dtypes.append(f"{name}: {theirs.dtype} in {label} vs {spec.dtype}")
        elif theirs.dtype != spec.dtype:
            report.notes.append(f"{name}: {theirs.dtype} in {label} vs {spec.dtype} (converted when merged)")
    for name in other:
        if name not in reference and tied_partner(name, reference):
            report.notes.append(f"{name}: in {label}, tied to {tied_partner(name, reference)} in the first")
        elif name not in reference:
            report.extra.append(f"{name} (in {label})")
    return report


@dataclass(frozen=True)
class Inspection:
    text: str
    compatible: bool  # every checkpoint matches the first (tensors and architecture)


def inspect_checkpoints(paths: list[str], *, allow_pickle: bool = False, resolver=None) -> Inspection:
    lines = []
    sources: list[CheckpointSource] = []
    compatible = True
    try:
        for path in paths:
            src = open_source(path, allow_pickle=allow_pickle, base=sources[0] if sources else None, resolver=resolver)
            sources.append(src)
            d = describe(src)
            dtypes = ", ".join(f"{k} ×{v}" for k, v in sorted(d["dtypes"].items()))
            stacks = (" (" + ", ".join(f"{k} {v}" for k, v in d["stacks"].items()) + ")") if d["stacks"] else ""
            lines.append(f"{d['label']}: {d['architecture']}, {d['tensors']} tensors, "
                         f"{d['parameters'] / 1e6:.2f} M parameters, {d['bytes'] / 1e6:.1f} MB, {d['layers']} layers"
                         f"{stacks}, dtypes {dtypes}")
        reference = sources[0].specs() if sources else {}
        first_family = family(read_json_file(sources[0], "config.json")) if sources else None
        for src in sources[1:]:
            report = compare(reference, src.specs(), src.label)
            theirs = family(read_json_file(src, "config.json"))
            if first_family and theirs and theirs != first_family:
                report.architectures.append(f"{theirs} in {src.label} vs {first_family}")
            compatible &= report.ok
            status = "compatible" if report.ok else f"INCOMPATIBLE: {report.text()}"
            lines.append(f"{src.label} vs {sources[0].label}: {status}")
            lines += [f"  note: {n}" for n in report.notes[:5]]
    finally:
        for src in sources:
            src.close()
    return Inspection("\n".join(lines), compatible)


def inspect_paths(paths: list[str], *, allow_pickle: bool = False, resolver=None) -> str:
    return inspect_checkpoints(paths, allow_pickle=allow_pickle, resolver=resolver).text
