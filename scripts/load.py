"""Many visitors at once against a public app: N gradio_client sessions each run /analyze, then /merge.

Starts the real app (``app.build_app``, local paths off, the merge limit of a Space) on 127.0.0.1 in this
process, with the demo zoo, and reports: errors, whether every merged file equals ``run_merge``'s for the same
config (the model card and merge_config.yml as a public server names the demo models), whether any two sessions
shared a folder, the process's peak resident memory, and how long until the idle API sessions' folders are gone
(the idle timer is shortened to ``--idle`` seconds for the run).

    python scripts/load.py [--sessions 16] [--idle 10] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--idle", type=float, default=10.0, help="the API sessions' idle timer for this run (s)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import gradio_client
    import yaml
    from app_server import running_app
    from test_concurrency import CONFIGS

    from merging.config import parse_config
    from merging.engine import run_merge

    texts = [yaml.safe_dump(CONFIGS[i % len(CONFIGS)], sort_keys=False) for i in range(args.sessions)]
    with tempfile.TemporaryDirectory() as tmp, running_app(Path(tmp) / "cache", allow_local_paths=False,
                                                          merge_concurrency=2) as served:
        clients = [gradio_client.Client(served.url, verbose=False, download_files=False)
                   for _ in range(args.sessions)]
        barrier = threading.Barrier(args.sessions)

        def visit(i: int):
            barrier.wait()
            try:
                # the analysis compares task vectors: configs without a base (linear) only merge
                stats = clients[i].predict(texts[i], api_name="/analyze") if "base_model:" in texts[i] else None
                return stats, clients[i].predict(texts[i], api_name="/merge"), None
            except Exception as exc:  # noqa: BLE001 - counted and shown: the figure is how many
                return None, None, f"{type(exc).__name__}: {exc}"

        started = time.monotonic()
        with ThreadPoolExecutor(args.sessions) as pool:
            results = list(pool.map(visit, range(args.sessions)))
        wall = time.monotonic() - started
        errors = [e for _, _, e in results if e]
        mismatches, folders = [], set()
        for i, (_stats, merged, error) in enumerate(results):
            if error:
                continue
            files, _archive, _summary = merged
            expected_dir = Path(tmp) / f"direct-{i}"
            run_merge(parse_config(texts[i]), expected_dir)
            for f in files:
                path = Path(f["path"])
                want = (expected_dir / path.name).read_bytes()
                if path.name in ("README.md", "merge_config.yml"):
                    want = served.settings.redact(want.decode()).encode()
                if path.read_bytes() != want:
                    mismatches.append(f"session {i}: {path.name}")
            folders.add(served.sessions.get(clients[i].session_hash).folder)
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        served.sessions.api_idle_s = args.idle
        idle_from = time.monotonic()
        while time.monotonic() - idle_from < args.idle + 120 and any(served.sessions.root.iterdir()):
            served.sessions.sweep()
            time.sleep(0.5)
        removed_after = time.monotonic() - idle_from
        left = sorted(p.name for p in served.sessions.root.iterdir())

    figures = {"sessions": args.sessions, "wall_s": round(wall, 1), "errors": len(errors),
               "mismatched_files": len(mismatches), "distinct_folders": len(folders),
               "peak_rss_gb": round(peak_gb, 2), "idle_timer_s": args.idle,
               "folders_removed_after_s": round(removed_after, 1), "folders_left": len(left)}
    for line in errors[:5] + mismatches[:5]:
        print(line)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    return 0 if not errors and not mismatches and not left and len(folders) == args.sessions - len(errors) else 1


if __name__ == "__main__":
    raise SystemExit(main())
