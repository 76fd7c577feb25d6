"""The whole check: resolve the models, refuse up front what cannot fit, load one model at a time, measure, judge.

``evaluate`` returns a JSON-ready report (``report.py`` prints it); ``progress(fraction, text)`` is called after
every unit of work and ``cancel()`` before it (True: stop with ``Cancelled``, nothing is written).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import SourceError
from . import inputs as inp
from .inputs import Candidate
from .shared import Steps, base_row, resolve_device, skip_kind, tokenizers
from .verdict import judge

DEFAULT_MAX_TOKENS = 4096
DEFAULT_NEW_TOKENS = 24
MAX_WINDOW = 1024


def evaluate(merged: str | Path, compare: list[str] | None = None, *, text: str | Path | None = None,
             prompts: str | Path | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
             new_tokens: int = DEFAULT_NEW_TOKENS, window: int | None = None, stride: int | None = None,
             device: str = "auto", dtype: str = "auto", hub_cache: bool = True, progress: Callable | None = None,
             cancel: Callable[[], bool] | None = None, config_file: str | Path | None = None) -> dict:
    """Check the merged folder ``merged`` against ``compare`` (default: the inputs its merge_config.yml, or
    ``config_file``, names)."""
    started = time.monotonic()
    if max_tokens < 2:
        raise SourceError(f"--max-tokens {max_tokens}: at least 2 tokens are needed")
    merged_c = inp.merged_candidate(merged)
    others = inp.compare_candidates(merged_c.folder, compare, hub_cache, config_file=config_file)
    candidates = [*others, merged_c]  # the table's order: base, inputs, merged
    held, source = inp.read_text(text)
    if inp.is_zoo(inp.read_config(merged_c.folder)):
        from .kinds import evaluate_zoo

        report = evaluate_zoo(candidates, Steps(len(candidates), progress, cancel))
    else:
        from .loading import model_kind

        kind = model_kind(merged_c.folder, str(merged))
        device = resolve_device(device)
        context = dict(held=held, source=source, prompts=inp.read_prompts(prompts), max_tokens=max_tokens,
                       new_tokens=new_tokens, window=window, stride=stride, device=device,
                       progress=progress, cancel=cancel)
        if kind in ("causal_lm", "seq2seq"):
            report = evaluate_lm(candidates, kind, dtype, **context)
        else:
            from .kinds import evaluate_classifier

            report = evaluate_classifier(candidates, kind, dtype, **context)
    report["merged"] = str(merged)
    report["seconds"] = round(time.monotonic() - started, 3)
    report["verdict"] = judge(report)
    return report


def evaluate_lm(candidates: list[Candidate], kind: str, dtype: str, *, held: str, source: str, prompts: list[str],
                max_tokens: int, new_tokens: int, window: int | None, stride: int | None, device: str,
                progress: Callable | None, cancel: Callable[[], bool] | None) -> dict:
    """Causal LMs (windowed perplexity, top-1, continuations) and seq2seq models (target perplexity, outputs)."""
    import torch

    from . import metrics
    from .loading import check_memory, dims, eval_dtype, load_model, load_tokenizer, quiet, threads_for

    merged = candidates[-1]
    tok, tok_info = tokenizers(candidates, kind)
    base_tok = tok_info.pop("base")
    with quiet():
        if kind == "causal_lm":
            ids = torch.tensor(tok(held)["input_ids"][:max_tokens], dtype=torch.long)
            if len(ids) < 2:
                raise SourceError(f"{source}: fewer than 2 tokens to score")
            context = dims(merged.folder)["context"]
            window = window or min(context or MAX_WINDOW, MAX_WINDOW, len(ids))
            if context and window > context:
                raise SourceError(f"--window {window}: longer than the model's context ({context} positions)")
            stride = stride or max(1, window // 2)
            if window < 2 or stride > window:
                raise SourceError(f"--window {window} --stride {stride}: need a window of at least 2 tokens and a "
                                  "stride no longer than the window")
            units, top_id = len(metrics.windows(len(ids), window, stride)), int(ids.max())
            text_info = {"source": source, "tokens": len(ids), "window": window, "stride": stride,
                         "scored": len(ids) - 1}
        else:
            pairs = _pairs(tok, held, max_tokens)
            if not pairs:
                raise SourceError(f"{source}: too short to make source/target pairs (two sentences at least)")
            units, top_id = len(pairs), max(max(max(s), max(t)) for s, t in pairs)
            window = max(len(s) + len(t) for s, t in pairs)
            text_info = {"source": source, "pairs": len(pairs), "target_tokens": sum(len(t) for _, t in pairs)}
        if base_tok is not None and tok_info["missing"] is None:
            tok_info["difference"] = metrics.tokenizer_difference(tok, base_tok, held)
    for c in candidates[:-1]:
        if c.folder is not None and not c.skipped:
            c.skipped = skip_kind(c, kind)
    live = [c for c in candidates if c.folder is not None and not c.skipped]
    dtype = eval_dtype(dtype, device, merged.dtype)
    check_memory(live, device, dtype, window)

    steps = Steps(len(live) * (units + len(prompts)), progress, cancel)
    rows, preds, outputs = [], {}, {}
    for c in candidates:
        row = base_row(c)
        rows.append(row)
        if c.folder is None or c.skipped:
            continue
        vocab = dims(c.folder)["vocab"]
        if top_id >= vocab:
            row["skipped"] = c.skipped = f"its vocabulary ({vocab}) is smaller than the text's token ids ({top_id})"
            continue
        if c.role != "merged":
            own = load_tokenizer(c.folder)
            row["tokenizer"] = "none" if own is None else ("same" if own(held)["input_ids"] == tok(held)["input_ids"]
                                                           else "differs")
        else:
            row["tokenizer"] = tok_info["scored_with"] if tok_info["missing"] else "own"
        began = time.monotonic()
        steps.note(f"{c.label}: loading")
        model, missing = load_model(c, kind, device, dtype)
        try:
            with quiet(), threads_for(c, device):
                if kind == "causal_lm":
                    scores = metrics.score_causal(model, ids, window, stride, device, steps.checker(c.label, "window"))
                    texts = metrics.continuations(model, tok, prompts, new_tokens, device, dims(c.folder)["context"],
                                                  steps.checker(c.label, "prompt"))
                else:
                    scores = metrics.score_seq2seq(model, pairs, device, steps.checker(c.label, "pair"))
                    texts = metrics.seq2seq_outputs(model, tok, prompts, new_tokens, device,
                                                    steps.checker(c.label, "prompt"))
        finally:
            del model
            _free(device)
        preds[c.label], outputs[c.label] = scores.predictions, texts
        row.update(perplexity=scores.perplexity, top1=scores.top1, nll=scores.nll, scored=scores.count,
                   finite=scores.finite, missing_weights=missing, seconds=round(time.monotonic() - began, 3))
    mine = preds.get(merged.label)
    for row in rows:
        if mine is not None and row["label"] in preds:
            row["agreement"] = metrics.agreement(preds[row["label"]], mine)
    return {"kind": kind, "device": device, "dtype": dtype, "text": text_info, "rows": rows, "tokenizer": tok_info,
            "continuations": [{"prompt": p, "outputs": {k: v[i] for k, v in outputs.items()}}
                              for i, p in enumerate(prompts)],
            "new_tokens": new_tokens}


def _pairs(tok, held: str, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Seq2seq references: each held-text sentence as the target of the sentence before it."""
    sents = inp.sentences(held)
    pairs, total = [], 0
    for src, tgt in zip(sents, sents[1:]):
        s = tok(src, truncation=True, max_length=256)["input_ids"]
        t = tok(text_target=tgt, truncation=True, max_length=128)["input_ids"]
        if total + len(t) > max_tokens:
            break
        pairs.append((s, t))
        total += len(t)
    return pairs


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        import torch

        torch.cuda.empty_cache()
