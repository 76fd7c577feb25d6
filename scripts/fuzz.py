"""A longer fuzz run of the untrusted-input parsers, outside CI.

Runs the hypothesis properties of tests/test_fuzz_properties.py (the safetensors header reader and the config
parser) and tests/test_fuzz_surfaces.py (the advice, the tokenizer union's tokenizer.json reader, every method on
degenerate tensors) in rounds of fresh random examples until the time is up, and prints how many inputs each property saw
and every failure found (hypothesis shrinks it to a minimal example first).

    python scripts/fuzz.py --seconds 120 [--json result.json]

Exit status 1 when any property failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120, help="total time budget (default 120)")
    parser.add_argument("--batch", type=int, default=500, help="examples per property per round (default 500)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)

    import test_fuzz_properties as props
    import test_fuzz_surfaces as surfaces
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.errors import InvalidArgument

    counts: dict[str, int] = {}

    def counting(fn, key):
        def wrapped(*a, **kw):
            counts[key] = counts.get(key, 0) + 1
            return fn(*a, **kw)
        return wrapped

    # Every property funnels its input through one of these checks: count the inputs there.
    props.check_header = counting(props.check_header, "safetensors header")
    props.check_config = counting(props.check_config, "config")
    surfaces.check_advice = counting(surfaces.check_advice, "advice")
    surfaces.check_tokenizer = counting(surfaces.check_tokenizer, "tokenizer.json")
    surfaces.check_method = counting(surfaces.check_method, "method on degenerate tensors")
    tests = {name: getattr(module, name) for module in (props, surfaces) for name in dir(module)
             if name.startswith("test_")}
    per_test: dict[str, dict] = {name: {"rounds": 0, "failures": []} for name in tests}
    deadline = time.monotonic() + args.seconds
    started = time.monotonic()
    rounds = 0
    while time.monotonic() < deadline:
        for name, test in tests.items():
            if time.monotonic() >= deadline:
                break
            before = dict(counts)
            long_run = settings(max_examples=args.batch, deadline=None, database=None, derandomize=False,
                                phases=[Phase.generate, Phase.shrink],  # the explicit examples ran in CI already
                                suppress_health_check=list(HealthCheck))
            # The CI settings (200 examples) are replaced by these; hypothesis reads this attribute per call.
            test._hypothesis_internal_use_settings = long_run
            try:
                test()
            except InvalidArgument:
                raise  # a broken harness, not a finding
            except Exception as exc:  # noqa: BLE001 - a found failure: record it and go on fuzzing
                text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
                notes = "\n".join(getattr(exc, "__notes__", []))
                found = f"{text}\n{notes}".strip()[:4000]
                if found not in per_test[name]["failures"]:
                    per_test[name]["failures"].append(found)
            per_test[name]["rounds"] += 1
            per_test[name]["examples"] = per_test[name].get("examples", 0) + sum(
                counts.get(k, 0) - before.get(k, 0) for k in counts)
        rounds += 1
    summary = {
        "seconds": round(time.monotonic() - started, 1),
        "examples_total": sum(counts.values()),
        "examples_by_parser": counts,
        "properties": per_test,
        "failures": sum(len(t["failures"]) for t in per_test.values()),
    }
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
