"""Tensors → plan and merge seconds: the figures behind tests/test_scaling.py, up to 100 000 tensors.

Builds a base and a fine-tune of N tiny float32 tensors each (named as a mixture-of-experts'), then times planning
(``plan_merge``: headers, plan, no weights read) and a task-arithmetic merge through the CLI's library call.

    python scripts/scaling.py [--sizes 1000 10000 40000 100000] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 40_000, 100_000])
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    from test_scaling import config

    from merging.config import parse_config
    from merging.engine import plan_merge, run_merge

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.sizes:
            text = config(root, n)
            started = time.perf_counter()
            plan_merge(parse_config(text))
            planned = time.perf_counter() - started
            started = time.perf_counter()
            run_merge(parse_config(text), root / f"out{n}")
            merged = time.perf_counter() - started
            rows.append({"tensors": n, "plan_s": round(planned, 2), "merge_s": round(merged, 2)})
            print(f"{n:>7} tensors: plan {planned:6.2f} s, merge {merged:6.2f} s", flush=True)
            for p in (root / f"base{n}", root / f"ft{n}", root / f"out{n}"):
                shutil.rmtree(p, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
