"""The pre-flight resource check (merging/resources.py): a merge too big for the machine's free memory or disk is
refused before anything is read or written, with the figures; the memory estimate bounds what a real merge uses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import fine_tune, save_checkpoint, write_family

from merging.bands import BAND_ELEMENTS
from merging.config import parse_config
from merging.engine import run_merge
from merging.errors import MergeError
from merging.plan import build_plan
from merging.resources import (
    FIXED_BUFFERS,
    FUSED_BUFFERS,
    PROCESS_OVERHEAD,
    check_resources,
    estimate_resources,
    free_resources,
)
from merging.sources import open_sources

ROOT = Path(__file__).resolve().parent.parent


def config_for(base: Path, tunes: list[Path], method: str = "ties", **extra) -> str:
    params = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    doc = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(t), "parameters": {"weight": 0.5, **params}} for t in tunes], **extra}
    if method == "slerp":
        doc = {"merge_method": "slerp", "base_model": str(tunes[0]), "models": [{"model": str(t)} for t in tunes[:2]],
               "parameters": {"t": 0.3}}
    return yaml.safe_dump(doc)


def plan_of(text: str):
    config = parse_config(text)
    sources = open_sources(config.model_refs(), config.base_model)
    return build_plan(config, sources), sources


def test_small_machine_is_refused_up_front_with_the_figures(family, tmp_path, monkeypatch):
    base, tunes = family
    text = config_for(base, tunes)
    plan, sources = plan_of(text)
    need = estimate_resources(plan, sources)
    assert need.memory > 0 and need.disk >= plan.total_bytes_out

    monkeypatch.setenv("MERGESCOPE_MEMORY_LIMIT", str(need.memory - 1))
    out = tmp_path / "out"
    with pytest.raises(MergeError) as err:
        run_merge(parse_config(text), out)
    msg = str(err.value)
    assert msg.startswith("not enough memory") and "\n" not in msg
    assert "MERGESCOPE_MEMORY_LIMIT" in msg and " GB " in msg  # sizes in GB: at least PROCESS_OVERHEAD
    assert not out.exists() and not list(tmp_path.glob(".out*"))  # nothing written, not even a temp folder

    monkeypatch.setenv("MERGESCOPE_MEMORY_LIMIT", str(need.memory))  # exactly enough: merges
    monkeypatch.setenv("MERGESCOPE_DISK_LIMIT", "1MB")
    with pytest.raises(MergeError) as err:
        run_merge(parse_config(text), out)
    assert str(err.value).startswith(f"not enough disk space for {out}") and "1 MB is free" in str(err.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))

    monkeypatch.setenv("MERGESCOPE_RESOURCE_CHECK", "0")  # the escape hatch for an estimate that is too careful
    assert run_merge(parse_config(text), out).tensors == len(plan.tasks)


def test_the_cli_prints_one_line_and_exits_nonzero(family, tmp_path):
    base, tunes = family
    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_for(base, tunes))
    env = {**_env(), "MERGESCOPE_MEMORY_LIMIT": "1000"}
    proc = subprocess.run([sys.executable, "-m", "merging", "merge", str(cfg), str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "not enough memory" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_measured_free_memory_and_disk_are_sane(tmp_path, monkeypatch):
    monkeypatch.delenv("MERGESCOPE_MEMORY_LIMIT", raising=False)
    monkeypatch.delenv("MERGESCOPE_DISK_LIMIT", raising=False)
    free = free_resources(tmp_path / "not" / "yet" / "there")
    assert free.memory is not None and 0 < free.memory < 1 << 50
    assert free.disk is not None and free.disk > 0 and free.disk_source.endswith(str(tmp_path))
    monkeypatch.setenv("MERGESCOPE_DISK_LIMIT", "lots")
    with pytest.raises(MergeError, match="MERGESCOPE_DISK_LIMIT='lots' is not a size"):
        free_resources(tmp_path)


def test_bands_bound_element_wise_merges_and_whole_tensors_the_others(tmp_path):
    """A tensor too big for one band costs one band (8 rows at least, as the engine cuts them); slerp (not
    element-wise) costs whole tensors."""
    rows, cols = 16, BAND_ELEMENTS // 8  # two bands of 8 rows
    base = {"w": torch.zeros(rows, cols), "b": torch.zeros(8)}
    save_checkpoint(tmp_path / "base", base)
    tunes = [save_checkpoint(tmp_path / f"ft{k}", fine_tune(base, k)) for k in range(2)]
    plan, sources = plan_of(config_for(tmp_path / "base", tunes, "task_arithmetic"))
    banded = estimate_resources(plan, sources, fused=False)
    fused = estimate_resources(plan, sources, fused=True)
    plan, sources = plan_of(config_for(tmp_path / "base", tunes, "slerp"))
    whole = estimate_resources(plan, sources)
    assert banded.largest_task == whole.largest_task == "w"
    # task_arithmetic, 3 inputs, 8 rows per band: 2 stored copies of each input, 3 outputs in flight, 2 float32
    # buffers per input and 6 more
    band = 8 * cols
    assert banded.memory == PROCESS_OVERHEAD + 4 * band * (2 * 3 + 3 + 2 * 3 + FIXED_BUFFERS)
    # the fused kernels hold no float32 copy of an input: FUSED_BUFFERS in their place
    assert fused.memory == PROCESS_OVERHEAD + 4 * band * (2 * 3 + 3 + FUSED_BUFFERS)
    # slerp, 2 inputs, not element-wise (no kernel): the same counts of whole tensors
    assert whole.memory == PROCESS_OVERHEAD + 4 * rows * cols * (2 * 2 + 3 + 2 * 2 + FIXED_BUFFERS)
    assert check_resources(plan, tmp_path / "out", sources) == whole  # fits on this machine


MEASURE = r"""
import json, resource, sys
import torch  # imported before the baseline: its own memory is not the merge's
from merging.config import parse_config
from merging.engine import run_merge
from merging.plan import build_plan
from merging.resources import estimate_resources
from merging.sources import open_sources

text = open(sys.argv[1]).read()
config = parse_config(text)
sources = open_sources(config.model_refs(), config.base_model)
estimate = estimate_resources(build_plan(config, sources), sources).memory
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
run_merge(config, sys.argv[2], device="cpu")
# VmHWM is this process's own peak: ru_maxrss would include the pytest process's size, which Linux carries into a
# child across exec.
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"estimate": estimate, "before": before, "peak": peak}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ties", "slerp", "task_arithmetic"])
def test_estimate_bounds_the_measured_peak_memory(tmp_path, method):
    """A real merge of 3 × 48 MB checkpoints in a fresh process: peak RSS growth ≤ the estimate ≤ 4 × it."""
    base_dir, tunes = write_family(tmp_path / "models", n_models=2, hidden=1024, intermediate=2048, layers=1,
                                   vocab=4096)
    cfg = tmp_path / "merge.yml"
    cfg.write_text(config_for(base_dir, tunes, method))
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(cfg), str(tmp_path / "out")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    used = m["peak"] - m["before"]
    assert 0 < used <= m["estimate"], m
    assert m["estimate"] <= 4 * max(used, 1), m  # an upper bound, but not a useless one


def _env() -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("MERGESCOPE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env
