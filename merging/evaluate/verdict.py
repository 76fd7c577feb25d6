"""The verdict: is the merged model far outside the range of the models that went into it?

BROKEN (the "merge succeeded and the model is broken" signal), when any of:
- perplexity (causal LMs; seq2seq targets) above BROKEN_FACTOR × the worst input's, or not finite;
- the demo zoo: chance-corrected accuracy (mean over tasks of (acc − 1/classes) / (1 − 1/classes)) below the
  worst input's / BROKEN_FACTOR;
- classifiers: top-1 agreement with the closest input below the lowest agreement between two inputs /
  BROKEN_FACTOR, or one class predicted for every input while each input predicts several;
- weights missing from the merged folder (transformers initialized them at random), or NaN/Inf outputs.
WARNING: the merged model is worse than every input on the main figure (but within the factor), or it has more
(or fewer) parameters than its inputs, or its tokenizer encodes the held text differently from the base's (or it
has none). OK otherwise. NO COMPARISON when no input could be loaded.
"""

from __future__ import annotations

import math

BROKEN_FACTOR = 2.0
RULE = (f"BROKEN when the merged model's perplexity is above {BROKEN_FACTOR:g}× the worst input's (or not finite); "
        f"for the zoo, when its chance-corrected accuracy is below the worst input's / {BROKEN_FACTOR:g}; for "
        f"classifiers, when its agreement with the closest input is below the inputs' lowest agreement with each "
        f"other / {BROKEN_FACTOR:g}, or it predicts one class for everything; also when weights are missing. "
        "WARNING when it is worse than every input, changes size, or its tokenizer differs from the base's.")


def judge(report: dict) -> dict:
    """``{"status", "line", "findings": [{"level", "text"}], "rule"}`` for a report built by ``run.evaluate``."""
    rows = report["rows"]
    merged = next(r for r in rows if r["role"] == "merged")
    inputs = [r for r in rows if r["role"] != "merged" and not r.get("skipped")]
    findings: list[tuple[str, str]] = []
    if merged.get("missing_weights"):
        names = merged["missing_weights"]
        shown = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
        findings.append(("broken", f"{len(names)} weights are missing from the merged folder and transformers "
                                   f"initialized them at random ({shown})"))
    if merged.get("finite") is False:
        findings.append(("broken", "the merged model's outputs hold NaN or Inf"))
    kind = report["kind"]
    headline = None
    if kind in ("causal_lm", "seq2seq"):
        headline = _perplexity(merged, inputs, findings)
    elif kind == "zoo":
        headline = _zoo(merged, inputs, findings)
    else:
        headline = _classifier(merged, inputs, report, findings)
    _sizes(merged, inputs, findings)
    tok = report.get("tokenizer") or {}
    if tok.get("difference"):
        findings.append(("warning", tok["difference"]))
    if tok.get("missing"):
        findings.append(("warning", tok["missing"]))
    for r in rows:
        if r.get("skipped"):
            findings.append(("info", f"{r['label']} not compared: {r['skipped']}"))

    levels = [level for level, _ in findings]
    if "broken" in levels:
        status = "broken"
    elif not inputs:
        status = "no comparison"
    elif "warning" in levels:
        status = "warning"
    else:
        status = "ok"
    first = next((text for level, text in findings if level == status), None)
    line = f"verdict: {status.upper()}: " + (first or headline or "")
    if first and headline and headline.split()[0] not in first:
        line += f" ({headline})"
    return {"status": status, "line": line, "findings": [{"level": lv, "text": t} for lv, t in findings],
            "rule": RULE, "factor": BROKEN_FACTOR}


def _finite(values: list) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _perplexity(merged: dict, inputs: list[dict], findings: list) -> str | None:
    ppl = merged.get("perplexity")
    known = _finite([r.get("perplexity") for r in inputs])
    if ppl is None:
        return None
    if not known:
        return f"perplexity {ppl:.4g}, nothing to compare it with"
    lo, hi = min(known), max(known)
    if not math.isfinite(ppl) or ppl > BROKEN_FACTOR * hi:
        ratio = "not finite" if not math.isfinite(ppl) else f"{ppl / hi:.3g}× the worst input's {hi:.4g}"
        findings.append(("broken", f"perplexity {ppl:.4g} is {ratio} (limit {BROKEN_FACTOR:g}×)"))
    elif ppl > hi:
        findings.append(("warning", f"perplexity {ppl:.4g} is above every input's (worst {hi:.4g}, "
                                    f"{ppl / hi:.2f}×; broken above {BROKEN_FACTOR:g}×)"))
    if ppl < lo:
        return f"perplexity {ppl:.4g}, below every input's ({lo:.4g}–{hi:.4g})"
    return f"perplexity {ppl:.4g}, inputs {lo:.4g}–{hi:.4g}"


def _zoo(merged: dict, inputs: list[dict], findings: list) -> str | None:
    skill = merged.get("skill")
    known = [(r["skill"], r["average"]) for r in inputs if r.get("skill") is not None]
    if skill is None:
        return None
    avg = merged["average"]
    if not known:
        return f"average accuracy {avg:.1%}, nothing to compare it with"
    worst_skill = min(s for s, _ in known)
    lo, hi = min(a for _, a in known), max(a for _, a in known)
    if skill < worst_skill / BROKEN_FACTOR:
        findings.append(("broken", f"chance-corrected accuracy {skill:.3f} is below the worst input's "
                                   f"{worst_skill:.3f} / {BROKEN_FACTOR:g} (average accuracy {avg:.1%})"))
    elif avg < lo:
        findings.append(("warning", f"average accuracy {avg:.1%} is below every input's ({lo:.1%}–{hi:.1%})"))
    return f"average accuracy {avg:.1%}, inputs {lo:.1%}–{hi:.1%}"


def _classifier(merged: dict, inputs: list[dict], report: dict, findings: list) -> str | None:
    agree = _finite([r.get("agreement") for r in inputs])
    if not agree:
        return None
    closest = max(agree)
    pairwise = _finite(list((report.get("pairwise") or {}).values()))
    lowest = min(pairwise) if pairwise else None
    classes = merged.get("classes") or {}
    if len(classes) == 1 and inputs and all(len(r.get("classes") or {}) > 1 for r in inputs):
        findings.append(("broken", f"the merged model predicts class {next(iter(classes))} for every input; "
                                   "each input predicts several"))
    if lowest is not None and closest < lowest / BROKEN_FACTOR:
        findings.append(("broken", f"it agrees with its closest input on {closest:.1%} of predictions, below the "
                                   f"inputs' lowest agreement with each other ({lowest:.1%}) / {BROKEN_FACTOR:g}"))
    elif lowest is not None and closest < lowest:
        findings.append(("warning", f"it agrees with its closest input on {closest:.1%} of predictions, less than "
                                    f"the inputs agree with each other (lowest {lowest:.1%})"))
    return f"agreement with its closest input {closest:.1%}" + (f", inputs among themselves ≥ {lowest:.1%}"
                                                               if lowest is not None else "")


def _sizes(merged: dict, inputs: list[dict], findings: list) -> None:
    sizes = [r["parameters"] for r in inputs if r.get("parameters")]
    n = merged.get("parameters")
    if not sizes or not n:
        return
    if n > max(sizes):
        findings.append(("warning", f"the merged model has {n:,} parameters, {n - max(sizes):,} more than its "
                                    f"largest input ({max(sizes):,}, +{(n / max(sizes) - 1):.1%})"))
    elif n < min(sizes):
        findings.append(("warning", f"the merged model has {n:,} parameters, fewer than its smallest input "
                                    f"({min(sizes):,})"))
    base = next((r for r in inputs if r["role"] == "base"), None)
    if base and base.get("dtype") and merged.get("dtype") and base["dtype"] != merged["dtype"]:
        findings.append(("info", f"dtype {merged['dtype']}, the base's is {base['dtype']}"))
