"""Parity with mergekit 0.1.5: the same YAML through both, every output tensor within 1e-5 relative error.

mergekit's CLI imports transformers and peft (5–15 s), so it is started once for the whole module: one
``python`` process calls the ``mergekit-yaml`` entry point (the same click command, with mergekit_ref's flags and
offline environment) for every config in turn. Each method's test then compares its own output. Our side runs
in-process through ``run_merge``.

Relative error of a tensor: max |ours − mergekit| / max |mergekit|.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from mergekit_ref import load_output, mergekit_batch, write_config, write_llama_checkpoint

from merging.config import config_from_dict
from merging.engine import run_merge

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LAYERS = 4  # anchors [a, b, c] then fall between their points: t = 0, 1/3, 2/3, 1
TOLERANCE = 1e-5

def _cases(m: dict[str, str]) -> dict[str, dict]:
    """Every parity config, keyed by case name; ``m`` maps base/ft0/ft1/ft2 to folders."""
    base, ft0, ft1, ft2 = m["base"], m["ft0"], m["ft1"], m["ft2"]
    three = [ft0, ft1, ft2]

    def tv(method: str, weights, parameters: dict, per_model: list[dict] | None = None) -> dict:
        per_model = per_model or [{} for _ in three]
        return {"merge_method": method, "base_model": base, "dtype": "float32", "parameters": parameters,
                "models": [{"model": f, "parameters": {"weight": w, **extra}}
                           for f, w, extra in zip(three, weights, per_model)]}

    return {
        "linear": {"merge_method": "linear", "dtype": "float32",
                   "models": [{"model": f, "parameters": {"weight": w}} for f, w in zip([base, ft0, ft1], [1, 2, 3])]},
        "linear_filters": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                           "models": [{"model": ft0, "parameters": {"weight": [{"filter": "mlp", "value": 0.8},
                                                                              {"value": 0.3}]}},
                                      {"model": ft1, "parameters": {"weight": [0.1, 0.9]}}]},
        "slerp": {"merge_method": "slerp", "base_model": base, "dtype": "float32", "parameters": {"t": 0.3},
                  "models": [{"model": base}, {"model": ft0}]},
        "slerp_anchors": {"merge_method": "slerp", "base_model": base, "dtype": "float32",
                          "parameters": {"t": [0, 0.5, 1]}, "models": [{"model": base}, {"model": ft0}]},
        "slerp_filters": {"merge_method": "slerp", "base_model": ft0, "dtype": "float32",
                          "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                               {"value": 0.5}]},
                          "models": [{"model": ft0}, {"model": ft1}]},
        "task_arithmetic": tv("task_arithmetic", [1.0, 0.5, -0.3], {"lambda": 0.8}),
        "task_arithmetic_filters": tv("task_arithmetic", [1.0, [0.2, 1.0], 0.5],
                                      {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.2}]}),
        "ties": tv("ties", [1.0, 0.7, 1.2], {"density": 0.5}),
        "ties_per_model": tv("ties", [1.0, 1.0, 1.0], {"normalize": False, "lambda": 0.6},
                             [{"density": 0.2}, {"density": 0.5}, {"density": [0.3, 0.9]}]),
        "breadcrumbs": tv("breadcrumbs", [1.0, 0.5, 0.8], {"density": 0.8, "gamma": 0.05}),
        "breadcrumbs_ties": tv("breadcrumbs_ties", [1.0, 0.7, 1.2], {"density": 0.7, "gamma": 0.1}),
        # the random methods at density 1 drop nothing: deterministic, so this pins their election and
        # normalize/rescale defaults against mergekit's (their masks are checked against the formula in test_methods)
        "dare_ties_keep_all": tv("dare_ties", [1.0, 0.7, 1.2], {"density": 1.0}),
        "dare_linear_keep_all": tv("dare_linear", [1.0, 0.7, 1.2], {"density": 1.0, "lambda": 0.7}),
        "della_keep_all": tv("della", [1.0, 0.7, 1.2], {"density": 1.0, "epsilon": 0.05}),
        "della_linear_keep_all": tv("della_linear", [1.0, 0.7, 1.2], {"density": 1.0}),
        "model_stock": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                        "models": [{"model": f} for f in three]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": base, "dtype": "float32",
                                    "parameters": {"filter_wise": True}, "models": [{"model": f} for f in three]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
                    "models": [{"model": ft0, "parameters": {"weight": 1.0}},
                               {"model": ft1, "parameters": {"weight": 3.0}}]},
        "nuslerp_rows": {"merge_method": "nuslerp", "base_model": base, "dtype": "float32",
                         "parameters": {"nuslerp_flatten": False},
                         "models": [{"model": ft0, "parameters": {"weight": 0.4}},
                                    {"model": ft1, "parameters": {"weight": 0.6}}]},
        "passthrough_slices": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": ft0, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft1, "layer_range": [1, 4]}]}]},
        # mergekit 0.1.5's other methods
        "multislerp": {"merge_method": "multislerp", "base_model": base, "dtype": "float32",
                       "models": [{"model": f, "parameters": {"weight": w}} for f, w in zip(three, [1.0, 0.5, 2.0])]},
        "multislerp_no_base": {"merge_method": "multislerp", "dtype": "float32",
                               "parameters": {"normalize_weights": False},
                               "models": [{"model": f, "parameters": {"weight": w}}
                                          for f, w in zip(three, [0.2, 0.3, 0.5])]},
        "karcher": {"merge_method": "karcher", "dtype": "float32", "models": [{"model": f} for f in three]},
        "karcher_with_base": {"merge_method": "karcher", "base_model": base, "dtype": "float32",
                              "parameters": {"max_iter": 20, "tol": 1e-6},
                              "models": [{"model": f} for f in [ft0, ft1]]},
        "sce": {"merge_method": "sce", "base_model": base, "dtype": "float32", "parameters": {"select_topk": 0.5},
                "models": [{"model": f} for f in three]},
        "sce_all": {"merge_method": "sce", "base_model": base, "dtype": "float32",
                    "models": [{"model": f} for f in three]},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "dtype": "float32", "parameters": {"t": 0.005},
                     "models": [{"model": base}, {"model": ft0}]},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "dtype": "float32",
                         "models": [{"model": base}, {"model": ft1}]},
        # ε near the noise scale (0.01-0.03), so some entries are changed by one model only, some by several
        "ram": {"merge_method": "ram", "base_model": base, "dtype": "float32", "parameters": {"epsilon": 0.02},
                "models": [{"model": f} for f in three]},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "dtype": "float32",
                       "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.4},
                       "models": [{"model": f} for f in three]},
        "nuslerp_no_base": {"merge_method": "nuslerp", "dtype": "float32",
                            "models": [{"model": ft0, "parameters": {"weight": 1.0}},
                                       {"model": ft1, "parameters": {"weight": 2.0}}]},
        "passthrough_scale": {"merge_method": "passthrough", "dtype": "float32",
                              "models": [{"model": ft0, "parameters": {"scale": 0.5}}]},
        "passthrough_slices_scale": {"merge_method": "passthrough", "dtype": "float32",
                                     "parameters": {"scale": [{"filter": "o_proj", "value": 0.0},
                                                              {"filter": "down_proj", "value": 0.5}]},
                                     "slices": [{"sources": [{"model": ft0, "layer_range": [0, 2]}]},
                                                {"sources": [{"model": ft1, "layer_range": [1, 4]}]}]},
        # a deliberate difference, pinned below: weights summing to zero with normalize
        "linear_zero_sum": {"merge_method": "linear", "dtype": "float32",
                            "models": [{"model": ft0, "parameters": {"weight": 1.0}},
                                       {"model": ft1, "parameters": {"weight": -1.0}}]},
    }


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """Write the checkpoints, run every case through mergekit (one process) and through us; returns
    {case: (ours, mergekit's or an error text, our folder, mergekit's folder)} and the models."""
    root = tmp_path_factory.mktemp("parity")
    base = write_llama_checkpoint(root / "base", seed=0, layers=LAYERS)
    tensors = {"base": base}
    for k in range(3):
        # different noise scales so that model_stock's angles and nuslerp's weights matter
        tensors[f"ft{k}"] = write_llama_checkpoint(root / f"ft{k}", seed=k + 1, base=base, noise=0.01 * (k + 1),
                                                   layers=LAYERS)
    folders = {name: str(root / name) for name in tensors}
    cases = _cases(folders)
    with mergekit_batch([(name, str(write_config(root / f"{name}.yml", cfg)), str(root / f"mk_{name}"), [])
                         for name, cfg in cases.items()]) as mergekit_failed:
        for name, cfg in cases.items():  # ours while mergekit runs
            run_merge(config_from_dict(cfg, source=name), root / f"ours_{name}", device="cpu")
        failed = mergekit_failed()
    results = {}
    for name in cases:
        ours_dir = root / f"ours_{name}"
        mk_dir = root / f"mk_{name}"
        results[name] = (load_output(ours_dir), failed.get(name) or load_output(mk_dir), ours_dir, mk_dir)
    return results, tensors


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.double().abs().max())
    return float((ours.double() - reference.double()).abs().max()) / (scale if scale > 0 else 1.0)


def assert_parity(parity, case: str) -> None:
    results, _ = parity
    ours, theirs, _, _ = results[case]
    assert not isinstance(theirs, str), f"mergekit failed on {case}:\n{theirs}"
    assert set(ours) == set(theirs), f"{case}: names differ: {sorted(set(ours) ^ set(theirs))}"
    worst = max((relative_error(ours[n], theirs[n]), n) for n in theirs)
    for name in theirs:
        assert ours[name].shape == theirs[name].shape and ours[name].dtype == theirs[name].dtype, name
    assert worst[0] <= TOLERANCE, f"{case}: {worst[1]} differs by {worst[0]:.2e} (relative)"


@pytest.mark.parametrize("case", [
    "linear", "linear_filters", "slerp", "slerp_anchors", "slerp_filters", "task_arithmetic",
    "task_arithmetic_filters", "ties", "ties_per_model", "breadcrumbs", "breadcrumbs_ties", "dare_ties_keep_all",
    "dare_linear_keep_all", "della_keep_all", "della_linear_keep_all", "model_stock",
    "model_stock_filter_wise", "nuslerp", "nuslerp_rows",
    "multislerp", "multislerp_no_base", "karcher", "karcher_with_base", "sce", "sce_all", "nearswap", "arcee_fusion",
    "ram", "ramplus_tl", "nuslerp_no_base", "passthrough_scale", "passthrough_slices_scale",
])
def test_matches_mergekit(parity, case):
    assert_parity(parity, case)


def test_every_mergekit_method_has_a_parity_case():
    """mergekit 0.1.5's 20 methods, each in at least one case above (the registry's own extras are ours)."""
    import mergekit.merge_methods.registry as mk

    theirs = {m.spec.name for m in mk.registered_methods()}
    covered = {case["merge_method"] for case in _cases({k: k for k in ("base", "ft0", "ft1", "ft2")}).values()}
    assert len(theirs) == 20 and theirs <= covered, sorted(theirs - covered)


def test_the_cases_really_merge(parity):
    """Guard against a vacuous pass: the merges move away from every input, and anchors vary across layers."""
    results, tensors = parity
    name = "model.layers.1.mlp.up_proj.weight"
    for case in ("ties", "breadcrumbs_ties", "model_stock", "slerp", "nuslerp", "multislerp", "karcher", "sce",
                 "nearswap", "arcee_fusion", "ram", "ramplus_tl", "nuslerp_no_base"):
        out = results[case][0][name]
        assert all(relative_error(out, t[name]) > 1e-4 for t in tensors.values()), case
    # RAM+ amplifies unique entries: it differs from RAM, so both kinds of entries occur at this ε
    assert relative_error(results["ramplus_tl"][0][name], results["ram"][0][name]) > 1e-4
    anchors = results["slerp_anchors"][0]
    base, ft0 = tensors["base"], tensors["ft0"]
    assert torch.equal(anchors["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(anchors[f"model.layers.{LAYERS - 1}.mlp.up_proj.weight"],
                          ft0[f"model.layers.{LAYERS - 1}.mlp.up_proj.weight"])


def test_passthrough_slices_match_mergekit_bit_for_bit(parity):
    results, tensors = parity
    ours, theirs, ours_dir, mk_dir = results["passthrough_slices"]
    assert not isinstance(theirs, str), theirs
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in theirs)
    layers = json.loads((ours_dir / "config.json").read_text())["num_hidden_layers"]
    assert layers == json.loads((mk_dir / "config.json").read_text())["num_hidden_layers"] == 5
    assert torch.equal(ours["model.layers.2.self_attn.q_proj.weight"], tensors["ft1"]["model.layers.1.self_attn.q_proj.weight"])


def test_linear_with_weights_summing_to_zero_differs_on_purpose(parity):
    """mergekit divides by Σ w = 0 and writes inf/NaN; we treat a zero sum as 1 (as mergekit's own task-vector
    methods do) and write the plain weighted sum, here θ_ft0 − θ_ft1."""
    results, tensors = parity
    ours, theirs, _, _ = results["linear_zero_sum"]
    assert not isinstance(theirs, str), theirs
    name = "model.layers.0.mlp.up_proj.weight"
    assert not bool(theirs[name].isfinite().all())
    assert torch.allclose(ours[name], tensors["ft0"][name] - tensors["ft1"][name], atol=1e-7)


def test_scaled_slices_are_computed_and_unscaled_ones_copied(parity):
    """passthrough's ``scale``: o_proj × 0, down_proj × 0.5, everything else copied bit for bit."""
    results, tensors = parity
    ours = results["passthrough_slices_scale"][0]
    assert torch.equal(ours["model.layers.2.self_attn.o_proj.weight"], torch.zeros_like(
        tensors["ft1"]["model.layers.1.self_attn.o_proj.weight"]))
    assert torch.equal(ours["model.layers.2.mlp.down_proj.weight"], tensors["ft1"]["model.layers.1.mlp.down_proj.weight"]
                       * 0.5)
    assert torch.equal(ours["model.layers.2.self_attn.q_proj.weight"], tensors["ft1"]["model.layers.1.self_attn.q_proj.weight"])


def test_relative_error_metric():
    assert relative_error(torch.tensor([1.0, -2.0]), torch.tensor([1.0, -2.0])) == 0.0
    ours, reference = torch.tensor([1.0, -2.0 + 2e-5], dtype=torch.float64), torch.tensor([1.0, -2.0], dtype=torch.float64)
    assert math.isclose(relative_error(ours, reference), 1e-5, rel_tol=1e-9)
