"""What the checks of every kind share: the progress/cancel counter, the device, the rows, the tokenizer."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Cancelled, SourceError
from .inputs import Candidate


class Steps:
    """Counts units of work for the progress callback and checks the cancel flag before each one."""

    def __init__(self, total: int, progress: Callable | None, cancel: Callable[[], bool] | None) -> None:
        self.total, self.done, self.progress, self.cancel = max(1, total), 0, progress, cancel

    def __call__(self, text: str) -> None:
        self.note(text)
        self.done += 1

    def note(self, text: str) -> None:
        """Report ``text`` at the current fraction (no unit counted); cancel here too."""
        if self.cancel is not None and self.cancel():
            raise Cancelled("the check was cancelled")
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total), text)

    def checker(self, label: str, unit: str) -> Callable[[int, int], None]:
        return lambda i, n: self(f"{label}: {unit} {i + 1}/{n}")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SourceError(f"--device {device}: no CUDA device is available here")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SourceError(f"--device {device}: use auto, cpu or cuda")
    return device


def base_row(c: Candidate) -> dict:
    return {"label": c.label, "ref": c.ref, "role": c.role, "parameters": c.parameters, "dtype": c.dtype,
            "skipped": c.skipped}


def skip_kind(c: Candidate, kind: str) -> str:
    """Why ``c`` cannot be compared as a ``kind`` (its config says another kind), or ''."""
    from .loading import model_kind

    try:
        other = model_kind(c.folder, c.ref)
    except SourceError as exc:
        return str(exc)
    return "" if other == kind else f"a {other.replace('_', ' ')}, the merged model is a {kind.replace('_', ' ')}"


def tokenizers(candidates: list[Candidate], kind: str) -> tuple[object, dict]:
    """The tokenizer everything is scored with (the merged folder's, else the base's) and what the report says
    about it: whether the merged one encodes the held text as the base's."""
    from .loading import load_tokenizer

    merged = candidates[-1]
    base = next((c for c in candidates if c.role == "base" and c.folder is not None), None)
    tok = load_tokenizer(merged.folder)
    base_tok = load_tokenizer(base.folder) if base else None
    info: dict = {"scored_with": "merged", "difference": None, "missing": None}
    if tok is None:
        if base_tok is None:
            raise SourceError(f"{merged.ref}: no tokenizer files in the merged folder or its base; a "
                              f"{kind.replace('_', ' ')} needs one to be checked")
        tok = base_tok
        info.update(scored_with=base.label, missing="the merged folder has no tokenizer: scored with the base's")
    return tok, {**info, "base": base_tok}
