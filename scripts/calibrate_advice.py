"""The sweeps behind ``merging.advice.THRESHOLDS``: where one method overtakes another, and what the diagnostics
read there. Prints Markdown tables (the README's "What the diagnostics mean" section quotes them). About a minute on
2 cores; outside CI (tests/test_advice.py pins the outcomes on the four synthetic cases and the demo zoo).

    python scripts/calibrate_advice.py

1. Noise sweep (``trim_conflict``): disjoint task vectors (4 and 8 models) in more and more dense noise; the trimmed
   sign disagreement where TIES overtakes task arithmetic (λ = 1).
2. Dominance sweep (``dominant_ratio``): one task vector scaled 1.5-5×, in the disjoint cases above and in the dense
   case; the norm ratio where TIES / task arithmetic fall behind the weighted averages.
3. Step sweep (``big_step``, ``sum_budget``): the demo zoo's task vectors scaled by s (θ_base + s·τ_i, heads
   untouched); the blocks' relative norm where task arithmetic and TIES fall below weight averaging.
4. The four named cases and the demo zoo: each candidate's score and the advice's pick.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from advice_cases import CASES, candidates, merged_state, named_case, recommendation_label, write_case  # noqa: E402

from merging.advice import _View, advise  # noqa: E402
from merging.analysis import analyze  # noqa: E402
from merging.config import config_from_dict  # noqa: E402


def stats_of(case) -> dict:
    return analyze(config_from_dict(case.config("ties", {"lambda": 1.0}, {"density": 0.2}), source="case"))


def scores(case, tmp: Path, only=None) -> dict[str, float]:
    out = {}
    for label, (method, params, mparams) in candidates(len(case.models)).items():
        if only is None or label in only:
            out[label] = case.score(merged_state(case.config(method, params, mparams), tmp / f"{case.name}-{label}"))
    return out


def fmt(x: float) -> str:
    return f"{x:.3f}"


def noise_sweep(tmp: Path) -> None:
    print("\n### 1. Noise sweep: TIES against task arithmetic\n")
    print("| models | noise | trimmed disagreement | task arithmetic | TIES | linear |\n|--:|--:|--:|--:|--:|--:|")
    for n in (4, 8):
        for noise in (0.05, 0.1, 0.15, 0.2, 0.3, 0.5):
            case = write_case(tmp / f"noise-{n}-{noise}", f"noise-{n}-{noise}", n=n, noise=noise)
            s = scores(case, tmp, {"task_arithmetic", "ties", "linear"})
            view = _View(stats_of(case))
            print(f"| {n} | {noise} | {fmt(view.trim_rate)} | {fmt(s['task_arithmetic'])} | {fmt(s['ties'])} | "
                  f"{fmt(s['linear'])} |")


def dominance_sweep(tmp: Path) -> None:
    print("\n### 2. Dominance sweep: one task vector k× the others\n")
    print("| case | k | max/median ‖τ‖ | task arithmetic | TIES | linear | NAN |\n|---|--:|--:|--:|--:|--:|--:|")
    families = {"orthogonal": CASES["orthogonal"], "conflicting": CASES["conflicting"], "dense": CASES["dominant"]}
    for name, spec in families.items():
        for k in (1.5, 2.0, 3.0, 5.0):
            case = write_case(tmp / f"dom-{name}-{k}", f"dom-{name}-{k}", **{**spec, "scale0": k})
            s = scores(case, tmp)
            view = _View(stats_of(case))
            print(f"| {name} | {k} | {view.dominant[1]:.2f} | {fmt(s['task_arithmetic'])} | {fmt(s['ties'])} | "
                  f"{fmt(s['linear'])} | {fmt(s['task_arithmetic+nan'])} |")


def scaled_zoo(zoo, s: float, folder: Path) -> Path:
    from safetensors.torch import save_file

    base = zoo.state("base")
    for name in ["base", *zoo.tasks]:
        (folder / name).mkdir(parents=True)
        shutil.copy(zoo.root / name / "config.json", folder / name)
        state = zoo.state(name)
        save_file({k: (base[k] + s * (state[k] - base[k])).contiguous() for k in state},
                  str(folder / name / "model.safetensors"))
    return folder


def zoo_config(folder: Path, tasks, method: str, params: dict, mparams: dict):
    return config_from_dict({"merge_method": method, "base_model": str(folder / "base"),
                             "models": [{"model": str(folder / t), "parameters": dict(mparams)} for t in tasks],
                             "parameters": dict(params)}, source="zoo")


def step_sweep(tmp: Path) -> None:
    from merging.zoo.eval import Zoo, average, evaluate_state
    from merging.zoo.merges import merged_tensors

    zoo = Zoo(ROOT / "assets" / "zoo")
    print("\n### 3. Step sweep: the demo zoo's task vectors scaled by s (average test accuracy, %)\n")
    print("| s | blocks' ‖τ_i‖/‖θ_base‖ | blocks' ‖Σ τ_i‖/‖θ_base‖ | task arithmetic λ=1 | TIES | linear | advice |")
    print("|--:|--:|--:|--:|--:|--:|---|")
    for s in (0.05, 0.1, 0.2, 0.3, 0.5, 1.0):
        folder = scaled_zoo(zoo, s, tmp / f"zoo-{s}")
        acc = {}
        for label, (method, params, mparams) in candidates(len(zoo.tasks)).items():
            if label in ("task_arithmetic", "ties", "linear"):
                config = zoo_config(folder, zoo.tasks, method, params, mparams)
                acc[label] = 100 * average(evaluate_state(zoo, merged_tensors(config, zoo)))
        stats = analyze(zoo_config(folder, zoo.tasks, "ties", {"lambda": 1.0}, {"density": 0.2}))
        view = _View(stats)
        pick = advise(stats)["recommendation"]["summary"]
        print(f"| {s} | {100 * view.rel_step:.2f} % | {100 * view.sum_step:.2f} % | {acc['task_arithmetic']:.1f} | "
              f"{acc['ties']:.1f} | {acc['linear']:.1f} | {pick} |")


def named(tmp: Path) -> None:
    print("\n### 4. The synthetic cases\n")
    labels = list(candidates(2))
    print("| case | " + " | ".join(labels) + " | advice |\n|---|" + "--:|" * len(labels) + "---|")
    for name in CASES:
        case = named_case(name, tmp / name)
        s = scores(case, tmp)
        rec = advise(stats_of(case))["recommendation"]
        cells = [fmt(s[k]) if k in s else "" for k in labels]
        print(f"| {name} | " + " | ".join(cells) + f" | {recommendation_label(rec)} |")


def zoo_recommendation() -> None:
    from merging.demo import zoo_models
    from merging.zoo.eval import Zoo, average, evaluate_state
    from merging.zoo.merges import merged_tensors

    demo = zoo_models()
    zoo = Zoo(ROOT / "assets" / "zoo")
    advice = advise(analyze(config_from_dict(demo.config_dict(), source="demo")))
    config = config_from_dict(advice["recommendation"]["config"], source="advice")
    accuracy = 100 * average(evaluate_state(zoo, merged_tensors(config, zoo)))
    table = json.loads((ROOT / "assets" / "zoo" / "table.json").read_text())
    free = [100 * r["average"] for r in table["rows"] if r.get("method") and r["average"] is not None]
    print(f"\n### 5. The demo zoo\n\nadvice: {advice['recommendation']['summary']}: {accuracy:.1f} % average; "
          f"the table's data-free methods: median {statistics.median(free):.1f} % (of {len(free)})")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="calibrate-advice-") as tmp:
        tmp = Path(tmp)
        noise_sweep(tmp)
        dominance_sweep(tmp)
        step_sweep(tmp)
        named(tmp)
        zoo_recommendation()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
