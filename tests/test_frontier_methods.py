"""The 2024–2025 data-free methods against direct computations of their papers' formulas, in numpy float64:
TSV-M, Iso-C, Iso-CTS, CART, PCB-Merging (per tensor and over the whole model, streamed) and Consensus merging.

The formulas were also checked against FusionBench 0.2.33's implementations (TSV-M, Iso-C, Iso-CTS: largest
relative difference 1.1e-5, from its float32 SVDs) and the official PCB-Merging function (3.3e-7), computed locally
once; those packages are not test dependencies, so the tests below hold the papers' formulas written out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from checkpoints import load_folder, write_family

import merging.bands
from merging.config import parse_config
from merging.engine import run_merge
from merging.methods import REGISTRY, TensorContext
from merging.params import resolve

NAME = "model.layers.0.mlp.up_proj.weight"


def run(method, base, models, model_params=None, **params):
    m = REGISTRY[method]
    resolved = resolve(m, params, model_params or [{} for _ in models], NAME, 0.0)
    return m.fn(base, models, resolved, TensorContext(NAME, 0, None, ()))


def family(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # low-rank-ish updates plus noise, as fine-tunes look
    models = []
    for _ in range(n):
        if len(shape) == 2:
            update = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g) * 0.05
        else:
            update = torch.zeros(shape)
        models.append(base + update + 0.02 * torch.randn(shape, generator=g))
    return base, models


def np_svd(a):
    u, s, vh = np.linalg.svd(a, full_matrices=False)
    return u, s, vh


def np_polar(a):
    p, _, qh = np_svd(a)
    return p @ qh


def close(ours, want, tol=2e-5):
    ours = ours.double().numpy()
    scale = max(1e-12, float(np.abs(want).max()))
    assert float(np.abs(ours - want).max()) / scale <= tol, float(np.abs(ours - want).max()) / scale


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_tsv_m_decorrelates_each_tasks_top_singular_vectors(shape):
    base, models = family(shape)
    taus = [(m - base).double().numpy() for m in models]
    k = min(shape) // 3
    parts = [np_svd(t) for t in taus]
    u = np.concatenate([p[0][:, :k] for p in parts], axis=1)
    s = np.concatenate([p[1][:k] for p in parts])
    vh = np.concatenate([p[2][:k] for p in parts], axis=0)
    want = base.double().numpy() + 0.7 * (np_polar(u) * s) @ np_polar(vh)
    close(run("tsv_m", base, models, **{"lambda": 0.7}), want)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_non_matrix_tensors_get_the_mean_task_vector(method):
    base, models = family((16,))
    want = base.double().numpy() + 0.5 * np.mean([(m - base).double().numpy() for m in models], axis=0)
    close(run(method, base, models, **{"lambda": 0.5}), want)


def test_iso_c_flattens_the_spectrum_of_the_sum():
    base, models = family((30, 20))
    summed = sum((m - base).double().numpy() for m in models)
    u, s, vh = np_svd(summed)
    want = base.double().numpy() + 1.3 * s.mean() * u @ vh
    out = run("iso_c", base, models, **{"lambda": 1.3})
    close(out, want)
    spectrum = np.linalg.svd((out - base).double().numpy(), compute_uv=False)
    assert spectrum.max() / spectrum.min() == pytest.approx(1.0, abs=1e-4)  # isotropic


@pytest.mark.parametrize("shape, fraction", [((30, 20), 0.8), ((20, 36), 0.5)])
def test_iso_cts_adds_task_specific_directions_off_the_common_subspace(shape, fraction):
    base, models = family(shape)
    taus = [(m - base).double().numpy() for m in models]
    r, n = min(shape), len(taus)
    per_task = round((r - int(r * fraction)) / n)
    common = r - n * per_task
    u, s, vh = np_svd(sum(taus))
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for t in taus:
        ut, st, vht = np_svd(t - u[:, :common] @ u[:, :common].T @ t)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vhs.append(vht[:per_task])
    flat = np.concatenate(ss).mean()
    want = base.double().numpy() + flat * np_polar(np.concatenate(us, 1)) @ np_polar(np.concatenate(vhs, 0))
    close(run("iso_cts", base, models, common_fraction=fraction), want)


def test_cart_adds_low_rank_centred_task_vectors_to_the_average():
    base, models = family((24, 30), n=4)
    thetas = [m.double().numpy() for m in models]
    average = np.mean(thetas, axis=0)
    k = max(1, int(0.2 * 24))
    low = []
    for t in thetas:
        u, s, vh = np_svd(t - average)
        low.append((u[:, :k] * s[:k]) @ vh[:k])
    close(run("cart", base, models, rank_fraction=0.2, **{"lambda": 1.5}), average + 1.5 * sum(low))
    # non-matrix tensors: the weight average
    b1, m1 = family((12,))
    close(run("cart", b1, m1), np.mean([m.double().numpy() for m in m1], axis=0))


def pcb_reference(flat: np.ndarray, ratio: float) -> np.ndarray:
    """PCB-Merging's Eqs. 2–6 on flattened task vectors (N, D), with the official code's order statistics."""
    n, d = flat.shape

    def ascending(x, i):
        return np.sort(x, axis=1)[:, i:i + 1]

    mag = np.abs(flat)
    low, high = ascending(mag, int(d * 0.0001)), ascending(mag, int(d * (1 - 0.0001) - 1))
    mag = np.clip(mag, low, high)
    clipped = np.sign(flat) * mag
    beta = np.exp(n * ((mag - low) / (high - low)) ** 2) * np.tanh(flat * flat.sum(0, keepdims=True))
    q, top = ascending(beta, int(d * (1 - ratio))), beta.max(axis=1, keepdims=True)
    weights = (np.maximum(beta, q) - q) / (top - q)
    return (clipped * weights).sum(0) / np.maximum(weights.sum(0), 1e-12)


@pytest.mark.parametrize("shape", [(50, 60), (9000,)])
def test_pcb_per_tensor_is_the_papers_balancing(shape):
    base, models = family(shape, n=4)
    flat = np.stack([(m - base).double().numpy().reshape(-1) for m in models])
    want = base.double().numpy() + 0.8 * pcb_reference(flat, 0.2).reshape(shape)
    close(run("pcb", base, models, pcb_scope="tensor", ratio=0.2, **{"lambda": 0.8}), want, tol=1e-5)


@pytest.mark.parametrize("banded", [False, True])
def test_pcb_over_the_whole_model_streams_the_official_order_statistics(tmp_path, monkeypatch, banded):
    if banded:
        monkeypatch.setattr(merging.bands, "BAND_ELEMENTS", 64)
    base_dir, tune_dirs = write_family(tmp_path / "m", n_models=3)
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    config = {"merge_method": "pcb", "base_model": str(base_dir), "dtype": "float32",
              "parameters": {"ratio": 0.1, "lambda": 1.2}, "models": [{"model": str(t)} for t in tune_dirs]}
    run_merge(parse_config(yaml.safe_dump(config)), tmp_path / "out", device="cpu")
    out = load_folder(tmp_path / "out")
    names = [n for n in base if base[n].is_floating_point()]
    flat = np.stack([np.concatenate([(t[n] - base[n]).double().numpy().reshape(-1) for n in names]) for t in tunes])
    merged, offset = pcb_reference(flat, 0.1), 0
    for n in names:
        k = base[n].numel()
        want = base[n].double().numpy() + 1.2 * merged[offset:offset + k].reshape(base[n].shape)
        offset += k
        close(out[n], want, tol=1e-5)


def test_consensus_keeps_entries_at_least_k_tall_masks_mark():
    base, models = family((20, 30), n=4)
    taus = np.stack([(m - base).double().numpy() for m in models])
    total = taus.sum(0)
    lams = [0.2, 0.4, 0.5, 0.6]
    masks = np.stack([np.abs(t) > lam * np.abs(total - t) for t, lam in zip(taus, lams)])
    for k in (1, 2, 3):
        want = base.double().numpy() + 0.9 * total * (masks.sum(0) >= k)
        out = run("consensus", base, models, model_params=[{"tall_lambda": lam} for lam in lams], k=k,
                  **{"lambda": 0.9})
        close(out, want)
    # k = 0 is task arithmetic
    close(run("consensus", base, models, k=0), base.double().numpy() + total)
