"""``python -m merging bench --device cuda``: CUDA merges against the host→device copy floor and our CPU kernels.

A merge on a GPU still reads every input from the host: its floor is the time to copy the input bytes from pinned
host memory to the device (measured here, best of five copies of 256 MB). For each method, each in its own
process, best of ``repeat``: the CUDA merge's own seconds (``run_merge``'s, without the interpreter's start), its
input throughput, the share of the copy floor it reaches (floor ÷ merge; the goal is at least 50 %), the same
merge on the CPU with our fused kernels, and whether the CUDA output has the same bytes as the torch reference on
the CPU (``MERGESCOPE_NATIVE=0``; deterministic methods only).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import time
from pathlib import Path

from ..errors import MergeError
from .local import RANDOM_METHODS, Shape, checked, reported_seconds, run_measured

COPY_BYTES = 256 << 20


def copy_bandwidth() -> float:
    """Host→device bytes per second from pinned memory (best of five)."""
    import torch

    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return COPY_BYTES / best


def bench_gpu(shape: Shape, methods: list[str], repeat: int, workdir: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise MergeError("bench --device cuda: no CUDA device is available on this machine")
    models = workdir / "models"
    input_bytes = sum(f.stat().st_size for d in models.iterdir() if d.is_dir() for f in d.glob("*.safetensors"))
    bandwidth = copy_bandwidth()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HUB_OFFLINE": "1"}
    rows = []
    for method in methods:
        cfg = workdir / f"{method}.yml"  # written by the local bench that ran first
        row = {"method": method}
        for device, extra in (("cuda", {}), ("cpu", {}), ("cpu-torch", {"MERGESCOPE_NATIVE": "0"})):
            if device == "cpu-torch" and method in RANDOM_METHODS:
                continue
            out = workdir / f"out_gpu_{device}_{method}"
            best = float("inf")
            for _ in range(repeat if device != "cpu-torch" else 1):
                shutil.rmtree(out, ignore_errors=True)
                stdout = checked(f"the {device} merge", method, run_measured(
                    [sys.executable, "-m", "merging", "merge", str(cfg), str(out), "--device", device[:4]],
                    {**env, **extra}))[4]
                best = min(best, reported_seconds(stdout, r" in ([0-9.]+) s on ") or float("inf"))
            row[f"{device}_s"] = best
        if "cpu-torch_s" in row:
            a, b = workdir / f"out_gpu_cuda_{method}", workdir / f"out_gpu_cpu-torch_{method}"
            files = sorted(p.name for p in a.glob("*.safetensors"))
            row["same_bytes_as_cpu_torch"] = bool(files) and all(filecmp.cmp(a / f, b / f, shallow=False)
                                                                 for f in files)
        rows.append(row)
    return {"device": torch.cuda.get_device_name(), "input_bytes": input_bytes, "copy_bytes_per_s": bandwidth,
            "copy_floor_s": input_bytes / bandwidth, "results": rows}


def format_gpu_table(report: dict) -> str:
    floor = report["copy_floor_s"]
    lines = [f"{report['device']}: host→device copy {report['copy_bytes_per_s'] / 1e9:.1f} GB/s from pinned memory; "
             f"floor for {report['input_bytes'] / 1e9:.2f} GB of inputs {floor:.2f} s",
             "| method | CUDA merge (s) | input GB/s | share of the copy floor | CPU kernels (s) | CUDA ÷ CPU "
             "| same bytes as the CPU torch path |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        same = {True: "yes", False: "no"}.get(r.get("same_bytes_as_cpu_torch"), "n/a (random)")
        lines.append(f"| {r['method']} | {r['cuda_s']:.2f} | {report['input_bytes'] / r['cuda_s'] / 1e9:.2f} "
                     f"| {floor / r['cuda_s']:.0%} | {r['cpu_s']:.2f} | {r['cuda_s'] / r['cpu_s']:.2f} | {same} |")
    return "\n".join(lines)
