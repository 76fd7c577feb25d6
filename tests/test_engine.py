"""The streaming engine end to end: real checkpoints in, real safetensors out, checked element-wise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import fine_tune, llama_config, llama_tensors, load_folder, save_checkpoint, write_family
from safetensors.torch import save_file

from merging import CompatibilityError, ConfigError, MergeError, SourceError, parse_config, run_merge
from merging.errors import Cancelled
from merging.safetensors_io import read_local_header

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "merging", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_linear_merge_equals_weighted_mean(family, tmp_path):
    base, (a, b, c) = family
    cfg = parse_config(f"""
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: 1.0}}}}
  - {{model: {b}, parameters: {{weight: 2.0}}}}
  - {{model: {c}, parameters: {{weight: 0.5}}}}
""")
    run_merge(cfg, tmp_path / "out")
    out, ta, tb, tc = (load_folder(p) for p in (tmp_path / "out", a, b, c))
    assert set(out) == set(ta)
    for name in out:
        expected = (1.0 * ta[name] + 2.0 * tb[name] + 0.5 * tc[name]) / 3.5
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7)


def test_task_arithmetic_with_layer_anchors(family, tmp_path):
    base, (a, b, _) = family
    cfg = parse_config(f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: [0.0, 1.0]}}}}
  - {{model: {b}, parameters: {{weight: [{{filter: mlp, value: 2.0}}, {{value: 0.5}}]}}}}
parameters: {{lambda: 0.7}}
""")
    run_merge(cfg, tmp_path / "out")
    out, tb0, ta, tb = (load_folder(p) for p in (tmp_path / "out", base, a, b))
    for name in out:
        layer = 1 if "layers.1." in name else 0  # two layers: t = 0 for layer 0 and outside the blocks, 1 for layer 1
        wa = float(layer)
        wb = 2.0 if "mlp" in name else 0.5
        expected = tb0[name] + 0.7 * (wa * (ta[name] - tb0[name]) + wb * (tb[name] - tb0[name]))
        torch.testing.assert_close(out[name], expected, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_are_merged_in_float32_and_written_in_out_dtype(family_bf16, tmp_path):
    base, (a, b, _) = family_bf16
    cfg = parse_config(f"""
merge_method: task_arithmetic
base_model: {base}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{lambda: 0.5}}
out_dtype: float32
""")
    run_merge(cfg, tmp_path / "out")
    out, t0, ta, tb = (load_folder(p) for p in (tmp_path / "out", base, a, b))
    for name in out:
        assert out[name].dtype == torch.float32
        expected = t0[name].float() + 0.5 * ((ta[name].float() - t0[name].float()) + (tb[name].float() - t0[name].float()))
        torch.testing.assert_close(out[name], expected, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float32"


def test_sharded_output_equals_unsharded_and_has_index(family, tmp_path):
    base, (a, b, _) = family
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
    run_merge(parse_config(text), tmp_path / "one")
    run_merge(parse_config(text), tmp_path / "many", max_shard_size="4KB")
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 2
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    one, many = load_folder(tmp_path / "one"), load_folder(tmp_path / "many")
    assert set(index["weight_map"]) == set(one)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    for name, fname in index["weight_map"].items():
        assert name in read_local_header(tmp_path / "many" / fname)[0]
        assert torch.equal(one[name], many[name])


def test_sharded_inputs_read_like_single_files(tmp_path):
    base1, tunes1 = write_family(tmp_path / "single", n_models=2)
    base3, tunes3 = write_family(tmp_path / "sharded", n_models=2, shards=3)
    assert (base3 / "model.safetensors.index.json").exists()
    outs = []
    for base, tunes, name in ((base1, tunes1, "o1"), (base3, tunes3, "o3")):
        cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {tunes[0]}}}, {{model: {tunes[1]}}}]\n")
        run_merge(cfg, tmp_path / name)
        outs.append(load_folder(tmp_path / name))
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_integer_buffers_are_copied_from_the_base(tmp_path):
    cfg_json = llama_config()
    base = llama_tensors(cfg_json, 0)
    base["model.position_ids"] = torch.arange(10)
    tune = fine_tune(base, 1)
    tune["model.position_ids"] = torch.arange(10) * 7
    save_checkpoint(tmp_path / "base", base, cfg_json)
    save_checkpoint(tmp_path / "ft", tune, cfg_json)
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'ft'}}}]\n")
    run_merge(cfg, tmp_path / "out")
    assert torch.equal(load_folder(tmp_path / "out")["model.position_ids"], torch.arange(10))


def test_side_files_model_card_and_config_are_written(family, tmp_path):
    base, (a, b, _) = family
    (base / "tokenizer.json").write_text('{"model": "tok"}')
    (base / "generation_config.json").write_text('{"do_sample": false}')
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{lambda: 0.3}}\n"
    run_merge(parse_config(text), tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"model": "tok"}'
    assert (out / "generation_config.json").exists()
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    rerun = parse_config((out / "merge_config.yml").read_text())
    assert rerun == parse_config(text)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["base_model"] == [str(base), str(a), str(b)]
    assert meta["tags"] == ["merge", "mergescope", "task_arithmetic"]
    assert "lambda: 0.3" in card


def test_failure_midway_leaves_no_output_and_no_temp_folder(family, tmp_path):
    base, (a, b, _) = family
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n")
    seen = []

    def explode(progress):
        seen.append(progress.tensors_done)
        if progress.tensors_done == 5:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError):
        run_merge(cfg, tmp_path / "out", progress=explode)
    assert seen == [1, 2, 3, 4, 5]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_cancel_stops_between_tensors_and_leaves_nothing(family, tmp_path):
    base, (a, b, _) = family
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n")
    done = []
    with pytest.raises(Cancelled):
        run_merge(cfg, tmp_path / "out", progress=lambda p: done.append(p.tensors_done), cancel=lambda: len(done) >= 3)
    assert max(done) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_stale_temp_folder_of_a_dead_process_is_removed(family, tmp_path):
    base, (a, _, _) = family
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    stale = tmp_path / f".out.mergescope-tmp-{dead_pid}-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\n")
    run_merge(cfg, tmp_path / "out")
    assert not stale.exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def _lora_pair(tmp_path: Path, rank: int = 4, alpha: float = 8.0, rslora: bool = False):
    cfg_json = llama_config()
    base = llama_tensors(cfg_json, 0)
    save_checkpoint(tmp_path / "base", base, cfg_json)
    g = torch.Generator().manual_seed(3)
    adapter, full = {}, dict(base)
    scale = alpha / (rank ** 0.5 if rslora else rank)
    targets = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    for module in targets:
        w = base[f"{module}.weight"]
        a = torch.randn(rank, w.shape[1], generator=g) * 0.1
        b = torch.randn(w.shape[0], rank, generator=g) * 0.1
        adapter[f"base_model.model.{module}.lora_A.weight"] = a
        adapter[f"base_model.model.{module}.lora_B.weight"] = b
        full[f"{module}.weight"] = w + scale * (b @ a)
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    save_file(adapter, str(lora_dir / "adapter_model.safetensors"))
    (lora_dir / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora,
        "target_modules": ["q_proj", "down_proj"], "base_model_name_or_path": str(tmp_path / "base")}))
    save_checkpoint(tmp_path / "full", full, cfg_json)
    save_checkpoint(tmp_path / "other", fine_tune(base, 9), cfg_json)
    return tmp_path / "base", lora_dir, tmp_path / "full", tmp_path / "other"


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_merges_like_the_equivalent_full_fine_tune(tmp_path, rslora):
    base, lora, full, other = _lora_pair(tmp_path, rslora=rslora)
    results = []
    for name, model in (("via_lora", lora), ("via_full", full)):
        cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {model}}}, {{model: {other}}}]\n"
                           "parameters: {lambda: 0.6}\n")
        run_merge(cfg, tmp_path / name)
        results.append(load_folder(tmp_path / name))
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)
    changed = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(results[0][changed], load_folder(base)[changed])


def test_pickle_is_refused_with_a_reason_and_loaded_on_request(tmp_path):
    cfg_json = llama_config()
    base = llama_tensors(cfg_json, 0)
    save_checkpoint(tmp_path / "base", base, cfg_json)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    tune = fine_tune(base, 1)
    torch.save(tune, pickled / "pytorch_model.bin")
    config = write_config(tmp_path / "c.yml", f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {pickled}}}]\n")
    refused = cli("merge", str(config), str(tmp_path / "out"))
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: ")
    assert "pickle" in refused.stderr and "safetensors" in refused.stderr and "--allow-pickle" in refused.stderr
    assert not (tmp_path / "out").exists()
    allowed = cli("merge", str(config), str(tmp_path / "out"), "--allow-pickle")
    assert allowed.returncode == 0, allowed.stderr
    out = load_folder(tmp_path / "out")
    torch.testing.assert_close(out["lm_head.weight"], tune["lm_head.weight"])


def test_mismatch_report_names_every_problem_grouped(tmp_path):
    cfg_json = llama_config()
    base = llama_tensors(cfg_json, 0)
    tune = fine_tune(base, 1)
    del tune["model.norm.weight"]
    tune["model.extra.weight"] = torch.zeros(3)
    tune["model.layers.0.mlp.up_proj.weight"] = torch.zeros(33, 16)
    save_checkpoint(tmp_path / "base", base, cfg_json)
    save_checkpoint(tmp_path / "bad", tune, cfg_json)
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'bad'}}}]\n")
    with pytest.raises(CompatibilityError) as err:
        run_merge(cfg, tmp_path / "out")
    msg = str(err.value)
    assert "missing tensors (1): model.norm.weight" in msg
    assert "extra tensors (1): model.extra.weight" in msg
    assert "shape mismatches (1): model.layers.0.mlp.up_proj.weight: [33, 16]" in msg and "[32, 16]" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()


def test_vocabulary_mismatch_merges_shared_rows_when_allowed(tmp_path):
    cfg_json = llama_config()
    base = llama_tensors(cfg_json, 0)
    small = fine_tune(base, 1)
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        small[key] = small[key][:60].clone()
    save_checkpoint(tmp_path / "base", base, cfg_json)
    save_checkpoint(tmp_path / "small", small, cfg_json)
    text = f"merge_method: task_arithmetic\nbase_model: {tmp_path / 'base'}\nmodels: [{{model: {tmp_path / 'small'}}}]\n"
    with pytest.raises(CompatibilityError, match="shape mismatches"):
        run_merge(parse_config(text), tmp_path / "refused")
    run_merge(parse_config(text + "allow_vocab_mismatch: true\n"), tmp_path / "out")
    out = load_folder(tmp_path / "out")
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(out[emb][:60], small[emb])
    assert torch.equal(out[emb][60:], base[emb][60:])
    assert "the first 60 are merged" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("text, expected", [
    ("merge_method: nope\nmodels: [{model: a}]\n", "unknown merge_method 'nope'"),
    ("merge_method: linear\nmodels: [{model: a}]\nweird: 1\n", "unknown key `weird`"),
    ("merge_method: task_arithmetic\nmodels: [{model: a}]\n", "needs a `base_model`"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {weight: .nan}}]\n", "`weight` must be finite"),
    ("merge_method: linear\nmodels: [{model: a, parameters: {wieght: 1}}]\n", "unknown parameter `wieght`"),
    ("merge_method: linear\nmodels: [{model: a}]\ndtype: int8\n", "unknown dtype 'int8'"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("a: &x [1, *x]\n", "a YAML alias refers to the block that contains it"),
    ("merge_method: linear\nmodels: [{model: a}\n", "not valid YAML"),
])
def test_bad_configs_get_one_clear_line(text, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_cli_merge_and_inspect(family, tmp_path):
    base, (a, b, _) = family
    config = write_config(tmp_path / "c.yml", f"merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}}}]\ndtype: bfloat16\n")
    done = cli("merge", str(config), str(tmp_path / "out"), "--max-shard-size", "8KB")
    assert done.returncode == 0, done.stderr
    assert "merged 21 tensors" in done.stdout
    out = load_folder(tmp_path / "out")
    assert {t.dtype for t in out.values()} == {torch.bfloat16}
    again = cli("merge", str(config), str(tmp_path / "out"))
    assert again.returncode == 2 and "already exists" in again.stderr
    info = cli("inspect", str(base), str(a), str(tmp_path / "out"))
    assert info.returncode == 0, info.stderr
    assert "21 tensors" in info.stdout and f"{a} vs {base}: compatible" in info.stdout
    missing = cli("inspect", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert str(tmp_path / "nowhere") in missing.stderr and "no such local file or folder" in missing.stderr


def test_cli_reports_bad_config_on_one_line_and_exit_2(tmp_path):
    config = write_config(tmp_path / "c.yml", "merge_method: linear\nmodels: []\n")
    done = cli("merge", str(config), str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_truncated_input_is_a_clear_source_error(family, tmp_path):
    base, (a, _, _) = family
    data = (a / "model.safetensors").read_bytes()
    (a / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {a}}}]\n")
    with pytest.raises(SourceError, match="outside the file"):
        run_merge(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_errors_are_merge_errors():
    assert issubclass(ConfigError, MergeError) and issubclass(SourceError, MergeError)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_bands_give_the_same_bytes_as_whole_tensors(family_bf16, tmp_path, monkeypatch, method):
    import dataclasses

    import merging.bands as bands
    from merging.methods import REGISTRY

    base, (a, b, _) = family_bf16
    text = f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 0.3}}}}]\n"
    monkeypatch.setitem(REGISTRY, method, dataclasses.replace(REGISTRY[method], elementwise=False))
    run_merge(parse_config(text), tmp_path / "whole")
    monkeypatch.setitem(REGISTRY, method, dataclasses.replace(REGISTRY[method], elementwise=True))
    monkeypatch.setattr(bands, "BAND_ELEMENTS", 100)  # 64×16 embeddings → bands of 6 rows, the last one short
    seen = []
    run_merge(parse_config(text), tmp_path / "banded", progress=seen.append)
    whole, banded = load_folder(tmp_path / "whole"), load_folder(tmp_path / "banded")
    assert whole.keys() == banded.keys()
    assert all(torch.equal(whole[k], banded[k]) for k in whole)
    assert [p.tensors_done for p in seen] == list(range(1, 22))
    assert seen[-1].bytes_done == seen[-1].bytes_total


@pytest.mark.parametrize("method, params, exact", [
    ("ties", "{density: 0.3}", True),
    ("breadcrumbs_ties", "{density: 0.5, gamma: 0.1}", True),
    ("breadcrumbs", "{density: 0.4, gamma: 0.2}", True),
    ("ties", "{density: 0.3, rescale: true}", False),
    ("task_arithmetic", "{coefficients: nan}", False),
    ("linear", "{coefficients: nan}", False),
])
def test_banded_stats_passes_match_whole_tensor_merges(family_bf16, tmp_path, monkeypatch, method, params, exact):
    """Top-k cuts, L1 rescale and NAN norms gathered band by band give the whole-tensor result (bf16 inputs have
    many ties at the top-k threshold: the kept count must still be exact)."""
    import merging.bands as bands

    base, (a, b, c) = family_bf16
    text = (f"merge_method: {method}\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\n"
            f"parameters: {params}\n")
    run_merge(parse_config(text), tmp_path / "whole")
    monkeypatch.setattr(bands, "BAND_ELEMENTS", 100)
    run_merge(parse_config(text), tmp_path / "banded")
    whole, banded = load_folder(tmp_path / "whole"), load_folder(tmp_path / "banded")
    for k in whole:
        if exact:
            assert torch.equal(whole[k], banded[k]), k
        else:
            torch.testing.assert_close(banded[k], whole[k], rtol=1e-2, atol=1e-6)  # bf16 output: last-bit rounding


def test_banded_random_methods_are_deterministic_and_keep_the_density(family, tmp_path, monkeypatch):
    import merging.bands as bands

    monkeypatch.setattr(bands, "BAND_ELEMENTS", 100)
    base, (a, b, _) = family
    text = (f"merge_method: dare_linear\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\n"
            "parameters: {density: 0.3, rescale: false}\nseed: 7\n")
    run_merge(parse_config(text), tmp_path / "one")
    run_merge(parse_config(text), tmp_path / "two")
    one, two, t0, ta, tb = (load_folder(p) for p in (tmp_path / "one", tmp_path / "two", base, a, b))
    emb = "model.embed_tokens.weight"  # 64×16: eleven bands of six rows
    assert torch.equal(one[emb], two[emb])
    kept_a = ((one[emb] - t0[emb]) != 0).float().mean().item()
    assert 0.4 < kept_a < 0.6  # two models at density 0.3 each: 1 − 0.7² = 0.51 of entries touched


@pytest.mark.parametrize("rescaler", ["model", "tensor_mean"])
def test_banded_emr_writes_the_same_masks_and_rescalers(family_bf16, tmp_path, monkeypatch, rescaler):
    """EMR runs band by band: τ_uni bands, 1-bit masks written from whole bytes, rescaler sums added up."""
    import merging.bands as bands

    base, (a, b, c) = family_bf16
    text = (f"merge_method: emr\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}, {{model: {c}}}]\n"
            f"parameters: {{rescaler: {rescaler}}}\n")
    run_merge(parse_config(text), tmp_path / "whole")
    monkeypatch.setattr(bands, "BAND_ELEMENTS", 100)  # 64×16 tensors → bands of 8 rows = 128 elements = 16 bytes
    run_merge(parse_config(text), tmp_path / "banded")
    whole, banded = load_folder(tmp_path / "whole"), load_folder(tmp_path / "banded")
    assert whole.keys() == banded.keys()
    assert all(torch.equal(whole[k], banded[k]) for k in whole)
    lam = [json.loads((tmp_path / d / "emr.json").read_text())["tasks"] for d in ("whole", "banded")]
    for t_whole, t_banded in zip(*lam):
        assert t_banded["rescaler"] == pytest.approx(t_whole["rescaler"], rel=1e-9)
