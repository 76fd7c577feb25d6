"""Each paper's own semantics beside mergekit's, against direct computations of the papers' formulas: TIES' global
top-k and disjoint sum (the official code), DARE's and DELLA's inverse-keep rescale (unbiased: E[τ̃] = τ), NAN per
layer, LiNeS' per-block scale; and the whole-model threshold pass exact whatever its sample does."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from checkpoints import load_folder, write_family

import merging.bands
from merging.config import parse_config
from merging.engine import run_merge
from merging.errors import ConfigError
from merging.methods import TensorContext, global_topk
from merging.methods.sparsify import sparsify
from merging.plan import layer_index


def _merge(tmp_path, method: str, base, tunes, params: dict, name: str = "out") -> dict[str, torch.Tensor]:
    config = {"merge_method": method, "base_model": str(base), "dtype": "float32", "parameters": params,
              "models": [{"model": str(t)} for t in tunes]}
    run_merge(parse_config(yaml.safe_dump(config)), tmp_path / name, device="cpu")
    return load_folder(tmp_path / name)


def _official_ties(base: dict, tunes: list[dict], density: float, lam: float, merge: str) -> dict[str, torch.Tensor]:
    """The official TIES code on the flattened model: keep |τ| ≥ kthvalue(D − ⌊density·D⌋) per task, elect
    sign(Σ τ̃) (≥ 0 → +), then the disjoint sum (or mean over the agreeing non-zero entries), θ = θ_0 + λ·merged."""
    names = [n for n in base if base[n].is_floating_point()]
    flat = torch.stack([torch.cat([(t[n] - base[n]).double().reshape(-1) for n in names]) for t in tunes])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(density * d), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = (trimmed * sign > 0)
    merged = (trimmed * agree).sum(0)
    if merge == "mean":
        merged = merged / agree.sum(0).clamp(min=1)
    out, offset = {}, 0
    for n in names:
        k = base[n].numel()
        out[n] = base[n].double() + lam * merged[offset:offset + k].reshape(base[n].shape)
        offset += k
    return out


@pytest.mark.parametrize("merge, banded", [("sum", False), ("mean", True)])
def test_ties_global_topk_is_the_official_code(tmp_path, monkeypatch, merge, banded):
    if banded:  # every tensor in row bands of 64 elements: the passes never hold one whole
        monkeypatch.setattr(merging.bands, "BAND_ELEMENTS", 64)
    base_dir, tune_dirs = write_family(tmp_path / "m", n_models=3)
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    params = {"density": 0.2, "topk_scope": "model", "merge": merge, "lambda": 0.3 if merge == "sum" else 1.0}
    out = _merge(tmp_path, "ties", base_dir, tune_dirs, params)
    want = _official_ties(base, tunes, 0.2, params["lambda"], merge)
    for n, w in want.items():
        assert torch.allclose(out[n].double(), w, rtol=0, atol=1e-6), n
    # per tensor (mergekit's scope) is a different merge on the same models
    per_tensor = _merge(tmp_path, "ties", base_dir, tune_dirs, {**params, "topk_scope": "tensor"}, "tensor")
    assert any(not torch.allclose(per_tensor[n].double(), w, atol=1e-6) for n, w in want.items())


@pytest.mark.parametrize("seed", range(6))
def test_the_global_threshold_is_exact_even_when_the_sample_misses(tmp_path, monkeypatch, seed):
    """A bracket of zero width around one sample value misses the true threshold on one side or the other; the
    fallback pass must still give the exact value (and a small sample limit forces a wide stride)."""
    monkeypatch.setattr(global_topk, "MARGIN_SIGMAS", 0.0)
    monkeypatch.setattr(global_topk, "MARGIN_RANKS", 0)
    monkeypatch.setattr("merging.whole_model.MODEL_SAMPLE_ELEMENTS", 200)
    base_dir, tune_dirs = write_family(tmp_path / "m", n_models=2, seed=seed)
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    density = [0.05, 0.3, 0.7][seed % 3]
    out = _merge(tmp_path, "ties", base_dir, tune_dirs, {"density": density, "topk_scope": "model", "merge": "sum"})
    for n, w in _official_ties(base, tunes, density, 1.0, "sum").items():
        assert torch.allclose(out[n].double(), w, rtol=0, atol=1e-6), n


def test_global_topk_needs_one_density_for_the_whole_model(tmp_path):
    base, tunes = write_family(tmp_path / "m", n_models=2)
    config = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(t)} for t in tunes],
              "parameters": {"topk_scope": "model", "density": [{"filter": "mlp", "value": 0.5}, {"value": 0.2}]}}
    with pytest.raises(ConfigError, match="same density"):
        run_merge(parse_config(yaml.safe_dump(config)), tmp_path / "out", device="cpu")


# --- DARE and DELLA: the papers' rescale is unbiased, mergekit's L1 rescale is not -----------------------------

def _mean_ratio(method: str, rescale: str, n: int, seeds: int, density: float = 0.3):
    """E[τ̃ / τ] per element over ``seeds`` draws (τ all positive, growing magnitudes), and its standard error."""
    tau = torch.linspace(0.1, 1.0, n)
    params = {"density": [density], "rescale": rescale, "epsilon": [0.2]}
    how = "random" if method == "dare" else "della"
    total = torch.zeros(n, dtype=torch.float64)
    total_sq = torch.zeros(n, dtype=torch.float64)
    for s in range(seeds):
        ctx = TensorContext(f"t{n}", seed=s, shape=(n,))
        ratio = (sparsify(tau, how, params, 0, ctx.generator(), ctx) / tau).double()
        total += ratio
        total_sq += ratio.square()
    mean = total / seeds
    return mean, ((total_sq / seeds - mean.square()).clamp(min=0) / seeds).sqrt()


@pytest.mark.parametrize("method", ["dare", "della"])
@pytest.mark.parametrize("n, seeds", [(1, 4000), (16, 2000), (10_000, 60)])
def test_inverse_keep_is_unbiased(method, n, seeds):
    mean, se = _mean_ratio(method, "inverse_keep", n, seeds)
    if n < 100:  # each element within 5.5 standard errors of 1 (at most 16 of them)
        assert float(((mean - 1).abs() / se.clamp(min=1e-12)).max()) < 5.5
    overall_se = float(se.square().sum().sqrt()) / n
    assert abs(float(mean.mean()) - 1) < 5 * overall_se + 1e-9
    if n == 10_000:  # by magnitude quarter too (DELLA's keep probability grows with |τ|)
        for quarter in mean.reshape(4, -1):
            assert abs(float(quarter.mean()) - 1) < 0.05


def test_l1_rescale_is_biased_where_the_papers_is_not():
    one, _ = _mean_ratio("dare", "l1", 1, 4000)  # a 1-element tensor: kept with probability 0.3, rescaled by 1
    assert float(one[0]) == pytest.approx(0.3, abs=0.03)
    della, _ = _mean_ratio("della", "l1", 10_000, 60)
    quarters = [float(q.mean()) for q in della.reshape(4, -1)]
    assert quarters[0] < 0.75 and quarters[-1] > 1.2  # small entries shrink, large ones grow


def test_rescale_accepts_mergekit_booleans():
    from merging.methods import REGISTRY
    from merging.params import resolve

    m = REGISTRY["dare_linear"]
    assert resolve(m, {"rescale": True}, [{}], "x", 0)["rescale"] == "l1"
    assert resolve(m, {"rescale": False}, [{}], "x", 0)["rescale"] == "none"
    assert resolve(m, {}, [{}], "x", 0)["rescale"] == "l1"  # mergekit's default


# --- NAN per layer, LiNeS per block --------------------------------------------------------------------------

def _group(name: str) -> int | None:
    return layer_index(name)


def test_nan_layer_scope_sums_norms_per_block(tmp_path):
    base_dir, tune_dirs = write_family(tmp_path / "m", n_models=3)
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    out = _merge(tmp_path, "task_arithmetic", base_dir, tune_dirs,
                 {"coefficients": "nan", "nan_scope": "layer", "nan_on": "task_vector"})
    floats = [n for n in base if base[n].is_floating_point()]
    groups = {g: [n for n in floats if _group(n) == g] for g in {_group(n) for n in floats}}
    for names in groups.values():
        inverse = [1 / math.sqrt(sum(float((t[n] - base[n]).double().square().sum()) for n in names)) for t in tunes]
        alphas = [x / sum(inverse) for x in inverse]
        for n in names:
            want = base[n].double() + sum(a * (t[n] - base[n]).double() for a, t in zip(alphas, tunes))
            assert torch.allclose(out[n].double(), want, atol=1e-6), n


def test_lines_scales_the_merged_task_vector_by_depth(tmp_path):
    base_dir, tune_dirs = write_family(tmp_path / "m", n_models=3, layers=3)
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    beta = 0.6
    out = _merge(tmp_path, "task_arithmetic", base_dir, tune_dirs, {"lines": "on", "lines_beta": beta})
    for n in base:
        if not base[n].is_floating_point():
            continue
        layer = _group(n)
        scale = 1 / 3 + (beta * layer / 2 if layer is not None else 0.0)  # α = 1/N for task arithmetic
        want = base[n].double() + scale * sum((t[n] - base[n]).double() for t in tunes)
        assert torch.allclose(out[n].double(), want, atol=1e-6), n
    # on TIES the norm ratio is the official code's α = ‖Σ τ_i‖₁ / (N ‖τ_TIES‖₁)
    ties = {"density": 0.3, "merge": "sum"}
    plain = _merge(tmp_path, "ties", base_dir, tune_dirs, ties, "ties")
    lined = _merge(tmp_path, "ties", base_dir, tune_dirs, {**ties, "lines": "on", "lines_beta": beta}, "lined")
    floats = [n for n in base if base[n].is_floating_point()]
    summed = sum(float(sum((t[n] - base[n]).double() for t in tunes).abs().sum()) for n in floats)
    merged = sum(float((plain[n] - base[n]).double().abs().sum()) for n in floats)
    alpha = summed / (3 * merged)
    for n in floats:
        layer = _group(n)
        scale = alpha + (beta * layer / 2 if layer is not None else 0.0)
        assert torch.allclose(lined[n].double(), base[n].double() + scale * (plain[n] - base[n]).double(),
                              atol=1e-6), n
    fixed = _merge(tmp_path, "ties", base_dir, tune_dirs, {**ties, "lines": "on", "lines_alpha_from": "value",
                                                           "lines_alpha": 0.25, "lines_beta": 0.0}, "fixed")
    n = "model.layers.1.mlp.up_proj.weight"
    assert torch.allclose(fixed[n].double(), base[n].double() + 0.25 * (plain[n] - base[n]).double(), atol=1e-6)
