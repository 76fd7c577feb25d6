"""The Hugging Face Hub: find checkpoints, check a merge before downloading anything, stream from it, push to it.

- Model references: a config may name ``org/name`` or ``org/name@revision`` (a branch, tag or commit); a local
  path wins when it exists. ``parse_ref`` validates them strictly before any request is made.
- Tokens: an explicit argument (the app's OAuth login), else ``HF_TOKEN``, else huggingface_hub's stored login
  (``resolve_token``); on a Space only the explicit one, unless ``MERGESCOPE_USE_SPACE_TOKEN=1``
  (``ambient.py``, which also drops the owner's token from a server process). A token is sent only as an
  ``Authorization`` header to the Hub; it never appears in a log, an error message, a model card, a config or any
  file we write (``push_merge`` checks the folder before upload).
- Endpoint: the ``endpoint`` argument, else ``MERGESCOPE_HF_ENDPOINT``, else ``HF_ENDPOINT``, read at call time
  (huggingface_hub reads ``HF_ENDPOINT`` only once, at import).
- Search: ``search_models`` (free text) and ``fine_tunes_of`` (the Hub's ``base_model`` relations), sorted by
  downloads, with parameter counts and whether safetensors weights exist.
- Pre-flight: ``preflight`` opens every input by its safetensors headers only (a few KB per file), runs the
  engine's plan and compatibility check, and estimates the bytes a merge reads, the disk and peak memory it
  needs, and its time.
- Streaming: ``hub_resolver`` gives ``run_merge``/``open_sources`` a way to open repo ids, by HTTP range requests
  (merging/sources/hub.py) or, with ``cache=True``, from the huggingface_hub cache.
- Push: ``push_merge`` creates the repo (``exist_ok``) and uploads the finished folder with its model card.
"""

import importlib

# ``preflight`` is both a function and its module's name: bound here, so that importing the module never leaves the
# module where the function is expected. Push and search load on first use (a local merge needs neither).
from .ambient import ambient_allowed, drop_ambient_tokens
from .preflight import ModelSummary, Preflight, preflight
from .refs import DEFAULT_ENDPOINT_ENV, HubRef, parse_ref, resolve_endpoint, resolve_token, scrub
from .resolver import hub_resolver

_LAZY = {"hub_model_card": "push", "push_merge": "push", "HubModel": "search", "fine_tunes_of": "search",
         "search_models": "search"}
__all__ = ["DEFAULT_ENDPOINT_ENV", "HubModel", "HubRef", "ModelSummary", "Preflight", "ambient_allowed",
           "drop_ambient_tokens", "fine_tunes_of", "hub_model_card", "hub_resolver", "parse_ref", "preflight",
           "push_merge", "resolve_endpoint", "resolve_token", "scrub", "search_models"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
