"""Pushing a finished merge to the Hub: the repo created, the folder checked for secrets, then uploaded."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from ..errors import MergeError, SourceError
from .refs import parse_ref, resolve_endpoint, resolve_token


def push_merge(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, *,
               endpoint: str | None = None, commit_message: str = "Upload merged model (Mergescope)") -> str:
    """Create ``repo_id`` (kept if it exists) and upload the finished merge folder; returns the repo URL.

    Before uploading, the model card's ``base_model`` is normalized to Hub repo ids (revisions dropped, local
    paths left out: the Hub links only repos), and every file is checked for the token: a folder that holds it
    is refused, so a token can never be published by accident.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from ..sources.hub import httpx

    ref = parse_ref(repo_id)
    if ref.revision != "main":
        raise MergeError(f"{repo_id!r}: push to a repo id without '@revision'")
    tok = resolve_token(token)
    if not tok:
        raise MergeError(f"{ref.repo_id}: pushing needs a token with write access: log in (`hf auth login`), "
                         "set HF_TOKEN, or pass a token")
    root = Path(folder)
    if not root.is_dir():
        raise MergeError(f"{root}: no such folder to push")
    if not any(root.glob("*.safetensors")):
        raise MergeError(f"{root}: holds no .safetensors files; push a finished merge folder")
    card = root / "README.md"
    if not card.is_file():
        raise MergeError(f"{root}: has no README.md model card; push a folder written by a merge")
    fixed = hub_model_card(card.read_text(encoding="utf-8"))
    if fixed != card.read_text(encoding="utf-8"):
        card.write_text(fixed, encoding="utf-8")
    _refuse_secrets(root, [tok, os.environ.get("HF_TOKEN", "").strip()])
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=tok, library_name="mergescope")
    try:
        url = api.create_repo(ref.repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=getattr(url, "repo_id", None) or ref.repo_id, folder_path=str(root),
                          commit_message=commit_message, ignore_patterns=[".*", "**/.*"])
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        hint = ": the token needs write access to that namespace" if status in (401, 403) else ""
        raise MergeError(f"{ref.repo_id}: push failed, the Hub answered HTTP {status}{hint}") from None
    except httpx.TransportError as exc:
        raise MergeError(f"{ref.repo_id}: push failed, cannot reach the Hub ({exc.__class__.__name__})") from None
    return str(url)


def hub_model_card(text: str) -> str:
    """The card with ``base_model`` as Hub repo ids (``org/name@rev`` → ``org/name``; local paths dropped)."""
    if not text.startswith("---\n"):
        return text
    end = text.find("\n---", 4)
    if end < 0:
        return text
    try:
        front = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError:
        return text
    bases = front.get("base_model") if isinstance(front, dict) else None
    if bases is None:
        return text
    repo_ids = []
    for b in [bases] if isinstance(bases, str) else list(bases):
        for part in str(b).split("+"):  # mergekit's model+lora: both are inputs
            if os.path.exists(part):
                continue  # a local folder (`checkpoints/ft_a` parses as a repo id, but is not one)
            try:
                repo_ids.append(parse_ref(part).repo_id)
            except SourceError:
                continue  # a local path: listed in the card's body, not a Hub link
    repo_ids = list(dict.fromkeys(repo_ids))
    if repo_ids == ([bases] if isinstance(bases, str) else bases):
        return text
    if repo_ids:
        front["base_model"] = repo_ids
    else:
        front.pop("base_model")
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + text[end + 1:]


def _refuse_secrets(root: Path, secrets: list[str]) -> None:
    from ..safetensors_io import read_local_header

    secrets = [s for s in secrets if s and len(s) >= 8]
    if not secrets:
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            _, meta = read_local_header(path)  # only the header and metadata can hold text
            data = repr(meta).encode()
        elif path.stat().st_size <= 256 * 1024 * 1024:
            data = path.read_bytes()
        else:
            continue
        if any(s.encode() in data for s in secrets):
            raise MergeError(f"{path.relative_to(root)}: contains the Hub token; refusing to upload it")
