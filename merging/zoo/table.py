"""The merging papers' main table (the EMR-Merging paper's Table 2, grown with the 2024–2025 methods), on the zoo:
per-task test accuracy of each method's merge of the eight task fine-tunes, their average, and the normalized
accuracy (mean over tasks of merged accuracy / that task's individual fine-tune's accuracy), next to the average each
paper reports on ViT-B/32 with eight tasks (``rows.PAPER_VIT_B32``, with its table).

Each row follows its paper's protocol (``rows.rows``): fixed settings where the paper fixes them, and the free ones
(λ, α, ...) chosen on the validation split only (``tuned.json``, from ``python -m merging zoo tune``), as the
CMA-ES row's ``evolved.yml``; the test split is read only here.

Merges go through the library (a config validated as ``parse_config`` validates it, run by ``run_merge`` with the
registered methods; EMR's task models rebuilt by ``emr_store.extract_task``), so a row is what
``python -m merging merge`` gives for the same YAML; a method that is not registered (yet) is listed as n/a.
Fisher merging and RegMean need data and run here directly.
Every merged body is scored with each task's own head (the heads are never merged).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import load_config
from .eval import Zoo, average, evaluate_checkpoint, evaluate_state
from .merges import is_registered, merged_tensors, zoo_config
from .rows import PAPER_VIT_B32, Row, rows
from .train import single_thread
from .tune import TUNED_FILE, read_tuned

SPLIT = "test"
EVOLVED_CONFIG = "evolved.yml"


def build_table(zoo: Zoo | None = None, split: str = SPLIT, log: Callable[[str], None] | None = None) -> dict:
    """Every row of the table on ``split``: {"tasks", "rows": [{key, label, accuracy, average, normalized, ...}]}."""
    zoo = zoo or Zoo()
    with single_thread():  # one thread: these tensors are tiny, and extra threads only contend
        return _build_table(zoo, split, log)


def _build_table(zoo: Zoo, split: str, log: Callable[[str], None] | None) -> dict:
    tasks = zoo.tasks
    started = time.monotonic()
    individual = {t: evaluate_state(zoo, zoo.state(t), [t], split)[t] for t in tasks}
    tuned = read_tuned(zoo)
    out_rows = []
    for row in rows(len(tasks)):
        t0 = time.monotonic()
        entry: dict[str, Any] = {"key": row.key, "label": row.label, "method": row.method, "note": row.note,
                                 "protocol": row.protocol}
        try:
            scores, config_yaml = _row_scores(row, zoo, tasks, split, individual, tuned)
        except _NotAvailable as exc:
            entry.update(status=f"n/a: {exc}", accuracy=None, average=None, normalized=None)
        else:
            entry.update(status="ok", accuracy=scores, average=average(scores),
                         normalized=sum(scores[t] / individual[t] for t in tasks) / len(tasks), config=config_yaml)
        entry["seconds"] = time.monotonic() - t0
        paper = PAPER_VIT_B32.get(row.key)
        entry["paper_vit_b32_average"] = paper[0] if paper else None
        entry["paper_source"] = paper[1] if paper else None
        out_rows.append(entry)
        if log:
            log(f"{row.label}: {entry['status']} ({entry['seconds']:.1f} s)")
    shown = _shown_path(zoo.root)
    for entry in out_rows:  # configs as a user would write them from the repository root, not this machine's paths
        if entry.get("config"):
            entry["config"] = entry["config"].replace(str(zoo.root), shown)
    return {"tasks": tasks, "split": split, "rows": out_rows, "seconds": time.monotonic() - started, "zoo": shown}


def _shown_path(path: Path) -> str:
    """``path`` relative to the current folder when it lies inside it (``assets/zoo``), else as it is."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class _NotAvailable(Exception):
    pass


def _row_scores(row: Row, zoo: Zoo, tasks: list[str], split: str, individual: dict[str, float],
                tuned: dict[str, dict]) -> tuple[dict[str, float], str | None]:
    if row.key == "pretrained":
        return evaluate_state(zoo, zoo.state("base"), tasks, split), None
    if row.key == "individual":
        return dict(individual), None
    if row.key == "fisher":
        from .fisher import fisher_merge

        return evaluate_state(zoo, fisher_merge(zoo, tasks), tasks, split), None
    if row.key == "regmean":
        from .regmean import regmean_merge

        return evaluate_state(zoo, regmean_merge(zoo, tasks), tasks, split), None
    if row.key == "evolved":
        from .evolve import config_on_zoo

        path = zoo.root / EVOLVED_CONFIG
        if not path.is_file():
            raise _NotAvailable(f"no {path.name} in the zoo (run `python -m merging zoo evolve`)")
        config = config_on_zoo(load_config(str(path)), zoo)
        if not is_registered(config.merge_method):
            raise _NotAvailable(f"method {config.merge_method!r} is not registered")
        return evaluate_state(zoo, merged_tensors(config, zoo), tasks, split), path.read_text()
    if not is_registered(row.method):
        raise _NotAvailable(f"method {row.method!r} is not registered yet")
    if row.method in ("emr", "emr_rescale"):
        return emr_scores(zoo, tasks, split, row.method, row.params)
    params, model_params = row.params, None
    if row.tuned:
        if row.key not in tuned:
            raise _NotAvailable(f"no `{row.key}` in {TUNED_FILE} (run `python -m merging zoo tune`)")
        params, model_params = tuned[row.key]["parameters"], tuned[row.key].get("model_parameters")
    config = zoo_config(zoo, row.method, params, model_params, tasks=tasks)
    return evaluate_state(zoo, merged_tensors(config, zoo), tasks, split), config.to_yaml()


def emr_scores(zoo: Zoo, tasks: list[str], split: str = SPLIT, method: str = "emr",
               params: dict[str, Any] | None = None) -> tuple[dict[str, float], str]:
    """EMR-Merging through the CLI's path: merge into a folder, extract each task's model (``emr-extract``), score
    it on its own task. The heads are kept per task (``skip``), so they do not enter the rescalers."""
    from ..emr_store import extract_task
    from ..engine import run_merge

    config = zoo_config(zoo, method, params if params is not None else {"skip": ["head."]}, tasks=tasks)
    scores = {}
    with tempfile.TemporaryDirectory(prefix="zoo-emr-") as tmp:
        merged = Path(tmp) / "merged"
        run_merge(config, merged, device="cpu")
        for index, task in enumerate(tasks):
            out = Path(tmp) / f"task-{task}"
            extract_task(str(merged), index, str(out))
            scores[task] = evaluate_checkpoint(out, zoo, [task], split)[task]
    return scores, config.to_yaml()


def to_markdown(table: dict) -> str:
    """The table in Markdown: accuracy in %, one column per task, then the average, the normalized accuracy and
    the paper's ViT-B/32 8-task average with its source (a letter, its table listed under the table)."""
    tasks = table["tasks"]
    head = ["Method", *tasks, "Avg", "Norm.", "Paper avg (ViT-B/32, 8 tasks)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["--:"] * (len(head) - 1)) + "|"]
    sources: list[str] = []
    for row in table["rows"]:
        paper = row.get("paper_vit_b32_average")
        source = row.get("paper_source")
        if source and source not in sources:
            sources.append(source)
        mark = f" ({chr(ord('a') + sources.index(source))})" if source else ""
        paper_text = f"{paper:.1f}{mark}" if paper is not None else ""
        if row["accuracy"] is None:
            cells = [row["label"], *(["n/a"] * len(tasks)), "n/a", "n/a", paper_text]
        else:
            cells = [row["label"], *(f"{100 * row['accuracy'][t]:.1f}" for t in tasks), f"{100 * row['average']:.1f}",
                     f"{100 * row['normalized']:.1f}", paper_text]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['label']}: {r['status']}" for r in table["rows"] if r["status"] != "ok"]
    text = "\n".join(lines) + "\n"
    if sources:
        text += "\nPaper averages: " + "; ".join(f"({chr(ord('a') + i)}) {s}" for i, s in enumerate(sources)) + ".\n"
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def protocols_markdown(table: dict) -> str:
    """Each row's protocol, one bullet per row (the README lists them under the table)."""
    return "".join(f"- **{r['label']}**: {r['protocol']}\n" for r in table["rows"] if r.get("protocol"))


def scores_tensor(table: dict) -> torch.Tensor:
    """(rows × tasks) accuracies, NaN where a row is n/a (for charts)."""
    return torch.tensor([[r["accuracy"][t] if r["accuracy"] else float("nan") for t in table["tasks"]]
                         for r in table["rows"]])
