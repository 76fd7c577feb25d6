"""Hub references, tokens and endpoints: validated before any request, never written anywhere."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import MergeError, SourceError
from .ambient import ambient_allowed

DEFAULT_ENDPOINT_ENV = "MERGESCOPE_HF_ENDPOINT"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
MAX_REPO_ID = 96  # the Hub's limit
MAX_REVISION = 200
SEARCH_FIELDS = ["downloads", "likes", "safetensors", "siblings", "pipeline_tag", "gated", "private", "tags"]
RELATIONS = ("finetune", "adapter", "merge", "quantized")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse_ref(ref: str) -> HubRef:
    """``org/name`` or ``org/name@revision`` → HubRef; anything else raises a one-line SourceError.

    Strict on purpose: a reference goes into URLs and cache paths, so ``..``, empty parts, spaces, control
    characters, URL syntax and over-long names are refused before any request is made.
    """
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    if not isinstance(ref, str) or not ref.strip():
        raise SourceError("empty model reference: give a local path or a Hub repo id like org/name[@revision]")

    def bad(why: str) -> SourceError:
        return SourceError(f"{shown!r}: no such local file or folder, and not a Hub repo id "
                           f"(org/name or org/name@revision): {why}")

    repo_id, sep, revision = ref.partition("@")
    if sep and not revision:
        raise bad("the revision after '@' is empty")
    if "@" in revision:
        raise bad("more than one '@'")
    if len(repo_id) > MAX_REPO_ID:
        raise bad(f"the repo id is longer than {MAX_REPO_ID} characters")
    if ".." in repo_id or "--" in repo_id:
        raise bad("'..' and '--' are not allowed in a repo id")
    if repo_id.count("/") > 1:
        raise bad("a repo id has at most one '/'")
    if not _REPO_ID.fullmatch(repo_id):
        raise bad("a repo id uses letters, digits, '-', '_' and '.', and starts and ends with a letter or digit")
    if repo_id.endswith(".git"):
        raise bad("a repo id cannot end with '.git'")
    if sep:
        if len(revision) > MAX_REVISION:
            raise bad(f"the revision is longer than {MAX_REVISION} characters")
        if ".." in revision or not _REVISION.fullmatch(revision) or revision.startswith(("-", ".")) \
                or revision.endswith((".", ".lock")):
            raise bad("a revision is a branch, tag or commit made of letters, digits, '-', '_', '.' and '/'")
    return HubRef(repo_id, revision if sep else "main")


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the one given; else, except on a Space (``ambient.ambient_allowed``), HF_TOKEN or what
    huggingface_hub finds itself (HUGGING_FACE_HUB_TOKEN, the stored login); None if none.

    On a Space the only token is the one a call passes (the visitor's login): the environment and the stored login
    are the owner's, never a visitor's, unless the owner set MERGESCOPE_USE_SPACE_TOKEN=1."""
    if token and token.strip():
        return token.strip()
    if not ambient_allowed():
        return None
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    try:
        from huggingface_hub import get_token

        return get_token() or None
    except Exception:  # a broken token file or a failed OIDC exchange means "not logged in" here
        return None


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub's base URL: the argument, else MERGESCOPE_HF_ENDPOINT, else HF_ENDPOINT, else huggingface.co."""
    from huggingface_hub import constants

    url = endpoint or os.environ.get(DEFAULT_ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/@]+(?:/[^\s@]*)?", url):
        raise MergeError(f"Hub endpoint {url!r} is not an http(s) URL")
    return url


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token (if any) masked: for messages built from a library's error text."""
    return text.replace(token, "***") if token else text
