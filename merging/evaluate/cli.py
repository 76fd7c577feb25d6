"""``python -m merging evaluate MERGED_DIR [--compare BASE_OR_MODEL ...] [--text FILE] [--prompts FILE]
[--max-tokens N] [--device auto|cpu|cuda] [--json OUT]``: does the merged model still work?

Loads the merged folder and the models it is compared with (``--compare``, the first one as the base; by default
the inputs its merge_config.yml names) from local folders or the Hub cache, never downloading, one at a time, and
prints one table with a row per model, greedy continuations side by side and a verdict line (see
merging/evaluate/verdict.py and the README). Exit codes: 0 checked (whatever the verdict; with ``--strict``, 3 when
it is BROKEN), 2 bad input, 1 a bug.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import budget
from ..errors import MergeError


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 1, got {value}")
    return value


def _progress():
    """A one-line progress display on a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return None, lambda: None

    def show(fraction: float, text: str) -> None:
        print(f"\r\033[K{100 * fraction:5.1f}% {text}"[:160], end="", file=sys.stderr, flush=True)

    return show, lambda: print("\r\033[K", end="", file=sys.stderr, flush=True)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .report import format_report, write_json
    from .run import evaluate

    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise MergeError(f"--json {args.json}: the folder {Path(args.json).absolute().parent} does not exist")
    show, close = _progress()
    try:
        report = evaluate(args.merged, args.compare, text=args.text, prompts=args.prompts,
                          max_tokens=args.max_tokens, new_tokens=args.new_tokens, window=args.window,
                          stride=args.stride, device=args.device, dtype=args.dtype, progress=show,
                          time_budget=args.time_budget)
    finally:
        close()
    print(format_report(report))
    if args.json:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    return 3 if args.strict and report["verdict"]["status"] == "broken" else 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("evaluate", help="sanity-check a merged model beside its inputs (perplexity, "
                                               "agreement, continuations, sizes, tokenizer)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("merged", metavar="MERGED_DIR", help="the merged checkpoint's folder")
    p.add_argument("--compare", nargs="+", metavar="BASE_OR_MODEL",
                   help="models to compare with, the base first (local folders or Hub repos already in the cache); "
                        "default: the inputs named by MERGED_DIR/merge_config.yml")
    p.add_argument("--text", metavar="FILE", help="held text (UTF-8) to score; default: the built-in sample under "
                                                  "assets/eval (public-domain prose and code)")
    p.add_argument("--prompts", metavar="FILE", help="prompts for the greedy continuations, one per line "
                                                     "(\\n for a newline); default: assets/eval/prompts.txt")
    p.add_argument("--max-tokens", type=_positive, default=4096, metavar="N",
                   help="score at most the first N tokens of the held text (default 4096)")
    p.add_argument("--new-tokens", type=_positive, default=24, metavar="N",
                   help="tokens generated per prompt (default 24)")
    p.add_argument("--window", type=_positive, metavar="W",
                   help="tokens per perplexity window (default: the model's context, at most 1024)")
    p.add_argument("--stride", type=_positive, metavar="S", help="how far each window moves (default W/2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="evaluation dtype (default: float32 on the CPU, the stored dtype on CUDA)")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON")
    budget.add_flag(p)
    p.add_argument("--strict", action="store_true", help="exit with 3 when the verdict is BROKEN")
    p.set_defaults(func=cmd_evaluate)
