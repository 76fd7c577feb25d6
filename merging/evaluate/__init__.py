"""Does the merged model still work? A sanity check of a merge's output beside the models that went into it.

``evaluate(merged_dir, compare=None, ...)`` loads the merged folder and each input (from ``--compare``, or the
inputs its ``merge_config.yml`` names), one model at a time, offline (local folders and the Hub cache only, with
``local_files_only=True``), and measures, by model kind:

- causal LMs: token-level perplexity on a held text (``assets/eval``: public-domain prose and code written for
  this check, or ``--text``), scored in windows of W tokens moving by a stride S (default W/2), so every token after
  the first is scored exactly once with at least W − S tokens of context; the next-token top-1 accuracy on that text;
  the agreement of the merged model's top-1 with each input's at the same positions; greedy continuations of a few
  prompts, side by side;
- seq2seq models: the perplexity of reference targets (each held-text sentence given the one before it), the
  decoder's top-1 agreement on those targets, greedy outputs for the prompts;
- sequence and image classifiers: the agreement of predictions with each input's on built-in inputs (the held
  text's sentences; deterministic synthetic images) or ``--text`` lines, and whether predictions collapse to one class;
- the demo zoo: its per-task accuracy (``merging.zoo.eval``);
- every kind: parameter count and dtype from the safetensors headers, and whether the merged folder's tokenizer
  encodes the held text exactly as the base's.

The verdict (``verdict.py``, documented in the README): BROKEN when the merged model is far outside its inputs'
range, by a factor of ``BROKEN_FACTOR`` = 2.

Modules: ``inputs`` (what is compared, the held text, sizes), ``loading`` (transformers, lazily; the memory
pre-flight), ``metrics`` (the measurements), ``verdict``, ``report`` (table and JSON), ``run`` (the whole check),
``charts`` (Plotly builders), ``cli`` (``python -m merging evaluate``). transformers and torch are imported only
when a check runs.
"""

import importlib

_EXPORTS = {"evaluate": "run", "format_report": "report", "BROKEN_FACTOR": "verdict"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'merging.evaluate' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
