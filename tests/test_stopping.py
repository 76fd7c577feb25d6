"""Jobs stop when asked and when their time is up, and leave nothing behind: the wall-clock budget
(``merging.budget``) on merges, analyses and checks, a cancel through the public API (``gradio_client``'s
``job.cancel()``) that stops the server's work and not only the reply, and kill -9, a connection that stays down and a
full disk in the middle of a merge, each followed by a run that recovers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from checkpoints import fine_tune, llama_config, llama_tensors, save_checkpoint

from merging import budget
from merging.budget import OverBudget
from merging.config import parse_config
from merging.engine import run_merge
from merging.errors import Cancelled, MergeError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def pair(tmp_path):
    cfg = llama_config(layers=2)
    base = llama_tensors(cfg, 0)
    save_checkpoint(tmp_path / "base", base, cfg)
    save_checkpoint(tmp_path / "ft", fine_tune(base, 1), cfg)
    return tmp_path


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
        run_merge(config, out, progress=slow(0.05), time_budget=0.3)  # 21 tensors × 50 ms: over 0.3 s
    assert isinstance(OverBudget("x"), Cancelled) and leftovers(out) == []
    done = run_merge(config, out, time_budget=60)  # the next run recovers; a budget not reached changes nothing
    assert done.tensors == 21 and (out / "model.safetensors").is_file()


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
        # The session works on: the next merge (no delay now) completes.
        served.settings.tensor_delay_s = 0.0
        files, _archive, summary = client.predict(yaml.safe_dump(served.demo.config_dict(), sort_keys=False),
                                                  api_name="/merge")
        assert summary["tensors"] == 57 and sorted(p.name for p in session.folder.iterdir()) == ["merge-2",
                                                                                                "merge-2.zip"]
