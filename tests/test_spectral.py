"""Spectral diagnostics against numpy: effective rank, top-k energy, subspace overlap and the sum's flatness from
exact SVDs; the streamed randomized SVD within its stated error bound, the same in one unit or in row bands."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from checkpoints import load_folder, save_checkpoint

import merging.bands
from merging.analysis import analyze, spectral
from merging.config import parse_config


def _family(root, m=60, n=40, models=3, rank=4, noise=0.002, seed=0, dtype=torch.float32):
    """A base and fine-tunes whose one 2-D tensor moves by a rank-``rank`` update plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(m, n, generator=g),
            "model.layers.0.input_layernorm.weight": torch.ones(n)}
    cfg = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1}
    base = {key: v.to(dtype) for key, v in base.items()}
    save_checkpoint(root / "base", base, cfg)
    tunes = []
    for k in range(models):
        update = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) * 0.05
        tuned = {key: (v.float() + (update if v.dim() == 2 else 0) + noise * torch.randn(v.shape, generator=g)
                       ).to(dtype) for key, v in base.items()}
        tunes.append(save_checkpoint(root / f"ft{k}", tuned, cfg))
    return root / "base", tunes, base, [load_folder(t) for t in tunes]


def _config(base, tunes):
    lines = ["merge_method: task_arithmetic", f"base_model: {base}", "models:"] + [f"  - model: {t}" for t in tunes]
    return parse_config("\n".join(lines) + "\n")


def _erank(s):
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


NAME = "model.layers.0.mlp.up_proj.weight"


def test_exact_spectra_are_the_formulas(tmp_path):
    base_dir, tune_dirs, base, tunes = _family(tmp_path)
    stats = analyze(_config(base_dir, tune_dirs))
    entry = next(t for t in stats["tensors"] if t["name"] == NAME)["spectral"]
    assert entry["method"] == "exact" and entry["error_bound"] is None and entry["rank"] == 40
    taus = [(t[NAME] - base[NAME]).double().numpy() for t in tunes]
    k = math.ceil(0.05 * 40)
    bases = []
    for i, tau in enumerate(taus):
        u, s, vh = np.linalg.svd(tau, full_matrices=False)
        bases.append((u[:, :k], vh[:k]))
        assert entry["effective_rank"][i] == pytest.approx(_erank(s), rel=1e-5)
        assert entry["energy_top_1"][i] == pytest.approx((s[:1] ** 2).sum() / (s ** 2).sum(), rel=1e-5)
        assert entry["energy_top_5"][i] == pytest.approx((s[:2] ** 2).sum() / (s ** 2).sum(), rel=1e-5)
        assert entry["singular_values"][i][:5] == pytest.approx(list(s[:5] / np.sqrt((s ** 2).sum())), rel=1e-5)
    for i in range(3):
        for j in range(3):
            (ui, vi), (uj, vj) = bases[i], bases[j]
            want = ((ui.T @ uj) ** 2).sum() / (2 * k) + ((vi @ vj.T) ** 2).sum() / (2 * k)
            assert entry["subspace_overlap"][i][j] == pytest.approx(want, rel=1e-4, abs=1e-7)
    offdiag = [entry["subspace_overlap"][i][j] for i in range(3) for j in range(3) if i != j]
    assert entry["interference"] == pytest.approx(sum(offdiag) / 6)
    s_sum = np.linalg.svd(sum(taus), compute_uv=False)
    assert entry["sum_flatness"] == pytest.approx(_erank(s_sum) / 40, rel=1e-5)
    # the norm (1-D) has none; its layer's value is the matrix's; so is the model's
    assert next(t for t in stats["tensors"] if t["name"] != NAME)["spectral"] is None
    layer = next(g for g in stats["groups"] if g["name"] == "layer 0")["spectral"]
    assert layer["interference"] == pytest.approx(entry["interference"]) and layer["tensors"] == 1
    assert stats["model"]["spectral"]["effective_rank"] == pytest.approx(entry["effective_rank"])


@pytest.mark.parametrize("banded", [False, True])
def test_randomized_svd_is_within_its_bound_and_streams_by_bands(tmp_path, monkeypatch, banded):
    base_dir, tune_dirs, base, tunes = _family(tmp_path, m=200, n=100)
    exact = analyze(_config(base_dir, tune_dirs))
    monkeypatch.setattr(spectral, "EXACT_ELEMENTS", 100)
    if banded:
        monkeypatch.setattr(merging.bands, "BAND_ELEMENTS", 2000)
    approx = analyze(_config(base_dir, tune_dirs), exact=True)
    e = next(t for t in exact["tensors"] if t["name"] == NAME)["spectral"]
    a = next(t for t in approx["tensors"] if t["name"] == NAME)["spectral"]
    assert a["method"] == "randomized" and len(a["error_bound"]) == 3
    for i, tau in enumerate((t[NAME] - base[NAME]).double().numpy() for t in tunes):
        s = np.linalg.svd(tau, compute_uv=False)
        norm = np.sqrt((s ** 2).sum())
        got = np.array(a["singular_values"][i]) * norm
        bound = a["error_bound"][i] * norm
        assert np.all(got <= s[:len(got)] * (1 + 1e-5) + 1e-9) and np.all(s[:len(got)] <= got + bound + 1e-9)
        assert a["error_bound"][i] < 0.05  # a rank-4 update plus noise: the sketch captures nearly all of it
        assert a["energy_top_5"][i] == pytest.approx(e["energy_top_5"][i], abs=2 * a["error_bound"][i])
    assert a["interference"] == pytest.approx(e["interference"], abs=0.05)


def test_randomized_passes_give_the_same_result_in_one_unit_or_in_bands(tmp_path, monkeypatch):
    base_dir, tune_dirs, _, _ = _family(tmp_path, m=200, n=100)
    monkeypatch.setattr(spectral, "EXACT_ELEMENTS", 100)
    whole = analyze(_config(base_dir, tune_dirs), exact=True)
    monkeypatch.setattr(merging.bands, "BAND_ELEMENTS", 2000)
    banded = analyze(_config(base_dir, tune_dirs), exact=True)
    w = next(t for t in whole["tensors"] if t["name"] == NAME)["spectral"]
    b = next(t for t in banded["tensors"] if t["name"] == NAME)["spectral"]
    np.testing.assert_allclose(b["singular_values"], w["singular_values"], rtol=1e-4, atol=1e-6)
    assert b["error_bound"] == pytest.approx(w["error_bound"], rel=1e-3, abs=1e-6)


def test_sampled_rows_are_labelled(tmp_path):
    base_dir, tune_dirs, _, _ = _family(tmp_path, m=200, n=100)
    stats = analyze(_config(base_dir, tune_dirs), sample=0.5, whole_tensor_bytes=0)
    entry = next(t for t in stats["tensors"] if t["name"] == NAME)["spectral"]
    assert entry["method"] == "sampled" and entry["error_bound"] is None


def test_an_exact_pass_gives_randomized_svds_to_every_kth_block_matrix_within_its_budget():
    from types import SimpleNamespace

    from merging.analysis.spectral import EXACT_ELEMENTS, spectral_choice

    def task(name, rows, cols):
        return SimpleNamespace(name=name, spec=SimpleNamespace(shape=(rows, cols), numel=rows * cols))

    big = 2 * EXACT_ELEMENTS
    tasks = [task("model.embed_tokens.weight", 32000, 2048)] + [
        task(f"model.layers.{i}.mlp.up_proj.weight", 2, big // 2) for i in range(12)] + [
        task("model.layers.0.input_layernorm.weight", 1, 8), task("model.layers.0.self_attn.q_proj.weight", 8, 8)]
    assert spectral_choice(tasks, budget=10**12) == (None, None)  # within the budget: every matrix
    chosen, note = spectral_choice(tasks, budget=3 * big)
    assert chosen == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 4, 8)}  # every 4th block matrix
    assert "3 of the 13 matrices" in note and "every 4th" in note


def test_a_sampled_pass_counts_its_budget_in_the_elements_it_reads():
    """In sampled mode the SVDs are of the sampled rows: the budget counts those, and the note says so."""
    from types import SimpleNamespace

    from merging.analysis.spectral import EXACT_ELEMENTS, spectral_choice

    big = 2 * EXACT_ELEMENTS
    tasks = [SimpleNamespace(name=f"model.layers.{i}.mlp.up_proj.weight", spec=SimpleNamespace(shape=(2, big // 2),
                                                                                                 numel=big))
             for i in range(12)]
    read = {t.name: big // 20 for t in tasks}  # 5 % of each
    assert spectral_choice(tasks, budget=big, read_elements=lambda t: read[t.name]) == (None, None)
    chosen, note = spectral_choice(tasks, budget=big // 10, read_elements=lambda t: read[t.name])
    assert chosen == {f"model.layers.{i}.mlp.up_proj.weight" for i in (0, 6)}
    assert "SVDs of the sampled rows of 2 of the 12 matrices" in note and "every 6th" in note and "read" in note
    vocabulary = [SimpleNamespace(name="model.embed_tokens.weight", spec=SimpleNamespace(shape=(2, big), numel=big))]
    assert spectral_choice(vocabulary, budget=10)[0] == set()  # over the budget, and no block matrix to take


def test_a_sampled_analysis_over_its_spectral_budget_leaves_the_other_matrices_out(tmp_path, monkeypatch):
    from checkpoints import write_family

    monkeypatch.setattr(spectral, "EXACT_ELEMENTS", 1000)  # the MLP matrices (64 x 256) count as large
    base, tunes = write_family(tmp_path / "m", n_models=2, hidden=64, intermediate=256, vocab=256, layers=4)
    stats = analyze(_config(base, tunes), sample=0.25, whole_tensor_bytes=0, spectral_elements=20_000)
    note = next(n for n in stats["meta"]["notes"] if n.startswith("spectral diagnostics"))
    assert "SVDs of the sampled rows of" in note
    with_spectra = {t["name"] for t in stats["tensors"] if t.get("spectral")}
    mlp = {t["name"] for t in stats["tensors"] if ".mlp." in t["name"]}
    assert 0 < len(with_spectra & mlp) < len(mlp)
    assert all(t["spectral"]["method"] == "sampled" for t in stats["tensors"] if t.get("spectral"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_kernels_give_the_randomized_passes_the_task_matrices_torch_computes(tmp_path, monkeypatch, dtype):
    """The passes' task matrices come from the fused kernels on the stored inputs, or from torch on float32 copies
    (MERGESCOPE_NATIVE=0): the same values, so the same spectra."""
    base_dir, tune_dirs, _, _ = _family(tmp_path, m=200, n=100, dtype=dtype)
    monkeypatch.setattr(spectral, "EXACT_ELEMENTS", 100)
    monkeypatch.setattr(merging.bands, "BAND_ELEMENTS", 2000)
    from merging.native import ops

    calls = []
    kernel = ops.task_matrices
    monkeypatch.setattr(ops, "task_matrices", lambda *a: calls.append(1) or kernel(*a))
    fused = analyze(_config(base_dir, tune_dirs), exact=True)
    assert calls, "the passes never took their task matrices from the kernels"
    calls.clear()
    monkeypatch.setenv("MERGESCOPE_NATIVE", "0")
    plain = analyze(_config(base_dir, tune_dirs), exact=True)
    assert not calls
    f = next(t for t in fused["tensors"] if t["name"] == NAME)["spectral"]
    p = next(t for t in plain["tensors"] if t["name"] == NAME)["spectral"]
    assert f["method"] == p["method"] == "randomized"
    np.testing.assert_allclose(f["singular_values"], p["singular_values"], rtol=1e-5, atol=1e-7)
    assert f["error_bound"] == pytest.approx(p["error_bound"], rel=1e-4, abs=1e-7)
    assert f["interference"] == pytest.approx(p["interference"], rel=1e-5)
