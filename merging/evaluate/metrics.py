"""The measurements, one model at a time: windowed perplexity and top-1 predictions, greedy continuations,
seq2seq target scores, classifier predictions, agreement, and where two tokenizers part.

Every function takes a loaded model (transformers) and plain token ids; ``check`` is called between units of work
(windows, prompts, inputs) and raises to cancel. Sums are taken in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class TokenScores:
    """A model's next-token scores over a text: summed negative log-likelihood, counts, its top-1 choices."""

    nll: float
    count: int
    correct: int  # top-1 equal to the text's next token
    predictions: torch.Tensor  # top-1 token id at every scored position
    finite: bool = True

    @property
    def perplexity(self) -> float:
        if not self.finite or self.count == 0:
            return float("nan")
        try:
            return math.exp(self.nll / self.count)
        except OverflowError:
            return float("inf")

    @property
    def top1(self) -> float:
        return self.correct / self.count if self.count else float("nan")


def windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n_tokens``: windows of ``window`` tokens moving
    by ``stride``; each scores only the positions no earlier window scored, so every token after the first is
    scored once, with at least ``window - stride`` tokens of context after the first window."""
    if window < 2 or not 0 < stride <= window:
        raise ValueError(f"window {window} and stride {stride}: need window >= 2 and 0 < stride <= window")
    out, begin, scored_to = [], 0, 1
    while scored_to < n_tokens:
        end = min(begin + window, n_tokens)
        out.append((begin, end, scored_to))
        scored_to = end
        begin += stride
        if end == n_tokens:
            break
    return out


@torch.no_grad()
def score_causal(model, ids: torch.Tensor, window: int, stride: int, device: str,
                 check: Callable[[int, int], None] = lambda i, n: None) -> TokenScores:
    """Token-level scores of a causal LM over ``ids`` (1-D), in windows (see ``windows``)."""
    spans = windows(len(ids), window, stride)
    nll, count, correct, finite, preds = 0.0, 0, 0, True, []
    for i, (begin, end, first) in enumerate(spans):
        check(i, len(spans))
        x = ids[begin:end].to(device)[None]
        logits = model(input_ids=x).logits[0]
        rows = logits[first - begin - 1:end - begin - 1].float()  # row r predicts token begin + r + 1
        targets = x[0, first - begin:]
        logp = torch.log_softmax(rows, dim=-1)
        token_nll = -logp.gather(1, targets[:, None])[:, 0]
        finite = finite and bool(torch.isfinite(token_nll).all())
        nll += float(token_nll.double().sum())
        count += len(targets)
        top = rows.argmax(dim=-1)
        correct += int((top == targets).sum())
        preds.append(top.cpu())
    return TokenScores(nll, count, correct, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), finite)


@torch.no_grad()
def continuations(model, tokenizer, prompts: list[str], new_tokens: int, device: str, context: int = 0,
                  check: Callable[[int, int], None] = lambda i, n: None) -> list[str]:
    """Each prompt's greedy continuation (argmax at every step, with the model's key-value cache), decoded."""
    eos = tokenizer.eos_token_id
    out = []
    for i, prompt in enumerate(prompts):
        check(i, len(prompts))
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if context:
            ids = ids[:, -max(1, context - new_tokens):]
        x, past, made = ids, None, []
        for _ in range(new_tokens):
            if context and ids.shape[1] + len(made) >= context:
                break
            step = model(input_ids=x, past_key_values=past, use_cache=True)
            past = step.past_key_values
            token = int(step.logits[0, -1].argmax())
            if token == eos:
                break
            made.append(token)
            x = torch.tensor([[token]], device=device)
        out.append(tokenizer.decode(made, skip_special_tokens=True))
    return out


@torch.no_grad()
def score_seq2seq(model, pairs: list[tuple[list[int], list[int]]], device: str,
                  check: Callable[[int, int], None] = lambda i, n: None) -> TokenScores:
    """The decoder's scores of each reference target given its source (teacher forcing)."""
    nll, count, correct, finite, preds = 0.0, 0, 0, True, []
    for i, (source, target) in enumerate(pairs):
        check(i, len(pairs))
        labels = torch.tensor([target], device=device)
        logits = model(input_ids=torch.tensor([source], device=device), labels=labels).logits[0].float()
        token_nll = -torch.log_softmax(logits, dim=-1).gather(1, labels[0][:, None])[:, 0]
        finite = finite and bool(torch.isfinite(token_nll).all())
        nll += float(token_nll.double().sum())
        count += len(target)
        top = logits.argmax(dim=-1)
        correct += int((top == labels[0]).sum())
        preds.append(top.cpu())
    return TokenScores(nll, count, correct, torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), finite)


@torch.no_grad()
def seq2seq_outputs(model, tokenizer, prompts: list[str], new_tokens: int, device: str,
                    check: Callable[[int, int], None] = lambda i, n: None) -> list[str]:
    out = []
    for i, prompt in enumerate(prompts):
        check(i, len(prompts))
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        made = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                              do_sample=False, num_beams=1)
        out.append(tokenizer.decode(made[0], skip_special_tokens=True))
    return out


@torch.no_grad()
def classify(model, inputs: list[dict], device: str,
             check: Callable[[int, int], None] = lambda i, n: None) -> tuple[torch.Tensor, float, bool]:
    """Predicted class of each input (a dict of model arguments), the mean top probability, and whether every
    logit was finite."""
    preds, confidence, finite = [], 0.0, True
    for i, batch in enumerate(inputs):
        check(i, len(inputs))
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
        finite = finite and bool(torch.isfinite(logits).all())
        probs = torch.softmax(logits, dim=-1)
        preds.append(logits.argmax(dim=-1).cpu())
        confidence += float(probs.max(dim=-1).values.sum())
    predictions = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)
    return predictions, confidence / max(1, len(predictions)), finite


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of positions where two models chose the same token (or class)."""
    n = min(len(a), len(b))
    return float((a[:n] == b[:n]).double().mean()) if n else float("nan")


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` deterministic smooth images (sums of random plane waves and blobs) in [-1, 1], shape (n, C, H, W):
    inputs a classifier can be compared on without its data, normalized as most image processors do."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = torch.zeros(n, channels, size, size)
    for i in range(n):
        for c in range(channels):
            freq = torch.rand(2, generator=g) * 8
            phase = torch.rand(1, generator=g) * 6.283
            wave = torch.sin(6.283 * (freq[0] * xx + freq[1] * yy) + phase)
            cy, cx = torch.rand(2, generator=g)
            blob = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)
            images[i, c] = 0.6 * wave + 0.8 * blob - 0.2
    return images.clamp(-1, 1)


def tokenizer_difference(tokenizer, reference, text: str, names: tuple[str, str] = ("merged", "base")) -> str | None:
    """None when both encode ``text`` to the same ids; else where they first part, with both tokens shown."""
    a = tokenizer(text)["input_ids"]
    b = reference(text)["input_ids"]
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    where = ""
    try:
        offsets = reference(text, return_offsets_mapping=True)["offset_mapping"]
        if i < len(offsets):
            at = offsets[i][0]
            where = f" (character {at}: {text[max(0, at - 12):at + 12]!r})"
    except (NotImplementedError, TypeError, ValueError, KeyError):
        pass

    def shown(tok, ids: list[int]) -> str:
        return f"{ids[i]} {tok.decode(ids[i:i + 1])!r}" if i < len(ids) else "end of text"

    line = (f"{names[0]}'s tokenizer differs from the {names[1]}'s at token {i}{where}: {shown(tokenizer, a)} vs "
            f"{shown(reference, b)}; {len(a)} vs {len(b)} tokens")
    if len(tokenizer) != len(reference):
        line += f"; vocabularies of {len(tokenizer)} vs {len(reference)}"
    return line
