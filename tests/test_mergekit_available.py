"""mergekit (the reference for parity tests) is installed and runs offline on CPU on a local llama checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from mergekit_ref import (
    llama_tensor_names,
    load_output,
    mergekit_executable,
    run_mergekit,
    write_config,
    write_llama_checkpoint,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_mergekit_imports():
    from importlib.metadata import version

    import mergekit  # noqa: F401

    assert version("mergekit") == "0.1.5"  # the pin in tests/requirements.txt
    assert mergekit_executable(), "mergekit-yaml console script not found"


def test_mergekit_linear_is_weighted_mean(tmp_path):
    models = tmp_path / "models"
    base = write_llama_checkpoint(models / "base", seed=0, dtype="float32")
    tunes = [write_llama_checkpoint(models / f"ft{k}", seed=k, dtype="float32", base=base) for k in (1, 2)]
    inputs = [base, *tunes]
    assert sorted(base) == sorted(llama_tensor_names(2))
    assert all(not torch.equal(base[n], t[n]) for t in tunes for n in base)

    # Weights that do not sum to 1: mergekit's linear normalizes by default (normalize: true).
    weights = [1.0, 2.0, 3.0]
    folders = [models / "base", models / "ft1", models / "ft2"]
    cfg = write_config(tmp_path / "linear.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(f), "parameters": {"weight": w}} for f, w in zip(folders, weights)],
        "dtype": "float32",
    })
    out = run_mergekit(cfg, tmp_path / "out")

    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    merged = load_output(out)
    assert sorted(merged) == sorted(base)
    total = sum(weights)
    for name, got in merged.items():
        expected = sum(w * m[name].double() for w, m in zip(weights, inputs)) / total
        assert got.dtype == torch.float32 and got.shape == base[name].shape, name
        torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-5, msg=name)
