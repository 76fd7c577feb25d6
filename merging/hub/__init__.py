"""The Hugging Face Hub: find checkpoints, check a merge before downloading anything, stream from it, push to it.

- Model references: a config may name ``org/name`` or ``org/name@revision`` (a branch, tag or commit); a local
  path wins when it exists. ``parse_ref`` validates them strictly before any request is made.
- Tokens: an explicit argument (the app's OAuth login), else ``HF_TOKEN``, else huggingface_hub's stored login
  (``resolve_token``). A token is sent only as an ``Authorization`` header to the Hub; it never appears in a log,
  an error message, a model card, a config or any file we write (``push_merge`` checks the folder before upload).
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

# Loaded on first use: a local merge asks for ``hub_resolver`` only, and never pays for the pre-flight, push or
# search modules (nor huggingface_hub, which only the Hub paths import).
_EXPORTS = {
    "ModelSummary": "preflight", "Preflight": "preflight", "preflight": "preflight",
    "hub_model_card": "push", "push_merge": "push",
    "DEFAULT_ENDPOINT_ENV": "refs", "HubRef": "refs", "parse_ref": "refs", "resolve_endpoint": "refs",
    "resolve_token": "refs", "scrub": "refs",
    "hub_resolver": "resolver",
    "HubModel": "search", "fine_tunes_of": "search", "search_models": "search",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
