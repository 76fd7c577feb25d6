"""``python -m merging bench --hub``: merges streamed from a Hub behind a shaped link, as a Space sees them.

The synthetic checkpoints (``bench.local.write_models``) are served by the loopback Hub (``merging.hub.loopback``:
model info, a redirect to a CDN on a second port, range requests) through one ``LinkShape`` at a time: a total
bandwidth B, optionally a cap per connection, and a round-trip time added per request, per redirect and per new
connection. For each method, each in its own process, best of ``repeat``:

- **streamed**: ``python -m merging merge`` on the repo ids (``MERGESCOPE_HF_ENDPOINT``): the process's wall time
  and the merge's own (``run_merge``'s seconds: opening the repos, streaming, writing; not the interpreter's
  start), the bytes the server sent, its requests and connections;
- **the link floor**: those bytes ÷ B, the least any client could take;
- **download, then merge** (what mergekit users do): ``snapshot_download`` of every repo into a folder, then
  ``python -m merging merge`` on the folders; both processes' wall times added.

Then, once per link, the sampled analysis (``python -m merging analyze --sample F``) of the first method's config:
its time, the bytes the server sent and its requests. The server runs in this process (its threads mostly sleep
on the link's clock); every measured command is a child process, as a user's would be.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..hub.link import LinkShape
from ..hub.loopback import LoopbackHub
from .local import ANALYSIS_SECONDS, METHOD_PARAMS, Shape, checked, reported_seconds, run_measured, write_models

# what mergekit does for each model before merging: snapshot_download of the repo (here into a plain folder)
_DOWNLOAD = """
import sys
from huggingface_hub import snapshot_download
endpoint, root = sys.argv[1], sys.argv[2]
for repo in sys.argv[3:]:
    snapshot_download(repo, endpoint=endpoint, local_dir=f"{root}/{repo}", token=False)
"""


def _config(method: str, base: str, tunes: list[str], dtype: str) -> str:
    if method == "emr":
        models = "\n".join(f"  - model: {t}" for t in tunes)
    else:
        models = "\n".join(f"  - model: {t}\n    parameters: {{weight: 1.0}}" for t in tunes)
    return (f"merge_method: {method}\nbase_model: {base}\nmodels:\n{models}\n"
            f"parameters: {json.dumps(METHOD_PARAMS.get(method, {}))}\ndtype: {dtype}\n")


def _env(hub: LoopbackHub, workdir: Path) -> dict[str, str]:
    """A child's environment: this checkout, the loopback Hub as the endpoint, no token, an empty HF home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(PYTHONPATH=str(Path(__file__).resolve().parents[2]), MERGESCOPE_HF_ENDPOINT=hub.url,
               HF_ENDPOINT=hub.url, HF_HOME=str(workdir / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    return env


def _best(runs: list[dict], key: str = "wall") -> dict:
    return min(runs, key=lambda r: r[key])


def bench_hub(shape: Shape, methods: list[str], links: list[LinkShape], repeat: int, workdir: Path,
              sample: float = 0.05) -> dict:
    base, tunes = write_models(workdir / "hub-models", shape)  # not `bench`'s models: each would rewrite the other's
    repos = {"bench/base": base, **{f"bench/ft{k}": t for k, t in enumerate(tunes)}}
    input_bytes = sum(f.stat().st_size for d in repos.values() for f in d.glob("*.safetensors"))
    rows, analyses = [], []
    for link in links:
        hub = LoopbackHub(link)
        for repo, folder in repos.items():
            hub.add_repo(repo, folder)
        with hub:
            env = _env(hub, workdir)
            for method in methods:
                cfg = workdir / f"hub-{method}.yml"
                cfg.write_text(_config(method, "bench/base", list(repos)[1:], shape.dtype))
                row = {"link": link.describe(), "method": method, "bandwidth": link.total_bps,
                       "rtt_s": link.rtt_s, **_streamed(hub, cfg, workdir, env, repeat)}
                row["floor_s"] = row["served_bytes"] / link.total_bps if link.total_bps else None
                row.update(_download_then_merge(hub, method, repos, shape, workdir, env, repeat))
                rows.append(row)
            analyses.append({"link": link.describe(), "sample": sample,
                             **_sampled_analysis(hub, workdir / f"hub-{methods[0]}.yml", workdir, env, sample,
                                                 repeat)})
    return {"shape": {**shape.__dict__}, "parameters_per_model": shape.parameters(), "input_bytes": input_bytes,
            "cpu_count": os.cpu_count(), "results": rows, "analyses": analyses}


def _streamed(hub: LoopbackHub, cfg: Path, workdir: Path, env: dict, repeat: int) -> dict:
    out = workdir / "out_hub"
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        hub.reset_counts()
        wall, peak, _, _, stdout = checked("the streamed merge", cfg.stem, run_measured(
            [sys.executable, "-m", "merging", "merge", str(cfg), str(out)], env))
        runs.append({"wall": wall, "merge_s": reported_seconds(stdout, r" in ([0-9.]+) s on "), "peak_bytes": peak,
                     "served_bytes": hub.served(), **hub.counts()})
    best = _best(runs)
    return {"streamed_s": best["wall"], "streamed_merge_s": best["merge_s"], "streamed_peak_bytes": best["peak_bytes"],
            "served_bytes": best["served_bytes"], "requests": best["requests"], "connections": best["connections"],
            "max_in_flight": best["max_in_flight"]}


def _download_then_merge(hub: LoopbackHub, method: str, repos: dict, shape: Shape, workdir: Path, env: dict,
                         repeat: int) -> dict:
    root = workdir / "downloaded"
    cfg = workdir / f"downloaded-{method}.yml"
    cfg.write_text(_config(method, str(root / "bench/base"), [str(root / r) for r in list(repos)[1:]], shape.dtype))
    out = workdir / "out_downloaded"
    runs = []
    for _ in range(repeat):
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        download = checked("snapshot_download", method, run_measured(
            [sys.executable, "-c", _DOWNLOAD, hub.url, str(root), *repos], env))[0]
        merge = checked("the merge of the downloaded models", method, run_measured(
            [sys.executable, "-m", "merging", "merge", str(cfg), str(out)], env))[0]
        runs.append({"wall": download + merge, "download": download, "merge": merge})
    best = _best(runs)
    return {"download_s": best["download"], "downloaded_merge_s": best["merge"], "download_then_merge_s": best["wall"]}


def _sampled_analysis(hub: LoopbackHub, cfg: Path, workdir: Path, env: dict, sample: float, repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        hub.reset_counts()
        wall, peak, _, _, stdout = checked("the sampled analysis", cfg.stem, run_measured(
            [sys.executable, "-m", "merging", "analyze", str(cfg), "--sample", str(sample), "--json",
             str(workdir / "analysis.json")], env))
        runs.append({"wall": wall, "analysis_s": reported_seconds(stdout, ANALYSIS_SECONDS),
                     "read_bytes": json.loads((workdir / "analysis.json").read_text())["meta"]["bytes_read"],
                     "served_bytes": hub.served(), "peak_bytes": peak, **hub.counts()})
    return _best(runs)


def format_hub_table(report: dict) -> str:
    def num(value, fmt: str) -> str:
        return "–" if value is None else fmt.format(value)

    shape = report["shape"]
    lines = [f"inputs: base + {shape['models']} × {report['parameters_per_model'] / 1e9:.2f} B parameters "
             f"({shape['dtype']}), {report['input_bytes'] / 1e9:.2f} GB, served by the loopback Hub (127.0.0.1, a "
             f"redirect to its CDN) behind each link; {report['cpu_count']} CPUs",
             "| link | method | streamed (s) | of which the merge (s) | link floor (s) | merge ÷ floor "
             "| download + merge (s) | streamed ÷ download+merge | read (GB) | requests | connections |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        floor, merge = r["floor_s"], r["streamed_merge_s"]
        lines.append(
            f"| {r['link']} | {r['method']} | {r['streamed_s']:.2f} | {num(merge, '{:.2f}')} | {num(floor, '{:.2f}')} "
            f"| {num(merge / floor if merge and floor else None, '{:.2f}')} | {r['download_then_merge_s']:.2f} "
            f"({r['download_s']:.2f} + {r['downloaded_merge_s']:.2f}) "
            f"| {r['streamed_s'] / r['download_then_merge_s']:.2f} | {r['served_bytes'] / 1e9:.2f} "
            f"| {r['requests']} | {r['connections']} |")
    lines += ["", "| link | sampled analysis (s) | of which the analysis (s) | rows read (MB) | sent by the Hub (MB) "
              "| requests |", "|---|---|---|---|---|---|"]
    for a in report["analyses"]:
        lines.append(f"| {a['link']} ({a['sample']:.0%} of rows) | {a['wall']:.2f} | {num(a['analysis_s'], '{:.2f}')} "
                     f"| {a['read_bytes'] / 1e6:.1f} | {a['served_bytes'] / 1e6:.1f} | {a['requests']} |")
    return "\n".join(lines)
