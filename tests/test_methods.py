"""Each merge method against a direct element-wise computation on small tensors; the random ones against their
formulas (kept fraction, norm, expected value) and for bit-exact reproducibility."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from merging.errors import ConfigError
from merging.methods import REGISTRY, TensorContext
from merging.methods.task_vectors import della_keep_probabilities, top_k_mask
from merging.native import rng
from merging.params import resolve


def tensors(n_models: int, shape=(6, 10), seed: int = 0, scale: float = 0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) * scale for _ in range(n_models)]
    return base, models


def run(method: str, base, models, seed: int = 0, name: str = "model.layers.0.mlp.up_proj.weight",
        model_params: list[dict] | None = None, **global_params):
    """Call a registered method the way the engine does: parameters resolved by the registry's schema."""
    m = REGISTRY[method]
    params = resolve(m, global_params, model_params or [{} for _ in models], name, 0.0)
    return m.fn(base, models, params, TensorContext(name, seed, None, tuple(f"m{i}" for i in range(len(models)))))


# --- direct references: loops over elements in numpy, written from the papers' formulas ------------------------

def ref_topk_keep(tau: np.ndarray, density: float) -> np.ndarray:
    flat = tau.reshape(-1)
    k = max(1, int(density * flat.size))
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-np.abs(flat), kind="stable")[:k]] = True
    return keep.reshape(tau.shape)


def ref_breadcrumbs_keep(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = tau.reshape(-1)
    n = flat.size
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom = max(0, n - keep_n - top_n)
    order = np.argsort(np.abs(flat), kind="stable")
    keep = np.zeros(n, bool)
    keep[order[bottom:bottom + keep_n]] = True
    return keep.reshape(tau.shape)


def ref_task_vector_merge(base, models, weights, keeps, consensus: bool, normalize: bool, lam: float):
    b = base.numpy().astype(np.float64)
    taus = [(m.numpy().astype(np.float64) - b) * k for m, k in zip(models, keeps)]
    out = np.empty_like(b)
    for idx in np.ndindex(b.shape):
        deltas = [w * t[idx] for w, t in zip(weights, taus)]
        if consensus:
            sign = 1.0 if sum(deltas) >= 0 else -1.0
            agree = [i for i, d in enumerate(deltas) if np.sign(d) == sign]
            total = sum(deltas[i] for i in agree)
            divisor = sum(weights[i] for i in agree) or 1.0
        else:
            total = sum(deltas)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out[idx] = b[idx] + lam * (total / divisor if normalize else total)
    return out


def close(ours: torch.Tensor, ref: np.ndarray, tol: float = 1e-5) -> bool:
    return float(np.abs(ours.numpy().astype(np.float64) - ref).max()) <= tol * max(1.0, float(np.abs(ref).max()))


# --- deterministic methods -------------------------------------------------------------------------------------

def test_linear_is_the_weighted_mean():
    base, models = tensors(3)
    out = run("linear", None, models, model_params=[{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}])
    ref = sum(w * m.numpy().astype(np.float64) for w, m in zip((1.0, 2.0, 0.5), models)) / 3.5
    assert close(out, ref)
    out = run("linear", None, models, normalize=False, weight=0.5)
    assert close(out, sum(0.5 * m.numpy().astype(np.float64) for m in models))


def test_task_arithmetic_adds_scaled_task_vectors():
    base, models = tensors(2)
    out = run("task_arithmetic", base, models, model_params=[{"weight": 1.0}, {"weight": -0.5}], **{"lambda": 0.3})
    keeps = [np.ones(base.shape, bool)] * 2
    assert close(out, ref_task_vector_merge(base, models, [1.0, -0.5], keeps, False, False, 0.3))


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_trims_elects_and_takes_the_disjoint_mean(density):
    base, models = tensors(3)
    weights = [1.0, 0.7, 1.3]
    out = run("ties", base, models, model_params=[{"weight": w} for w in weights], density=density)
    keeps = [ref_topk_keep((m - base).numpy(), density) for m in models]
    assert close(out, ref_task_vector_merge(base, models, weights, keeps, True, True, 1.0))
    # the trim keeps exactly ⌊density·n⌋ entries of each task vector
    assert all(k.sum() == max(1, int(density * base.numel())) for k in keeps)


def test_ties_lambda_and_no_normalize():
    base, models = tensors(3, seed=1)
    out = run("ties", base, models, density=0.4, normalize=False, **{"lambda": 0.5})
    keeps = [ref_topk_keep((m - base).numpy(), 0.4) for m in models]
    assert close(out, ref_task_vector_merge(base, models, [1.0] * 3, keeps, True, False, 0.5))


@pytest.mark.parametrize("method,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.9, 0.2), (0.3, 0.0)])
def test_breadcrumbs_drops_outliers_and_the_smallest(method, consensus, density, gamma):
    base, models = tensors(2, seed=2)
    out = run(method, base, models, density=density, gamma=gamma)
    keeps = [ref_breadcrumbs_keep((m - base).numpy(), density, gamma) for m in models]
    assert close(out, ref_task_vector_merge(base, models, [1.0, 1.0], keeps, consensus, False, 1.0))
    assert all(k.sum() == int(density * base.numel()) for k in keeps)


def test_top_k_mask_is_exact_with_ties_and_nested():
    magnitude = torch.tensor([3.0, 1.0, 2.0, 2.0, 2.0, 0.0, 5.0, 2.0])
    for k in range(0, 9):
        assert int(top_k_mask(magnitude, k).sum()) == k
    # the three largest: 5, 3 and the first 2 in flat order
    assert top_k_mask(magnitude, 3).tolist() == [True, False, True, False, False, False, True, False]
    for k in range(8):
        assert bool((top_k_mask(magnitude, k) <= top_k_mask(magnitude, k + 1)).all())


def test_slerp_matches_the_spherical_formula():
    base, models = tensors(1, shape=(5, 7), scale=1.0)
    a, b = base.numpy().astype(np.float64).ravel(), models[0].numpy().astype(np.float64).ravel()
    omega = math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    for t in (0.0, 0.3, 1.0):
        out = run("slerp", base, models, t=t)
        ref = (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
        assert close(out, ref.reshape(base.shape))
    assert close(run("slerp", base, models, t=0.0), base.numpy().astype(np.float64))


def test_slerp_falls_back_to_lerp_when_nearly_colinear():
    base = torch.linspace(1, 2, 12).reshape(3, 4)
    other = base * 1.5 + 1e-4  # cos ≈ 1
    out = run("slerp", base, [other], t=0.25)
    assert close(out, (0.75 * base + 0.25 * other).numpy().astype(np.float64))


def test_nuslerp_interpolates_task_vectors_per_row_or_flat():
    base, models = tensors(2, shape=(4, 9), scale=1.0)
    taus = [m - base for m in models]
    out = run("nuslerp", base, models, model_params=[{"weight": 1.0}, {"weight": 3.0}], nuslerp_flatten=False)
    t = 3.0 / 4.0
    ref = np.empty(base.shape)
    for r in range(base.shape[0]):
        a, b = taus[0][r].numpy().astype(np.float64), taus[1][r].numpy().astype(np.float64)
        omega = math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        ref[r] = base[r].numpy() + (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    assert close(out, ref)
    flat = run("nuslerp", base, models, model_params=[{"weight": 1.0}, {"weight": 3.0}])
    a, b = taus[0].numpy().astype(np.float64).ravel(), taus[1].numpy().astype(np.float64).ravel()
    omega = math.acos(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    ref = base.numpy().ravel() + (math.sin((1 - t) * omega) * a + math.sin(t * omega) * b) / math.sin(omega)
    assert close(flat, ref.reshape(base.shape))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_follows_the_angle_formula(filter_wise):
    base, models = tensors(3, shape=(4, 8), seed=3)
    out = run("model_stock", base, models, filter_wise=filter_wise)
    b = base.numpy().astype(np.float64)
    ws = [m.numpy().astype(np.float64) for m in models]
    rows = [slice(r, r + 1) for r in range(b.shape[0])] if filter_wise else [slice(None)]
    ref = np.empty_like(b)
    for rs in rows:
        d = [(w[rs] - b[rs]).ravel() for w in ws]
        cos = np.mean([d[i] @ d[j] / np.linalg.norm(d[i]) / np.linalg.norm(d[j])
                       for i in range(3) for j in range(i + 1, 3)])
        t = 3 * cos / (1 + 2 * cos)
        ref[rs] = t * sum(w[rs] for w in ws) / 3 + (1 - t) * b[rs]
    assert close(out, ref)


def test_passthrough_returns_its_one_input():
    _, models = tensors(1)
    assert torch.equal(run("passthrough", None, models), models[0])


# --- random methods --------------------------------------------------------------------------------------------

BIG = (256, 256)


def test_dare_keeps_the_density_fraction_and_the_l1_norm():
    base = torch.zeros(BIG)
    tau = torch.randn(BIG, generator=torch.Generator().manual_seed(5))
    out = run("dare_linear", base, [tau], density=0.3)
    kept = out != 0
    n = tau.numel()
    assert abs(kept.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    # rescale (default on) makes the L1 norm equal the original's: the kept entries scaled by one factor
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)
    factor = tau.abs().sum() / tau[kept].abs().sum()
    assert torch.allclose(out[kept], tau[kept] * factor, rtol=1e-5)
    # without rescale the survivors are untouched
    plain = run("dare_linear", base, [tau], density=0.3, rescale=False)
    assert torch.equal(plain[plain != 0], tau[plain != 0])


def test_dare_expected_value_is_the_task_vector():
    base = torch.zeros(64)
    tau = torch.linspace(-1, 1, 64)
    mean = torch.stack([run("dare_linear", base, [tau], seed=s, density=0.5) for s in range(400)]).mean(0)
    # each entry: mean of 400 draws of (tau/p)·Bernoulli(p) (the L1 rescale ≈ 1/p): std ≈ |tau|/sqrt(400)
    assert float((mean - tau).abs().max()) < 5 * 1.0 / math.sqrt(400) + 0.05


def test_dare_ties_elects_signs_on_the_dropped_vectors():
    base, models = tensors(3, shape=(8, 8), seed=4)
    out = run("dare_ties", base, models, density=0.5, seed=7)
    # the same masks, drawn again from the position hash (merging/native/rng.py), through the direct reference
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", 7)
    keeps, taus = [], []
    for i, m in enumerate(models):
        tau = m - base
        keep = rng.keep_mask(ctx, i, tau.shape, 0.5).numpy()
        scale = tau.abs().sum() / (tau * torch.from_numpy(keep)).abs().sum()
        keeps.append(keep)
        taus.append(base + tau * scale)  # the rescaled model, so the reference needs no rescale step
    assert close(out, ref_task_vector_merge(base, taus, [1.0] * 3, keeps, True, False, 1.0))


def test_della_probabilities_rank_magnitudes_within_rows():
    tau = torch.tensor([[0.1, -3.0, 0.5, 2.0], [5.0, 0.0, -1.0, 0.2]])
    probs = della_keep_probabilities(tau, 0.5, 0.2)
    # ascending |τ| rank r ∈ {0, 1/3, 2/3, 1} → p = 0.3 + 0.4 r
    expected = torch.tensor([[0.3, 0.7, 0.3 + 0.4 / 3, 0.3 + 0.8 / 3], [0.7, 0.3, 0.3 + 0.8 / 3, 0.3 + 0.4 / 3]])
    assert torch.allclose(probs, expected)


def test_della_keeps_large_entries_more_often_and_the_mean_density():
    base = torch.zeros(BIG)
    tau = torch.randn(BIG, generator=torch.Generator().manual_seed(6))
    out = run("della_linear", base, [tau], density=0.4, epsilon=0.2)
    kept = out != 0
    n = tau.numel()
    assert abs(kept.float().mean().item() - 0.4) < 4 * math.sqrt(0.24 / n)
    order = tau.abs().argsort(dim=1)
    smallest = kept.gather(1, order[:, :25]).float().mean().item()  # p ≈ 0.2 … 0.22
    largest = kept.gather(1, order[:, -25:]).float().mean().item()  # p ≈ 0.58 … 0.6
    assert smallest == pytest.approx(0.21, abs=0.03) and largest == pytest.approx(0.59, abs=0.03)
    assert out.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-5)


def test_della_rejects_density_epsilon_outside_the_unit_interval():
    base, models = tensors(1)
    with pytest.raises(ConfigError, match="density ± epsilon"):
        run("della", base, models, density=0.1, epsilon=0.2)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_give_identical_bytes_for_the_same_seed_at_any_thread_count(method):
    base, models = tensors(2, shape=(384, 384), seed=8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(method, base, models, seed=3, density=0.6, epsilon=0.1)
        again = run(method, base, models, seed=3, density=0.6, epsilon=0.1)
        torch.set_num_threads(2)
        two = run(method, base, models, seed=3, density=0.6, epsilon=0.1)
    finally:
        torch.set_num_threads(threads)
    assert one.numpy().tobytes() == again.numpy().tobytes() == two.numpy().tobytes()
    other_seed = run(method, base, models, seed=4, density=0.6, epsilon=0.1)
    other_tensor = run(method, base, models, seed=3, name="model.layers.1.mlp.up_proj.weight", density=0.6,
                       epsilon=0.1)
    assert not torch.equal(one, other_seed) and not torch.equal(one, other_tensor)


def test_every_registered_method_has_a_paper_a_summary_and_valid_defaults():
    for m in REGISTRY.values():
        assert m.summary and m.paper, m.name
        for p in m.params:
            if p.type in (bool, int, float, str) and p.default is not None:
                assert p.check(p.default, m.name) == p.default


def test_the_readme_table_lists_every_method_and_parameter():
    from merging.methods.docs import methods_table_markdown

    table = methods_table_markdown()
    rows = table.splitlines()
    for m in REGISTRY.values():
        assert any(r.startswith(f"| `{m.name}` |") and m.paper in r for r in rows), m.name
        for p in m.params:
            assert any(r.startswith(f"| `{m.name}` | `{p.name}` |") for r in rows), (m.name, p.name)
    assert "| `ties` | `density` | 1 | (0, 1] | per model |" in table
    assert "| `slerp` | `t` | 0.5 | [0, 1] | global |" in table
