"""Merge diagnostics: every statistic against a direct numpy computation on real safetensors checkpoints, hand-built
tensors with known conflict rates, sampled estimates against their confidence intervals, and the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import llama_config, llama_tensors, load_folder, save_checkpoint, write_family

import merging.analysis.run as run
from merging.__main__ import main
from merging.analysis import DEFAULT_SAMPLE_FRACTION, RatioStrata, StatsContext, analyze, derive, group_of, tensor_sums
from merging.config import parse_config
from merging.engine import run_merge
from merging.methods import REGISTRY


def sparse_family(root: Path, n_models: int = 3, hidden: int = 16, intermediate: int = 32, vocab: int = 64,
                  layers: int = 2, seed: int = 0) -> tuple[Path, list[Path]]:
    """A float32 base and fine-tunes whose updates are sparse, with a keep probability that varies by row: exact
    zeros in τ (so "at least two non-zero" matters) and rates that differ between rows (so rows are clusters)."""
    cfg = llama_config(hidden, intermediate, layers, vocab)
    base = llama_tensors(cfg, seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    base_dir = save_checkpoint(root / "base", base, cfg)
    tunes = []
    for k in range(n_models):
        tensors = {}
        for name, t in base.items():
            rows = t.shape[0]
            p_row = torch.rand(rows, generator=gen) * 0.9 + 0.05
            keep = torch.rand(t.shape, generator=gen) < p_row.view(-1, *([1] * (t.dim() - 1)))
            scale = 0.01 * (1 + k)  # different task-vector norms per model, so NAN's α differ
            tensors[name] = t + torch.randn(t.shape, generator=gen) * scale * keep
        tunes.append(save_checkpoint(root / f"ft{k}", tensors, cfg))
    return base_dir, tunes


def config_for(method: str, base: Path, tunes: list[Path], params: dict | None = None,
               model_params: dict | None = None) -> str:
    lines = [f"merge_method: {method}", f"base_model: {base}", "models:"]
    for t in tunes:
        lines.append(f"  - model: {t}")
        if model_params:
            lines.append(f"    parameters: {json.dumps(model_params)}")
    if params:
        lines.append(f"parameters: {json.dumps(params)}")
    return "\n".join(lines) + "\n"


# --- a direct numpy computation --------------------------------------------------------------------------------------

def numpy_reference(base_dir: Path, tune_dirs: list[Path], density: float, merged: dict | None = None) -> dict:
    """Every statistic per group and for the whole model, from whole tensors, the formulas written out plainly."""
    base = {k: v.float().numpy() for k, v in load_folder(base_dir).items()}
    tunes = [{k: v.float().numpy() for k, v in load_folder(d).items()} for d in tune_dirs]
    names = {"model": list(base)}
    for name in base:
        names.setdefault(group_of(name)[0], []).append(name)
    n = len(tunes)
    # whole-model EMR rescalers first (they enter every group's mask+rescale error)
    tau_all = {name: np.stack([t[name] - base[name] for t in tunes]).reshape(n, -1).astype(np.float64)
               for name in base}

    def emr_parts(tau):
        s = np.where(tau.sum(0) > 0, 1.0, -1.0)
        agree = tau * s > 0
        uni = s * np.where(agree, np.abs(tau), 0).max(0)
        masks = tau * uni > 0
        return uni, masks

    num = np.zeros(n)
    den = np.zeros(n)
    for tau in tau_all.values():
        uni, masks = emr_parts(tau)
        num += np.abs(tau).sum(1)
        den += (masks * np.abs(uni)).sum(1)
    lam = num / den
    out = {}
    for group, members in names.items():
        tau = np.concatenate([tau_all[m] for m in members], axis=1)
        thetas = np.concatenate([np.stack([t[m].reshape(-1) for t in tunes]) for m in members], axis=1)
        thetas = thetas.astype(np.float64)
        b = np.concatenate([base[m].reshape(-1) for m in members]).astype(np.float64)
        tau_norm = np.sqrt((tau ** 2).sum(1))
        nonzero = (tau != 0).sum(0)
        eligible = nonzero >= 2
        conflict = (tau > 0).any(0) & (tau < 0).any(0)
        # TIES trim per tensor: exactly k = max(1, int(density·numel)) largest |τ_i| (ties: first positions)
        against = mass = 0.0
        for m in members:
            t = tau_all[m]
            kept = np.zeros_like(t)
            k = max(1, int(density * t.shape[1]))
            for i in range(n):
                top = np.argsort(-np.abs(t[i]), kind="stable")[:k]
                kept[i, top] = t[i, top]
            elected = np.where(kept.sum(0) >= 0, 1.0, -1.0)
            against += np.abs(kept)[kept * elected < 0].sum()
            mass += np.abs(kept).sum()
        uni_parts, mask_parts = zip(*(emr_parts(tau_all[m]) for m in members))
        uni, masks = np.concatenate(uni_parts), np.concatenate(mask_parts, axis=1)
        masked = masks * uni
        tau_sq = (tau ** 2).sum(1)
        inv = 1 / np.sqrt((thetas ** 2).sum(1))
        entry = {
            "task_vector_norm": tau_norm,
            "relative_task_vector_norm": tau_norm / np.sqrt((b ** 2).sum()),
            "sign_conflict": conflict.sum() / eligible.sum(),
            "trimmed_sign_disagreement": against / mass,
            "cosine_similarity": (tau @ tau.T) / np.outer(tau_norm, tau_norm),
            "nan_coefficients": inv / inv.sum(),
            "mask_density": masks.mean(1),
            "rescaler": np.abs(tau).sum(1) / (masks * np.abs(uni)).sum(1),
            "unified": np.sqrt(((tau - uni) ** 2).sum(1) / tau_sq),
            "masked": np.sqrt(((tau - masked) ** 2).sum(1) / tau_sq),
            "masked_rescaled": np.sqrt(((tau - lam[:, None] * masked) ** 2).sum(1) / tau_sq),
        }
        if merged is not None:
            mg = np.concatenate([merged[m].float().numpy().reshape(-1) for m in members]).astype(np.float64)
            entry["merged_distance"] = np.sqrt(((mg - thetas) ** 2).sum(1)) / tau_norm
        out[group] = entry
    out["lambda"] = lam
    return out


def _by_group(stats: dict) -> dict:
    return {"model": stats["model"], **{g["name"]: g for g in stats["groups"]}}


def _rate_list(rates: list[dict]) -> list[float]:
    return [r["rate"] for r in rates]


@pytest.mark.parametrize("method, band_elements", [("ties", None), ("ties", 100), ("task_arithmetic", 100)])
def test_every_statistic_matches_a_direct_numpy_computation(tmp_path, monkeypatch, method, band_elements):
    """Whole tensors, and row bands of a few rows (as large tensors go: the trim's and TIES' exact top-k cuts
    come from statistics passes, ties at the threshold cut mid-tensor)."""
    import merging.bands as bands

    base, tunes = sparse_family(tmp_path / "m")
    model_params = {"weight": 1.0, "density": 0.3} if method == "ties" else {"weight": 1.0}
    text = config_for(method, base, tunes, model_params=model_params)
    config = parse_config(text)
    if band_elements:
        monkeypatch.setattr(bands, "BAND_ELEMENTS", band_elements)
    stats = analyze(config, exact=True)
    if band_elements:
        monkeypatch.undo()
    merged = load_folder(run_merge(config, tmp_path / "merged").out_dir)
    ref = numpy_reference(base, tunes, 0.3 if method == "ties" else 0.2, merged)
    groups = _by_group(stats)
    assert set(groups) == set(ref) - {"lambda"}
    assert [g["name"] for g in stats["groups"]] == ["embeddings", "layer 0", "layer 1", "head", "other"]
    for name, want in ref.items():
        if name == "lambda":
            continue
        got = groups[name]
        close = dict(rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(got["task_vector_norm"], want["task_vector_norm"], **close)
        np.testing.assert_allclose(got["relative_task_vector_norm"], want["relative_task_vector_norm"], **close)
        np.testing.assert_allclose(got["sign_conflict"]["rate"], want["sign_conflict"], **close)
        np.testing.assert_allclose(got["trimmed_sign_disagreement"]["rate"], want["trimmed_sign_disagreement"], **close)
        np.testing.assert_allclose(np.array(got["cosine_similarity"], float), want["cosine_similarity"], **close)
        np.testing.assert_allclose(got["nan_coefficients"], want["nan_coefficients"], **close)
        np.testing.assert_allclose(_rate_list(got["emr"]["mask_density"]), want["mask_density"], **close)
        np.testing.assert_allclose(_rate_list(got["emr"]["rescaler"]), want["rescaler"], **close)
        for key in ("unified", "masked", "masked_rescaled"):
            np.testing.assert_allclose(got["emr"]["reconstruction_error"][key], want[key], rtol=1e-4)
        np.testing.assert_allclose(got["merged_distance"], want["merged_distance"], rtol=1e-4)
        assert got["sign_conflict"]["ci95"] is None  # exact: no interval
    np.testing.assert_allclose(stats["meta"]["emr_rescalers"], ref["lambda"], rtol=1e-6)
    # sparse updates: exact zeros make "at least two non-zero" bite, and the rate is far from the dense 3/4
    assert 0.2 < stats["model"]["sign_conflict"]["rate"] < 0.7
    # NAN favours the smaller fine-tune (scales 0.01, 0.02, 0.03) but only slightly on θ
    alphas = stats["model"]["nan_coefficients"]
    assert alphas[0] > alphas[1] > alphas[2] and abs(sum(alphas) - 1) < 1e-12


def test_exact_pass_reads_each_input_once(tmp_path):
    base, tunes = write_family(tmp_path / "m", n_models=3, dtype="bfloat16")
    stats = analyze(parse_config(config_for("task_arithmetic", base, tunes)), exact=True)
    on_disk = sum(t.numel() * t.element_size() for d in [base, *tunes] for t in load_folder(d).values()
                  if t.is_floating_point())
    meta = stats["meta"]
    assert meta["passes"] == 1 and meta["mode"] == "exact"
    assert meta["bytes_read"] == meta["bytes_total"] == on_disk
    assert meta["seconds"] > 0
    # task arithmetic with λ = 1: θ_merged − θ_i = Σ_{j≠i} τ_j, so ‖·‖/‖τ_i‖ ≈ √2 for 3 equal independent τ
    np.testing.assert_allclose(stats["model"]["merged_distance"], [2 ** 0.5] * 3, rtol=0.05)


# --- hand-built tensors with known answers ---------------------------------------------------------------------------

# Three task vectors over 6 elements (base 0). Elements with ≥ 2 non-zero: 0 (+,+), 1 (+,−), 3 (−,+), 5 (+,−,+):
# 4 eligible, 3 conflicting → 0.75. Elected sign (0 → +): +, +, +, +, +, +; mass against: 1 (e1) + 1 (e3) + 2 (e5)
# = 4 of a total |τ| of 18. EMR (0 → −): τ_uni = [1, −1, 5, −1, 0, 3]; masks [1,0,0,1,0,1], [1,1,0,0,0,0],
# [0,0,1,0,0,1].
HAND = [[1.0, 1, 0, -1, 0, 2], [1.0, -1, 0, 0, 0, -2], [0.0, 0, 5, 1, 0, 3]]
AGREE = [[1.0, 2, 3], [1.0, 1, 1], [0.0, 0, 0]]  # 3 eligible, none conflicting


def test_hand_built_tensor_has_the_known_rates():
    base = torch.zeros(2, 3)
    models = [torch.tensor(row).reshape(2, 3) for row in HAND]
    sums = tensor_sums(base, models, trim_density=[1.0] * 3)
    stats = derive(sums, StatsContext(sampled=False, nan_on="weights"))
    assert stats["sign_conflict"]["rate"] == 0.75
    assert stats["trimmed_sign_disagreement"]["rate"] == pytest.approx(4 / 18)
    assert _rate_list(stats["emr"]["mask_density"]) == pytest.approx([3 / 6, 2 / 6, 2 / 6])
    # rescaler: Σ|τ_i| / Σ|M_i τ_uni| = 5/5, 4/2, 9/8
    assert _rate_list(stats["emr"]["rescaler"]) == pytest.approx([1.0, 2.0, 9 / 8])
    # trimming to one entry per model keeps 2, −2 and 5 (the first of the tied |2|s): elected + at e5 → 2 against
    trimmed = derive(tensor_sums(base, models, trim_density=[1 / 6] * 3), StatsContext(False, "weights"))
    assert trimmed["trimmed_sign_disagreement"]["rate"] == pytest.approx(2 / 9)


def test_hand_built_checkpoints_give_known_rates_per_layer_and_model(tmp_path):
    def write(name: str, k: int) -> Path:
        tensors = {"model.layers.0.mlp.weight": torch.tensor(HAND[k]).reshape(2, 3),
                   "model.layers.1.mlp.weight": torch.tensor(AGREE[k]).reshape(3, 1)}
        return save_checkpoint(tmp_path / name, tensors)

    save_checkpoint(tmp_path / "base", {"model.layers.0.mlp.weight": torch.zeros(2, 3),
                                        "model.layers.1.mlp.weight": torch.zeros(3, 1)})
    tunes = [write(f"ft{k}", k) for k in range(3)]
    stats = analyze(parse_config(config_for("ties", tmp_path / "base", tunes, model_params={"density": 1.0})))
    groups = _by_group(stats)
    assert groups["layer 0"]["sign_conflict"]["rate"] == 0.75
    assert groups["layer 1"]["sign_conflict"]["rate"] == 0.0
    assert groups["model"]["sign_conflict"]["rate"] == pytest.approx(3 / 7)
    assert groups["layer 0"]["trimmed_sign_disagreement"]["rate"] == pytest.approx(4 / 18)
    assert stats["meta"]["trim"] == {"density_from": "config", "default": 0.2, "densities": [1.0, 1.0, 1.0]}
    # the third model never moved in layer 1: its cosine there is undefined (null), not NaN
    assert groups["layer 1"]["cosine_similarity"][2][0] is None


def test_ratio_interval_is_zero_when_every_row_is_read_and_grows_with_row_heterogeneity():
    strata = RatioStrata(np.array([10.0]), np.array([10.0]), *(np.array([[v]]) for v in (5, 10, 5, 10, 5)))
    ratio, se = strata.estimate()
    assert ratio[0] == 0.5 and se[0] == 0
    # 4 of 10 rows read, each row one element: y = [1, 0, 1, 0], x = 1 → R = 0.5, s² = 1/3,
    # Var(Ŷ − R X̂) = N² (1 − n/N) s² / n = 100 · 0.6 · (1/3) / 4 = 5, se = √5 / X̂ with X̂ = 10
    part = RatioStrata(np.array([10.0]), np.array([4.0]), *(np.array([[v]]) for v in (2, 4, 2, 4, 2)))
    ratio, se = part.estimate()
    assert ratio[0] == 0.5 and se[0] == pytest.approx(5 ** 0.5 / 10)


# --- sampled mode ----------------------------------------------------------------------------------------------------

def test_sampled_estimates_fall_inside_their_intervals_of_the_exact_values(tmp_path):
    base, tunes = sparse_family(tmp_path / "m", hidden=64, intermediate=256, vocab=256)
    config = parse_config(config_for("ties", base, tunes, model_params={"density": 0.5}))
    exact = _by_group(analyze(config, exact=True))
    covered = checked = 0
    widths = []
    for seed in range(8):
        stats = analyze(config, sample=0.25, seed=seed, whole_tensor_bytes=0)
        assert stats["meta"]["mode"] == "sampled" and stats["meta"]["tensors_sampled"] == 21
        assert stats["meta"]["bytes_read"] < 0.3 * stats["meta"]["bytes_total"]
        for name, got in _by_group(stats).items():
            want = exact[name]
            pairs = [(got["sign_conflict"], want["sign_conflict"]),
                     (got["trimmed_sign_disagreement"], want["trimmed_sign_disagreement"]),
                     *zip(got["emr"]["mask_density"], want["emr"]["mask_density"]),
                     *zip(got["emr"]["rescaler"], want["emr"]["rescaler"])]
            for estimate, truth in pairs:
                low, high = estimate["ci95"]
                covered += low <= truth["rate"] <= high
                checked += 1
                if name != "other":  # "other" is one 64-element norm: a sample of 16 may hold no variation
                    widths.append(high - low)
            if name in ("model", "layer 0", "layer 1"):  # norms are scaled estimates (tiny groups vary more)
                np.testing.assert_allclose(got["task_vector_norm"], want["task_vector_norm"], rtol=0.15)
    assert checked == 8 * 6 * 8
    assert covered / checked >= 0.85, covered / checked  # nominal 95%; deterministic seeds, no flakiness
    assert min(widths) > 0


def test_sampling_is_the_default_above_the_threshold_and_exact_forces_a_full_pass(tmp_path):
    base, tunes = write_family(tmp_path / "m", n_models=2, hidden=32, intermediate=64, vocab=128)
    config = parse_config(config_for("task_arithmetic", base, tunes))
    small = analyze(config)
    assert small["meta"]["mode"] == "exact"
    big = analyze(config, sample_threshold_bytes=1, whole_tensor_bytes=0)
    assert big["meta"]["mode"] == "sampled" and big["meta"]["sample_fraction"] == DEFAULT_SAMPLE_FRACTION
    assert big["meta"]["bytes_read"] < small["meta"]["bytes_read"] / 4
    forced = analyze(config, exact=True, sample_threshold_bytes=1)
    assert forced["meta"]["mode"] == "exact" and forced["meta"]["bytes_read"] == small["meta"]["bytes_read"]
    # every tensor keeps at least 2 rows; the same seed draws the same rows
    assert all(t["rows_read"] >= 2 for t in big["tensors"])
    again = analyze(config, sample_threshold_bytes=1, whole_tensor_bytes=0)
    assert again["model"]["task_vector_norm"] == big["model"]["task_vector_norm"]


# --- methods with whole-model quantities -----------------------------------------------------------------------------

def test_emr_distance_is_the_rebuilt_task_and_rescalers_match_the_merge(tmp_path):
    base, tunes = sparse_family(tmp_path / "m")
    config = parse_config(config_for("emr", base, tunes))
    stats = analyze(config)
    whole = stats["model"]
    # the merged model of task i is θ_base + λ_i M_i ⊙ τ_uni: its distance is EMR's mask+rescale error
    np.testing.assert_allclose(whole["merged_distance"], whole["emr"]["reconstruction_error"]["masked_rescaled"],
                               rtol=1e-6)
    out = run_merge(config, tmp_path / "emr").out_dir
    meta = json.loads((out / "emr.json").read_text())
    np.testing.assert_allclose(stats["meta"]["method_rescalers"], [t["rescaler"] for t in meta["tasks"]], rtol=1e-6)
    np.testing.assert_allclose(_rate_list(whole["emr"]["mask_density"]), [t["mask_density"] for t in meta["tasks"]],
                               rtol=1e-6)
    # the paper's argument: the mask and then the rescaler each bring the rebuilt model closer
    errors = whole["emr"]["reconstruction_error"]
    for i in range(3):
        assert errors["masked_rescaled"][i] < errors["masked"][i] < errors["unified"][i]


def test_a_method_that_elects_gets_the_figures_its_own_task_vector_would_give(tmp_path, monkeypatch):
    """EMR declares ``elects``: its own sums come from the sums' election, not from running it; the same figures."""
    config = parse_config(config_for("emr", *sparse_family(tmp_path / "m"), params={"skip": ["lm_head"]}))
    ran, unified_tau = [], run._unified_tau
    monkeypatch.setattr(run, "_unified_tau", lambda *a: ran.append(1) or unified_tau(*a))
    assert REGISTRY["emr"].elects
    shared = analyze(config, exact=True)
    assert not ran, "a method that elects was run again for its own task vector"
    monkeypatch.setitem(REGISTRY, "emr", dataclasses.replace(REGISTRY["emr"], elects=False))
    computed = analyze(config, exact=True)
    assert ran
    np.testing.assert_allclose(shared["meta"]["method_rescalers"], computed["meta"]["method_rescalers"], rtol=1e-6)
    for a, b in zip(shared["groups"], computed["groups"]):
        np.testing.assert_allclose(a["merged_distance"], b["merged_distance"], rtol=1e-6, atol=1e-9)


def test_emr_rescale_distance_matches_the_extracted_tasks(tmp_path):
    from merging.emr_store import extract_task

    base, tunes = sparse_family(tmp_path / "m")
    text = config_for("emr_rescale", base, tunes, params={"unify": "ties", "density": 0.5,
                                                          "skip": ["lm_head"]})
    config = parse_config(text)
    stats = analyze(config)
    out = run_merge(config, tmp_path / "emr").out_dir
    theta_base = load_folder(base)
    groups = _by_group(stats)
    for k, tune in enumerate(tunes):
        rebuilt = load_folder(extract_task(out, k, tmp_path / f"task{k}").out_dir)
        theta = load_folder(tune)
        for name in ("model", "layer 1", "head"):
            members = [n for n in theta if name == "model" or group_of(n)[0] == name]
            dist = sum(float(((rebuilt[n] - theta[n]) ** 2).sum()) for n in members) ** 0.5
            tau = sum(float(((theta[n] - theta_base[n]) ** 2).sum()) for n in members) ** 0.5
            assert groups[name]["merged_distance"][k] == pytest.approx(dist / tau, rel=1e-4, abs=1e-7)
    assert groups["head"]["merged_distance"] == [0.0, 0.0, 0.0]  # `skip` tensors are kept per task
    # τ_uni comes from TIES here, so the method's λ differ from the paper's EMR election's
    assert stats["meta"]["method_rescalers"] != pytest.approx(stats["meta"]["emr_rescalers"], rel=1e-3)


def test_whole_model_nan_takes_a_reduction_pass_and_its_distance_matches_the_merge(tmp_path):
    base, tunes = sparse_family(tmp_path / "m")
    config = parse_config(config_for("linear", base, tunes,
                                     params={"coefficients": "nan", "nan_scope": "model", "nan_on": "task_vector"}))
    stats = analyze(config)
    assert stats["meta"]["passes"] == 2 and stats["meta"]["bytes_read"] == 2 * stats["meta"]["bytes_total"]
    assert stats["meta"]["nan_on"] == "task_vector"
    merged = load_folder(run_merge(config, tmp_path / "out").out_dir)
    ref = numpy_reference(base, tunes, 0.2, merged)
    for name, got in _by_group(stats).items():
        np.testing.assert_allclose(got["merged_distance"], ref[name]["merged_distance"], rtol=1e-4)
    # NAN on τ: α ∝ 1/‖τ_i‖, and the fine-tunes' scales are 1 : 2 : 3
    norms = np.array(stats["model"]["task_vector_norm"])
    np.testing.assert_allclose(stats["model"]["nan_coefficients"], (1 / norms) / (1 / norms).sum(), rtol=1e-9)


def test_the_json_has_exactly_the_keys_its_schema_documents(tmp_path):
    from merging.analysis import schema

    base, tunes = write_family(tmp_path / "m", n_models=2)
    stats = analyze(parse_config(config_for("ties", base, tunes, model_params={"density": 0.5})))
    assert list(stats) == schema.names(schema.TOP_LEVEL)
    assert list(stats["meta"]) == schema.names(schema.META)
    figures = {k: v for k, v in stats["model"].items() if k not in ("name", "kind", "layer", "tensors")}
    flat = [f"emr.{k}" for k in figures.pop("emr")] + [f"spectral.{k}" for k in figures["spectral"]] + list(figures)
    assert sorted(flat) == sorted(schema.names(schema.STATS_OBJECT))


# --- the command line ------------------------------------------------------------------------------------------------

def test_cli_writes_json_and_html(tmp_path, capsys):
    base, tunes = write_family(tmp_path / "m", n_models=2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_for("ties", base, tunes, model_params={"density": 0.5}))
    out_json, out_html = tmp_path / "stats.json", tmp_path / "report.html"
    assert main(["analyze", str(cfg), "--json", str(out_json), "--html", str(out_html), "--sample", "0.5",
                 "--seed", "3"]) == 0
    stats = json.loads(out_json.read_text())
    assert stats["schema_version"] == 1 and stats["meta"]["mode"] == "sampled" and stats["meta"]["seed"] == 3
    assert len(stats["groups"]) == 5 and len(stats["tensors"]) == 21
    page = out_html.read_text()
    assert "plotly.js v" in page and '<script src="http' not in page
    assert "analyzed 21 tensors of 2 models" in capsys.readouterr().out


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    base, tunes = write_family(tmp_path / "m", n_models=2)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_for("linear", base, tunes).replace(f"base_model: {base}\n", ""))
    assert main(["analyze", str(cfg), "--json", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "base_model" in err and err.count("\n") == 1
    assert main(["analyze", str(cfg), "--json", str(tmp_path / "missing" / "s.json")]) == 2
    with pytest.raises(SystemExit):
        main(["analyze", str(cfg), "--json", "x.json", "--exact", "--sample", "0.1"])


@pytest.mark.parametrize("n_models, method", [(1, "task_arithmetic"), (3, "dare_ties"), (3, "emr")])
def test_fused_kernel_and_torch_give_the_same_statistics(tmp_path, monkeypatch, n_models, method):
    """The per-row sums of merging/native against the torch code they replace (MERGESCOPE_NATIVE=0), band by
    band; only the order of float32 sums differs."""
    import merging.bands as bands

    base, tunes = sparse_family(tmp_path / "m", n_models=n_models)
    config = parse_config(config_for(method, base, tunes))
    from merging.native import ops

    monkeypatch.setattr(bands, "BAND_ELEMENTS", 200)
    row_sums, calls = ops.row_sums, []
    monkeypatch.setattr(ops, "row_sums", lambda *a, **k: calls.append(1) or row_sums(*a, **k))
    fused = analyze(config, exact=True)
    assert calls, "the fused per-row sums never ran"
    calls.clear()
    monkeypatch.setenv("MERGESCOPE_NATIVE", "0")
    plain = analyze(config, exact=True)
    assert not calls

    def numbers(node):
        if isinstance(node, dict):
            return [x for k, v in sorted(node.items()) if k not in ("seconds", "device") for x in numbers(v)]
        if isinstance(node, list):
            return [x for v in node for x in numbers(v)]
        return [float(node)] if isinstance(node, (int, float)) and not isinstance(node, bool) else []

    a, b = numbers({k: fused[k] for k in ("model", "groups", "tensors")}), numbers(
        {k: plain[k] for k in ("model", "groups", "tensors")})
    assert len(a) == len(b) > 100
    # reconstruction errors are square roots of cancelling sums (exactly 0 for a single model): absolute noise
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)
