"""Pre-flight: what a merge would read, write, need and take, from safetensors headers alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import MergeConfig, parse_config
from ..sources import CheckpointSource, open_sources
from ..sources.readahead import window_bytes
from .resolver import hub_resolver


@dataclass
class ModelSummary:
    ref: str
    location: str  # "hub" or "local"
    commit: str | None
    files: dict[str, int]  # weight file -> size in bytes (Hub inputs)
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), from the headers
    parameters: int
    bytes: int


@dataclass
class Preflight:
    """What a merge would do and cost, learned from headers alone."""

    method: str
    models: list[ModelSummary]
    compatible: bool
    report: dict
    report_text: str
    tensors_out: int
    bytes_to_read: int  # tensor bytes the merge reads, every pass included
    bytes_to_read_by_model: dict[str, int]
    bytes_from_hub: int
    output_bytes: int
    disk_needed: int
    peak_memory: int
    est_seconds: float
    header_bytes: int  # network bytes this pre-flight used (headers, config)
    assumptions: str

    def to_dict(self) -> dict:
        d = asdict(self)
        for m in d["models"]:
            m["tensors"] = {n: {"dtype": dt, "shape": list(sh)} for n, (dt, sh) in m["tensors"].items()}
        return d

    def text(self) -> str:
        gb = 1e9
        lines = [f"method {self.method}: {self.tensors_out} output tensors, "
                 + ("compatible" if self.compatible else f"INCOMPATIBLE: {self.report_text}")]
        for m in self.models:
            lines.append(f"  {m.ref} ({m.location}{', commit ' + m.commit[:10] if m.commit else ''}): "
                         f"{len(m.tensors)} tensors, {m.parameters / 1e6:.1f} M parameters, {m.bytes / gb:.3f} GB")
        lines.append(f"reads {self.bytes_to_read / gb:.3f} GB ({self.bytes_from_hub / gb:.3f} GB from the Hub); "
                     f"writes {self.output_bytes / gb:.3f} GB; disk needed {self.disk_needed / gb:.3f} GB; "
                     f"peak memory about {self.peak_memory / gb:.3f} GB; about {self.est_seconds:.0f} s")
        lines.append(f"({self.assumptions})")
        return "\n".join(lines)


def preflight(config: MergeConfig | str, token: str | None = None, *, endpoint: str | None = None,
              cache: bool = False, allow_pickle: bool = False, resolver: Callable | None = None,
              network_bytes_per_s: float = 100e6, disk_read_bytes_per_s: float = 1e9,
              disk_write_bytes_per_s: float = 500e6, elements_per_s: float = 300e6) -> Preflight:
    """Check a merge and estimate its cost without downloading weights: only safetensors headers are read.

    The plan and compatibility report are the engine's own (``build_plan``) on header-only sources. Estimates:
      bytes read   = Σ over tasks of the stored bytes of every input it reads (twice for tensors in a reduction pass)
      disk         = output tensors + side files (+ the Hub inputs themselves when ``cache=True``)
      peak memory  ≈ 2 × the largest task's stored inputs (current + prefetched)
                     + its float32 working set (inputs, base, result, one temporary) + 3 output tensors in flight
      time         ≈ max(network + disk reads, compute) + writes, with the rates given as arguments.
    """
    from ..methods.registry import get_method
    from ..plan import build_plan
    from ..sources.hub import HubCheckpoint

    if isinstance(config, str):
        config = parse_config(config)
    resolver = resolver or hub_resolver(token, cache=False, endpoint=endpoint)
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        plan = build_plan(config, sources)
        method = get_method(config.merge_method)
        reduce_pass = (method.reduce is not None and (method.reduce_needed is None or method.reduce_needed(plan))
                       and not method.reduce_after_merge)
        by_model: dict[str, int] = {ref: 0 for ref in sources}
        specs = {ref: src.specs() for ref, src in sources.items()}
        peak_stored = peak_f32 = peak_out = 0
        elements = 0
        for task in plan.tasks:
            refs = ([task.base] if task.base else []) + list(task.inputs)
            passes = 2 if reduce_pass and not task.copy else 1
            stored = 0
            for r in refs:
                spec = specs[r.model].get(r.name)
                if spec is not None:
                    by_model[r.model] += spec.nbytes * passes
                    stored += spec.nbytes
            numel = task.spec.numel
            peak_stored = max(peak_stored, stored)
            peak_out = max(peak_out, task.spec.nbytes)
            if not task.copy:
                peak_f32 = max(peak_f32, numel * 4 * (len(refs) + 2))
                elements += numel * len(refs) * passes
        hub_refs = {ref for ref, src in sources.items() if isinstance(src, HubCheckpoint)}
        from_hub = sum(n for ref, n in by_model.items() if ref in hub_refs)
        total_read = sum(by_model.values())
        output = plan.total_bytes_out
        ref_src = sources[plan.reference]
        side = sum(getattr(ref_src, "side_sizes", {}).values()) or _local_side_bytes(ref_src)
        hub_files = sum(sum(src.weight_files().values()) for ref, src in sources.items() if ref in hub_refs)
        disk = output + side + (hub_files if cache else 0)
        peak = 2 * peak_stored + peak_f32 + 3 * peak_out + (min(window_bytes(), from_hub) if from_hub else 0)
        read_s = from_hub / network_bytes_per_s + (total_read - from_hub) / disk_read_bytes_per_s
        est = max(read_s, elements / elements_per_s) + output / disk_write_bytes_per_s
        models = [_summary(ref, src) for ref, src in sources.items()]
        header_bytes = sum(src.network_bytes() for src in sources.values() if isinstance(src, HubCheckpoint))
        return Preflight(
            method=method.name, models=models, compatible=plan.report.ok, report=plan.report.to_dict(),
            report_text=plan.report.text(), tensors_out=len(plan.tasks), bytes_to_read=total_read,
            bytes_to_read_by_model=by_model, bytes_from_hub=from_hub, output_bytes=output, disk_needed=disk,
            peak_memory=peak, est_seconds=est, header_bytes=header_bytes,
            assumptions=(f"network {network_bytes_per_s / 1e6:.0f} MB/s, disk read {disk_read_bytes_per_s / 1e6:.0f}"
                         f" MB/s, write {disk_write_bytes_per_s / 1e6:.0f} MB/s, {elements_per_s / 1e6:.0f} M "
                         "input elements/s of compute; reads overlap compute"))
    finally:
        for src in sources.values():
            src.close()


def _summary(ref: str, src: CheckpointSource) -> ModelSummary:
    from ..sources.hub import HubCheckpoint

    specs = src.specs()
    hub = isinstance(src, HubCheckpoint)
    return ModelSummary(ref=ref, location="hub" if hub else "local", commit=src.commit if hub else None,
                        files=src.weight_files() if hub else {},
                        tensors={n: (s.dtype, s.shape) for n, s in specs.items()},
                        parameters=sum(s.numel for s in specs.values() if s.is_float),
                        bytes=sum(s.nbytes for s in specs.values()))


def _local_side_bytes(src: CheckpointSource) -> int:
    path = Path(getattr(src, "label", ""))
    if not path.is_dir():
        return 0
    return sum((path / name).stat().st_size for name in src.file_names() if (path / name).is_file())


# ----------------------------------------------------------------------------------------------------------------
