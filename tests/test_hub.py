"""The Hub, for real, on loopback: huggingface_hub and our range reader talk HTTP to tests/fakehub.py.

Nothing here is mocked except the upload protocol in the push tests (it cannot exist offline; see there).
Byte counts are the server's own: what it actually sent.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import load_folder
from hub_world import SECRET, file_bytes, resolver, ta_config, total_size

from merging import SourceError, parse_config, run_merge
from merging.hub import (
    fine_tunes_of,
    parse_ref,
    preflight,
    resolve_token,
    search_models,
)
from merging.safetensors_io import read_local_header
from merging.sources.hub import HEADER_PREFETCH, HubCheckpoint

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("no_ambient_token")


# ----- references and tokens -----
@pytest.mark.parametrize("ref", ["acme/base", "acme/base@main", "gpt2", "acme/m.v1_2-x@refs/pr/1",
                                 "acme/base@" + "a1" * 20, "acme/base@v1.0"])
def test_valid_references_parse(ref):
    parsed = parse_ref(ref)
    assert str(parsed) == (ref[:-5] if ref.endswith("@main") else ref)


@pytest.mark.parametrize("ref", ["../etc/passwd", "acme/../x", "acme/base@..", "acme/base@a/../b", "a b/c",
                                 "acme/base@ma:in", "acme/" + "x" * 97, "acme/base@", "/abs/path", "acme/base/extra",
                                 "acme/base@a@b", "-acme/x", "acme/x.git", "acme/base@" + "r" * 201, "acme/ba\nse",
                                 "https://huggingface.co/acme/base", "acme/base@-x", "acme--x/y"])
def test_bad_references_are_refused_in_one_line(ref):
    with pytest.raises(SourceError) as err:
        parse_ref(ref)
    msg = str(err.value)
    assert "\n" not in msg and "not a Hub repo id" in msg and repr(ref[:40])[:-1] in msg


def test_bad_reference_in_a_config_fails_before_any_request(world, tmp_path):
    cfg = parse_config(ta_config(str(world["base"]), "../nope/x", "acme/ft0"))
    with pytest.raises(SourceError, match=r"'\.\./nope/x': no such local file or folder, and not a Hub repo id"):
        run_merge(cfg, tmp_path / "out", resolver=resolver(world))
    assert world["hub"].requests == []
    assert not (tmp_path / "out").exists()


def test_token_comes_from_argument_then_env_then_stored_login(monkeypatch, tmp_path):
    import huggingface_hub.constants as constants

    stored = tmp_path / "token"
    stored.write_text("hf_storedLoginToken000000000000000")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    assert resolve_token() == "hf_storedLoginToken000000000000000"
    monkeypatch.setenv("HF_TOKEN", "hf_fromEnvironment00000000000000000")
    assert resolve_token() == "hf_fromEnvironment00000000000000000"
    assert resolve_token("hf_explicitOAuthToken0000000000000") == "hf_explicitOAuthToken0000000000000"


# ----- search -----
def test_search_sorts_by_downloads_with_parameter_counts(world):
    results = search_models("acme/", limit=10, endpoint=world["hub"].url)
    assert [m.repo_id for m in results] == ["acme/base", "acme/ft-lora", "acme/ft1", "acme/ft0", "acme/pickled",
                                            "acme/gated"]
    by_id = {m.repo_id: m for m in results}
    n_params = sum(t.numel() for t in load_folder(world["base"]).values())
    assert by_id["acme/base"].parameters == n_params == 1_049_216
    assert by_id["acme/ft1"].parameters == n_params  # sharded: counted over every shard
    assert by_id["acme/base"].has_safetensors and not by_id["acme/pickled"].has_safetensors
    assert by_id["acme/pickled"].parameters is None
    assert by_id["acme/gated"].gated and by_id["acme/ft0"].base_models == ["acme/base"]
    assert [m.repo_id for m in search_models("acme/", limit=2, endpoint=world["hub"].url)] == ["acme/base",
                                                                                               "acme/ft-lora"]


def test_fine_tunes_of_follow_the_base_model_relation(world):
    url = world["hub"].url
    assert [m.repo_id for m in fine_tunes_of("acme/base", endpoint=url)] == ["acme/ft1", "acme/ft0", "acme/gated"]
    assert [m.repo_id for m in fine_tunes_of("acme/base", relation=None, endpoint=url)] == [
        "acme/ft-lora", "acme/ft1", "acme/ft0", "acme/gated"]
    assert [m.repo_id for m in fine_tunes_of("acme/base", relation="adapter", endpoint=url)] == ["acme/ft-lora"]
    assert fine_tunes_of("other/small", endpoint=url) == []
    assert all(m.parameters == 1_049_216 and m.has_safetensors for m in fine_tunes_of("acme/base", endpoint=url))


# ----- pre-flight -----
def test_preflight_reads_only_headers(world):
    hub = world["hub"]
    cfg = parse_config(ta_config("acme/base", "acme/ft0@v2", "acme/ft1"))
    pf = preflight(cfg, endpoint=hub.url)
    served = hub.served()
    files = total_size(world["base"], world["ft2"], world["ft1_sharded"])
    print(f"\npre-flight: server sent {served} bytes for {files} bytes of safetensors "
          f"({100 * served / files:.2f} %)")
    assert pf.compatible and pf.report["ok"]
    # Only the first HEADER_PREFETCH bytes of each of the 5 weight files, the index and config.json.
    assert served <= 5 * HEADER_PREFETCH + 20_000
    assert served < files / 30
    assert pf.header_bytes == 2 * HEADER_PREFETCH + 3 * HEADER_PREFETCH  # each file holds more than the prefix
    local = {n: (str(t.dtype), tuple(t.shape)) for n, t in load_folder(world["base"]).items()}
    summary = {m.ref: m for m in pf.models}
    assert summary["acme/ft1"].files.keys() == {f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)}
    assert summary["acme/ft0@v2"].commit == hub.repos["acme/ft0"].sha("v2")
    assert {n: s for n, (_, s) in summary["acme/ft1"].tensors.items()} == {n: s for n, (_, s) in local.items()}
    assert all(dt == "F32" for dt, _ in summary["acme/base"].tensors.values())
    # The merge reads each float tensor of the base and both models once: 3 × 4.2 MB, all from the Hub.
    tensor_bytes = sum(t.numel() * 4 for t in load_folder(world["base"]).values())
    assert pf.bytes_to_read == pf.bytes_from_hub == 3 * tensor_bytes
    assert pf.output_bytes == tensor_bytes
    assert pf.disk_needed == tensor_bytes + (world["base"] / "config.json").stat().st_size
    largest = 2048 * 128 * 4  # embed_tokens / lm_head, float32
    # whole tensors (the largest three inputs and its float32 copies), writes in flight, and the read-ahead
    assert pf.peak_memory == 2 * 3 * largest + 5 * largest + 3 * largest + pf.bytes_from_hub
    assert 0 < pf.est_seconds < 5
    assert "compatible" in pf.text() and "acme/ft1" in pf.text()


def test_preflight_reports_incompatible_inputs_without_downloading(world):
    hub = world["hub"]
    pf = preflight(ta_config("acme/base", "acme/ft0", "other/small"), endpoint=hub.url)
    assert not pf.compatible
    assert pf.report["shape_mismatches"] and "other/small" in pf.report_text
    assert hub.served() < 3 * HEADER_PREFETCH + 10_000


# ----- streaming merges -----
def test_streamed_merge_equals_local_merge_byte_for_byte(world, tmp_path):
    hub = world["hub"]
    local = parse_config(ta_config(str(world["base"]), str(world["ft2"]), str(world["ft1"])))
    remote = parse_config(ta_config("acme/base", "acme/ft0@v2", "acme/ft1"))
    run_merge(local, tmp_path / "local")
    hub.reset_counts()
    result = run_merge(remote, tmp_path / "hub", resolver=resolver(world))
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")
    assert (tmp_path / "hub" / "config.json").read_bytes() == (tmp_path / "local" / "config.json").read_bytes()
    served, files = hub.served(), total_size(world["base"], world["ft2"], world["ft1_sharded"])
    print(f"\nstreamed merge: server sent {served} bytes for {files} bytes of input files")
    # Each input tensor once, plus one header prefetch per file (5 files).
    assert files <= served <= files + 5 * HEADER_PREFETCH
    assert result.tensors == 21
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "acme/ft0@v2" in card and "acme/ft1" in card


def test_cached_merge_downloads_only_weights_config_and_tokenizer(world, tmp_path):
    hub = world["hub"]
    cache_dir = tmp_path / "hf-cache"
    cfg = parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1"))
    run_merge(cfg, tmp_path / "hub", resolver=resolver(world, cache=True, cache_dir=str(cache_dir)))
    run_merge(parse_config(ta_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")
    cached = {p.name for p in cache_dir.rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert cached == {"model.safetensors", "config.json", "model.safetensors.index.json",
                      "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                      "model-00003-of-00003.safetensors"}
    assert hub.served("acme/ft0", "pytorch_model.bin") == 0 and hub.served("acme/ft0", "training_args.bin") == 0


@pytest.mark.slow
def test_cli_merges_repo_ids_through_the_endpoint_variable(world, tmp_path):
    cfg = tmp_path / "merge.yml"
    cfg.write_text(ta_config("acme/base", "acme/ft0", "acme/ft1"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(PYTHONPATH=str(ROOT), MERGESCOPE_HF_ENDPOINT=world["hub"].url, HF_HOME=str(tmp_path / "hf-home"))
    run = subprocess.run([sys.executable, "-m", "merging", "merge", str(cfg), str(tmp_path / "cli-out")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    run_merge(parse_config(ta_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(tmp_path / "cli-out") == file_bytes(tmp_path / "local")
    assert not (tmp_path / "hf-home").exists()  # streaming writes nothing but the output

    cfg.write_text(ta_config("acme/base", "acme/ft0", "acme/gated"))
    run = subprocess.run([sys.executable, "-m", "merging", "merge", str(cfg), str(tmp_path / "no")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: acme/gated: gated or private: log in (`hf auth login`), set HF_TOKEN, or pass a token"]


# ----- ranges, sampling, faults -----
def test_sampled_analysis_from_the_hub_equals_local_and_reads_few_bytes(world, monkeypatch):
    import merging.sources.hub as hub_source
    from merging.analysis import analyze

    hub = world["hub"]
    monkeypatch.setattr(hub_source, "COALESCE_GAP", 0)  # rows 0.5 kB apart: every gap would be read otherwise
    options = dict(sample=0.05, whole_tensor_bytes=4096)  # norms are read whole, matrices sampled by rows
    remote = analyze(parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1")), resolver=resolver(world),
                     **options)
    served = hub.served()
    local = analyze(parse_config(ta_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), **options)
    assert remote["tensors"] == local["tensors"] and remote["groups"] == local["groups"]
    assert remote["meta"]["bytes_read"] == local["meta"]["bytes_read"] < local["meta"]["bytes_total"] / 10
    files = total_size(world["base"], world["ft0"], world["ft1_sharded"])
    print(f"\nsampled analysis (5% of rows): server sent {served} bytes for {files} bytes of input files")
    assert served < files / 8
    # With gaps read rather than paid for with a request of their own: fewer requests, the same statistics.
    monkeypatch.setattr(hub_source, "COALESCE_GAP", 128 * 1024)
    requests = len(hub.requests)
    hub.reset_counts()
    again = analyze(parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1")), resolver=resolver(world),
                    **options)
    assert again["tensors"] == local["tensors"] and again["meta"]["bytes_read"] == local["meta"]["bytes_read"]
    assert len(hub.requests) < requests / 2  # runs of rows already take one request each


def test_sampled_rows_read_far_fewer_bytes_than_the_file(world, monkeypatch):
    import merging.sources.hub as hub_source

    hub = world["hub"]
    monkeypatch.setattr(hub_source, "COALESCE_GAP", 0)  # each run of rows its own request, exactly its bytes
    src = resolver(world)("acme/ft0", allow_pickle=False, base=None)
    try:
        hub.reset_counts()
        rows = sorted(random.Random(0).sample(range(2048), 16))
        got = src.read_rows("model.embed_tokens.weight", rows)
        expected = load_folder(world["ft0"])["model.embed_tokens.weight"][rows]
        assert torch.equal(got, expected)
        file_size = (world["ft0"] / "model.safetensors").stat().st_size
        served = hub.served("acme/ft0", "model.safetensors")
        print(f"\nsampled 16 of 2048 rows: server sent {served} bytes of a {file_size}-byte file")
        # Exactly the rows, one range request per band; rows inside the header prefetch cost nothing more.
        start = read_local_header(world["ft0"] / "model.safetensors")[0]["model.embed_tokens.weight"].start
        assert served == sum(512 for r in rows if start + (r + 1) * 512 > HEADER_PREFETCH)
        assert src.bytes_read() == 16 * 512
        # After the first request, ranges go straight to the CDN URL the Hub redirected to.
        assert [r["server"] for r in hub.requests] == ["cdn"] * len(hub.requests)
        hub.expire_signed_urls()  # a signed URL that expired is renewed through the Hub
        band = src.read("model.embed_tokens.weight", rows=(1000, 1010))
        assert torch.equal(band, load_folder(world["ft0"])["model.embed_tokens.weight"][1000:1010])
        assert [r["server"] for r in hub.requests[-3:]] == ["cdn", "hub", "cdn"]
    finally:
        src.close()


def test_connection_dropped_mid_tensor_resumes_from_the_last_byte(world):
    hub = world["hub"]
    src = resolver(world)("acme/ft0", allow_pickle=False, base=None)
    try:
        infos, _ = read_local_header(world["ft0"] / "model.safetensors")
        info = infos["model.layers.1.mlp.up_proj.weight"]
        middle = (info.start + info.end) // 2
        hub.reset_counts()
        hub.drop_once("acme/ft0", "model.safetensors", at_offset=middle)
        got = src.read(info.name)
        assert hub.pending_faults() == 0  # the connection really was cut
        assert torch.equal(got, load_folder(world["ft0"])[info.name])
        assert isinstance(src, HubCheckpoint) and src.retries_used() == 1
        # Resumed, not restarted: no byte was sent twice.
        assert hub.served("acme/ft0", "model.safetensors") == info.nbytes
        ranges = [r["range"] for r in hub.requests if r["server"] == "cdn"]
        assert ranges == [f"bytes={info.start}-{info.end - 1}", f"bytes={middle}-{info.end - 1}"]
        # A flaky Hub (503 twice) is retried with backoff.
        hub.fail_next("acme/ft0", "model.safetensors", status=503, times=2)
        assert torch.equal(src.read("model.norm.weight"), load_folder(world["ft0"])["model.norm.weight"])
        assert src.retries_used() == 3
    finally:
        src.close()


def test_large_reads_are_fetched_in_parallel_chunks(world, monkeypatch):
    import merging.sources.hub as hub_source

    hub = world["hub"]
    monkeypatch.setattr(hub_source, "PARALLEL_THRESHOLD", 100_000)
    monkeypatch.setattr(hub_source, "PARALLEL_CHUNK", 100_000)
    src = resolver(world)("acme/base", allow_pickle=False, base=None)
    try:
        info = read_local_header(world["base"] / "model.safetensors")[0]["lm_head.weight"]  # 1 MB
        hub.reset_counts()
        hub.drop_once("acme/base", "model.safetensors", at_offset=info.start + 450_000)
        assert torch.equal(src.read(info.name), load_folder(world["base"])[info.name])
        ranges = [r["range"] for r in hub.requests]
        assert len(ranges) == 11 + 1  # ceil(1 MB / 100 kB) chunks, one resumed after the drop
        assert f"bytes={info.start + 450_000}-{info.start + 499_999}" in ranges
        assert hub.served("acme/base", "model.safetensors") == info.nbytes
    finally:
        src.close()


def test_merge_survives_a_dropped_connection(world, tmp_path):
    hub = world["hub"]
    infos, _ = read_local_header(world["ft1_sharded"] / "model-00002-of-00003.safetensors")
    info = max(infos.values(), key=lambda i: i.nbytes)
    hub.drop_once("acme/ft1", "model-00002-of-00003.safetensors", at_offset=info.start + info.nbytes // 3)
    run_merge(parse_config(ta_config("acme/base", "acme/ft0", "acme/ft1")), tmp_path / "hub",
              resolver=resolver(world))
    assert hub.pending_faults() == 0
    run_merge(parse_config(ta_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(tmp_path / "hub") == file_bytes(tmp_path / "local")


# ----- errors and tokens -----
def test_missing_repo_revision_and_file_are_clear_one_line_errors(world):
    open_ref = resolver(world)
    cases = {
        "acme/nope": "acme/nope: no such local folder, and no such model repo on the Hub",
        "acme/ft0@nope": "acme/ft0: revision 'nope' not found on the Hub",
        "acme/pickled": "acme/pickled: holds PyTorch pickle weights (pytorch_model.bin)",
    }
    for ref, message in cases.items():
        with pytest.raises(SourceError) as err:
            open_ref(ref, allow_pickle=False, base=None)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    from huggingface_hub import hf_hub_url

    from merging.sources.hub import HubFile

    with pytest.raises(SourceError, match=r"^acme/ft0: file 'missing.safetensors' not found in the repo$"):
        HubFile(hf_hub_url("acme/ft0", "missing.safetensors", endpoint=world["hub"].url), "acme/ft0", "main",
                "missing.safetensors", None)


def test_gated_repo_needs_the_token_which_never_leaks(world, tmp_path, monkeypatch):
    hub = world["hub"]
    cfg = parse_config(ta_config("acme/base", "acme/ft0", "acme/gated"))
    with pytest.raises(SourceError) as err:
        run_merge(cfg, tmp_path / "out", resolver=resolver(world))
    assert str(err.value) == "acme/gated: gated or private: log in (`hf auth login`), set HF_TOKEN, or pass a token"
    wrong = "hf_WrongToken9999999999999999999999"
    with pytest.raises(SourceError) as err:
        preflight(cfg, token=wrong, endpoint=hub.url)
    assert "(the token sent was refused)" in str(err.value) and wrong not in str(err.value)

    monkeypatch.setenv("HF_TOKEN", SECRET)
    hub.reset_counts()
    run_merge(cfg, tmp_path / "out", resolver=resolver(world))
    assert load_folder(tmp_path / "out")  # merged
    assert any(r["authorized"] for r in hub.requests if r["server"] == "hub")
    assert not hub.cdn_saw_authorization  # the token stays on the Hub, never forwarded to the CDN
    for path in (tmp_path / "out").rglob("*"):
        assert SECRET.encode() not in path.read_bytes(), path
    # The explicit argument (the app's OAuth token) works as well, and wins over the environment.
    monkeypatch.setenv("HF_TOKEN", wrong)
    pf = preflight(cfg, token=SECRET, endpoint=hub.url)
    assert pf.compatible and SECRET not in repr(pf.to_dict())
