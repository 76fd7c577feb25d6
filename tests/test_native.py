"""The fused CPU kernels (merging/native) against the torch code they stand in for.

Every merge here runs twice on the same real checkpoints, once with the kernels and once with
``MERGESCOPE_NATIVE=0`` (the torch path, which is also what runs on CUDA or without a C compiler); the outputs must
be the same bytes, band by band and whole.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import (
    fine_tune,
    llama_config,
    llama_tensors,
    load_folder,
    save_checkpoint,
)

from merging import native, parse_config, run_merge
from merging.methods.registry import TensorContext
from merging.native import abi, ops, rng

ROOT = Path(__file__).resolve().parent.parent

needs_compiler = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                    reason="no C compiler: only the torch path exists here")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bf16 base and three fine-tunes: bf16 task vectors have many exact ties at any top-k threshold."""
    root = tmp_path_factory.mktemp("native")
    cfg = llama_config(hidden=32, intermediate=48, layers=2, vocab=96)
    base = llama_tensors(cfg, seed=0, dtype=torch.bfloat16)
    folders = [save_checkpoint(root / "base", base, cfg)]
    for k in range(3):
        folders.append(save_checkpoint(root / f"ft{k}", fine_tune(base, seed=k, scale=0.02), cfg))
    return folders


KERNELS = ("weighted_sum", "task_vectors", "emr")


def _merge_both(text: str, out: Path, monkeypatch) -> tuple[dict, dict]:
    """Merge with the kernels, counting their calls (they must have run), then with torch only."""
    calls = []
    for name in KERNELS:
        kernel = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _kernel=kernel, _name=name, **k: calls.append(_name) or _kernel(*a, **k))
    monkeypatch.delenv("MERGESCOPE_NATIVE", raising=False)
    run_merge(parse_config(text), out / "native")
    assert calls, "the fused kernels never ran"
    calls.clear()
    monkeypatch.setenv("MERGESCOPE_NATIVE", "0")
    run_merge(parse_config(text), out / "torch")
    assert not calls, "MERGESCOPE_NATIVE=0 still ran a kernel"
    monkeypatch.delenv("MERGESCOPE_NATIVE")
    return load_folder(out / "native"), load_folder(out / "torch")


CASES = [
    ("linear", "{}"),
    ("task_arithmetic", "{lambda: 0.7}"),
    ("task_arithmetic", "{normalize: true, coefficients: nan}"),
    ("ties", "{density: 0.3}"),
    ("ties", "{density: 0.3, rescale: true}"),
    ("breadcrumbs", "{density: 0.5, gamma: 0.1}"),
    ("breadcrumbs_ties", "{density: 0.4, gamma: 0.2}"),
    ("dare_linear", "{density: 0.5}"),
    ("dare_ties", "{density: 0.3}"),
    ("emr", "{}"),
    ("emr", "{rescaler: tensor_mean}"),
]


@needs_compiler
@pytest.mark.parametrize("band_elements", [None, 100])
@pytest.mark.parametrize("method, params", CASES)
def test_kernels_give_the_torch_bytes(family, tmp_path, monkeypatch, method, params, band_elements):
    import merging.bands as bands

    assert native.library() is not None, native.why_not()
    if band_elements:
        monkeypatch.setattr(bands, "BAND_ELEMENTS", band_elements)  # bands of a few rows, ties cut mid-tensor
    base, *tunes = family
    weights = (1.0, 0.5, 0.8)
    models = ", ".join(f"{{model: {t}, parameters: {{weight: {w}}}}}" for t, w in zip(tunes, weights))
    if method == "emr":
        models = ", ".join(f"{{model: {t}}}" for t in tunes)
    text = f"merge_method: {method}\nbase_model: {base}\nmodels: [{models}]\nparameters: {params}\ndtype: bfloat16\n"
    fast, slow = _merge_both(text, tmp_path, monkeypatch)
    assert fast.keys() == slow.keys()
    for name in fast:
        if method.startswith("dare"):
            # DARE rescales by L1 norms summed in a different (fixed) order: last-bit differences only
            torch.testing.assert_close(fast[name].float(), slow[name].float(), rtol=1e-2, atol=1e-5)
        else:
            assert torch.equal(fast[name], slow[name]), name
    if method == "emr":
        import json

        a = json.loads((tmp_path / "native" / "emr.json").read_text())["tasks"]
        b = json.loads((tmp_path / "torch" / "emr.json").read_text())["tasks"]
        for x, y in zip(a, b):
            assert x["rescaler"] == pytest.approx(y["rescaler"], rel=1e-9)
            assert x["mask_density"] == y["mask_density"]


@needs_compiler
def test_draws_match_their_torch_twin_across_the_32_bit_boundary():
    ctx = TensorContext("model.layers.0.mlp.up_proj.weight", seed=7)
    key, first, n = rng.model_key(ctx, 2), (1 << 32) - 300, 1000
    limit = rng.keep_limit(0.37)
    ones, zeros = torch.ones(n), torch.zeros(n)
    kept, _ = ops.task_vectors(zeros, [ones], [1.0], [1.0], torch.float32, draws=([key], [limit], first),
                               consensus=False, normalize=False, divisor=1.0, lam=1.0)
    assert torch.equal(kept > 0, rng.draw24(key, first, n) < limit)
    assert 0.3 < float((kept > 0).float().mean()) < 0.45


@needs_compiler
def test_kernels_store_bf16_with_round_to_nearest_even_and_count_nonfinite():
    values = torch.tensor([1.0, 1.00390625, 1.01171875, -2.5, float("inf"), float("nan"), 3.0e38, 1e-40])
    out, bad = ops.weighted_sum([values, torch.zeros_like(values)], [1.0, 0.0], torch.bfloat16)
    finite = torch.isfinite(values) | torch.isinf(values)  # NaN payloads differ between torch builds; NaN is NaN
    assert out[finite].view(torch.int16).tolist() == values[finite].to(torch.bfloat16).view(torch.int16).tolist()
    assert bool(out[~finite].isnan().all())
    assert bad == 2  # inf and nan; 3e38 still fits in bf16


@needs_compiler
def test_kernels_read_and_store_float16_as_torch_does():
    """Every float16 value (all 65536 bit patterns, in lengths that are not multiples of the 8-wide conversions)
    comes in as torch converts it, and float32 values go out rounded to nearest even, as torch stores them."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)[:-3]
    widened = every.float()
    got, bad = ops.weighted_sum([every], [1.0], torch.float32)
    finite = ~widened.isnan()
    assert torch.equal(got[finite], widened[finite]) and bool(got[~finite].isnan().all())
    assert bad == int((~torch.isfinite(widened)).sum())
    values = torch.randn(10_007, generator=torch.Generator().manual_seed(0)) * torch.logspace(-9, 5, 10_007)
    stored, bad = ops.weighted_sum([values], [1.0], torch.float16)
    assert stored.view(torch.int16).tolist() == values.to(torch.float16).view(torch.int16).tolist()
    assert bad == int((~torch.isfinite(values.to(torch.float16))).sum())


@needs_compiler
@pytest.mark.parametrize("method, params", [c for c in CASES if not c[0].startswith("dare")])
def test_kernels_give_the_torch_bytes_on_float16_checkpoints(tmp_path, monkeypatch, method, params):
    cfg = llama_config(hidden=32, intermediate=48, layers=1, vocab=96)
    base = llama_tensors(cfg, seed=1, dtype=torch.float16)
    folders = [save_checkpoint(tmp_path / "base", base, cfg)]
    folders += [save_checkpoint(tmp_path / f"ft{k}", fine_tune(base, seed=k, scale=0.02), cfg) for k in range(3)]
    models = ", ".join(f"{{model: {t}}}" for t in folders[1:])
    text = f"merge_method: {method}\nbase_model: {folders[0]}\nmodels: [{models}]\nparameters: {params}\n"
    fast, slow = _merge_both(text, tmp_path, monkeypatch)
    assert fast.keys() == slow.keys() and any(t.dtype == torch.float16 for t in fast.values())
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_nonfinite_count_kernel_counts_what_torch_counts(dtype):
    values = torch.randn(200_003, generator=torch.Generator().manual_seed(3)).to(dtype)
    values[[0, 17, 65_536, 200_002]] = torch.tensor([float("nan"), float("inf"), -float("inf"), float("nan")],
                                                    dtype=dtype)
    values[100] = torch.finfo(dtype).max  # the largest finite value is not counted
    assert ops.count_nonfinite(values) == int((~torch.isfinite(values)).sum()) == 4
    assert ops.count_nonfinite(values[:18]) == 2 and ops.count_nonfinite(values[1:17]) == 0


@needs_compiler
def test_a_ties_merge_takes_its_top_k_sample_from_the_kernel(family, tmp_path, monkeypatch):
    calls = []
    kernel = ops.strided_magnitudes
    monkeypatch.setattr(ops, "strided_magnitudes", lambda *a: calls.append(1) or kernel(*a))
    base, *tunes = family
    models = ", ".join(f"{{model: {t}}}" for t in tunes)
    run_merge(parse_config(f"merge_method: ties\nbase_model: {base}\nmodels: [{models}]\n"
                           "parameters: {density: 0.3}\n"), tmp_path / "out")
    assert calls


@needs_compiler
def test_the_strided_sample_kernel_is_torchs_strided_abs_difference():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(100_003, generator=g).to(torch.bfloat16)
    model = (base.float() + torch.randn(100_003, generator=g) * 0.01).to(torch.bfloat16)
    model[[0, 61 * 7]] = torch.tensor([float("nan"), -0.0], dtype=torch.bfloat16)
    for b in (base, None):
        want = ((model.float() - b.float()) if b is not None else model.float()).abs()[::61]
        got = ops.strided_magnitudes(b, model, 61)
        assert got.view(torch.int32).tolist() == want.view(torch.int32).tolist()


@needs_compiler
def test_bracket_and_tie_end_are_exact():
    torch.manual_seed(0)
    base = torch.randn(300_000).to(torch.bfloat16)
    model = (base.float() + torch.randn(300_000) * 0.01).to(torch.bfloat16)
    magnitude = (model.float() - base.float()).abs()
    lo, hi = float(magnitude.quantile(0.79)), float(magnitude.quantile(0.81))
    above, inside = ops.bracket(base, model, lo, hi)
    assert above == int((magnitude > hi).sum())
    assert torch.equal(inside, magnitude[(magnitude >= lo) & (magnitude <= hi)])
    threshold = float(magnitude.kthvalue(200_000).values)
    ties = (magnitude == threshold).nonzero().reshape(-1)
    assert ties.numel() > 10  # bf16 differences repeat
    end = ops._tie_end(base, model, threshold, 7)
    assert end == int(ties[6]) + 1


@needs_compiler
def test_without_a_compiler_the_torch_path_merges_the_same_bytes(family, tmp_path):
    base, a, b, _ = family
    cfg = tmp_path / "ties.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
                   "parameters: {density: 0.4}\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CC": str(tmp_path / "no-such-compiler"),
           "MERGESCOPE_CACHE": str(tmp_path / "cache")}
    probe = subprocess.run([sys.executable, "-c", "from merging import native; print(native.library() is None, "
                            "native.why_not())"], capture_output=True, text=True, env=env, timeout=120)
    assert probe.stdout.startswith("True could not build the kernels"), probe.stdout + probe.stderr
    done = subprocess.run([sys.executable, "-m", "merging", "merge", str(cfg), str(tmp_path / "plain")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    run_merge(parse_config(cfg.read_text()), tmp_path / "fast")
    plain, fast = load_folder(tmp_path / "plain"), load_folder(tmp_path / "fast")
    assert all(torch.equal(plain[k], fast[k]) for k in fast)


@needs_compiler
def test_the_python_structs_are_the_c_structs():
    lib = native.library()
    assert lib is not None, native.why_not()
    assert abi.mismatches(lib) == []
    for struct in abi.STRUCTS:
        assert lib.ms_sizeof(struct.c_name.encode()) == ctypes.sizeof(struct), struct.c_name
    assert {struct for struct, _, _ in abi.KERNELS.values()} <= set(abi.STRUCTS)


@needs_compiler
def test_a_struct_out_of_step_with_c_is_refused(monkeypatch, caplog):
    lib = native.library()
    fields = abi.TaskVectorsArgs._fields_

    class Swapped(abi.KernelArgs):  # the same size, two fields in the wrong order
        c_name = "ms_task_vectors_args"
        _fields_ = [fields[1], fields[0], *fields[2:]]

    class Short(abi.KernelArgs):
        c_name = "ms_task_vectors_args"
        _fields_ = fields[:-1]

    class Unknown(abi.KernelArgs):
        c_name = "ms_no_such_args"
        _fields_ = fields

    assert "fields differ" in abi.mismatches(lib, (Swapped,))[0]
    assert "bytes in C" in abi.mismatches(lib, (Short,))[0]
    assert "not in the library" in abi.mismatches(lib, (Unknown,))[0]
    # and a library that disagrees is not used: the merges fall back to torch, with a line in the log saying why
    check = abi.mismatches
    monkeypatch.setattr(abi, "mismatches", lambda library: check(library, (Swapped,)))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    with caplog.at_level(logging.ERROR, logger="mergescope.native"):
        assert native.library() is None
    assert "disagree" in native.why_not() and "ms_task_vectors_args" in native.why_not()
    assert any("disagree" in r.getMessage() for r in caplog.records)


@needs_compiler
def test_the_row_sums_layout_is_the_one_c_reports():
    lib = native.library()
    fields = ops._row_sums_fields(lib)
    assert [name for name, _ in fields][:3] == ["base_sq", "weight_sq", "gram"]
    for m in (1, 3, 5):
        offsets = (ctypes.c_int64 * (len(fields) + 1))()
        width = lib.ms_row_sums_layout(m, offsets)
        assert width == offsets[len(fields)] == sum(m ** rank for _, rank in fields)
        assert [offsets[i + 1] - offsets[i] for i in range(len(fields))] == [m ** rank for _, rank in fields]
    torch.manual_seed(0)
    base = torch.randn(5, 70).to(torch.bfloat16)
    models = [(base.float() + torch.randn(5, 70) * 0.1).to(torch.bfloat16) for _ in range(3)]
    sums = ops.row_sums(base, models, [(0.05, -1)] * 3, True, None, None)
    assert list(sums) == [name for name, _ in fields]
    tau = torch.stack([m.float() - base.float() for m in models], dim=1)
    assert torch.allclose(sums["gram"], torch.bmm(tau, tau.transpose(1, 2)).double(), rtol=1e-5)
    assert torch.allclose(sums["abs"], tau.abs().sum(dim=-1).double(), rtol=1e-5)


@needs_compiler
def test_an_infinite_task_vector_against_the_election_adds_nothing_to_its_masked_sums():
    """τ_0 = +inf and τ_1 = −inf at one element: the election takes τ_1's side, so the element is outside M_0 and
    adds 0 to model 0's masked sums, as a huge finite pair does (an infinite τ times a masked-out 0 is NaN)."""
    torch.manual_seed(0)
    base = torch.zeros(2, 70)
    models = [torch.randn(2, 70), torch.randn(2, 70)]
    found = {}
    for label, value in (("infinite", float("inf")), ("huge", 1e30)):
        pair = [m.clone() for m in models]
        pair[0][0, 0], pair[1][0, 0] = value, -value
        found[label] = ops.row_sums(base, pair, [(0.0, -1)] * 2, True, None, pair[0] * 0.5)
    for field in ("masked_dot", "own_masked_dot", "abs_masked", "count"):
        assert torch.equal(found["infinite"][field][:, 0], found["huge"][field][:, 0]), field
