"""The generic method test: every method in the registry merges the fixtures from YAML through the CLI.

Configs are built from each method's schema (its base policy, model counts and every parameter at its default,
written out so validation sees them), so a newly registered method is covered without editing this file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from checkpoints import load_folder
from safetensors import safe_open

from merging.__main__ import main
from merging.config import load_config
from merging.engine import _planned_outputs, plan_merge
from merging.methods import REGISTRY, MergeMethod

ROOT = Path(__file__).resolve().parent.parent


def minimal_config(method: MergeMethod, base: Path, tunes: list[Path], dtype: str = "bfloat16") -> dict:
    """The smallest valid config for ``method``: as many models as it needs (at least one), each scalar parameter
    at its default, per-model ones under every model."""
    count = max(1, method.min_models)
    if method.max_models is not None:
        count = min(count, method.max_models)
    assert count <= len(tunes), f"{method.name} needs {count} models; the fixture has {len(tunes)}"
    scalars = [p for p in method.params if p.type in (bool, int, float, str) and p.default is not None]
    per_model = {p.name: p.default for p in scalars if p.per_model}
    global_params = {p.name: p.default for p in scalars if not p.per_model}
    config: dict = {"merge_method": method.name,
                    "models": [{"model": str(t), "parameters": dict(per_model)} for t in tunes[:count]],
                    "dtype": dtype}
    if global_params:
        config["parameters"] = global_params
    if method.base != "none":
        config["base_model"] = str(base)
    return config


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_merges_through_the_cli(name, family, tmp_path, capsys):
    method = REGISTRY[name]
    base, tunes = family
    config_path = write_config(tmp_path, minimal_config(method, base, tunes))
    out = tmp_path / "out"
    assert main(["merge", str(config_path), str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
    merged = load_folder(out)  # loadable: every file parses as safetensors
    assert (out / "config.json").is_file() and (out / "README.md").is_file()
    # an output that is not a model (EMR) must not load as one: its tensors are not in model.safetensors
    assert (out / "model.safetensors").exists() == method.model_output
    if method.outputs is None:
        expected = {n: (tuple(t.shape), t.is_floating_point()) for n, t in load_folder(base).items()}
        assert set(merged) == set(expected)
        for n, tensor in merged.items():
            shape, is_float = expected[n]
            assert tuple(tensor.shape) == shape, n
            if is_float:
                assert str(tensor.dtype) == "torch.bfloat16", n
            assert not tensor.float().isnan().any(), n
    else:
        # a method that writes its own tensors (EMR): names, shapes and dtypes are what its outputs hook planned
        planned = _planned_outputs(plan_merge(load_config(str(config_path))))
        written = {}
        for f in out.glob("*.safetensors"):
            with safe_open(str(f), "pt") as fh:
                written.update({k: fh.get_slice(k) for k in fh.keys()})
        assert set(written) == {n for n, _ in planned}
        for n, spec in planned:
            assert tuple(written[n].get_shape()) == tuple(spec.shape) and written[n].get_dtype() == spec.dtype, n


@pytest.mark.parametrize("name", sorted(n for n, m in REGISTRY.items()
                                        if any(p.max is not None and p.type is float for p in m.params)))
def test_an_out_of_range_parameter_is_refused_with_exit_2(name, family, tmp_path, capsys):
    method = REGISTRY[name]
    base, tunes = family
    config = minimal_config(method, base, tunes)
    bounded = next(p for p in method.params if p.max is not None and p.type is float)
    if bounded.per_model:
        config["models"][0]["parameters"][bounded.name] = bounded.max + 1
    else:
        config["parameters"][bounded.name] = bounded.max + 1
    out = tmp_path / "out"
    assert main(["merge", str(write_config(tmp_path, config)), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and bounded.name in err and not out.exists()


def test_the_module_entry_point_runs_a_merge(family, tmp_path):
    """One real ``python -m merging merge`` process (the per-method runs above call the same ``main``)."""
    base, tunes = family
    config = minimal_config(REGISTRY["ties"], base, tunes, dtype="float16")
    config["parameters"]["density"] = 0.5
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "merging", "merge", str(write_config(tmp_path, config)), str(out),
                           "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    merged = load_folder(out)
    assert str(merged["lm_head.weight"].dtype) == "torch.float16"


def test_passthrough_slices_stack_layers_and_update_the_layer_count(tmp_path):
    """A frankenmerge: layers [0, 2) of A then [1, 3) of B gives 4 layers, renumbered, copied bit for bit."""
    import json

    from checkpoints import write_family

    base, (a, b) = write_family(tmp_path / "m", n_models=2, layers=3)
    config = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]}
    out = tmp_path / "out"
    assert main(["merge", str(write_config(tmp_path, config)), str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    merged, ta, tb = load_folder(out), load_folder(a), load_folder(b)
    origin = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (tb, 2)}
    for layer, (src, i) in origin.items():
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert merged[f"model.layers.{layer}.{suffix}"].equal(src[f"model.layers.{i}.{suffix}"])
    assert merged["model.embed_tokens.weight"].equal(ta["model.embed_tokens.weight"])
    assert merged["lm_head.weight"].equal(tb["lm_head.weight"])
    assert not any(".layers.4." in n for n in merged)
