"""``python -m merging bench``: the Hub table on tiny checkpoints (one link, one method, one run of each), and the
commands that must not load torch. Figures are printed, never asserted on: speed is the bench's business."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from merging.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_hub_prints_its_table_from_a_shaped_link(tmp_path, capsys):
    report = tmp_path / "hub.json"
    code = main(["bench", "--hub", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "512",
                 "--models", "2", "--methods", "task_arithmetic", "--links", "20MB/s,5ms,per=10MB/s", "--repeat", "1",
                 "--workdir", str(tmp_path / "work"), "--json", str(report)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "| 20 MB/s, 10 MB/s per connection, RTT 5 ms | task_arithmetic |" in out
    assert "| 20 MB/s, 10 MB/s per connection, RTT 5 ms (5% of rows) |" in out
    data = json.loads(report.read_text())
    (row,) = data["results"]
    assert data["input_bytes"] <= row["served_bytes"] < data["input_bytes"] + 3 * 65536  # each byte once + headers
    assert row["floor_s"] == pytest.approx(row["served_bytes"] / 20e6)
    assert row["connections"] < row["requests"]
    assert row["download_then_merge_s"] == pytest.approx(row["download_s"] + row["downloaded_merge_s"])
    (analysis,) = data["analyses"]
    assert 0 < analysis["read_bytes"] <= analysis["served_bytes"]


def test_bench_refuses_bad_links_and_a_missing_gpu_in_one_line(capsys):
    assert main(["bench", "--hub", "--links", "100MB/s,fast"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --links: link shape '100MB/s,fast': 'fast' is not a bandwidth "
                                               "like 100MB/s, per=50MB/s, or a round-trip time like 20ms")
    import torch

    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["merge", "--help"], ["bench", "--help"], ["analyze", "--help"]])
def test_the_command_line_parses_without_loading_torch(argv):
    """``--help`` and argument parsing load neither torch nor huggingface_hub (an import of torch is most of a
    small merge's time); a command loads what it needs when it runs."""
    code = ("import sys\nfrom merging.__main__ import build_parser\n"
            f"try:\n    build_parser().parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'huggingface_hub', 'pydantic') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_a_merge_imports_only_what_it_needs(tmp_path):
    """A local merge loads the engine and torch, but not the other commands' modules (analysis, zoo, evaluation,
    bench, EMR), the Hub's push and search, nor huggingface_hub: start-up is most of a small merge."""
    from merging.bench.local import Shape, write_models

    base, tunes = write_models(tmp_path / "models", Shape(64, 128, 1, 512, 2))
    cfg = tmp_path / "ta.yml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                   + "".join(f"  - model: {t}\n" for t in tunes) + "dtype: bfloat16\n")
    unwanted = ("merging.analysis", "merging.analysis_cli", "merging.zoo", "merging.evaluate", "merging.bench",
                "merging.emr_cli", "merging.methods_cli", "merging.hub.push",
                "merging.hub.search", "merging.sources.hub", "huggingface_hub", "plotly", "transformers")
    code = ("import sys\nfrom merging.__main__ import main\n"
            f"assert main(['merge', {str(cfg)!r}, {str(tmp_path / 'out')!r}]) == 0\n"
            f"print(sorted(m for m in {unwanted!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_bench_prints_the_analysis_against_the_merge(tmp_path, capsys):
    report = tmp_path / "local.json"
    code = main(["bench", "--hidden", "64", "--intermediate", "128", "--layers", "1", "--vocab", "512", "--models",
                 "2", "--methods", "ties", "--repeat", "1", "--no-mergekit", "--workdir", str(tmp_path / "work"),
                 "--json", str(report)])
    out = capsys.readouterr().out
    print(out)
    assert code == 0
    assert "| method | merge (s) | exact analysis (s) | of which spectra (s) | analysis / merge |" in out
    (row,) = json.loads(report.read_text())["results"]
    assert row["analysis_s"] > 0 and row["ours_merge_s"] >= 0 and 0 <= row["analysis_spectral_s"] <= row["analysis_s"]
    assert row["analysis_peak_bytes"] > 0 and "mergekit_s" not in row
