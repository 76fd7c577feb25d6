"""``inspect``: what a checkpoint holds, and how several compare to the first."""

from __future__ import annotations

from collections import Counter

from .plan import CompatibilityReport, layer_index
from .sources import CheckpointSource, TensorSpec, open_source


def describe(source: CheckpointSource) -> dict:
    specs = source.specs()
    dtypes = Counter(s.dtype for s in specs.values())
    layers = {layer_index(n) for n in specs} - {None}
    return {
        "label": source.label,
        "tensors": len(specs),
        "parameters": sum(s.numel for s in specs.values() if s.is_float),
        "bytes": sum(s.nbytes for s in specs.values()),
        "dtypes": dict(dtypes),
        "layers": len(layers),
    }


def compare(reference: dict[str, TensorSpec], other: dict[str, TensorSpec], label: str) -> CompatibilityReport:
    """Missing and extra tensors, shape and dtype differences of ``other`` against ``reference``."""
    report = CompatibilityReport()
    for name, spec in reference.items():
        theirs = other.get(name)
        if theirs is None:
            report.missing.append(f"{name} (in {label})")
        elif theirs.shape != spec.shape:
            report.shapes.append(f"{name}: {list(theirs.shape)} in {label} vs {list(spec.shape)}")
        elif theirs.is_float != spec.is_float:
            report.dtypes.append(f"{name}: {theirs.dtype} in {label} vs {spec.dtype}")
        elif theirs.dtype != spec.dtype:
            report.notes.append(f"{name}: {theirs.dtype} in {label} vs {spec.dtype} (converted when merged)")
    report.extra += [f"{name} (in {label})" for name in other if name not in reference]
    return report


def inspect_paths(paths: list[str], *, allow_pickle: bool = False, resolver=None) -> str:
    lines = []
    sources = []
    try:
        for path in paths:
            src = open_source(path, allow_pickle=allow_pickle, base=sources[0] if sources else None, resolver=resolver)
            sources.append(src)
            d = describe(src)
            dtypes = ", ".join(f"{k} ×{v}" for k, v in sorted(d["dtypes"].items()))
            lines.append(f"{d['label']}: {d['tensors']} tensors, {d['parameters'] / 1e6:.2f} M parameters, "
                         f"{d['bytes'] / 1e6:.1f} MB, {d['layers']} layers, dtypes {dtypes}")
        reference = sources[0].specs() if sources else {}
        for src in sources[1:]:
            report = compare(reference, src.specs(), src.label)
            status = "compatible" if report.ok else f"INCOMPATIBLE: {report.text()}"
            lines.append(f"{src.label} vs {sources[0].label}: {status}")
            lines += [f"  note: {n}" for n in report.notes[:5]]
    finally:
        for src in sources:
            src.close()
    return "\n".join(lines)
