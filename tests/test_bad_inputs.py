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


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "task_arithmetic"])
def test_nan_inputs_are_reported_even_when_the_method_drops_them(pair, method):
    """TIES' election and trim (and DARE's, breadcrumbs') compare magnitudes and a NaN loses every comparison: a
    fine-tune full of NaN is left out and the merged tensors are finite. The notes (CLI, model card) say so."""
    cfg = llama_config(layers=1)
    save_checkpoint(pair / "nan", {k: torch.full_like(v, float("nan")) for k, v in llama_tensors(cfg, 2).items()}, cfg)
    params = "{weight: 1.0, density: 0.5}" if method != "task_arithmetic" else "{weight: 1.0}"
    text = (f"merge_method: {method}\nbase_model: {pair / 'base'}\nmodels:\n  - model: {pair / 'ft'}\n"
            f"    parameters: {params}\n  - model: {pair / 'nan'}\n    parameters: {params}\n")
    (pair / "config.yml").write_text(text)
    done = run_cli("merge", str(pair / "config.yml"), str(pair / "out"))
    assert done.returncode == 0, done.stderr
    if method == "task_arithmetic":  # a weighted sum carries the NaN into the output: said per merged tensor
        assert "dropped" not in done.stdout and "lm_head.weight: 1024 NaN/Inf values in the merged tensor" in done.stdout
        return
    line = next(n for n in done.stdout.splitlines() if n.startswith(f"note: input {pair / 'nan'}: "))
    dropped = f"{method} dropped them (the merged tensors are finite)"
    assert "NaN/Inf values in 12 tensors" in line and dropped in line and "in the merged tensor" not in done.stdout
    assert dropped in (pair / "out" / "README.md").read_text()


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


def _evaluate_folder(tmp_path: Path, name: str, breaks) -> Path:
    cfg = llama_config(layers=1)
    folder = save_checkpoint(tmp_path / name, llama_tensors(cfg, 0), cfg)
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {
        "type": "WordLevel", "vocab": {f"t{i}": i for i in range(64)}, "unk_token": "t0"}}))
    breaks(folder)
    return folder


_CLAIM = json.dumps({"w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}).encode()
EVALUATE_CASES = {
    "config_not_json": (lambda d: (d / "config.json").write_text("{nope"), "config.json: not valid JSON"),
    "config_not_an_object": (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json: not a JSON object"),
    "no_config": (lambda d: (d / "config.json").unlink(), "no config.json"),
    "header_claims_4_tb": (lambda d: (d / "model.safetensors").write_bytes(struct.pack("<Q", len(_CLAIM)) + _CLAIM),
                           "lie outside the file"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "holds no .safetensors weights"),
    "merge_config_not_yaml": (lambda d: (d / "merge_config.yml").write_text("models: [\n"), "not valid YAML"),
    "emr_output": (lambda d: (d / "emr.json").write_text("{}"), "an EMR merge"),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_refuses_broken_merged_folders_with_one_line(tmp_path, case):
    breaks, fragment = EVALUATE_CASES[case]
    folder = _evaluate_folder(tmp_path, case, breaks)
    out = tmp_path / "report.json"
    done = run_cli("evaluate", str(folder), "--max-tokens", "50", "--json", str(out))
    assert_refused(done, str(folder), fragment)
    assert not out.exists()


ADVICE_CASES = {  # the fine-tune (and base) the analysis and its advice are asked about
    "zero_task_vectors": lambda base: (base, base),
    "nan_fine_tune": lambda base: (base, {k: torch.full_like(v, float("nan")) for k, v in base.items()}),
    "inf_fine_tune": lambda base: (base, {k: torch.full_like(v, float("inf")) for k, v in base.items()}),
    "zero_base": lambda base: ({k: torch.zeros_like(v) for k, v in base.items()}, base),
    "nan_base": lambda base: ({k: torch.full_like(v, float("nan")) for k, v in base.items()}, base),
}


@pytest.mark.parametrize("case", sorted(ADVICE_CASES))
def test_analysis_and_advice_of_degenerate_models(tmp_path, case):
    """Identical, NaN, Inf or zero weights: the analysis and its findings finish without a warning or a traceback,
    non-finite inputs are named in the findings, and the recommended config is a valid config."""
    from merging.advice import advise, recommended_yaml
    from merging.analysis import analyze
    from merging.config import parse_config

    cfg = llama_config(layers=1)
    base, tuned = ADVICE_CASES[case](llama_tensors(cfg, 0))
    save_checkpoint(tmp_path / "base", base, cfg)
    save_checkpoint(tmp_path / "ft", tuned, cfg)
    save_checkpoint(tmp_path / "ft2", fine_tune(llama_tensors(cfg, 0), 3), cfg)
    text = (f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n  - model: {tmp_path / 'ft'}\n"
            f"    parameters: {{weight: 1.0, density: 0.5}}\n  - model: {tmp_path / 'ft2'}\n"
            "    parameters: {weight: 1.0, density: 0.5}\n")
    (tmp_path / "config.yml").write_text(text)
    done = run_cli("analyze", str(tmp_path / "config.yml"), "--advice")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "recommendation:" in done.stdout
    advice = advise(analyze(parse_config(text)))
    assert 3 <= len(advice["findings"]) <= 8
    parse_config(recommended_yaml(advice))
    if "nan" in case or "inf" in case:
        assert any("NaN/Inf values" in f["text"] and f["level"] == "warn" for f in advice["findings"])


def _word_level(vocab, added=()) -> str:
    return json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"},
                       "added_tokens": list(added)})


TOKENIZER_CASES = {  # (what breaks the fine-tune's tokenizer.json or the config, the line's fragment)
    "base_without_tokenizer": (lambda d: (d / "base" / "tokenizer.json").unlink(), "", "needs the base's tokenizer.json"),
    "not_json": (lambda d: (d / "ft" / "tokenizer.json").write_text("{"), "", "tokenizer.json is not valid JSON"),
    "vocab_of_numbers": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level([1, 2])), "", "not a [piece, score] pair"),
    "negative_id": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level({"a": -5})), "", "is '-5', not a token id"),
    "huge_id": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level({"a": 10**12})), "", "not a token id"),
    "id_not_an_integer": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level({"a": "7"})), "", "not a token id"),
    "added_token_not_an_object": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level({"a": 1}, [5])), "", "added_tokens[0] is not an object"),
    "added_token_without_id": (lambda d: (d / "ft" / "tokenizer.json").write_text(_word_level({"a": 1}, [{"content": "b"}])), "", "added_tokens[0].id is 'None'"),
    "token_from_an_unknown_model": (lambda d: None, "tokenizer:\n  source: union\n  tokens:\n    t70:\n      source: nowhere/model\n", "is not one of the merged models"),
    "token_source_not_a_string": (lambda d: None, "tokenizer:\n  source: union\n  tokens:\n    t1:\n      source: {kind: zero_embedding}\n", "tokenizer.tokens.t1.source"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CASES))
def test_tokenizer_union_refuses_broken_tokenizers_with_one_line(tmp_path, case):
    from test_stopping import tokenizer_json

    breaks, extra, fragment = TOKENIZER_CASES[case]
    for name, vocab, seed in (("base", 64, 0), ("ft", 66, 1)):
        cfg = llama_config(layers=1, vocab=vocab)
        tokenizer_json(save_checkpoint(tmp_path / name, llama_tensors(cfg, seed), cfg), [f"t{i}" for i in range(vocab)])
    breaks(tmp_path)
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels:\n"
                   f"  - model: {tmp_path / 'ft'}\n    parameters: {{weight: 1.0}}\n" + (extra or "tokenizer_source: union\n"))
    assert_refused(run_cli("merge", str(cfg), str(tmp_path / "out")), fragment, out=tmp_path / "out")


def test_an_analysis_too_big_for_memory_is_refused_before_reading(tmp_path, monkeypatch):
    """Header-claimed 16 GB inputs (sparse files: nothing on disk) made /analyze attempt 32 GB allocations; now the
    merge's memory pre-flight runs first and refuses with the figures (MERGESCOPE_MEMORY_LIMIT plays the machine)."""
    for name in ("base", "ft"):
        (tmp_path / name).mkdir()
        header = json.dumps({"w": {"dtype": "F32", "shape": [65536, 65536], "data_offsets": [0, 4 * 65536**2]}}).encode()
        with open(tmp_path / name / "model.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header)
            f.truncate(8 + len(header) + 4 * 65536**2)
    cfg = tmp_path / "config.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {tmp_path / 'base'}\nmodels:\n  - model: {tmp_path / 'ft'}\n"
                   "    parameters: {weight: 1.0, density: 0.5}\n")
    monkeypatch.setenv("MERGESCOPE_MEMORY_LIMIT", "8GB")
    assert_refused(run_cli("analyze", str(cfg)), "not enough memory: this analysis (peak at w) needs about",
                   "only 8.00 GB is available ($MERGESCOPE_MEMORY_LIMIT)")


def test_one_model_listed_a_thousand_times_is_refused_in_one_line(pair):
    entry = "  - {model: ft, parameters: {weight: 1.0}}\n"  # refused at validation: nothing is opened
    cfg = pair / "config.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {pair / 'base'}\nmodels:\n" + entry * 1000)
    # the demo model listed 10 000 times grew /analyze to 13.6 GB; any list past the ceiling is refused at validation
    assert_refused(run_cli("analyze", str(cfg)), "`models` has 1000 entries; at most 64 inputs are merged at once")
