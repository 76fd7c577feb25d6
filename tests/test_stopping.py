"""Jobs stop when asked and when their time is up, and leave nothing behind: the wall-clock budget
(``merging.budget``) on merges, analyses and checks, a cancel through the public API (``gradio_client``'s
``job.cancel()``) that stops the server's work and not only the reply, and kill -9, a connection that stays down and a
full disk in the middle of a merge, each followed by a run that recovers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_bad_inputs
from checkpoints import llama_config, llama_tensors, save_checkpoint

from merging import budget
from merging.budget import OverBudget
from merging.config import parse_config
from merging.engine import run_merge
from merging.errors import Cancelled, MergeError

ROOT = Path(__file__).resolve().parent.parent
pair = test_bad_inputs.pair  # the fixture: a base and a fine-tune of one layer


def ta_config(root: Path, base: str | None = None, *models: str) -> str:
    models = models or (str(root / "ft"),)
    lines = [f"merge_method: task_arithmetic\nbase_model: {base or root / 'base'}\nmodels:"]
    lines += [f"  - model: {m}\n    parameters: {{weight: 1.0}}" for m in models]
    return "\n".join(lines) + "\n"


def leftovers(out: Path) -> list[Path]:
    """The output folder and any temp folder of it."""
    return [p for p in out.parent.iterdir() if p.name == out.name or p.name.startswith(f".{out.name}.")]


def slow(seconds: float):
    return lambda progress: time.sleep(seconds)


# ----- the wall-clock budget -----
def test_a_merge_past_its_budget_stops_as_a_cancel_does(pair):
    config = parse_config(ta_config(pair))
    out = pair / "out"
    with pytest.raises(OverBudget, match=r"the merge stopped after its time budget of 0.3 s .*nothing was written"):
        run_merge(config, out, progress=slow(0.05), time_budget=0.3)  # 12 tensors × 50 ms: over 0.3 s
    assert isinstance(OverBudget("x"), Cancelled) and leftovers(out) == []
    done = run_merge(config, out, time_budget=60)  # the next run recovers; a budget not reached changes nothing
    assert done.tensors == 12 and (out / "model.safetensors").is_file()


def test_the_budget_comes_from_the_flag_the_environment_or_the_space(monkeypatch):
    monkeypatch.delenv(budget.ENV, raising=False)
    monkeypatch.delenv("SPACE_ID", raising=False)
    assert budget.resolve() is None and budget.resolve(5) == 5.0 and budget.resolve(0) is None
    monkeypatch.setenv("SPACE_ID", "someone/mergescope")
    assert budget.resolve() == budget.SPACE_DEFAULT_S and budget.resolve(0) is None  # 0: none, even on a Space
    monkeypatch.setenv(budget.ENV, "90")
    assert budget.resolve() == 90.0 and budget.resolve(12) == 12.0  # the flag wins over the variable
    monkeypatch.setenv(budget.ENV, "soon")
    with pytest.raises(MergeError, match=r"^\$MERGESCOPE_TIME_BUDGET='soon' is not a number of seconds$"):
        budget.resolve()


def test_the_cli_flag_and_the_variable_stop_a_merge_with_one_line(pair, monkeypatch):
    from test_bad_inputs import assert_refused, run_cli

    cfg = pair / "config.yml"
    cfg.write_text(ta_config(pair))
    out = pair / "out"
    done = run_cli("merge", str(cfg), str(out), "--time-budget", "0.000001")
    assert_refused(done, "time budget of 1e-06 s", "nothing was written", out=out)
    monkeypatch.setenv(budget.ENV, "0.000001")
    assert_refused(run_cli("merge", str(cfg), str(out)), "time budget", out=out)
    assert_refused(run_cli("analyze", str(cfg)), "the analysis stopped after its time budget")
    assert run_cli("merge", str(cfg), str(out), "--time-budget", "0").returncode == 0  # 0: no budget


def test_an_analysis_past_its_budget_stops(pair):
    from merging.analysis import analyze

    config = parse_config(ta_config(pair))
    with pytest.raises(OverBudget, match="the analysis stopped"):
        analyze(config, progress=slow(0.05), time_budget=0.2)
    assert analyze(config, time_budget=60)["meta"]["mode"] == "exact"


# ----- a cancel through the public API -----
def test_a_cancelled_api_merge_stops_writing_and_leaves_no_folder(tmp_path_factory):
    """gradio_client's job.cancel() reaches Gradio's /cancel, which cancels the event's asyncio task; the endpoint
    turns that into the session's cancel flag, so the engine itself stops (a 57-tensor merge slowed to ~11 s by the
    app's test-only tensor delay), and its temp folder is removed within seconds, no final folder made."""
    gradio_client = pytest.importorskip("gradio_client")
    import yaml
    from app_server import running_app

    with running_app(tmp_path_factory.mktemp("cache"), prefer_zoo=False, tensor_delay_s=0.2) as served:
        client = gradio_client.Client(served.url, verbose=False)
        job = client.submit(yaml.safe_dump(served.demo.config_dict(), sort_keys=False), api_name="/merge")
        session = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the merge is writing into its temp folder
            session = served.sessions._sessions.get(client.session_hash)
            if session is not None and any(p.name.startswith(".merge-") for p in session.folder.iterdir()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("the merge never started writing")
        assert not job.done()
        job.cancel()
        cancelled = time.monotonic()
        while time.monotonic() - cancelled < 5 and list(session.folder.iterdir()):
            time.sleep(0.05)
        stopped_after = time.monotonic() - cancelled
        assert list(session.folder.iterdir()) == [], f"still there {stopped_after:.1f} s after the cancel"
        assert session.cancel.is_set()  # the engine saw the flag: the work stopped, not only the reply
        time.sleep(1.0)
        assert list(session.folder.iterdir()) == []  # and nothing grows again
        # A budget set on the server stops an API merge the same way, with its one line as the API error.
        os.environ[budget.ENV] = "0.5"
        try:
            with pytest.raises(gradio_client.exceptions.AppError, match="the merge stopped after its time budget"):
                client.predict(yaml.safe_dump(served.demo.config_dict(), sort_keys=False), api_name="/merge")
        finally:
            del os.environ[budget.ENV]
        assert list(session.folder.iterdir()) == []
        # The session works on: the next merge (no delay now) completes.
        served.settings.tensor_delay_s = 0.0
        files, _archive, summary = client.predict(yaml.safe_dump(served.demo.config_dict(), sort_keys=False),
                                                  api_name="/merge")
        assert summary["tensors"] == 57 and sorted(p.name for p in session.folder.iterdir()) == ["merge-3",
                                                                                                "merge-3.zip"]


# ----- crashes in the middle of a merge, then a run that recovers -----
def hub_config(*refs: str) -> str:
    base, *models = refs
    return ta_config(Path("."), base, *models)


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_kill_9_during_a_streamed_merge_leaves_a_temp_folder_the_next_run_removes(world, no_ambient_token, tmp_path):
    """The CLI streams three checkpoints from the fake Hub over a slowed link and is killed (SIGKILL) while its
    output is being written: no output folder, only the hidden temp folder, which the next merge removes."""
    from hub_world import resolver

    hub = world["hub"]
    cfg = tmp_path / "hub.yml"
    cfg.write_text(hub_config("acme/base", "acme/ft0", "acme/ft1"))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MERGESCOPE_HF_ENDPOINT": hub.url}
    hub.chunk_delay_s = 0.1  # ~13 MB in 256 KB chunks, a few requests in flight: seconds of streaming
    try:
        child = subprocess.Popen([sys.executable, "-m", "merging", "merge", str(cfg), str(out)], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        temp = []
        while time.monotonic() < deadline and child.poll() is None:
            temp = [p for p in tmp_path.glob(".out.mergescope-tmp-*") if any(p.iterdir())]
            if temp:
                break
            time.sleep(0.02)
        assert temp and child.poll() is None, "the merge finished (or failed) before it could be killed"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(30) == -signal.SIGKILL
    finally:
        hub.chunk_delay_s = 0.0
        if child.poll() is None:
            child.kill()
    assert not out.exists() and [p.name for p in leftovers(out)] == [temp[0].name]
    done = run_merge(parse_config(cfg.read_text()), out, resolver=resolver(world))
    assert done.tensors > 0 and [p.name for p in leftovers(out)] == ["out"]  # the stale temp folder is gone
    run_merge(parse_config(hub_config(str(world["base"]), str(world["ft0"]), str(world["ft1"]))), tmp_path / "local")
    assert file_bytes(out) == file_bytes(tmp_path / "local")


def test_a_connection_dropped_mid_tensor_that_stays_down_leaves_nothing(world, no_ambient_token, tmp_path):
    from hub_world import resolver
    from test_hub import read_local_header

    from merging.errors import SourceError

    hub = world["hub"]
    infos, _ = read_local_header(world["ft0"] / "model.safetensors")
    info = max(infos.values(), key=lambda i: i.nbytes)
    # cut in the middle of the largest tensor, then three 503s: more than the two retries allowed
    hub.drop_once("acme/ft0", "model.safetensors", at_offset=info.start + info.nbytes // 2, then_fail=3)
    config = parse_config(hub_config("acme/base", "acme/ft0"))
    out = tmp_path / "out"
    with pytest.raises(SourceError, match=r"^acme/ft0/model.safetensors: download failed after 2 retries") as err:
        run_merge(config, out, resolver=resolver(world, retries=2))
    assert "\n" not in str(err.value) and hub.pending_faults() == 0 and leftovers(out) == []
    assert run_merge(config, out, resolver=resolver(world)).tensors > 0  # the next run recovers
    run_merge(parse_config(hub_config(str(world["base"]), str(world["ft0"]))), tmp_path / "local")
    assert file_bytes(out) == file_bytes(tmp_path / "local")


def tokenizer_json(folder: Path, tokens: list[str]) -> None:
    import tokenizers

    spec = {"version": "1.0", "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)},
                                        "unk_token": tokens[0]}, "added_tokens": []}
    tokenizers.Tokenizer.from_str(__import__("json").dumps(spec)).save(str(folder / "tokenizer.json"))


def test_the_disk_filling_during_a_tokenizer_union_merge_leaves_nothing(tmp_path):
    """RLIMIT_FSIZE in a child stands in for a full disk, set between the weights' size and the union tokenizer's:
    the weights are written, the tokenizer file is not. One line, no folder; the next run recovers."""
    from test_bad_inputs import assert_refused

    long = [f"<tok_{i}_" + "x" * 600 + ">" for i in range(66)]  # a tokenizer file larger than the weights
    for name, vocab, seed in (("base", 64, 0), ("ft", 66, 1)):
        cfg = llama_config(layers=1, vocab=vocab)
        folder = save_checkpoint(tmp_path / name, llama_tensors(cfg, seed), cfg)
        tokenizer_json(folder, long[:vocab])
    cfg = tmp_path / "config.yml"
    cfg.write_text(ta_config(tmp_path) + "tokenizer_source: union\n")
    weights = 20_000 + (tmp_path / "ft" / "model.safetensors").stat().st_size
    assert weights < (tmp_path / "ft" / "tokenizer.json").stat().st_size
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({weights}, {weights})); "
            "from merging.__main__ import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", code, "merge", str(cfg), str(out)], capture_output=True, text=True,
                          env=env, timeout=120)
    assert_refused(done, "disk full while writing the output", out=out)
    done = run_merge(parse_config(cfg.read_text()), out)  # the next run (room enough) recovers
    assert (out / "tokenizer.json").stat().st_size > weights and done.tensors > 0
