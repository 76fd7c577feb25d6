"""The checks that need no held-out data beyond what is built in: classifiers (prediction agreement) and the demo
zoo (its per-task accuracy, as ``python -m merging zoo eval`` computes it)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

from ..errors import SourceError
from . import inputs as inp
from .inputs import Candidate

N_IMAGES = 32
IMAGE_BATCH = 8


def evaluate_zoo(candidates: list[Candidate], steps) -> dict:
    """Per-task test accuracy of every zoo checkpoint, each task scored with its own head."""
    from ..zoo.data import TASKS
    from ..zoo.eval import Zoo, average, evaluate_checkpoint
    from ..zoo.train import MLP_TASK

    base = next((c for c in candidates if c.role == "base" and c.folder is not None), None)
    root = base.folder.parent if base and (base.folder.parent / "base" / "model.safetensors").is_file() else None
    zoo = Zoo(root) if root else Zoo()
    rows = []
    for c in candidates:
        row = {"label": c.label, "ref": c.ref, "role": c.role, "parameters": c.parameters, "dtype": c.dtype,
               "skipped": c.skipped}
        rows.append(row)
        if c.folder is None or c.skipped:
            continue
        if not inp.is_zoo(inp.read_config(c.folder)):
            row["skipped"] = c.skipped = "not a zoo checkpoint"
            continue
        steps(f"{c.label}: scoring the zoo's tasks")
        began = time.monotonic()
        scores = evaluate_checkpoint(c.folder, zoo)
        chance = {t: 1 / (TASKS[t].num_classes if t in TASKS else 10) for t in scores}
        skill = sum((a - chance[t]) / (1 - chance[t]) for t, a in scores.items()) / len(scores)
        row.update(accuracy=scores, average=average(scores), skill=skill, seconds=round(time.monotonic() - began, 3))
    tasks = sorted({t for r in rows for t in r.get("accuracy", {})},
                   key=lambda t: list(TASKS).index(t) if t in TASKS else (len(TASKS) if t == MLP_TASK else 99))
    return {"kind": "zoo", "device": "cpu", "dtype": "float32", "text": {"source": f"the zoo's test split ({zoo.root})",
                                                                         "tasks": tasks},
            "rows": rows, "tokenizer": {}, "continuations": []}


def evaluate_classifier(candidates: list[Candidate], kind: str, dtype: str, *, held: str, source: str,
                        prompts: list[str], max_tokens: int, new_tokens: int, window: int | None, stride: int | None,
                        device: str, progress: Callable | None, cancel: Callable[[], bool] | None) -> dict:
    """Sequence classifiers on the held text's sentences, image classifiers on synthetic images: each model's
    predictions, their agreement with the merged model's and with each other's, and the classes predicted."""
    from . import metrics
    from .loading import check_memory, dims, eval_dtype, load_model, quiet, threads_for
    from .shared import Steps, base_row, skip_kind, tokenizers

    merged = candidates[-1]
    for c in candidates[:-1]:
        if c.folder is not None and not c.skipped:
            c.skipped = skip_kind(c, kind)
    live = [c for c in candidates if c.folder is not None and not c.skipped]
    tok_info: dict = {}
    if kind == "sequence_classifier":
        tok, tok_info = tokenizers(candidates, kind)
        base_tok = tok_info.pop("base")
        context = dims(merged.folder)["context"] or 512
        with quiet():
            texts = inp.sentences(held, limit=64)
            batches = [dict(tok(s, truncation=True, max_length=min(512, context), return_tensors="pt"))
                       for s in texts]
            if base_tok is not None and tok_info["missing"] is None:
                tok_info["difference"] = metrics.tokenizer_difference(tok, base_tok, held)
        batches = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask")} for b in batches]
        text_info = {"source": f"the sentences of {source}", "inputs": len(batches)}
        window = max(b["input_ids"].shape[1] for b in batches)
    else:
        cfg = inp.read_config(merged.folder)
        size, channels = _image_shape(cfg)
        images = metrics.synthetic_images(N_IMAGES, channels, size)
        batches = [{"pixel_values": images[i:i + IMAGE_BATCH]} for i in range(0, N_IMAGES, IMAGE_BATCH)]
        text_info = {"source": f"{N_IMAGES} built-in synthetic images ({channels}×{size}×{size}, in [-1, 1])",
                     "inputs": N_IMAGES}
        window = 1
    dtype = eval_dtype(dtype, device, merged.dtype)
    check_memory(live, device, dtype, window)
    steps = Steps(len(live) * len(batches), progress, cancel)
    rows, preds = [], {}
    for c in candidates:
        row = base_row(c)
        rows.append(row)
        if c.folder is None or c.skipped:
            continue
        began = time.monotonic()
        steps.note(f"{c.label}: loading")
        model, missing = load_model(c, kind, device, dtype)
        try:
            for b in batches:
                b.update({k: v.to(getattr(model, "dtype", v.dtype)) for k, v in b.items() if v.is_floating_point()})
            with threads_for(c, device):
                p, confidence, finite = metrics.classify(model, batches, device, steps.checker(c.label, "input"))
            names = getattr(model.config, "id2label", None) or {}
        finally:
            del model
        preds[c.label] = p
        counts = Counter(names.get(int(k), str(int(k))) for k in p)
        row.update(classes=dict(counts.most_common()), confidence=confidence, finite=finite,
                   missing_weights=missing, seconds=round(time.monotonic() - began, 3))
    mine = preds.get(merged.label)
    for row in rows:
        if mine is not None and row["label"] in preds:
            row["agreement"] = metrics.agreement(preds[row["label"]], mine)
    labels = [c.label for c in candidates[:-1] if c.label in preds]
    pairwise = {f"{a} · {b}": metrics.agreement(preds[a], preds[b])
                for i, a in enumerate(labels) for b in labels[i + 1:]}
    return {"kind": kind, "device": device, "dtype": dtype, "text": text_info, "rows": rows, "tokenizer": tok_info,
            "pairwise": pairwise, "continuations": []}


def _image_shape(cfg: dict) -> tuple[int, int]:
    size = cfg.get("image_size", 224)
    if isinstance(size, (list, tuple)):
        size = size[0]
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or 224
    if not isinstance(size, int) or not 4 <= size <= 1024:
        raise SourceError(f"config.json: image_size {size!r} is not a size this check can make images for")
    return size, int(cfg.get("num_channels", 3))

