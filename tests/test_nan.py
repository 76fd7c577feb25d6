"""NAN coefficients (Si et al. 2025): α_i = (1/‖x_i‖_F) / Σ_j (1/‖x_j‖_F), per tensor and over the whole model."""

from __future__ import annotations

import math

import pytest
import torch
from checkpoints import llama_config, llama_tensors, load_folder, save_checkpoint

from merging.config import config_from_dict
from merging.engine import run_merge
from merging.errors import ConfigError
from merging.methods import REGISTRY, TensorContext
from merging.methods.coefficients import nan_coefficients
from merging.params import resolve

NAME = "model.layers.0.self_attn.q_proj.weight"


def run(method, base, models, model_params=None, reduced=None, **global_params):
    m = REGISTRY[method]
    params = resolve(m, global_params, model_params or [{} for _ in models], NAME, 0.0)
    return m.fn(base, models, params, TensorContext(NAME, 0, reduced, ()))


def small(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(8, 8, generator=g)
    # fine-tunes of clearly different norms, so the coefficients are far from uniform
    return base, [base * s + torch.randn(8, 8, generator=g) * 0.3 for s in (0.5, 1.0, 2.0)]


def alphas(vectors):
    inverse = [1 / math.sqrt(sum(float(v.double().square().sum()) for v in parts)) for parts in vectors]
    return [x / sum(inverse) for x in inverse]


def test_coefficients_are_inverse_norms_normalized_to_one():
    assert nan_coefficients(torch.tensor([1.0, 2.0, 4.0])) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    # a zero norm adds nothing whatever its weight: α = 0, the others share the sum; all zero → uniform
    assert nan_coefficients(torch.tensor([0.0, 1.0, 3.0])) == pytest.approx([0.0, 0.75, 0.25])
    assert nan_coefficients(torch.zeros(4)) == pytest.approx([0.25] * 4)


def test_linear_nan_per_tensor_uses_the_weights_norms():
    base, models = small()
    a = alphas([[m] for m in models])
    # given weights are replaced by α, not multiplied
    out = run("linear", None, models, model_params=[{"weight": 9.0}, {}, {}], coefficients="nan")
    expected = sum(ai * m.double() for ai, m in zip(a, models))
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_task_arithmetic_nan_on_task_vectors_scaled_by_lambda():
    base, models = small(1)
    taus = [m - base for m in models]
    a = alphas([[t] for t in taus])
    out = run("task_arithmetic", base, models, coefficients="nan", nan_on="task_vector", **{"lambda": 0.4})
    expected = base.double() + 0.4 * sum(ai * t.double() for ai, t in zip(a, taus))
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "dare_linear", "della"])
def test_task_vector_methods_use_alpha_as_their_weights(method):
    base, models = small(2)
    a = alphas([[m] for m in models])
    common = {"density": 0.5, "gamma": 0.05, "epsilon": 0.1}
    nan = run(method, base, models, coefficients="nan", **common)
    explicit = run(method, base, models, model_params=[{"weight": ai} for ai in a], **common)
    assert torch.allclose(nan, explicit, rtol=1e-6, atol=1e-7)


def test_model_scope_reads_the_reduced_norms():
    base, models = small(3)
    squared = torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)  # whole-model norms 2, 1, 0.5 → α ∝ 1/2, 1, 2
    # the reduction's layout (coefficients.plugin_totals): the whole-model norms first, then the per-layer groups
    # (no layers here: one group outside the blocks) and LiNeS' two norms
    reduced = torch.cat([squared, torch.zeros(3 + 2, dtype=torch.float64)])
    out = run("linear", None, models, reduced=reduced, coefficients="nan", nan_scope="model")
    expected = sum(ai * m.double() for ai, m in zip([1 / 7, 2 / 7, 4 / 7], models))
    assert torch.allclose(out.double(), expected, rtol=1e-6, atol=1e-6)


def test_task_vector_norms_need_a_base():
    _, models = small()
    with pytest.raises(ConfigError, match="nan_on: task_vector"):
        run("linear", None, models, coefficients="nan", nan_on="task_vector")


@pytest.fixture
def nan_family(tmp_path):
    """A base and three fine-tunes whose weights and task vectors have clearly different norms, tensor by tensor
    in different proportions (so per-tensor and whole-model coefficients differ)."""
    cfg = llama_config()
    base = llama_tensors(cfg, seed=0)
    g = torch.Generator().manual_seed(1)
    tunes = []
    for k, (scale, noise) in enumerate([(0.8, 0.01), (1.0, 0.02), (1.5, 0.04)]):
        tensors = {n: t * scale + torch.randn(t.shape, generator=g) * noise * (1 + (i + k) % 3)
                   for i, (n, t) in enumerate(base.items())}
        tunes.append(save_checkpoint(tmp_path / f"ft{k}", tensors, cfg))
    return save_checkpoint(tmp_path / "base", base, cfg), tunes


def _merge(family, tmp_path, method, parameters, name="out"):
    base, tunes = family
    cfg = {"merge_method": method, "base_model": str(base), "models": [{"model": str(t)} for t in tunes],
           "parameters": parameters, "dtype": "float32"}
    phases = set()
    run_merge(config_from_dict(cfg), tmp_path / name, device="cpu", progress=lambda p: phases.add(p.phase))
    return load_folder(tmp_path / name), phases


@pytest.mark.parametrize("nan_on", ["weights", "task_vector"])
def test_whole_model_nan_through_the_engine(nan_family, tmp_path, nan_on):
    base_dir, tunes = nan_family
    base = load_folder(base_dir)
    models = [load_folder(t) for t in tunes]
    out, phases = _merge(nan_family, tmp_path, "task_arithmetic",
                         {"coefficients": "nan", "nan_scope": "model", "nan_on": nan_on, "lambda": 0.5})
    assert "reduce" in phases
    vectors = [[m[n] - base[n] for n in base] if nan_on == "task_vector" else list(m.values()) for m in models]
    a = alphas(vectors)
    assert max(a) - min(a) > 0.05  # far from uniform: the test would see weights left at 1/3
    for name in base:
        expected = base[name].double() + 0.5 * sum(ai * (m[name].double() - base[name].double())
                                                    for ai, m in zip(a, models))
        assert torch.allclose(out[name].double(), expected, rtol=1e-5, atol=1e-6), name


def test_whole_model_and_per_tensor_differ_and_the_extra_pass_runs_only_when_needed(nan_family, tmp_path):
    base_dir, tunes = nan_family
    base = load_folder(base_dir)
    models = [load_folder(t) for t in tunes]
    per_tensor, phases = _merge(nan_family, tmp_path, "linear", {"coefficients": "nan", "nan_on": "task_vector"}, "a")
    assert phases == {"merge"}
    whole, phases = _merge(nan_family, tmp_path, "linear",
                           {"coefficients": "nan", "nan_scope": "model", "nan_on": "task_vector"}, "b")
    assert phases == {"reduce", "merge"}
    a_model = alphas([[m[n] - base[n] for n in base] for m in models])
    for name in base:
        a = alphas([[m[name] - base[name]] for m in models])
        assert torch.allclose(per_tensor[name].double(), sum(ai * m[name].double() for ai, m in zip(a, models)),
                              rtol=1e-6, atol=1e-7), name
        assert torch.allclose(whole[name].double(), sum(ai * m[name].double() for ai, m in zip(a_model, models)),
                              rtol=1e-6, atol=1e-7), name
    name = "model.norm.weight"
    assert max(abs(x - y) for x, y in zip(alphas([[m[name] - base[name]] for m in models]), a_model)) > 0.01
