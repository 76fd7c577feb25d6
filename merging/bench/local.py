"""``python -m merging bench``: our engine against mergekit on the same synthetic llama checkpoints (local disk).

Writes a base and N fine-tunes (base + small noise) of a llama-shaped model, then runs the same YAML through
``python -m merging merge`` and, when installed, ``mergekit-yaml``, each in its own process, several times; prints
per method the best wall time of each, the ratio, each process's peak resident memory, and whether the outputs
agree; then our exact analysis of the same config (``python -m merging analyze --exact``) against our merge: the
seconds each reports of itself (without the interpreter's start-up) and their peak memory. The floor printed first
is the time to read every input once from the page cache.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import MergeError
from ..methods import REGISTRY
from ..safetensors_io import DTYPE_NAMES, read_local_header, tensor_from_bytes
from ..sources.base import TensorSpec
from ..synthetic import llama_config, llama_shapes
from ..writer import ShardedWriter

METHOD_PARAMS = {
    "linear": {},
    "task_arithmetic": {"lambda": 0.5},
    "ties": {"density": 0.2, "lambda": 1.0},
    "dare_ties": {"density": 0.2, "lambda": 1.0},
    "dare_linear": {"density": 0.2, "lambda": 1.0},
    "breadcrumbs_ties": {"density": 0.2, "gamma": 0.01},
    "della": {"density": 0.2, "epsilon": 0.1},
    "emr": {},
}
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}
MERGEKIT_METHODS = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_linear",
                    "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce", "model_stock",
                    "nearswap", "arcee_fusion", "passthrough", "ram", "ramplus_tl"}  # mergekit 0.1.5's
OURS_ONLY = set(REGISTRY) - MERGEKIT_METHODS


@dataclass
class Shape:
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 8
    vocab: int = 32000
    models: int = 3
    dtype: str = "bfloat16"

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        return llama_shapes(self.config_json())

    def parameters(self) -> int:
        return sum(torch.Size(s).numel() for _, s in self.tensors())

    def config_json(self) -> dict:
        return llama_config(self.hidden, self.intermediate, self.layers, self.vocab, max(1, self.hidden // 128),
                            self.dtype)


def write_models(root: Path, shape: Shape, seed: int = 0) -> tuple[Path, list[Path]]:
    """Write base and fine-tunes tensor by tensor (never a whole model in memory); reuse a matching set."""
    stamp = root / "shape.json"
    names = ["base"] + [f"ft{k}" for k in range(shape.models)]
    if stamp.exists() and json.loads(stamp.read_text()) == asdict(shape):
        return root / "base", [root / n for n in names[1:]]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[shape.dtype]
    specs = [(n, TensorSpec(DTYPE_NAMES[dtype], s)) for n, s in shape.tensors()]
    writers = []
    for n in names:
        (root / n).mkdir()
        (root / n / "config.json").write_text(json.dumps(shape.config_json()))
        writers.append(ShardedWriter(root / n, specs, 1 << 62))
    gen = torch.Generator().manual_seed(seed)
    for name, spec in specs:
        base = torch.randn(spec.shape, generator=gen) * 0.02
        if name.endswith("norm.weight"):
            base += 1
        writers[0].write(name, base.to(dtype))
        for w in writers[1:]:
            w.write(name, (base + torch.randn(spec.shape, generator=gen) * 0.002).to(dtype))
    for w in writers:
        w.finish()
    stamp.write_text(json.dumps(asdict(shape)))
    return root / "base", [root / n for n in names[1:]]


def read_floor(folders: list[Path]) -> float:
    """Seconds to read every input file once from the page cache (read twice; the second is timed)."""
    files = [f for d in folders for f in sorted(d.glob("*.safetensors"))]
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                while os.readv(fd, [view]) > 0:
                    pass
            finally:
                os.close(fd)
        best = min(best, time.perf_counter() - start)
    return best


# Runs one command and reports its wall time and peak RSS. It runs in a fresh, small Python: Linux carries the
# spawning process's peak RSS into a child across exec (fork and vfork alike), so spawning from this bench, which
# has just compared two outputs in memory, would report the bench's own size.
_LAUNCHER = """
import json, os, sys, time
cmd = json.loads(sys.argv[1])
start = time.perf_counter()
pid = os.posix_spawn(cmd[0], cmd, os.environ)
_, status, usage = os.wait4(pid, 0)
print(json.dumps({"wall": time.perf_counter() - start, "maxrss": usage.ru_maxrss * 1024,
                  "rc": os.waitstatus_to_exitcode(status)}))
"""


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[float, int, int, str, str]:
    """Wall seconds, peak resident bytes, return code, stderr tail and stdout of one command."""
    full = [shutil.which(cmd[0]) or cmd[0], *cmd[1:]]
    done = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(full)], capture_output=True, text=True,
                          env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return 0.0, 0, done.returncode or 1, done.stderr[-400:], ""
    result = json.loads(lines[-1])
    return result["wall"], result["maxrss"], result["rc"], done.stderr[-400:], "\n".join(lines[:-1])


ANALYSIS_SECONDS = r" in ([0-9.]+) s \(spectra [0-9.]+ s\), read "  # what ``analyze`` prints of itself
SPECTRAL_SECONDS = r" s \(spectra ([0-9.]+) s\), read "


def reported_seconds(stdout: str, pattern: str) -> float | None:
    """The seconds a command reports of itself (``merged ... in 3.1 s``: without the interpreter's start), or None."""
    m = re.search(pattern, stdout)
    return float(m[1]) if m else None


def checked(who: str, what: str, measured: tuple) -> tuple:
    """``measured`` (from ``run_measured``), or the one line saying how the command failed."""
    rc, err = measured[2], measured[3]
    if rc != 0:
        last = err.strip().splitlines()[-1] if err.strip() else ""
        raise MergeError(f"bench: {who} failed on {what} (exit {rc}): {last}")
    return measured


def compare_outputs(ours: Path, theirs: Path) -> str:
    """How much of the two outputs agrees within bf16 rounding: the share of elements whose difference is at most
    2 bf16 steps of their magnitude (plus 2 steps of the tensor's RMS, for values near zero).

    mergekit computes in the config's ``dtype`` (bf16 here) while we compute in float32, so exact equality is not
    expected; a real difference in the method shows up as a share far below 100 %.
    """
    ours_h = _all_headers(ours)
    theirs_h = _all_headers(theirs)
    missing = set(ours_h) ^ set(theirs_h)
    if missing:
        return f"no: names differ ({sorted(missing)[0]})"
    step = 2.0 ** -7
    off, total, worst, worst_name = 0, 0, 1.0, ""
    for name, (path, info) in ours_h.items():
        a = _read(path, info).float()
        b = _read(*theirs_h[name]).float()
        if a.shape != b.shape:
            return f"no: {name} shape {list(a.shape)} vs {list(b.shape)}"
        if not a.numel():
            continue
        rms = b.square().mean().sqrt()
        bad = int(((a - b).abs() > 2 * step * (torch.maximum(a.abs(), b.abs()) + rms)).sum())
        off, total = off + bad, total + a.numel()
        if 1 - bad / a.numel() < worst:
            worst, worst_name = 1 - bad / a.numel(), name
    share = 1 - off / total if total else 1.0
    detail = f"; lowest {worst:.4%} in {worst_name}" if worst < 1 else ""
    return f"{share:.4%} of elements{detail}"


def _all_headers(folder: Path):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for name, info in read_local_header(f)[0].items():
            out[name] = (f, info)
    return out


def _read(path: Path, info) -> torch.Tensor:
    with open(path, "rb") as f:
        f.seek(info.start)
        return tensor_from_bytes(info, bytearray(f.read(info.nbytes)))


def bench(shape: Shape, methods: list[str], repeat: int, workdir: Path, use_mergekit: bool, device: str) -> dict:
    base, tunes = write_models(workdir / "models", shape)
    floor = read_floor([base, *tunes])
    mergekit = shutil.which("mergekit-yaml") if use_mergekit else None
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in methods:
        params = METHOD_PARAMS.get(method, {})
        models = "\n".join(f"  - model: {t}\n    parameters: {{weight: 1.0}}" for t in tunes)
        if method in REGISTRY and not any(p.name == "weight" for p in REGISTRY[method].params):
            models = "\n".join(f"  - model: {t}" for t in tunes)  # emr, tsv_m, iso_c, ...: no per-model weight
        cfg = workdir / f"{method}.yml"
        cfg.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}\n"
                       f"parameters: {json.dumps(params)}\ndtype: {shape.dtype}\n")
        row = {"method": method}
        for who in ("ours", "mergekit"):
            if who == "mergekit" and (not mergekit or method in OURS_ONLY):
                continue
            out = workdir / f"out_{who}_{method}"
            times, peaks, inner = [], [], []
            for _ in range(repeat):
                shutil.rmtree(out, ignore_errors=True)
                os.sync()  # the last run's output is written back now, not during this run's timing
                if who == "ours":
                    cmd = [sys.executable, "-m", "merging", "merge", str(cfg), str(out), "--device", device]
                else:
                    cmd = [mergekit, str(cfg), str(out), "--no-copy-tokenizer", "--allow-crimes",
                           "--out-shard-size", "5B"]
                    if device == "cuda":
                        cmd.append("--cuda")
                wall, peak, _, _, stdout = checked(who, method, run_measured(cmd, env))
                times.append(wall)
                peaks.append(peak)
                inner.append(reported_seconds(stdout, r" in ([0-9.]+) s on ") or wall)
            row[f"{who}_s"] = min(times)
            row[f"{who}_peak_bytes"] = max(peaks)
            if who == "ours":
                row["ours_merge_s"] = min(inner)
        row.update(_analysis_row(cfg, method, repeat, env))
        row["analysis_ratio"] = row["analysis_s"] / row["ours_merge_s"] if row["ours_merge_s"] else float("nan")
        row["analysis_memory_ratio"] = row["analysis_peak_bytes"] / row["ours_peak_bytes"]
        if "mergekit_s" in row:
            row["time_ratio"] = row["ours_s"] / row["mergekit_s"]
            row["memory_ratio"] = row["ours_peak_bytes"] / row["mergekit_peak_bytes"]
            row["outputs_agree"] = ("n/a (random)" if method in RANDOM_METHODS
                                    else compare_outputs(workdir / f"out_ours_{method}",
                                                         workdir / f"out_mergekit_{method}"))
        rows.append(row)
    input_bytes = sum(f.stat().st_size for d in (base, *tunes) for f in d.glob("*.safetensors"))
    return {"shape": asdict(shape), "parameters_per_model": shape.parameters(), "input_bytes": input_bytes,
            "read_floor_s": floor, "cpu_count": os.cpu_count(), "torch": torch.__version__, "device": device,
            "results": rows}


def _analysis_row(cfg: Path, method: str, repeat: int, env: dict) -> dict:
    """Our exact analysis of the config: best seconds it reports of itself, and its peak resident memory."""
    runs, peaks = [], []
    for _ in range(repeat):
        cmd = [sys.executable, "-m", "merging", "analyze", str(cfg), "--exact"]
        _, peak, _, _, stdout = checked("analysis", method, run_measured(cmd, env))
        runs.append((reported_seconds(stdout, ANALYSIS_SECONDS) or float("nan"),
                     reported_seconds(stdout, SPECTRAL_SECONDS) or 0.0))
        peaks.append(peak)
    best, spectral = min(runs)
    return {"analysis_s": best, "analysis_spectral_s": spectral, "analysis_peak_bytes": max(peaks)}


def format_table(report: dict) -> str:
    lines = [f"inputs: base + {report['shape']['models']} × {report['parameters_per_model'] / 1e9:.2f} B parameters "
             f"({report['shape']['dtype']}), {report['input_bytes'] / 1e9:.2f} GB; "
             f"read floor {report['read_floor_s']:.2f} s; "
             f"{report['cpu_count']} CPUs, device {report['device']}",
             "| method | ours (s) | mergekit (s) | time ratio | ours peak RSS (GB) | mergekit peak RSS (GB) "
             "| memory ratio | outputs agree |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        def fmt(key: str, f: str, r: dict = r) -> str:
            return f.format(r[key]) if key in r else "–"
        lines.append(f"| {r['method']} | {fmt('ours_s', '{:.2f}')} | {fmt('mergekit_s', '{:.2f}')} "
                     f"| {fmt('time_ratio', '{:.3f}')} | "
                     f"{r['ours_peak_bytes'] / 1e9:.2f} | "
                     f"{(r['mergekit_peak_bytes'] / 1e9) if 'mergekit_peak_bytes' in r else float('nan'):.2f} | "
                     f"{fmt('memory_ratio', '{:.3f}')} | {r.get('outputs_agree', '–')} |")
    lines += ["", "our exact analysis (`analyze --exact`) against our merge of the same config, each without "
              "start-up:",
              "| method | merge (s) | exact analysis (s) | of which spectra (s) | analysis / merge "
              "| without spectra / merge | analysis peak RSS (GB) | memory ratio |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        spectral = r.get("analysis_spectral_s", 0.0)
        rest = (r["analysis_s"] - spectral) / r["ours_merge_s"] if r["ours_merge_s"] else float("nan")
        lines.append(f"| {r['method']} | {r['ours_merge_s']:.2f} | {r['analysis_s']:.2f} | {spectral:.2f} "
                     f"| {r['analysis_ratio']:.2f} | {rest:.2f} "
                     f"| {r['analysis_peak_bytes'] / 1e9:.2f} | {r['analysis_memory_ratio']:.2f} |")
    return "\n".join(lines)
