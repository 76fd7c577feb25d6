"""The report as text: one table with a row per model, the continuations side by side, the findings and the
verdict line (the CLI prints it; the app shows the same pieces as Markdown)."""

from __future__ import annotations

import json
import math
from pathlib import Path

KIND_NAMES = {"causal_lm": "causal LM", "seq2seq": "seq2seq model", "sequence_classifier": "sequence classifier",
              "image_classifier": "image classifier", "zoo": "demo zoo model"}


def params(n: int | None) -> str:
    if not n:
        return "–"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def num(x, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}%"


def heading(report: dict) -> str:
    t = report.get("text") or {}
    kind = KIND_NAMES.get(report["kind"], report["kind"])
    where = f"{report['merged']} ({kind}) on {report['device']} in {report['dtype']}"
    if report["kind"] == "causal_lm":
        return (f"{where}: {t['tokens']} tokens of {t['source']}, windows of {t['window']} moving by {t['stride']} "
                f"(each token after the first scored once, with at least {t['window'] - t['stride']} tokens of "
                f"context after the first window)")
    if report["kind"] == "seq2seq":
        return f"{where}: {t['pairs']} sentence pairs of {t['source']} ({t['target_tokens']} target tokens)"
    if report["kind"] == "zoo":
        return f"{where}: {t['source']}"
    return f"{where}: {t['inputs']} inputs, from {t['source']}"


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Column names and cells of the table, one row per model (skipped ones say why)."""
    kind = report["kind"]
    if kind in ("causal_lm", "seq2seq"):
        cols = ["model", "role", "parameters", "dtype", "perplexity" if kind == "causal_lm" else "target perplexity",
                "top-1 acc", "top-1 agrees with merged", "tokenizer", "seconds"]
        cell = lambda r: [num(r.get("perplexity")), pct(r.get("top1")), pct(r.get("agreement")),  # noqa: E731
                          r.get("tokenizer", "–")]
    elif kind == "zoo":
        tasks = report["text"]["tasks"]
        cols = ["model", "role", "parameters", "dtype", "average", "chance-corrected", *tasks, "seconds"]
        cell = lambda r: [pct(r.get("average")), num(r.get("skill"), 3),  # noqa: E731
                          *[pct((r.get("accuracy") or {}).get(t)) for t in tasks]]
    else:
        cols = ["model", "role", "parameters", "dtype", "agrees with merged", "classes predicted", "mean top prob",
                "seconds"]
        cell = lambda r: [pct(r.get("agreement")), _classes(r.get("classes")), num(r.get("confidence"), 3)]  # noqa: E731
    rows = []
    for r in report["rows"]:
        head = [r["label"], r["role"], params(r.get("parameters")), r.get("dtype") or "–"]
        if r.get("skipped"):
            rows.append(head + [f"not compared: {r['skipped']}"] + [""] * (len(cols) - len(head) - 1))
        else:
            rows.append(head + cell(r) + [num(r.get("seconds"), 3)])
    return cols, rows


def _classes(counts: dict | None) -> str:
    if not counts:
        return "–"
    shown = ", ".join(f"{k}: {v}" for k, v in list(counts.items())[:4])
    return shown + (" …" if len(counts) > 4 else "")


def markdown_table(report: dict) -> str:
    cols, rows = table_rows(report)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def continuations_markdown(report: dict) -> str:
    """The prompts as rows and the models as columns: each model's greedy continuation side by side."""
    conts = report.get("continuations") or []
    if not conts:
        return ""
    labels = [r["label"] for r in report["rows"] if r["label"] in conts[0]["outputs"]]
    esc = lambda s: md_escape(_one_line(str(s)))  # noqa: E731
    lines = ["| prompt | " + " | ".join(labels) + " |", "|" + "|".join("---" for _ in range(len(labels) + 1)) + "|"]
    lines += ["| " + esc(c["prompt"]) + " | " + " | ".join(esc(c["outputs"][k]) for k in labels) + " |"
              for c in conts]
    return "\n".join(lines)


def caption(report: dict) -> str:
    """What the main chart shows, in a sentence or two (the app puts it under the chart)."""
    t = report.get("text") or {}
    from .verdict import BROKEN_FACTOR

    if report["kind"] in ("causal_lm", "seq2seq"):
        what = (f"{t['tokens']} tokens of {t['source']}, in windows of {t['window']} moving by {t['stride']}"
                if report["kind"] == "causal_lm" else f"{t['target_tokens']} target tokens ({t['pairs']} sentence "
                                                      f"pairs of {t['source']})")
        return (f"Token-level perplexity of each model on {what}; lower is better. The dashed line is the "
                f"broken-merge limit: {BROKEN_FACTOR:g}× the worst input's perplexity.")
    if report["kind"] == "zoo":
        return (f"Average test accuracy over {len(t.get('tasks') or [])} tasks, each scored with its own head; "
                f"BROKEN when the merged model's chance-corrected accuracy is below the worst input's / "
                f"{BROKEN_FACTOR:g}.")
    return (f"How often each input predicts the merged model's class, on {t.get('inputs')} inputs "
            f"({t.get('source')}).")


def format_report(report: dict) -> str:
    """The CLI's text: heading, the table, continuations per prompt (one line per model), findings, verdict."""
    out = [heading(report), "", markdown_table(report)]
    conts = report.get("continuations") or []
    if conts:
        out += ["", f"greedy continuations ({report.get('new_tokens', '?')} new tokens at most):"]
        width = max(len(k) for c in conts for k in c["outputs"]) if conts[0]["outputs"] else 0
        for c in conts:
            out.append(f"  prompt {c['prompt']!r}")
            out += [f"    {k:<{width}} │ {_one_line(v)}" for k, v in c["outputs"].items()]
    v = report["verdict"]
    notes = [f"{f['level']}: {f['text']}" for f in v["findings"] if not v["line"].endswith(f["text"])
             and f["text"] not in v["line"]]
    if notes:
        out += [""] + notes
    out += ["", v["line"], f"({report['seconds']:.1f} s)"]
    return "\n".join(out)


def jsonable(value):
    """The report as strict JSON data: non-finite numbers become null (each row's ``finite`` says why)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value if value is None or isinstance(value, (str, int, bool)) else str(value)


def md_escape(text: str) -> str:
    """Model output shown literally in a Markdown cell: no code spans, emphasis, HTML or column breaks."""
    for ch in "\\`*_[]|#~":
        text = text.replace(ch, "\\" + ch)
    return text.replace("<", "&lt;").replace(">", "&gt;")


def _one_line(text: str) -> str:
    return " ".join(text.replace("\n", " ⏎ ").split()) or "∅"


def write_json(report: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(report), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
