"""``python -m merging zoo build|table|tune|eval|evolve|rebasin``: the demo zoo from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _zoo(args: argparse.Namespace):
    from .eval import Zoo

    return Zoo(args.zoo) if args.zoo else Zoo()


def cmd_build(args: argparse.Namespace) -> int:
    from .train import DEFAULT_ZOO_DIR, build

    report = build(args.out or DEFAULT_ZOO_DIR, seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    print(f"built {len(report['folders'])} checkpoints ({report['bytes']:,} bytes) in {report['seconds']:.1f} s "
          f"under {args.out or DEFAULT_ZOO_DIR}")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    from .table import build_table, to_markdown

    log = (lambda m: print(m, file=sys.stderr)) if args.verbose else None
    table = build_table(_zoo(args), split=args.split, log=log)
    text = to_markdown(table)
    print(text, end="")
    print(f"({table['split']} split, {table['seconds']:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import SEARCHES, TUNED_FILE, read_tuned, tune, write_tuned

    zoo = _zoo(args)
    keys = args.row or list(SEARCHES)
    unknown = [k for k in keys if k not in SEARCHES]
    if unknown:
        print(f"error: unknown row {', '.join(unknown)} (tunable: {', '.join(SEARCHES)})", file=sys.stderr)
        return 2
    results = {**read_tuned(zoo), **tune(zoo, keys, log=lambda m: print(m, file=sys.stderr))}
    out = Path(args.out) if args.out else zoo.root / TUNED_FILE
    write_tuned(results, out)
    print(f"{len(keys)} rows tuned on the validation split; written to {out}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval import average, evaluate_checkpoint

    scores = evaluate_checkpoint(args.checkpoint, _zoo(args), args.task or None, args.split)
    for task, acc in scores.items():
        print(f"{task:<10} {100 * acc:6.2f}")
    print(f"{'average':<10} {100 * average(scores):6.2f}   ({args.split} split)")
    return 0


def cmd_evolve(args: argparse.Namespace) -> int:
    from .evolve import evolve, save_config

    zoo = _zoo(args)
    result = evolve(zoo, args.method, args.granularity, args.budget, args.popsize, seed=args.seed,
                    log=lambda m: print(m, file=sys.stderr))
    out = Path(args.out) if args.out else zoo.root / "evolved.yml"
    note = (f"validation accuracy {result.start_score:.4f} at the start, {result.best_score:.4f} found "
            f"({result.evaluations} merges, {args.granularity} granularity, seed {args.seed})")
    save_config(result.config, out, zoo, note)
    print(f"{note}; config written to {out}")
    return 0


def cmd_rebasin(args: argparse.Namespace) -> int:
    from .rebasin import barrier_curve

    curve = barrier_curve(_zoo(args), points=args.points)
    print(f"{'alpha':>6} {'naive':>8} {'re-basin':>9} {'+REPAIR':>8}")
    for i, alpha in enumerate(curve["alpha"]):
        print(f"{alpha:6.2f} {100 * curve['naive'][i]:8.1f} {100 * curve['rebasin'][i]:9.1f} "
              f"{100 * curve['rebasin_repair'][i]:8.1f}")
    b = curve["barrier"]
    print(f"barrier (points of accuracy): naive {100 * b['naive']:.1f}, re-basin {100 * b['rebasin']:.1f}, "
          f"re-basin + REPAIR {100 * b['rebasin_repair']:.1f}; weight matching moved "
          f"{100 * curve['matched_units']:.0f}% of the hidden units")
    if args.json:
        Path(args.json).write_text(json.dumps(curve, indent=2) + "\n")
    return 0


def add_commands(subparsers) -> None:
    zoo = subparsers.add_parser("zoo", help="the demo zoo: small digit models whose merges can be scored")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)

    def with_zoo(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--zoo", default=None, help="the zoo folder (default: assets/zoo)")
        return p

    p = sub.add_parser("build", help="retrain every zoo model deterministically (about a minute on 2 cores)")
    p.add_argument("--out", default=None, help="where to write (default: assets/zoo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_build)

    p = with_zoo(sub.add_parser("table", help="the merging papers' table on the zoo: every method's merge, scored"))
    p.add_argument("--json", default=None, metavar="OUT", help="also write the table as JSON")
    p.add_argument("--markdown", default=None, metavar="OUT", help="also write the table as Markdown")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--verbose", action="store_true", help="report each row's time on stderr")
    p.set_defaults(func=cmd_table)

    p = with_zoo(sub.add_parser("tune", help="choose the frontier rows' free settings (λ, α, ...) on validation"))
    p.add_argument("--row", action="append", help="tune only this row (repeatable; default: every tunable row)")
    p.add_argument("--out", default=None, help="the JSON to write (default: <zoo>/tuned.json)")
    p.set_defaults(func=cmd_tune)

    p = with_zoo(sub.add_parser("eval", help="per-task accuracy of a checkpoint (each task with its own head)"))
    p.add_argument("checkpoint", help="a checkpoint folder holding a zoo model (a merge, a fine-tune, an EMR task)")
    p.add_argument("--task", action="append", help="score only this task (repeatable)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.set_defaults(func=cmd_eval)

    p = with_zoo(sub.add_parser("evolve", help="CMA-ES over merge coefficients on validation accuracy"))
    p.add_argument("--method", default="task_arithmetic", choices=["task_arithmetic", "ties"])
    p.add_argument("--granularity", default="model", choices=["model", "layer"])
    p.add_argument("--budget", type=int, default=120, help="merges evaluated, the starting point included")
    p.add_argument("--popsize", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="the YAML to write (default: <zoo>/evolved.yml)")
    p.set_defaults(func=cmd_evolve)

    p = with_zoo(sub.add_parser("rebasin", help="Git Re-Basin + REPAIR between mlp_a and mlp_b: the barrier curve"))
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--json", default=None, metavar="OUT")
    p.set_defaults(func=cmd_rebasin)
