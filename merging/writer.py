"""Writing the merged checkpoint: sharded safetensors laid out in advance, side files, model card, atomic finish.

Because the plan knows every output tensor's name, dtype and shape before any is computed, each shard's header
is written first and each tensor goes straight to its offset when it is ready: no shard is ever buffered in
memory, tensors may finish in any order, and the disk space is reserved up front, so a full disk fails at once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from .errors import MergeError
from .safetensors_io import DTYPE_NAMES, header_bytes, tensor_bytes
from .sources.base import TensorSpec

INDEX_NAME = "model.safetensors.index.json"
_TMP_MARK = ".mergescope-tmp-"


def parse_size(text: str | int) -> int:
    """'5GB', '500MB', '1.5GiB' or a byte count → bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise MergeError(f"max shard size {text!r} is not a size like 5GB or 500MB")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit.rstrip("I")]
    size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise MergeError(f"max shard size {text!r} must be positive")
    return size


class ShardedWriter:
    """Writes planned tensors into pre-sized shards; ``write`` may be called in any order, from any thread."""

    def __init__(self, folder: Path, outputs: list[tuple[str, TensorSpec]], max_shard_size: int,
                 metadata: dict | None = None, stem: str = "model") -> None:
        self.folder = folder
        self.index_name = f"{stem}.safetensors.index.json"
        groups: list[list[tuple[str, TensorSpec]]] = [[]]
        size = 0
        for name, spec in outputs:
            if groups[-1] and size + spec.nbytes > max_shard_size:
                groups.append([])
                size = 0
            groups[-1].append((name, spec))
            size += spec.nbytes
        n = len(groups)
        self.files = ([f"{stem}.safetensors"] if n == 1
                      else [f"{stem}-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, absolute offset, spec)
        self._fds: list[int] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        meta = {"format": "pt", **(metadata or {})}
        for fname, group in zip(self.files, groups):
            head, offsets = header_bytes([(nm, sp.dtype, sp.shape) for nm, sp in group], meta)
            fd = os.open(folder / fname, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            data_size = sum(sp.nbytes for _, sp in group)
            _reserve(fd, len(head) + data_size)
            _pwrite_all(fd, memoryview(head), 0)
            for (nm, sp), off in zip(group, offsets):
                self._where[nm] = (fd, len(head) + off, sp)
                self.weight_map[nm] = fname
                self.total_size += sp.nbytes
        self._written: set[str] = set()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: list[Future] = []

    def write(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Write a whole tensor, or the band of rows starting at ``first_row``."""
        fd, offset, spec = self._where[name]
        whole = first_row == 0 and tuple(tensor.shape) == spec.shape
        fits = (tensor.dim() == len(spec.shape) and tuple(tensor.shape[1:]) == spec.shape[1:]
                and first_row + (tensor.shape[0] if tensor.dim() else 1) <= (spec.shape[0] if spec.shape else 1))
        if DTYPE_NAMES[tensor.dtype] != spec.dtype or not (whole or fits):
            raise AssertionError(f"{name}: computed {DTYPE_NAMES[tensor.dtype]}{list(tensor.shape)} "
                                 f"at row {first_row}, "
                                 f"planned {spec.dtype}{list(spec.shape)}")
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        _pwrite_all(fd, tensor_bytes(tensor), offset + first_row * row_bytes)
        if whole or first_row + tensor.shape[0] == spec.shape[0]:
            self._written.add(name)

    def write_async(self, name: str, tensor: torch.Tensor, first_row: int = 0) -> None:
        """Queue a write; at most two stay pending, so memory stays bounded while compute goes on."""
        while len(self._pending) >= 2:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(self.write, name, tensor, first_row))

    def flush(self) -> None:
        while self._pending:
            self._pending.pop(0).result()

    def finish(self) -> None:
        self.flush()
        missing = set(self._where) - self._written
        if missing:
            raise AssertionError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[0]}")
        self.close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
            (self.folder / self.index_name).write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        for fut in self._pending:
            fut.cancel()
        self._pool.shutdown(wait=True)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def _reserve(fd: int, size: int) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (28, 27):  # ENOSPC, EFBIG
            raise MergeError(f"not enough disk space for the output ({size / 1e9:.2f} GB needed): "
                             f"{exc.strerror}") from None
        os.ftruncate(fd, size)  # the filesystem cannot preallocate; write sparse


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    data = data.cast("B") if data.format != "B" else data
    while len(data):
        try:
            n = os.pwrite(fd, data, offset)
        except OSError as exc:
            if exc.errno in (28, 27):
                raise MergeError(f"disk full while writing the output: {exc.strerror}") from None
            raise
        data = data[n:]
        offset += n


class OutputFolder:
    """A temporary folder beside OUT_DIR, renamed to OUT_DIR only on success, removed on any failure.

    Temp folders left by a killed process (their pid no longer alive) are removed on the next run.
    """

    def __init__(self, out_dir: str | os.PathLike, overwrite: bool = False) -> None:
        self.out = Path(out_dir).absolute()
        self.overwrite = overwrite
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        if self.out.exists() and not self.overwrite and (self.out.is_file() or any(self.out.iterdir())):
            raise MergeError(f"{self.out}: already exists; choose a new output folder or pass --overwrite")
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MergeError(f"{self.out.parent}: cannot create the output's parent folder ({exc.strerror})") from None
        remove_stale_temp_folders(self.out)
        self.tmp = self.out.parent / f".{self.out.name}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            if self.out.exists():
                old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(self.out, old)
                os.rename(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(self.tmp, self.out)
        except OSError:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise


def remove_stale_temp_folders(out: Path) -> list[Path]:
    removed = []
    for p in out.parent.glob(f".{out.name}{_TMP_MARK}*"):
        pid = p.name.rsplit(_TMP_MARK, 1)[1].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


NON_MODEL_STEM = "merge"  # weights of an output that is not a model: merge.safetensors, which from_pretrained ignores


def write_side_files(folder: Path, plan, sources: dict, reduced) -> None:
    """Everything beside the tensors: the reference's config and generation config, the tokenizer and processor
    files (from the ``tokenizer_source`` model when one is named; a built vocabulary's files over them), the chat
    template, config.json as the plan changed it, merge_config.yml, the method's own files and the model card."""
    ref = sources[plan.reference]
    files = {name: ref.read_file(name) for name in ref.file_names()}
    if plan.side_source and plan.side_source != plan.reference:
        files = {k: v for k, v in files.items() if k in ("config.json", "generation_config.json")}
        files.update(_tokenizer_files(plan.side_source, sources))
    files.update(plan.side_files)
    if plan.config.chat_template:
        _set_chat_template(files, plan, sources)
    files.pop("config.json", None)
    for name, data in files.items():
        if data is not None:
            (folder / name).write_bytes(data)
    out_cfg = _output_config(plan, ref)
    if out_cfg is not None:
        (folder / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n")
    config_yaml = plan.config.to_yaml()
    (folder / "merge_config.yml").write_text(config_yaml)
    if plan.method.finalize is not None:
        for name, data in plan.method.finalize(plan, reduced).items():
            (folder / name).write_bytes(data)
    (folder / "README.md").write_text(model_card(config_yaml, plan.method.name, plan.method.summary, plan.method.paper,
                                                 card_inputs(plan.config.model_refs()), plan.report.notes))


def _output_config(plan, ref) -> dict | None:
    """The reference's config.json as the plan changed it, with the output dtype under the key(s) it uses:
    ``dtype`` (transformers 5) and/or ``torch_dtype`` (older), ``dtype`` when it has neither."""
    if plan.out_config is None:
        raw = ref.read_file("config.json")
        if raw is None:
            return None
        try:
            cfg = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(cfg, dict):
            return None
    else:
        cfg = dict(plan.out_config)
    dtype = plan.config.out_dtype or plan.config.dtype
    if dtype:
        for key in [k for k in ("dtype", "torch_dtype") if k in cfg] or ["dtype"]:
            cfg[key] = dtype
    return cfg


def _tokenizer_files(model: str, sources: dict) -> dict[str, bytes | None]:
    from .sources import open_source

    src = sources.get(model)
    opened = src is None
    src = src or open_source(model)
    try:
        return {n: src.read_file(n) for n in src.file_names() if n not in ("config.json", "generation_config.json")}
    finally:
        if opened:
            src.close()


def _set_chat_template(files: dict, plan, sources: dict) -> None:
    """``chat_template``: a named template, the inputs' most common one (``auto``), or the Jinja text itself, written
    as chat_template.jinja (and dropped from tokenizer_config.json, where transformers would look first)."""
    from collections import Counter

    from .config import CHAT_TEMPLATES

    choice = plan.config.chat_template
    if choice == "auto":
        found = [t for t in (_chat_template_of(sources[r]) for r in plan.config.model_refs()) if t]
        if not found:
            plan.report.notes.append("chat_template auto: no input has a chat template; none written")
            return
        template = Counter(found).most_common(1)[0][0]
    else:
        template = CHAT_TEMPLATES.get(choice, choice)
    files["chat_template.jinja"] = template.encode()
    files.pop("chat_template.json", None)
    if files.get("tokenizer_config.json"):
        try:
            cfg = json.loads(files["tokenizer_config.json"])
        except ValueError:
            return
        if isinstance(cfg, dict) and "chat_template" in cfg:
            del cfg["chat_template"]
            files["tokenizer_config.json"] = json.dumps(cfg, indent=2).encode()


def _chat_template_of(src) -> str | None:
    raw = src.read_file("chat_template.jinja")
    if raw is not None:
        return raw.decode("utf-8", "replace").strip()
    raw = src.read_file("tokenizer_config.json")
    try:
        template = json.loads(raw).get("chat_template") if raw else None
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    return template.strip() if isinstance(template, str) else None


def card_inputs(refs: list[str]) -> list[str]:
    """The inputs as a model card lists them: local paths made absolute (so that a push never mistakes
    ``checkpoints/ft_a`` for a Hub repo id), Hub ids as written; ``model+lora`` parts each so."""
    return ["+".join(os.path.abspath(p) if os.path.exists(p) else p for p in ref.split("+")) for ref in refs]


def model_card(config_yaml: str, method_name: str, method_summary: str, paper: str, inputs: list[str],
               notes: list[str]) -> str:
    """A README.md for the Hub: front matter listing every input as base_model, then what was done."""
    front = {"base_model": inputs, "library_name": "transformers", "tags": ["merge", "mergescope", method_name]}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             "# Merged model", "",
             f"This checkpoint was merged with Mergescope using **{method_name}**: "
             f"{method_summary}", "", f"Method reference: {paper}", "", "## Inputs", ""]
    lines += [f"- `{m}`" for m in inputs]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "## Configuration", "", "```yaml", config_yaml.rstrip(), "```", "",
              f"Merged on {time.strftime('%Y-%m-%d')}.", ""]
    return "\n".join(lines)
