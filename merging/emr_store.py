"""Reading EMR-Merging outputs back: an EMR merge folder opened, and one task written as an ordinary checkpoint.

An ``emr`` (or ``emr_rescale``) merge folder holds τ_uni, packed masks, per-task tensors and ``emr.json`` (see
``merging.methods.emr``). Task k is rebuilt as

    θ_k = θ_base + λ_k · (M_k ⊙ τ_uni)       (merged tensors; in float32, then the recorded dtype)
    θ_k = emr.task.<k>.<name>                 (``skip`` tensors, kept per task)
    θ_k = <name>                              (integer tensors, copied from the base at merge time)

The base is found through ``emr.json``: the absolute path recorded at merge time when the base was local (so
extraction works from any working directory), else its reference (a Hub id); ``base=`` overrides both.

The CLI (``python -m merging emr-extract`` / ``emr-info``, ``merging.emr_cli``) and the app's materialize button
both call ``extract_task``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CompatibilityError, MergeError, SourceError
from .methods.emr import FORMAT, META_FILE, PAPER, mask_name, task_tensor_name, tau_uni_name, unpack_bits
from .safetensors_io import DTYPES
from .sources import CheckpointSource, TensorSpec, open_source
from .sources.local import open_local
from .writer import OutputFolder, ShardedWriter, model_card, parse_size


@dataclass(frozen=True)
class EmrTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype of the rebuilt tensor
    kind: str  # "merged" (τ_uni + masks), "per_task" (a skip tensor) or "copied" (an integer tensor)


class EmrMerge:
    """An opened EMR output folder: its metadata and its stored tensors, read one at a time."""

    def __init__(self, folder: Path, meta: dict, source: CheckpointSource) -> None:
        self.folder = folder
        self.meta = meta
        self.source = source
        self.tasks: list[str] = [t["model"] for t in meta["tasks"]]
        self.rescalers: list[float] = [float(t["rescaler"]) for t in meta["tasks"]]
        self.tensors: list[EmrTensor] = [EmrTensor(t["name"], tuple(t["shape"]), t["dtype"], t["kind"])
                                         for t in meta["tensors"]]

    def task_index(self, task: str | int) -> int:
        """Task by model reference as written in the config, by index, by absolute path, or by unique folder
        name; an unknown task raises MergeError listing the known ones."""
        if isinstance(task, str) and task in self.tasks:
            return self.tasks.index(task)
        if isinstance(task, int) or task.isdigit():
            k = int(task)
            if 0 <= k < len(self.tasks):
                return k
        else:
            absolute = [k for k, ref in enumerate(self.tasks) if os.path.abspath(ref) == os.path.abspath(task)]
            by_name = [k for k, ref in enumerate(self.tasks) if Path(ref).name == task]
            for found in (absolute, by_name):
                if len(found) == 1:
                    return found[0]
        known = ", ".join(f"{k}: {ref}" for k, ref in enumerate(self.tasks))
        raise MergeError(f"{self.folder}: unknown task {task!r} (known tasks: {known})")

    def unified(self, name: str) -> torch.Tensor:
        """τ_uni of tensor ``name`` in float32."""
        return self.source.read(tau_uni_name(name)).to(torch.float32)

    def mask(self, task: int, name: str) -> torch.Tensor:
        """Task ``task``'s mask M of tensor ``name``, as bool in the tensor's shape."""
        shape = self._tensor(name).shape
        return unpack_bits(self.source.read(mask_name(task, name)), shape)

    def task_vector(self, task: int, name: str) -> torch.Tensor:
        """λ_k · (M_k ⊙ τ_uni) of a merged tensor, float32."""
        unified = self.unified(name)
        return self.rescalers[task] * torch.where(self.mask(task, name), unified, torch.zeros_like(unified))

    def base_reference(self) -> str:
        """Where the base is: the recorded absolute path when it still exists, else the Hub reference."""
        path, ref = self.meta.get("base_path"), self.meta.get("base_model")
        if path and os.path.exists(path):
            return path
        if ref and path == ref and not os.path.isabs(ref):
            return ref  # not a local path at merge time: a Hub id, opened through the resolver
        raise SourceError(f"{self.folder}: the base recorded in {META_FILE} ({path or ref}) does not exist here; "
                          "pass --base PATH")

    def _tensor(self, name: str) -> EmrTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise MergeError(f"{self.folder}: no tensor {name!r} in {META_FILE}")

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> EmrMerge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_emr(merged_dir: str | os.PathLike) -> EmrMerge:
    """Open an EMR merge output folder (``emr.json`` plus its safetensors); close it when done."""
    folder = Path(merged_dir)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise MergeError(f"{folder}: not an EMR merge output (no {META_FILE}; merge with `merge_method: emr`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise MergeError(f"{meta_path}: not valid JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MergeError(f"{meta_path}: not a Mergescope EMR description (format {FORMAT!r} expected)")
    return EmrMerge(folder, meta, open_local(str(folder)))


@dataclass(frozen=True)
class ExtractResult:
    out_dir: Path
    task: int
    model: str
    rescaler: float
    base: str
    tensors: int
    bytes_written: int


def extract_task(merged_dir: str | os.PathLike, task: str | int, out_dir: str | os.PathLike, *,
                 base: str | None = None, overwrite: bool = False, max_shard_size: str | int = "5GB",
                 resolver=None) -> ExtractResult:
    """Write task ``task`` of an EMR merge as an ordinary checkpoint θ_base + λ_k · (M_k ⊙ τ_uni) in ``out_dir``,
    with the base's config and tokenizer files; ``out_dir`` appears only when everything was written."""
    with load_emr(merged_dir) as emr:
        k = emr.task_index(task)
        base_ref = base or emr.base_reference()
        base_src = open_source(base_ref, resolver=resolver)
        try:
            _check_base(emr, base_src, base_ref)
            outputs = [(t.name, TensorSpec(t.dtype, t.shape)) for t in emr.tensors]
            with OutputFolder(out_dir, overwrite) as tmp:
                writer = ShardedWriter(tmp, outputs, parse_size(max_shard_size))
                try:
                    for t in emr.tensors:
                        writer.write_async(t.name, _rebuild(emr, base_src, k, t).to(DTYPES[t.dtype]))
                    writer.finish()
                finally:
                    writer.close()
                _write_side_files(tmp, emr, base_src, base_ref, k)
            return ExtractResult(Path(out_dir).absolute(), k, emr.tasks[k], emr.rescalers[k], base_ref,
                                 len(outputs), writer.total_size)
        finally:
            base_src.close()


def _rebuild(emr: EmrMerge, base: CheckpointSource, k: int, t: EmrTensor) -> torch.Tensor:
    if t.kind == "merged":
        return base.read(t.name).to(torch.float32) + emr.task_vector(k, t.name)
    if t.kind == "per_task":
        return emr.source.read(task_tensor_name(k, t.name))
    return emr.source.read(t.name)


def _check_base(emr: EmrMerge, base: CheckpointSource, base_ref: str) -> None:
    specs = base.specs()
    problems = []
    for t in emr.tensors:
        if t.kind != "merged":
            continue
        spec = specs.get(t.name)
        if spec is None:
            problems.append(f"{t.name} missing")
        elif tuple(spec.shape) != t.shape:
            problems.append(f"{t.name}: {list(spec.shape)} vs {list(t.shape)}")
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CompatibilityError(f"{base_ref}: not the base of {emr.folder} ({'; '.join(problems[:5])}{more})")


def _write_side_files(folder: Path, emr: EmrMerge, base: CheckpointSource, base_ref: str, k: int) -> None:
    """The base's config and tokenizer files (config.json as the merge wrote it: its dtype) and a model card."""
    for name in base.file_names():
        data = base.read_file(name)
        if data is not None:
            (folder / name).write_bytes(data)
    merged_config = emr.folder / "config.json"
    if merged_config.is_file():
        (folder / "config.json").write_bytes(merged_config.read_bytes())
    config_file = emr.folder / "merge_config.yml"
    config_yaml = config_file.read_text(encoding="utf-8") if config_file.is_file() else ""
    summary = (f"task {k} (`{emr.tasks[k]}`) rebuilt from an EMR merge as θ_base + λ·(M ⊙ τ_uni), "
               f"λ = {emr.rescalers[k]:.6g}, the base `{base_ref}`.")
    (folder / "README.md").write_text(model_card(config_yaml, emr.meta.get("method", "emr"), summary, PAPER,
                                                 [base_ref, emr.tasks[k]], []))


def describe(emr: EmrMerge) -> str:
    """The tasks, their rescalers and mask densities, and the storage against N checkpoints, as text."""
    s = emr.meta["storage"]
    lines = [f"{emr.folder}: {emr.meta['method']} (τ_uni by {emr.meta['unify']}, rescaler {emr.meta['rescaler']}), "
             f"base {emr.meta.get('base_path') or emr.meta.get('base_model')}"]
    for t in emr.meta["tasks"]:
        lines.append(f"  task {t['index']}: {t['model']}  λ = {t['rescaler']:.6g}  "
                     f"mask density {t['mask_density']:.3f}")
    lines.append(f"  stored: τ_uni {s['unified_task_vector_bytes']:,} B + modulators {s['modulator_bytes']:,} B "
                 f"(masks {s['mask_bytes']:,}, rescalers {s['rescaler_bytes']}, per-task tensors "
                 f"{s['per_task_tensor_bytes']:,}) + copied {s['shared_copied_bytes']:,} B "
                 f"= {s['emr_total_bytes']:,} B")
    ratio = s["emr_to_n_checkpoints"]
    lines.append(f"  vs {s['tasks']} checkpoints: {s['n_checkpoints_bytes']:,} B"
                 + (f" ({ratio:.1%})" if ratio is not None else "") + "; the base is referenced, not stored")
    return "\n".join(lines)
