"""The bad-input corpus: every broken checkpoint or config gets one clear line naming it, and no output folder.

Each case builds a real file (or config) on disk and runs the real CLI, as a user would.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import fine_tune, llama_config, llama_tensors, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def raw_safetensors(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a safetensors file byte by byte, so that it can be broken in any way."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)
    return path


def good_entry(offset: int = 0, n: int = 4, dtype: str = "F32") -> dict:
    size = {"F32": 4, "BF16": 2, "F16": 2}.get(dtype, 1)
    return {"dtype": dtype, "shape": [n], "data_offsets": [offset, offset + n * size]}


@pytest.fixture
def pair(tmp_path):
    """A valid base and fine-tune; cases replace the fine-tune."""
    cfg = llama_config(layers=1)
    base = llama_tensors(cfg, 0)
    save_checkpoint(tmp_path / "base", base, cfg)
    save_checkpoint(tmp_path / "ft", fine_tune(base, 1), cfg)
    return tmp_path


def merge(tmp_path: Path, model: str, extra: str = "", method: str = "task_arithmetic") -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"merge_method: {method}\nbase_model: {tmp_path / 'base'}\nmodels:\n  - model: {model}\n{extra}")
    return run_cli("merge", str(cfg), str(tmp_path / "out"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The CLI's entry point in this process (the same code as `python -m merging`, without a torch import per case)."""
    import contextlib
    import io

    from merging.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["python", "-m", "merging", *args], code, out.getvalue(), err.getvalue())


def run_cli_process(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "merging", *args], capture_output=True, text=True, env=env, timeout=120)


def assert_refused(done: subprocess.CompletedProcess, *fragments: str, out: Path | None = None) -> None:
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.mergescope-tmp-*"))


FILE_CASES = {
    "truncated_data": (lambda p: raw_safetensors(p, {"w": good_entry(n=4)}, b"\0" * 7), "outside the file"),
    "header_length_beyond_file": (lambda p: raw_safetensors(p, {"w": good_entry()}, b"\0" * 16, header_len=10_000), "runs past the end"),
    "shorter_than_8_bytes": (lambda p: p.write_bytes(b"\x01\x02") and p, "not a safetensors file"),
    "invalid_header_json": (lambda p: raw_safetensors(p, b"{not json", b""), "not valid JSON"),
    "header_not_an_object": (lambda p: raw_safetensors(p, [1, 2], b""), "not a JSON object"),
    "header_not_utf8": (lambda p: raw_safetensors(p, b"\xff\xfe\xfd", b""), "not valid JSON"),
    "overlapping_offsets": (lambda p: raw_safetensors(p, {"a": good_entry(0), "b": good_entry(8)}, b"\0" * 24), "overlap"),
    "offsets_out_of_bounds": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": [4], "data_offsets": [100, 116]}}, b"\0" * 16), "outside the file"),
    "negative_offsets": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4), "outside the file"),
    "length_not_matching_shape": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16), "needs 12"),
    "unsupported_dtype": (lambda p: raw_safetensors(p, {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4), "unsupported dtype 'F8_E4M3'"),
    "shape_not_integers": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}, b"\0" * 16), "not a list of non-negative integers"),
    "negative_shape": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""), "not a list of non-negative integers"),
    "offsets_not_a_pair": (lambda p: raw_safetensors(p, {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4), "not a pair of integers"),
    "entry_not_an_object": (lambda p: raw_safetensors(p, {"w": 5}, b""), "not an object"),
    "empty_model": (lambda p: raw_safetensors(p, {}, b""), "holds no tensors"),
    "name_with_path_separator": (lambda p: raw_safetensors(p, {"../../etc/passwd": good_entry()}, b"\0" * 16), "without path separators"),
    "huge_header": (lambda p: raw_safetensors(p, {"w": good_entry()}, b"", header_len=200 * 1024 * 1024), "larger than"),
    "metadata_not_a_mapping": (lambda p: raw_safetensors(p, {"__metadata__": [1], "w": good_entry()}, b"\0" * 16), "__metadata__"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_broken_safetensors_files_are_refused_with_one_line(pair, case):
    build, fragment = FILE_CASES[case]
    broken = pair / "broken"
    broken.mkdir()
    build(broken / "model.safetensors")
    assert_refused(merge(pair, str(broken)), str(broken), fragment, out=pair / "out")


CONFIG_CASES = {
    "unknown_method": ("merge_method: frobnicate\nmodels: [{model: m}]\n", "unknown merge_method 'frobnicate'"),
    "missing_base": ("merge_method: ties\nmodels: [{model: m}]\n", "needs a `base_model`"),
    "density_zero": ("merge_method: ties\nbase_model: b\nmodels: [{model: m, parameters: {density: 0}}]\n", "density"),
    "density_above_one": ("merge_method: ties\nbase_model: b\nmodels: [{model: m, parameters: {density: 1.5}}]\n", "density"),
    "non_finite_weight": ("merge_method: linear\nmodels: [{model: m, parameters: {weight: .inf}}]\n", "must be finite"),
    "weight_not_a_number": ("merge_method: linear\nmodels: [{model: m, parameters: {weight: heavy}}]\n", "must be a number"),
    "slerp_three_models": ("merge_method: slerp\nbase_model: b\nmodels: [{model: m1}, {model: m2}, {model: m3}]\nparameters: {t: 0.5}\n", "exactly 1"),
    "unknown_top_level_key": ("merge_method: linear\nmodels: [{model: m}]\nlearning_rate: 3\n", "unknown key `learning_rate`"),
    "unknown_model_key": ("merge_method: linear\nmodels: [{model: m, weight: 1}]\n", "unknown key `models.0.weight`"),
    "not_a_mapping": ("just a string\n", "must be a YAML mapping"),
    "empty_file": ("", "must be a YAML mapping"),
    # nine levels of nine aliases: 9^9 (387 million) values from 400 bytes; refused before anything is built
    "alias_bomb": ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")), "YAML aliases expand to more than"),
    "no_models": ("merge_method: linear\nmodels: []\n", "names no models"),
    "bad_dtype": ("merge_method: linear\nmodels: [{model: m}]\nout_dtype: float8\n", "unknown dtype"),
    "bad_layer_range": ("merge_method: passthrough\nslices:\n  - sources: [{model: m, layer_range: [4, 2]}]\n", "layer_range"),
    "filter_entry_without_value": ("merge_method: linear\nmodels: [{model: m, parameters: {weight: [{filter: mlp}]}}]\n", "needs `value`"),
    "global_param_per_model": ("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: m, parameters: {lambda: 2}}]\n", "global parameter"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_configs_are_refused_with_one_line(tmp_path, case):
    text, fragment = CONFIG_CASES[case]
    cfg = tmp_path / "config.yml"
    cfg.write_text(text)
    assert_refused(run_cli("merge", str(cfg), str(tmp_path / "out")), str(cfg), fragment, out=tmp_path / "out")


def test_config_that_is_not_utf8(tmp_path):
    cfg = tmp_path / "config.yml"
    cfg.write_bytes(b"merge_method: \xff\xfe\n")
    assert_refused(run_cli("merge", str(cfg), str(tmp_path / "out")), "not UTF-8")


def test_missing_model_folder(pair):
    assert_refused(merge(pair, str(pair / "nowhere")), "nowhere", "no such local file or folder", out=pair / "out")


def test_index_naming_a_missing_shard(pair):
    (pair / "ft" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00009-of-00009.safetensors"}}))
    assert_refused(merge(pair, str(pair / "ft")), "shard files that are missing", out=pair / "out")


def test_index_naming_a_file_outside_the_folder(pair):
    (pair / "ft" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../../secret.safetensors"}}))
    assert_refused(merge(pair, str(pair / "ft")), "unsafe shard file", out=pair / "out")


def test_pickle_only_folder(pair):
    folder = pair / "pickled"
    folder.mkdir()
    torch.save({"w": torch.zeros(2)}, folder / "pytorch_model.bin")
    assert_refused(merge(pair, str(folder)), "pickle", "--allow-pickle", out=pair / "out")


def test_malicious_pickle_is_not_executed_even_when_allowed(pair):
    folder = pair / "evil"
    folder.mkdir()
    marker = pair / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    import pickle

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Evil()}))
    cfg = pair / "config.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {pair / 'base'}\nmodels: [{{model: {folder}}}]\n")
    assert_refused(run_cli_process("merge", str(cfg), str(pair / "out"), "--allow-pickle"), "weights_only=True", out=pair / "out")
    assert not marker.exists()


def test_lora_adapter_without_a_base(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "lora_alpha": 4}')
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"merge_method: linear\nmodels: [{{model: {lora}}}]\n")
    assert_refused(run_cli("merge", str(cfg), str(tmp_path / "out")), "needs the config's `base_model`")


def test_nan_weights_are_reported_and_refused_on_request(pair):
    tensors = llama_tensors(llama_config(layers=1), 0)
    bad = fine_tune(tensors, 1)
    bad["model.norm.weight"][3] = float("nan")
    save_checkpoint(pair / "nan", bad, llama_config(layers=1))
    done = merge(pair, str(pair / "nan"))
    assert done.returncode == 0, done.stderr
    assert "model.norm.weight: 1 NaN/Inf values" in done.stdout
    assert "NaN/Inf" in (pair / "out" / "README.md").read_text()
    refused = run_cli("merge", str(pair / "config.yml"), str(pair / "out2"))
    cfg = pair / "config.yml"
    cfg.write_text(cfg.read_text() + "refuse_nonfinite: true\n")
    assert_refused(run_cli("merge", str(cfg), str(pair / "out3")), "model.norm.weight", "NaN/Inf", out=pair / "out3")
    assert refused.returncode == 0


def test_negative_weights_are_not_bad_input(pair):
    done = merge(pair, str(pair / "ft"), extra="    parameters: {weight: -1.0}\n")
    assert done.returncode == 0, done.stderr


def test_bad_shard_size_and_existing_output(pair):
    cfg = pair / "config.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {pair / 'base'}\nmodels: [{{model: {pair / 'ft'}}}]\n")
    assert_refused(run_cli("merge", str(cfg), str(pair / "out"), "--max-shard-size", "lots"), "max shard size", out=pair / "out")
    (pair / "out").mkdir()
    (pair / "out" / "keep.txt").write_text("mine")
    assert_refused(run_cli("merge", str(cfg), str(pair / "out")), "already exists")
    assert (pair / "out" / "keep.txt").read_text() == "mine"


def test_disk_full_leaves_no_partial_checkpoint(pair):
    """RLIMIT_FSIZE in a child process stands in for a full disk: writes beyond the limit fail with EFBIG."""
    cfg = pair / "config.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {pair / 'base'}\nmodels: [{{model: {pair / 'ft'}}}]\n")
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from merging.__main__ import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code, "merge", str(cfg), str(pair / "out")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert_refused(done, "disk", out=pair / "out")
