"""EMR-Merging: the stored τ_uni, masks and rescalers against a direct element-wise computation, the 1-bit mask
storage, emr-extract's checkpoints, the CLI path and the storage report."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import load_folder, write_family
from safetensors.torch import save_file

from merging import ConfigError, MergeError, parse_config, run_merge
from merging.__main__ import main
from merging.emr_store import extract_task, load_emr
from merging.methods.emr import elect, pack_bits, task_masks, unpack_bits
from merging.safetensors_io import read_local_header

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "merging", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def emr_config(base, tunes, **parameters) -> str:
    models = "".join(f"  - model: {t}\n" for t in tunes)
    params = json.dumps(parameters) if parameters else "{}"
    return f"merge_method: emr\nbase_model: {base}\nmodels:\n{models}parameters: {params}\n"


# --- a direct element-wise reference, written from the paper's formulas ------------------------------------------

def reference_emr(base: dict, tunes: list[dict], variant: str = "model", skip: tuple[str, ...] = ()):
    """τ_uni, masks (per tensor) and λ by scalar loops over elements: exact-zero sums elect −1."""
    n = len(tunes)
    numerator, denominator = np.zeros(n), np.zeros(n)
    unified, masks = {}, {}
    for name, b in base.items():
        if not b.is_floating_point() or any(s in name for s in skip):
            continue
        tv = np.stack([t[name].float().numpy() - b.float().numpy() for t in tunes]).reshape(n, -1)
        uni = np.zeros(tv.shape[1], dtype=np.float32)
        mask = np.zeros(tv.shape, dtype=bool)
        for e in range(tv.shape[1]):
            column = [float(tv[i, e]) for i in range(n)]
            sign = 1.0 if sum(column) > 0 else -1.0
            agreeing = [abs(v) for v in column if v * sign > 0]
            uni[e] = sign * max(agreeing) if agreeing else 0.0
            for i in range(n):
                mask[i, e] = column[i] * uni[e] > 0
        num = np.abs(tv).astype(np.float64).sum(axis=1)
        den = (mask * np.abs(uni).astype(np.float64)).sum(axis=1)
        if variant == "tensor_mean":
            num, den = num / tv.shape[1], den / tv.shape[1]
        numerator += num
        denominator += den
        unified[name] = uni.reshape(b.shape)
        masks[name] = mask.reshape(n, *b.shape)
    rescalers = np.where(denominator > 0, numerator / np.where(denominator > 0, denominator, 1), 1.0)
    return unified, masks, rescalers


def stored_masks(folder: Path, name: str, n: int, shape) -> np.ndarray:
    tensors = load_folder(folder)
    return np.stack([unpack_bits(tensors[f"emr.mask.{k}.{name}"], shape).numpy() for k in range(n)])


# --- hand-built tensors --------------------------------------------------------------------------------------------

HAND_TAU = [[1, -2, 3, 0, 1, 0], [2, 1, -3, 0, -1, 0], [-1, 1, -1, 0, 0, 5]]
HAND_UNI = [2, -2, -3, 0, -1, 5]  # element 1 and 4 sum to exactly 0: elected −1, as the official code
HAND_MASKS = [[1, 1, 0, 0, 0, 0], [1, 0, 1, 0, 1, 0], [0, 0, 1, 0, 0, 1]]


def test_elect_and_masks_on_a_hand_built_case():
    tau = torch.tensor(HAND_TAU, dtype=torch.float32)
    unified = elect(tau)
    assert unified.tolist() == HAND_UNI
    assert task_masks(tau, unified).int().tolist() == HAND_MASKS


def write_hand_family(root: Path) -> tuple[Path, list[Path]]:
    """Tensor a: the hand case above; b: only task 0 moves; c: an int buffer; every value exact in float32."""
    base = {"a.weight": torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0, -0.5]), "b.weight": torch.tensor([[1.0, 2.0]]),
            "c.buffer": torch.arange(4, dtype=torch.int64)}
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    tunes = []
    for k in range(3):
        t = {"a.weight": base["a.weight"] + torch.tensor(HAND_TAU[k], dtype=torch.float32),
             "b.weight": base["b.weight"] + torch.tensor([[4.0, 0.0]]) * (k == 0),
             "c.buffer": base["c.buffer"] + 10}  # integer tensors are never merged: the base's are kept
        (root / f"t{k}").mkdir()
        save_file(t, str(root / f"t{k}" / "model.safetensors"))
        tunes.append(root / f"t{k}")
    return root / "base", tunes


@pytest.mark.parametrize("variant, rescalers", [
    # model: λ_0 = (7 + 4) / (4 + 4), λ_1 = 7 / 6, λ_2 = 8 / 8
    ("model", [11 / 8, 7 / 6, 1.0]),
    # tensor_mean: λ_0 = (7/6 + 4/2) / (4/6 + 4/2), λ_1 = (7/6) / (6/6), λ_2 = (8/6) / (8/6)
    ("tensor_mean", [(7 / 6 + 2) / (4 / 6 + 2), 7 / 6, 1.0]),
])
def test_hand_built_merge_stores_the_formula(tmp_path, variant, rescalers):
    base, tunes = write_hand_family(tmp_path / "models")
    run_merge(parse_config(emr_config(base, tunes, rescaler=variant)), tmp_path / "out")
    meta = json.loads((tmp_path / "out" / "emr.json").read_text())
    assert [t["rescaler"] for t in meta["tasks"]] == pytest.approx(rescalers, rel=1e-12)
    assert meta["rescaler"] == variant and meta["sign_of_zero_sum"] == -1
    stored = load_folder(tmp_path / "out")
    assert stored["emr.tau_uni.a.weight"].tolist() == HAND_UNI
    assert stored["emr.tau_uni.b.weight"].tolist() == [[4.0, 0.0]]
    assert stored_masks(tmp_path / "out", "a.weight", 3, (6,)).astype(int).tolist() == HAND_MASKS
    assert stored["emr.mask.0.a.weight"].tolist() == [0b11000000]  # numpy.packbits order
    assert stored["emr.mask.1.a.weight"].tolist() == [0b10101000]
    assert torch.equal(stored["c.buffer"], torch.arange(4))
    # density = set mask bits / merged elements (8)
    assert [t["mask_density"] for t in meta["tasks"]] == [3 / 8, 3 / 8, 2 / 8]


# --- the fixture family against the element-wise reference ---------------------------------------------------------

@pytest.mark.parametrize("variant", ["model", "tensor_mean"])
def test_merge_matches_elementwise_reference(family, tmp_path, variant):
    base_dir, tune_dirs = family
    run_merge(parse_config(emr_config(base_dir, tune_dirs, rescaler=variant)), tmp_path / "out")
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    unified, masks, rescalers = reference_emr(base, tunes, variant)
    stored = load_folder(tmp_path / "out")
    for name, uni in unified.items():
        assert np.array_equal(stored[f"emr.tau_uni.{name}"].numpy(), uni), name
        assert np.array_equal(stored_masks(tmp_path / "out", name, 3, uni.shape), masks[name]), name
    meta = json.loads((tmp_path / "out" / "emr.json").read_text())
    assert [t["rescaler"] for t in meta["tasks"]] == pytest.approx(rescalers.tolist(), rel=1e-9)
    assert meta["tasks"][0]["model"] == str(tune_dirs[0])
    assert 0.6 < meta["tasks"][0]["mask_density"] < 0.8  # three independent noises: P(agree with the vote) ≈ 0.69


def test_variants_give_different_rescalers(family, tmp_path):
    base_dir, tune_dirs = family
    lam = {}
    for variant in ("model", "tensor_mean"):
        run_merge(parse_config(emr_config(base_dir, tune_dirs, rescaler=variant)), tmp_path / variant)
        lam[variant] = [t["rescaler"] for t in json.loads((tmp_path / variant / "emr.json").read_text())["tasks"]]
    assert all(abs(a - b) > 1e-6 for a, b in zip(lam["model"], lam["tensor_mean"]))


# --- 1-bit storage -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (9,), (3, 5), (2, 3, 11), (64, 16)])
def test_packed_masks_take_one_bit_and_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) > 0.4
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (math.ceil(mask.numel() / 8),)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().ravel()))
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_stored_masks_are_one_bit_per_element(family, tmp_path):
    base_dir, tune_dirs = family
    run_merge(parse_config(emr_config(base_dir, tune_dirs)), tmp_path / "out")
    header, _ = read_local_header(tmp_path / "out" / "merge.safetensors")  # an EMR store, not a model
    for name, spec in load_folder(base_dir).items():
        for k in range(3):
            info = header[f"emr.mask.{k}.{name}"]
            assert info.dtype == "U8" and list(info.shape) == [math.ceil(spec.numel() / 8)]


# --- extraction ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_extract_equals_base_plus_rescaled_masked_unified(tmp_path, dtype):
    base_dir, tune_dirs = write_family(tmp_path / "models", n_models=3, dtype=dtype)
    (base_dir / "tokenizer.json").write_text('{"model": "toy"}')
    run_merge(parse_config(emr_config(base_dir, tune_dirs, skip=["lm_head"])), tmp_path / "out")
    stored = load_folder(tmp_path / "out")
    lam = [t["rescaler"] for t in json.loads((tmp_path / "out" / "emr.json").read_text())["tasks"]]
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    for k, task in [(1, "1"), (2, str(tune_dirs[2])), (0, "ft0")]:  # by index, by reference, by folder name
        out = tmp_path / f"task{k}"
        result = extract_task(tmp_path / "out", task, out)
        assert result.task == k and result.rescaler == lam[k]
        rebuilt = load_folder(out)
        assert set(rebuilt) == set(base)
        for name, b in base.items():
            assert rebuilt[name].dtype == b.dtype and rebuilt[name].shape == b.shape
            if "lm_head" in name:  # kept per task, restored exactly
                assert torch.equal(rebuilt[name], tunes[k][name])
                continue
            mask = unpack_bits(stored[f"emr.mask.{k}.{name}"], b.shape)
            expected = b.float() + lam[k] * mask * stored[f"emr.tau_uni.{name}"].float()
            torch.testing.assert_close(rebuilt[name], expected.to(b.dtype), rtol=0, atol=0)
        assert (out / "tokenizer.json").read_text() == '{"model": "toy"}'
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2


def test_extract_is_closer_to_each_task_than_the_unified_model(family, tmp_path):
    """EMR's point: task k rebuilt with its mask and λ_k is nearer θ_k than θ_base + τ_uni is."""
    base_dir, tune_dirs = family
    run_merge(parse_config(emr_config(base_dir, tune_dirs)), tmp_path / "out")
    base, stored = load_folder(base_dir), load_folder(tmp_path / "out")
    for k in range(3):
        rebuilt = load_folder(extract_task(tmp_path / "out", k, tmp_path / f"t{k}").out_dir)
        tune = load_folder(tune_dirs[k])
        err_emr = sum(float((rebuilt[n] - tune[n]).square().sum()) for n in base)
        err_uni = sum(float((base[n] + stored[f"emr.tau_uni.{n}"] - tune[n]).square().sum()) for n in base)
        assert err_emr < 0.6 * err_uni


def test_load_emr_gives_task_vectors(family, tmp_path):
    base_dir, tune_dirs = family
    run_merge(parse_config(emr_config(base_dir, tune_dirs)), tmp_path / "out")
    with load_emr(tmp_path / "out") as emr:
        assert emr.tasks == [str(t) for t in tune_dirs]
        name = "model.layers.0.mlp.up_proj.weight"
        vector = emr.task_vector(2, name)
        assert torch.equal(vector, emr.rescalers[2] * emr.mask(2, name) * emr.unified(name))
        with pytest.raises(MergeError, match=r"unknown task 'nope' \(known tasks: 0: .*ft0, 1: .*ft1, 2: .*ft2\)"):
            emr.task_index("nope")
        with pytest.raises(MergeError, match="unknown task 3 "):
            emr.task_index(3)


def test_extract_refuses_a_folder_that_is_not_emr(family, tmp_path):
    base_dir, _ = family
    with pytest.raises(MergeError, match="not an EMR merge output"):
        extract_task(base_dir, 0, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# --- the CLI path ------------------------------------------------------------------------------------------------

def test_cli_merge_then_extract_from_another_directory(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    write_family(work / "models", n_models=2)
    # Relative references: the base must be found again from anywhere, through its recorded absolute path.
    (work / "emr.yml").write_text(emr_config("models/base", ["models/ft0", "models/ft1"], rescaler="tensor_mean"))
    done = cli("merge", "emr.yml", "merged", cwd=work)
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = cli("emr-extract", str(work / "merged"), "--task", "models/ft1", "task1", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    stored, base = load_folder(work / "merged"), load_folder(work / "models" / "base")
    lam = json.loads((work / "merged" / "emr.json").read_text())["tasks"][1]["rescaler"]
    rebuilt = load_folder(elsewhere / "task1")
    for name, b in base.items():
        expected = b + lam * unpack_bits(stored[f"emr.mask.1.{name}"], b.shape) * stored[f"emr.tau_uni.{name}"]
        torch.testing.assert_close(rebuilt[name], expected, rtol=0, atol=0)

    # The error paths run in-process through the same entry point (a subprocess costs seconds of torch import).
    monkeypatch.chdir(elsewhere)
    assert main(["emr-extract", str(work / "merged"), "--task", "ft9", "bad"]) == 2
    assert "unknown task 'ft9' (known tasks: 0: models/ft0, 1: models/ft1)" in capsys.readouterr().err
    assert not (elsewhere / "bad").exists()
    shutil.move(work / "models" / "base", tmp_path / "moved_base")  # the recorded base is gone: --base finds it
    assert main(["emr-extract", str(work / "merged"), "--task", "0", "task0"]) == 2
    assert "pass --base PATH" in capsys.readouterr().err
    moved = str(tmp_path / "moved_base")
    assert main(["emr-extract", str(work / "merged"), "--task", "0", "task0", "--base", moved]) == 0
    assert set(load_folder(elsewhere / "task0")) == set(base)
    assert main(["emr-info", str(work / "merged")]) == 0
    assert "vs 2 checkpoints" in capsys.readouterr().out


# --- the storage report ------------------------------------------------------------------------------------------

def test_storage_report_counts_every_stored_byte(family, tmp_path):
    base_dir, tune_dirs = family
    run_merge(parse_config(emr_config(base_dir, tune_dirs, skip=["lm_head"])), tmp_path / "out")
    s = json.loads((tmp_path / "out" / "emr.json").read_text())["storage"]
    base = load_folder(base_dir)
    merged = {n: t for n, t in base.items() if "lm_head" not in n}
    # The fixture: 7248 float32 parameters; lm_head (64 x 16) kept per task, the other 6224 merged.
    assert sum(t.numel() for t in merged.values()) == 6224
    assert s["unified_task_vector_bytes"] == 6224 * 4 == 24896
    assert s["mask_bytes"] == 3 * sum(math.ceil(t.numel() / 8) for t in merged.values()) == 2334
    assert s["rescaler_bytes"] == 24
    assert s["per_task_tensor_bytes"] == 3 * 64 * 16 * 4 == 12288
    assert s["modulator_bytes"] == 2334 + 24 + 12288
    assert s["emr_total_bytes"] == 24896 + 2334 + 24 + 12288 == 39542
    assert s["checkpoint_bytes"] == 7248 * 4 and s["n_checkpoints_bytes"] == 3 * 28992 == 86976
    assert s["emr_to_n_checkpoints"] == pytest.approx(39542 / 86976)
    # ... and the report is what the files hold: the safetensors data section has exactly these bytes.
    header, _ = read_local_header(tmp_path / "out" / "merge.safetensors")  # an EMR store, not a model
    assert sum(info.nbytes for info in header.values()) == 24896 + 2334 + 12288


# --- mask and rescale on top of another method --------------------------------------------------------------------

def test_emr_rescale_takes_ties_merge_as_the_unified_vector(family, tmp_path):
    base_dir, tune_dirs = family
    models = "".join(f"  - model: {t}\n" for t in tune_dirs)
    run_merge(parse_config(f"merge_method: ties\nbase_model: {base_dir}\nmodels:\n{models}"
                           "parameters: {density: 0.2}\n"), tmp_path / "ties")
    run_merge(parse_config(f"merge_method: emr_rescale\nbase_model: {base_dir}\nmodels:\n{models}"
                           "parameters: {unify: ties, density: 0.2}\n"), tmp_path / "out")
    base, tunes = load_folder(base_dir), [load_folder(t) for t in tune_dirs]
    ties, stored = load_folder(tmp_path / "ties"), load_folder(tmp_path / "out")
    numerator, denominator = np.zeros(3), np.zeros(3)
    for name, b in base.items():
        unified = stored[f"emr.tau_uni.{name}"]
        torch.testing.assert_close(unified, ties[name] - b, rtol=0, atol=1e-6)
        assert float((unified == 0).float().mean()) > 0.3  # TIES trimmed: τ_uni is sparse
        tv = torch.stack([t[name] - b for t in tunes])
        masks = torch.stack([unpack_bits(stored[f"emr.mask.{k}.{name}"], b.shape) for k in range(3)])
        assert torch.equal(masks, tv * unified > 0)
        numerator += tv.abs().flatten(1).sum(1).double().numpy()
        denominator += (masks * unified.abs()).flatten(1).sum(1).double().numpy()
    meta = json.loads((tmp_path / "out" / "emr.json").read_text())
    assert meta["method"] == "emr_rescale" and meta["unify"] == "ties"
    assert [t["rescaler"] for t in meta["tasks"]] == pytest.approx((numerator / denominator).tolist(), rel=1e-5)


def test_rescalers_cancel_the_scale_of_the_unified_vector(family, tmp_path):
    """With task arithmetic, `normalize` only divides τ_uni by Σw = 3: λ_i grows by 3 and task i is the same."""
    base_dir, tune_dirs = family
    models = "".join(f"  - model: {t}\n" for t in tune_dirs)
    outs = []
    for normalize in ("true", "false"):
        config = (f"merge_method: emr_rescale\nbase_model: {base_dir}\nmodels:\n{models}"
                  f"parameters: {{unify: task_arithmetic, normalize: {normalize}}}\n")
        run_merge(parse_config(config), tmp_path / normalize)
        outs.append(load_folder(extract_task(tmp_path / normalize, 1, tmp_path / f"x{normalize}").out_dir))
    for name in outs[0]:
        torch.testing.assert_close(outs[0][name], outs[1][name], rtol=1e-5, atol=1e-6)


# --- bad configs -------------------------------------------------------------------------------------------------

def test_bad_configs_are_refused_before_anything_is_written(family, tmp_path):
    base_dir, tune_dirs = family
    models = "".join(f"  - model: {t}\n" for t in tune_dirs)
    with pytest.raises(ConfigError, match="`unify: linear` is not a task-vector method"):
        run_merge(parse_config(f"merge_method: emr_rescale\nbase_model: {base_dir}\nmodels:\n{models}"
                               "parameters: {unify: linear}\n"), tmp_path / "a")
    with pytest.raises(ConfigError, match="`unify: emr` is not a task-vector method"):
        run_merge(parse_config(f"merge_method: emr_rescale\nbase_model: {base_dir}\nmodels:\n{models}"
                               "parameters: {unify: emr}\n"), tmp_path / "b")
    with pytest.raises(ConfigError, match="`skip` must be a string or a list of strings"):
        parse_config(emr_config(base_dir, tune_dirs, skip=[1]))
    with pytest.raises(ConfigError, match="needs a `base_model`"):
        parse_config(f"merge_method: emr\nmodels:\n{models}")
    assert not any(p.name in ("a", "b") for p in tmp_path.iterdir())
