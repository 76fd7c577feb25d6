"""Findings and a recommendation from the analysis JSON (merging/advice.py): each rule on hand-built statistics,
the numbers behind every finding, and the calibration that must hold on real merges: on the four synthetic cases
of tests/advice_cases.py the recommended config scores best of every config the advice can give, and on the demo zoo
it scores at least the median of the zoo table's data-free methods."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from advice_cases import CASES, EXPECTED, candidates, merged_state, named_case, recommendation_label

from merging.advice import THRESHOLDS, advice_text, advise, recommended_yaml
from merging.config import config_from_dict, parse_config

ROOT = Path(__file__).resolve().parent.parent


def rate(r):
    return {"rate": r, "ci95": None}


def block(name: str, n: int, norms: list[float], rel: float, cos, conflict: float, kind: str = "layer") -> dict:
    matrix = cos if isinstance(cos, list) else [[1.0 if i == j else cos for j in range(n)] for i in range(n)]
    base = statistics.median(norms) / rel
    return {"name": name, "kind": kind, "layer": 0, "tensors": 7, "base_norm": base, "task_vector_norm": norms,
            "relative_task_vector_norm": [x / base for x in norms], "cosine_similarity": matrix,
            "sign_conflict": rate(conflict), "trimmed_sign_disagreement": rate(0.01)}


def hand_built(n: int = 4, *, norms: list[float] | None = None, rel: float = 0.01, cos=0.0, trim: float = 0.01,
               conflict: float = 0.8, method: str = "ties", head_rel: float | None = None, notes=(),
               emr_error: float = 0.5, distance: float = 0.6, names=("model.layers.0.mlp.up_proj.weight",),
               overlap: float | None = None) -> dict:
    norms = norms or [1.0] * n
    models = [f"org/m{i}" for i in range(n)]
    groups = [block(f"layer {k}", n, norms, rel, cos, conflict + 0.01 * k) for k in range(3)]
    if head_rel is not None:
        groups.append(block("head", n, norms, head_rel, cos, conflict, kind="head"))
    whole = {**block("model", n, norms, rel, cos, conflict), "trimmed_sign_disagreement": rate(trim),
             "nan_coefficients": [1 / n] * n, "merged_distance": [distance] * n,
             "emr": {"mask_density": [rate(0.6)] * n, "rescaler": [rate(0.7)] * n,
                     "reconstruction_error": {"unified": [1.0] * n, "masked": [0.8] * n,
                                              "masked_rescaled": [emr_error] * n}}}
    if overlap is not None:
        whole["spectral"] = {"method": "exact", "interference": overlap, "sum_flatness": 0.6}
    config = {"merge_method": method, "base_model": "org/base", "models": [{"model": m} for m in models],
              "dtype": "bfloat16"}
    return {"schema_version": 1, "config_yaml": yaml.safe_dump(config), "model": whole, "groups": groups,
            "tensors": [{"name": x} for x in names],
            "meta": {"mode": "exact", "method": method, "base_model": "org/base", "models": models,
                     "model_labels": [f"m{i}" for i in range(n)], "nan_on": "weights", "notes": list(notes),
                     "trim": {"density_from": "config", "default": 0.2, "densities": [0.2] * n}}}


def rec(stats: dict) -> dict:
    return advise(stats)["recommendation"]


# --- the rules, first match wins -----------------------------------------------------------------------------------

def test_one_model_gets_slerp_from_the_base():
    r = rec(hand_built(1))
    assert r["method"] == "slerp" and r["parameters"] == {"t": 0.5} and len(r["config"]["models"]) == 1


def test_big_steps_get_averaging():
    r = rec(hand_built(4, rel=0.105, trim=0.15))
    assert r["method"] == "linear" and "10.5 %" in r["reason"] and r["rule"] == "big steps"
    assert rec(hand_built(4, rel=THRESHOLDS["big_step"] * 0.9, trim=0.15))["method"] == "ties"
    assert rec(hand_built(4, rel=0.105, overlap=THRESHOLDS["subspace_overlap"] * 0.9))["method"] == "linear"


def test_big_steps_in_overlapping_subspaces_get_iso_c_within_the_sum_budget():
    stats = hand_built(4, rel=0.105, cos=0.2, overlap=0.17)
    r = rec(stats)
    assert r["method"] == "iso_c" and r["rule"] == "big steps, overlapping subspaces" and "17 %" in r["reason"]
    sum_step = 0.105 * (4 + 12 * 0.2) ** 0.5  # ‖Σ τ_i‖ / ‖θ_base‖ of 4 equal norms at cos 0.2
    assert r["parameters"]["lambda"] == float(f"{THRESHOLDS['sum_budget'] / sum_step:.2g}")  # 2 digits
    assert parse_config(yaml.safe_dump(r["config"])).merge_method == "iso_c"
    assert rec(hand_built(4, rel=0.01, overlap=0.5))["method"] == "task_arithmetic"  # small steps: the old rules


def test_the_subspace_overlap_is_read_against_random_subspaces():
    high = next(f for f in advise(hand_built(4, overlap=0.17))["findings"] if f["key"] == "subspace_overlap")
    assert high["level"] == "warn" and "17 %" in high["text"] and "TSV-M" in high["text"] and "0.6" in high["text"]
    low = next(f for f in advise(hand_built(4, overlap=0.04))["findings"] if f["key"] == "subspace_overlap")
    assert low["level"] == "info" and "directions of its own" in low["text"]
    assert not [f for f in advise(hand_built(4))["findings"] if f["key"] == "subspace_overlap"]


def test_a_dominant_model_gets_nan_on_task_vectors():
    r = rec(hand_built(4, norms=[5.0, 1.0, 1.0, 1.0], trim=0.15))
    assert (r["method"], r["parameters"]["coefficients"], r["parameters"]["nan_on"]) == \
        ("task_arithmetic", "nan", "task_vector")
    assert "m0" in r["reason"] and "5×" in r["reason"]
    assert rec(hand_built(4, norms=[3.0, 1.0, 1.0, 1.0], trim=0.15))["method"] == "ties"  # 3× is not dominant
    assert rec(hand_built(4, norms=[5.0, 1.0, 1.0, 1.0], rel=0.1))["parameters"].get("coefficients") == "nan"  # an
    # average weighted against the big one, before the plain average of big steps


def test_two_models_get_nuslerp():
    assert rec(hand_built(2, trim=0.15))["method"] == "nuslerp"


def test_trimmed_conflicts_get_ties_with_the_configs_density():
    r = rec(hand_built(8, trim=0.15))
    assert r["method"] == "ties" and r["model_parameters"]["density"] == 0.2 and r["parameters"]["lambda"] == 1.0
    assert "15 %" in r["reason"]


def test_little_interference_gets_task_arithmetic_scaled_to_the_sum_budget():
    r = rec(hand_built(4, trim=0.01, rel=0.01))  # orthogonal: ‖Σ τ‖ = 2 × 1 % = 2 %, within the budget
    assert r["method"] == "task_arithmetic" and r["parameters"] == {"lambda": 1.0}
    r = rec(hand_built(8, trim=0.01, rel=0.03, cos=0.5))  # ‖Σ τ‖ = 3 % × √(8 + 56 · 0.5) = 18 %
    assert r["method"] == "task_arithmetic" and r["parameters"]["lambda"] == pytest.approx(0.06 / 0.18, rel=0.02)
    assert "λ = 0.33" in r["reason"]


def test_the_recommended_config_keeps_the_models_base_and_other_keys_and_is_valid():
    advice = advise(hand_built(8, trim=0.15))
    config = advice["recommendation"]["config"]
    assert config["base_model"] == "org/base" and config["dtype"] == "bfloat16"
    assert [m["model"] for m in config["models"]] == [f"org/m{i}" for i in range(8)]
    parsed = parse_config(recommended_yaml(advice), source="advice")
    assert parsed.merge_method == "ties"


# --- the findings --------------------------------------------------------------------------------------------------

def test_three_to_eight_findings_each_with_its_number():
    for stats in (hand_built(1), hand_built(2), hand_built(8, rel=0.1, trim=0.15, head_rel=2.0, notes=["a", "b"]),
                  {"meta": {"models": ["a", "b"]}, "model": {}, "groups": []}):
        findings = advise(stats)["findings"]
        assert len(findings) <= 8
        for f in findings:
            assert f["text"] and f["level"] in ("info", "warn")
    for stats in (hand_built(2), hand_built(4), hand_built(8, rel=0.1, trim=0.15, head_rel=2.0)):
        findings = advise(stats)["findings"]
        assert 3 <= len(findings) <= 8
        for f in findings:
            if f["value"] is not None:
                assert any(ch.isdigit() for ch in f["text"]), f


def test_sign_conflicts_are_read_against_chance_and_located():
    text = next(f["text"] for f in advise(hand_built(8, conflict=0.974))["findings"] if f["key"] == "sign_conflict")
    assert "97.4 %" in text and "99.2 %" in text and "unrelated" in text  # 1 − 2^(1−8)
    assert "layer 2 (99.4 %)" in text.split("Highest in")[1].split(",")[0]  # the top layer first
    text = next(f["text"] for f in advise(hand_built(8, conflict=0.3))["findings"] if f["key"] == "sign_conflict")
    assert "same way" in text


def test_duplicates_and_opposed_pairs_are_named():
    dup = [[1.0, 0.95, 0.1], [0.95, 1.0, 0.1], [0.1, 0.1, 1.0]]
    f = next(f for f in advise(hand_built(3, cos=dup))["findings"] if f["key"] == "similarity")
    assert f["level"] == "warn" and "m0 and m1 are near duplicates" in f["text"] and f["value"] == 0.95
    opp = [[1.0, -0.6, 0.1], [-0.6, 1.0, 0.1], [0.1, 0.1, 1.0]]
    f = next(f for f in advise(hand_built(3, cos=opp))["findings"] if f["key"] == "similarity")
    assert "opposite" in f["text"] and "-0.6" in f["text"]


def test_nan_emr_head_and_vocabulary_findings():
    stats = hand_built(8, rel=0.1, head_rel=2.3)
    by_key = {f["key"]: f for f in advise(stats)["findings"]}
    assert "barely change" in by_key["nan"]["text"]
    assert "60 %–60 %" in by_key["emr"]["text"] and "0.5–0.5" in by_key["emr"]["text"]
    assert "head moved 23×" in by_key["outlier_group"]["text"]
    stats["model"]["nan_coefficients"] = [0.4, 0.2, 0.2, 0.2]
    stats["meta"]["models"] = stats["meta"]["models"][:4]
    nan = next(f for f in advise(stats)["findings"] if f["key"] == "nan")
    assert "reweight" in nan["text"]
    stats = hand_built(4, notes=["model.embed_tokens.weight: org/m1 has 260 rows"], names=("model.embed_tokens.weight",))
    keys = [f["key"] for f in advise(stats)["findings"]]
    assert "note" in keys and "tied" in keys
    crowded = hand_built(8, rel=0.1, head_rel=2.3, notes=["a vocabulary note"], names=("model.embed_tokens.weight",))
    findings = advise(crowded)["findings"]
    assert len(findings) == 8 and {"note", "outlier_group", "step_size"} <= {f["key"] for f in findings}  # warnings stay


def test_emr_is_the_alternative_when_it_rebuilds_each_task_much_closer():
    assert "emr-extract" in advise(hand_built(8, emr_error=0.6, distance=1.4))["alternative"]
    assert advise(hand_built(8, emr_error=0.6, distance=0.8))["alternative"] is None


def test_advice_text_lists_findings_then_the_recommendation():
    text = advice_text(advise(hand_built(8, trim=0.15)))
    assert text.startswith("findings:\n  - ") and "\nrecommendation: ties (lambda 1, density 0.2)\n  why: " in text


def test_the_advice_module_is_pure():
    code = "import sys, merging.advice; assert not {'torch', 'plotly', 'gradio'} & set(sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# --- calibration: real merges --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_on_each_synthetic_case_the_recommendation_wins(name, tmp_path):
    from merging.analysis import analyze

    case = named_case(name, tmp_path / name)
    stats = analyze(config_from_dict(case.config("ties", {"lambda": 1.0}, {"density": 0.2}), source="case"))
    recommendation = advise(stats)["recommendation"]
    assert recommendation_label(recommendation) == EXPECTED[name], advice_text(advise(stats))
    scores = {label: case.score(merged_state(case.config(method, params, mparams), tmp_path / label))
              for label, (method, params, mparams) in candidates(len(case.models)).items()}
    picked = case.score(merged_state(recommendation["config"], tmp_path / "recommended"))
    assert picked == pytest.approx(scores[EXPECTED[name]], abs=1e-6)  # the config is the candidate itself
    assert picked == max(scores.values()), scores


def test_on_the_demo_zoo_the_recommendation_reaches_the_median_data_free_method():
    from merging.analysis import analyze
    from merging.demo import zoo_models
    from merging.zoo.eval import Zoo, average, evaluate_state
    from merging.zoo.merges import merged_tensors
    from merging.zoo.table import emr_scores

    demo = zoo_models()
    assert demo is not None, "the demo zoo (assets/zoo) is missing"
    advice = advise(analyze(config_from_dict(demo.config_dict(), source="demo")))
    rec_ = advice["recommendation"]
    zoo = Zoo(ROOT / "assets" / "zoo")
    if rec_["method"] in ("emr", "emr_rescale"):
        accuracy = average(emr_scores(zoo, zoo.tasks, method=rec_["method"], params=rec_["parameters"])[0])
    else:
        accuracy = average(evaluate_state(zoo, merged_tensors(config_from_dict(rec_["config"], source="advice"), zoo)))
    table = json.loads((ROOT / "assets" / "zoo" / "table.json").read_text())
    data_free = [r["average"] for r in table["rows"] if r.get("method") and r["average"] is not None]
    assert len(data_free) == 18  # averaging, TA, 2 × TIES, 2 × DARE, EMR, 2 × EMR mask & rescale, 2 × NAN, the 7 of 2024-25
    assert accuracy >= statistics.median(data_free), (rec_["summary"], accuracy, statistics.median(data_free))


def test_the_cli_prints_findings_and_the_recommendation(tmp_path, capsys):
    from merging.__main__ import main
    from merging.demo import zoo_models

    config = tmp_path / "demo.yml"
    config.write_text(yaml.safe_dump(zoo_models().config_dict()))
    assert main(["analyze", str(config), "--advice"]) == 0  # no --json needed
    out = capsys.readouterr().out
    assert "\nfindings:\n  - " in out and "\nrecommendation: iso_c (lambda 0.17)\n  why: the blocks moved 10.5 %" in out
