"""What a check compares and on what: the merged folder and its inputs (resolved offline), the held text, the
prompts, and each checkpoint's size from its safetensors headers (no weights read)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SourceError

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "eval"
HELD_FILES = ("prose.txt", "code.txt")  # the built-in held text: these, joined by a blank line
PROMPTS_FILE = "prompts.txt"
ZOO_TYPES = ("digit_vit", "digit_mlp")
MAX_TEXT_BYTES = 4 * 1024 * 1024


@dataclass
class Candidate:
    """One row of the report: the merged model or one of the models it is compared with."""

    label: str  # short and unique: "merged", "base", the input's folder or repo name
    ref: str  # as the user (or merge_config.yml) wrote it
    role: str  # "merged" | "base" | "input"
    folder: Path | None  # None: not available offline (``skipped`` says why)
    skipped: str = ""
    parameters: int | None = None
    dtypes: dict[str, int] = field(default_factory=dict)  # safetensors dtype -> elements

    @property
    def dtype(self) -> str:
        """The dtype of most of its floating-point elements (``F32``, ``BF16`` ...), or '' when unknown."""
        floats = {k: v for k, v in self.dtypes.items() if k in ("F32", "F16", "BF16", "F64")} or self.dtypes
        return max(floats, key=floats.get) if floats else ""


def builtin_text() -> tuple[str, str]:
    parts = [(ASSETS / name).read_text(encoding="utf-8") for name in HELD_FILES]
    return "\n\n".join(p.strip("\n") for p in parts) + "\n", "built-in (assets/eval: prose.txt + code.txt)"


def read_text(path: str | os.PathLike | None, flag: str = "--text") -> tuple[str, str]:
    """The held text and where it came from: ``path``, or the built-in sample."""
    if path is None:
        return builtin_text()
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{flag} {path}: no such file")
    if p.stat().st_size > MAX_TEXT_BYTES:
        raise SourceError(f"{flag} {path}: larger than {MAX_TEXT_BYTES // (1024 * 1024)} MB; give a sample")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{flag} {path}: not UTF-8 text (byte {exc.start})") from None
    if not text.strip():
        raise SourceError(f"{flag} {path}: the file is empty")
    return text, str(path)


def read_prompts(path: str | os.PathLike | None) -> list[str]:
    """One prompt per non-empty line; a literal ``\\n`` in a line stands for a newline."""
    text, _ = read_text(path, "--prompts") if path is not None else \
        ((ASSETS / PROMPTS_FILE).read_text(encoding="utf-8"), "")
    prompts = [line.replace("\\n", "\n") for line in text.splitlines() if line.strip()]
    if not prompts:
        raise SourceError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def sentences(text: str, limit: int = 48, min_chars: int = 24, max_chars: int = 240) -> list[str]:
    """The held text cut at sentence ends and blank lines: inputs for classifiers and seq2seq pairs."""
    out, current = [], ""
    for ch in text:
        current += ch
        if ch in ".!?\n" and len(current.strip()) >= min_chars or len(current) >= max_chars:
            if current.strip():
                out.append(" ".join(current.split()))
            current = ""
        if len(out) >= limit:
            break
    return out or [" ".join(text.split())[:max_chars]]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise SourceError(f"{folder}: no config.json (transformers needs one to know the model)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a JSON object")
    return data


def is_zoo(config: dict) -> bool:
    return config.get("model_type") in ZOO_TYPES


def merged_candidate(merged: str | os.PathLike) -> Candidate:
    folder = Path(merged)
    if not folder.is_dir():
        raise SourceError(f"{merged}: no such folder (give the merged checkpoint's folder)")
    if (folder / "emr.json").is_file():
        raise SourceError(f"{merged}: an EMR merge holds one unified task vector and per-task masks, not a model; "
                          "rebuild a task first: python -m merging emr-extract MERGED --task NAME OUT")
    return with_sizes(Candidate("merged", str(merged), "merged", folder))


def compare_candidates(merged: Path, compare: list[str] | None, hub_cache: bool = True,
                       config_file: str | Path | None = None) -> list[Candidate]:
    """The models to compare with: ``compare`` (the first one is treated as the base), else the inputs named by
    the merged folder's ``merge_config.yml`` or ``config_file`` (base first). An explicit reference that is not
    available offline is an error; an input named by the config is a row with a note."""
    explicit = compare is not None
    if explicit:
        refs = [(ref, "base" if i == 0 else "input") for i, ref in enumerate(compare)]
    else:
        refs = _config_inputs(Path(config_file) if config_file else merged / "merge_config.yml")
    labels: Counter = Counter()
    out = []
    for ref, role in refs:
        label = _short(ref)
        labels[label] += 1
        if labels[label] > 1:
            label = f"{label}#{labels[label]}"
        folder, why = resolve(ref, hub_cache)
        if folder is None and explicit:
            raise SourceError(f"--compare {ref}: {why}")
        out.append(with_sizes(Candidate(label, ref, role, folder, why)) if folder else Candidate(label, ref, role,
                                                                                                  None, why))
    return out


def _config_inputs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SourceError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    refs: list[tuple[str, str]] = []
    if isinstance(data, dict) and isinstance(data.get("base_model"), str):
        refs.append((data["base_model"], "base"))
    for entry in (data.get("models") or []) if isinstance(data, dict) else []:
        ref = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(ref, str) and ref not in [r for r, _ in refs]:
            refs.append((ref, "input"))
    for piece in (data.get("slices") or []) if isinstance(data, dict) else []:
        for source in (piece.get("sources") or []) if isinstance(piece, dict) else []:
            ref = source.get("model") if isinstance(source, dict) else None
            if isinstance(ref, str) and ref not in [r for r, _ in refs]:
                refs.append((ref, "input"))
    return refs


def resolve(ref: str, hub_cache: bool = True) -> tuple[Path | None, str]:
    """A local folder holding ``ref``'s model, or None and why: never downloads anything."""
    p = Path(os.path.expanduser(ref))
    if p.exists():
        if p.is_file():
            return None, "a lone weights file: transformers needs a folder with config.json"
        if (p / "adapter_config.json").is_file():
            return None, "a LoRA adapter, not a full model: not loaded"
        if not (p / "config.json").is_file():
            return None, "no config.json in the folder: transformers cannot load it"
        return p, ""
    from ..hub.refs import parse_ref

    try:
        hub_ref = parse_ref(ref)
    except SourceError:
        return None, "no such local folder, and not a Hub repo id"
    if not hub_cache:
        return None, "a Hub model: this server checks against local folders only"
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        folder = snapshot_download(hub_ref.repo_id, revision=hub_ref.revision, local_files_only=True)
    except LocalEntryNotFoundError:
        return None, (f"not in the Hub cache, and evaluate never downloads; fetch it first "
                      f"(hf download {hub_ref.repo_id}) or pass a local folder")
    except Exception as exc:  # noqa: BLE001 - any cache problem is this one input's problem
        return None, f"the Hub cache could not be read ({type(exc).__name__})"
    if not (Path(folder) / "config.json").is_file():
        return None, "its cached snapshot has no config.json"
    return Path(folder), ""


def with_sizes(c: Candidate) -> Candidate:
    """Parameter count and dtypes from the folder's safetensors headers."""
    from ..sources.local import open_local

    try:
        with open_local(str(c.folder)) as source:
            specs = source.specs()
    except SourceError as exc:
        raise SourceError(f"{c.ref}: {exc}") from None
    dtypes: Counter = Counter()
    for spec in specs.values():
        dtypes[spec.dtype] += spec.numel
    c.parameters = sum(dtypes.values())
    c.dtypes = dict(dtypes)
    return c


def _short(ref: str) -> str:
    return ref.rstrip("/").rsplit("/", 1)[-1] or ref
