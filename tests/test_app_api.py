"""The app's public API (``/analyze``, ``/merge``) through gradio_client against the app launched on loopback,
plus the pieces of the app that need no server: the form ⇄ YAML round trip and the session folders."""

from __future__ import annotations

import json
import os
import struct
import time
import zipfile
from pathlib import Path

import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from app_server import running_app  # noqa: E402

from merging.config import parse_config  # noqa: E402
from merging.demo import ensure_demo_models  # noqa: E402
from merging.engine import run_merge  # noqa: E402


def safetensors_header(path: Path) -> dict:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    header.pop("__metadata__", None)
    end = max(entry["data_offsets"][1] for entry in header.values())
    assert 8 + n + end == len(data), "the data section must end exactly at the file's end"
    return header


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    # The llama-shaped demo family: its fine-tunes agree in early layers and fight in late ones by construction.
    with running_app(tmp_path_factory.mktemp("cache"), prefer_zoo=False) as running:
        yield running


@pytest.fixture(scope="module")
def client(served):
    return gradio_client.Client(served.url, verbose=False)


@pytest.fixture(scope="module")
def demo_yaml(served) -> str:
    return yaml.safe_dump(served.demo.config_dict(), sort_keys=False)


def test_named_endpoints_are_public(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(endpoints) == {"/analyze", "/merge", "/evaluate"}
    assert [p["label"] for p in endpoints["/evaluate"]["parameters"]] == ["config_yaml"]
    assert [p["label"] for p in endpoints["/merge"]["parameters"]] == ["config_yaml"]


def test_merge_endpoint_returns_the_library_merge_byte_for_byte(client, demo_yaml, tmp_path):
    files, archive, summary = client.predict(demo_yaml, api_name="/merge")
    by_name = {Path(f).name: Path(f) for f in files}
    assert set(by_name) == {"model.safetensors", "config.json", "merge_config.yml", "README.md"}
    assert summary["tensors"] == 57
    assert summary["files"]["model.safetensors"] == by_name["model.safetensors"].stat().st_size
    header = safetensors_header(by_name["model.safetensors"])
    assert header["model.layers.5.mlp.down_proj.weight"]["shape"] == [64, 128]

    expected = run_merge(parse_config(demo_yaml), tmp_path / "direct")
    assert expected.tensors == summary["tensors"]
    assert by_name["model.safetensors"].read_bytes() == (tmp_path / "direct" / "model.safetensors").read_bytes()
    with zipfile.ZipFile(archive) as zf:
        folders = {n.split("/")[0] for n in zf.namelist()}
        assert len(folders) == 1 and Path(archive).name == f"{folders.pop()}.zip"  # merge-N.zip holds merge-N/
        assert sorted(n.split("/", 1)[1] for n in zf.namelist()) == sorted(by_name)
        for name, path in by_name.items():
            assert zf.read(next(n for n in zf.namelist() if n.endswith("/" + name))) == path.read_bytes()


def test_bad_config_is_a_readable_message_not_a_traceback(client):
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict("merge_method: ties\nmodels: [{model: /nowhere/at/all}]\n", api_name="/merge")
    text = str(err.value)
    assert "needs a `base_model`" in text and "Traceback" not in text
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict("merge_method: [unclosed\n", api_name="/analyze")
    assert "not valid YAML" in str(err.value)


def test_missing_checkpoint_names_the_path(client, served):
    cfg = served.demo.config_dict()
    cfg["models"][1]["model"] = "/definitely/missing/checkpoint"
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        client.predict(yaml.safe_dump(cfg), api_name="/merge")
    assert "/definitely/missing/checkpoint" in str(err.value)


def test_local_paths_are_refused_when_the_server_disallows_them(served, demo_yaml, tmp_path):
    served.settings.allow_local_paths = False
    try:
        local = gradio_client.Client(served.url, verbose=False)
        # The demo models are always allowed ...
        files, _, _ = local.predict(demo_yaml, api_name="/merge")
        assert any(Path(f).name == "model.safetensors" for f in files)
        # ... a folder elsewhere on the server's disk is not.
        cfg = served.demo.config_dict()
        cfg["models"][0]["model"] = str(tmp_path)
        with pytest.raises(gradio_client.exceptions.AppError) as err:
            local.predict(yaml.safe_dump(cfg), api_name="/merge")
        assert "local paths are disabled" in str(err.value)
    finally:
        served.settings.allow_local_paths = True


def test_each_client_merges_into_its_own_session_folder(served, demo_yaml):
    before = {p for p in served.sessions.root.iterdir()}
    a = gradio_client.Client(served.url, verbose=False)
    b = gradio_client.Client(served.url, verbose=False)
    files_a, _, _ = a.predict(demo_yaml, api_name="/merge")
    files_b, _, _ = b.predict(demo_yaml, api_name="/merge")
    new = {p for p in served.sessions.root.iterdir()} - before
    assert len(new) == 2
    for folder in new:
        assert (folder / "merge-1" / "model.safetensors").is_file()
    assert Path(files_a[-1]).read_bytes() == Path(files_b[-1]).read_bytes()


def test_evaluate_endpoint_checks_the_merge_and_refuses_what_cannot_fit(served, tmp_path_factory, monkeypatch):
    """/evaluate merges the config in the caller's session (or reuses that merge) and checks it beside its inputs;
    a model too big for the machine's memory is refused with the figures, before anything is loaded."""
    from lm_family import family, merge_yaml

    config = merge_yaml(family(tmp_path_factory, "llama"))
    root = served.sessions.root
    before = set(root.iterdir()) if root.is_dir() else set()
    caller = gradio_client.Client(served.url, verbose=False)
    report = caller.predict(config, api_name="/evaluate")
    assert report["kind"] == "causal_lm" and report["text"]["tokens"] == 2048
    assert [r["role"] for r in report["rows"]] == ["base", "input", "input", "merged"]
    assert report["verdict"]["status"] == "ok" and report["verdict"]["line"].startswith("verdict: OK: perplexity")
    assert all(isinstance(r["perplexity"], float) for r in report["rows"])
    assert len(report["continuations"]) == 5 and set(report["continuations"][0]["outputs"]) == {
        r["label"] for r in report["rows"]}
    (folder,) = set(root.iterdir()) - before

    monkeypatch.setenv("MERGESCOPE_MEMORY_LIMIT", "50MB")
    with pytest.raises(gradio_client.exceptions.AppError) as err:
        caller.predict(config, api_name="/evaluate")
    text = str(err.value)
    assert "not enough memory: checking the merged model" in text and "only 50 MB is available" in text
    assert "Traceback" not in text
    assert sorted(p.name for p in folder.glob("merge-*") if p.is_dir()) == ["merge-1"]  # the session's merge, reused


# --- no server needed ---------------------------------------------------------------------------------------

def test_sessions_are_private_folders_removed_on_close_and_by_age(tmp_path):
    from components.sessions import SessionStore

    store = SessionStore(root=tmp_path / "sessions", max_age_s=3600)
    one, two = store.get("hash-1"), store.get("hash-2")
    assert one.folder != two.folder and one.folder.parent == two.folder.parent
    assert "hash-1" not in one.folder.name  # folder names reveal nothing about the session
    assert store.get("hash-1") is one
    (one.folder / "merge-1").mkdir()
    (one.folder / "merge-1" / "model.safetensors").write_bytes(b"x" * 10)
    store.close("hash-1")
    assert not one.folder.exists() and one.cancel.is_set() and len(store) == 1
    # A folder idle for longer than max_age_s (a previous run's too) is removed when a session starts.
    stale = tmp_path / "sessions" / "leftover"
    stale.mkdir()
    old = time.time() - 7200
    os.utime(stale, (old, old))
    two.last_used = old
    store.get("hash-3")
    assert not stale.exists() and not two.folder.exists() and len(store) == 1


def _form(demo):
    import gradio as gr

    from components.common import AppSettings
    from components.method_form import ConfigForm, build_method_form, build_yaml_view, initial_yaml
    from components.model_picker import build_model_picker

    with gr.Blocks():
        picker = build_model_picker(demo, AppSettings())
        form = build_method_form(demo)
        build_yaml_view(form, initial_yaml(demo))
    return ConfigForm(picker, form)


def _apply(values: dict, updates: dict) -> dict:
    """The values the form's components hold after Gradio applies ``updates`` ({component: update}) to them."""
    return {comp: updates[comp]["value"] if "value" in updates.get(comp, {}) else old for comp, old in values.items()}


def test_every_registered_method_is_in_the_form_with_its_schema(tmp_path):
    from merging.methods import REGISTRY

    cf = _form(ensure_demo_models(tmp_path, prefer_zoo=False))
    assert set(cf.form.method.choices[i][0] for i in range(len(cf.form.method.choices))) == set(REGISTRY)
    for name, method in REGISTRY.items():
        for p in method.params:
            if p.per_model:
                field = cf.picker.slots[0].fields[p.name]
                assert p.name in {n for n in cf.picker.slots[0].fields}
            elif p.name in ("coefficients", "nan_scope", "nan_on"):
                continue
            else:
                field = cf.form.fields[name][p.name]
                shown = ", ".join(p.default) if p.type is list else p.default  # a list: one comma-separated line
                assert field.value == shown or name == "ties", (name, p.name)
                assert p.help in (field.info or "")
                if p.min is not None and p.max is not None and p.type is float:
                    assert (field.minimum, field.maximum) == (p.min, p.max)
    assert "coefficients" in cf.form.nan


def test_yaml_round_trips_through_the_form_in_mergekit_format(tmp_path):
    demo = ensure_demo_models(tmp_path, prefer_zoo=False)
    cf = _form(demo)
    refs = list(demo.models.values())
    text = yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": demo.base,
        "models": [{"model": refs[0], "parameters": {"weight": 0.7, "density": [0.2, 0.6]}},
                   {"model": refs[1], "parameters": {"weight": 0.3, "density": 0.5}}],
        "parameters": {"lambda": 0.9, "normalize": True, "coefficients": "nan"},
        "out_dtype": "bfloat16", "seed": 7, "tokenizer_source": "base",
    }, sort_keys=False)
    from components.form_state import config_from_form, dump_yaml, form_from_config

    values = {c: c.value for c in cf.inputs()} | {cf.form.yaml: text}  # what the components hold, by component
    shown, notes = form_from_config(yaml.safe_load(text), cf.read(values))
    applied = _apply(values, cf.value_updates(shown, values))  # the form after the YAML edit
    assert any("density" in n for n in notes)  # the per-layer list cannot show in a number field
    round_tripped = config_from_form(cf.read(applied), cf.current_config(applied))
    assert round_tripped == yaml.safe_load(text) | {"models": [
        {"model": refs[0], "parameters": {"weight": 0.7, "density": [0.2, 0.6]}},
        {"model": refs[1], "parameters": {"weight": 0.3, "density": 0.5}}]}
    parse_config(dump_yaml(config_from_form(cf.read(applied), cf.current_config(applied))))  # still a valid config

    # A form edit (λ, a weight) changes only those keys; everything else survives.
    edited = cf.read(applied)
    edited.global_params["dare_ties"]["lambda"] = 0.5
    edited.models[1].params["weight"] = 0.4
    out = config_from_form(edited, cf.current_config(applied))
    assert out["parameters"]["lambda"] == 0.5 and out["models"][1]["parameters"]["weight"] == 0.4
    assert out["models"][0]["parameters"]["density"] == [0.2, 0.6] and out["tokenizer_source"] == "base"


def test_merge_streams_hub_repos_from_a_hub_on_loopback(client, served, monkeypatch, tmp_path):
    """Repo ids in the config are read from a Hub-compatible server on 127.0.0.1 (tests/fakehub.py), through the
    app's Hub resolver; the result equals the same merge of the local folders."""
    from fakehub import FakeHub

    demo = served.demo
    refs = list(demo.models.values())[:2]
    local_yaml = yaml.safe_dump({"merge_method": "ties", "base_model": demo.base,
                                 "models": [{"model": r, "parameters": {"density": 0.5}} for r in refs]})
    hub_yaml = yaml.safe_dump({"merge_method": "ties", "base_model": "demo/base",
                               "models": [{"model": f"demo/ft-{k}", "parameters": {"density": 0.5}}
                                          for k in range(len(refs))]})
    with FakeHub() as hub:
        hub.add_repo("demo/base", demo.base, downloads=10)
        for k, ref in enumerate(refs):
            hub.add_repo(f"demo/ft-{k}", ref, downloads=5, base_models=["demo/base"])
        monkeypatch.setenv("MERGESCOPE_HF_ENDPOINT", hub.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        files, _, summary = client.predict(hub_yaml, api_name="/merge")
        assert hub.served() > 0
    from_hub = next(Path(f) for f in files if f.endswith(".safetensors"))
    run_merge(parse_config(local_yaml), tmp_path / "local")
    assert from_hub.read_bytes() == (tmp_path / "local" / "model.safetensors").read_bytes()


def test_on_a_space_visitors_never_use_the_owners_token(monkeypatch):
    from types import SimpleNamespace

    from components.common import AppSettings, drop_space_owner_token, hf_token

    monkeypatch.setenv("HF_TOKEN", "hf_owner_secret")
    assert hf_token(None) == "hf_owner_secret"  # locally, HF_TOKEN is the user's own
    monkeypatch.setenv("SPACE_ID", "someone/mergescope")
    assert hf_token(None) is None
    assert hf_token(SimpleNamespace(token="hf_visitor")) == "hf_visitor"
    settings = AppSettings.from_env()
    assert settings.on_space and not settings.allow_local_paths
    assert drop_space_owner_token(settings) and "HF_TOKEN" not in os.environ


def test_analyze_endpoint_returns_the_statistics_and_the_advice(client, demo_yaml):
    stats = client.predict(demo_yaml, api_name="/analyze")
    assert {"schema_version", "meta", "config_yaml", "model", "groups", "tensors", "advice"} == set(stats)
    advice = stats["advice"]
    assert 3 <= len(advice["findings"]) <= 8 and all(f["text"] for f in advice["findings"])
    rec = advice["recommendation"]
    assert rec["method"] and rec["reason"] and parse_config(yaml.safe_dump(rec["config"]))


def test_the_pages_labels_agree_with_the_library():
    from components import analysis_panel
    from merging import charts
    from merging.analysis import DEFAULT_SAMPLE_FRACTION

    assert len(analysis_panel.CHART_TABS) == len(charts.CHARTS)  # one tab per chart, in its order
    assert DEFAULT_SAMPLE_FRACTION == 0.05 and analysis_panel.SAMPLED == "sampled (5 % of rows)"  # as the README
