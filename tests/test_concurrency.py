"""Many users at once: eight gradio_client sessions merge eight different configs against one public app whose
merge concurrency limit is 2.

- Every result is right: each file equals, byte for byte, what ``run_merge`` writes for the same config.
- The limit holds: the app's merge function (``components.merge_panel.run_merge``) is wrapped, server-side, by a
  counter of merges in flight; the largest count seen must be exactly 2 (held, and actually reached: a 10 ms
  pause per tensor (the app's test throttle) makes each merge last long enough to overlap).
- Sessions are isolated: each merges into its own random folder; download links differ and name nothing but that
  random folder; a link with another random folder is refused; asking ``/merge`` to read another session's output
  is refused.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

gradio_client = pytest.importorskip("gradio_client")

from app_server import running_app  # noqa: E402

from merging.config import parse_config  # noqa: E402
from merging.engine import run_merge  # noqa: E402

LIMIT = 2
ZOO = "assets/zoo/"


def model(name: str, **params) -> dict:
    return {"model": ZOO + name, **({"parameters": params} if params else {})}


CONFIGS = [
    {"merge_method": "linear", "models": [model("digits", weight=0.5), model("parity", weight=0.5)]},
    {"merge_method": "task_arithmetic", "base_model": ZOO + "base",
     "models": [model("greater4", weight=1.0), model("rotated", weight=1.0)], "parameters": {"lambda": 0.3}},
    {"merge_method": "ties", "base_model": ZOO + "base", "parameters": {"lambda": 1.0},
     "models": [model(m, density=0.2, weight=1.0) for m in ("digits", "mirrored", "inverted")]},
    {"merge_method": "dare_ties", "base_model": ZOO + "base", "seed": 7,
     "models": [model("noisy", density=0.5, weight=1.0), model("shifted", density=0.5, weight=1.0)]},
    {"merge_method": "breadcrumbs", "base_model": ZOO + "base",
     "models": [model("parity", weight=1.0), model("greater4", weight=1.0)]},
    {"merge_method": "slerp", "base_model": ZOO + "digits", "models": [model("digits"), model("noisy")],
     "parameters": {"t": 0.3}},
    {"merge_method": "model_stock", "base_model": ZOO + "base",
     "models": [model("rotated"), model("mirrored"), model("shifted")]},
    {"merge_method": "della", "base_model": ZOO + "base", "seed": 3,
     "models": [model("inverted", density=0.5, weight=1.0), model("digits", density=0.5, weight=1.0)]},
]


class InFlight:
    """Counts merges running at once, by wrapping the function the app's merge endpoint calls."""

    def __init__(self, fn):
        self.fn = fn
        self.now = self.max = self.calls = 0
        self.lock = threading.Lock()
        self.intervals: list[tuple[float, float]] = []

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.now += 1
            self.calls += 1
            self.max = max(self.max, self.now)
        start = time.monotonic()
        try:
            return self.fn(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1
                self.intervals.append((start, time.monotonic()))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("cache"), prefer_zoo=True, allow_local_paths=False,
                     merge_concurrency=LIMIT, tensor_delay_s=0.01) as running:
        yield running


def test_eight_sessions_merge_different_configs_at_once(served, tmp_path, monkeypatch):
    import components.merge_panel as merge_panel

    counter = InFlight(merge_panel.run_merge)
    monkeypatch.setattr(merge_panel, "run_merge", counter)
    clients = [gradio_client.Client(served.url, verbose=False, download_files=False) for _ in CONFIGS]
    texts = [yaml.safe_dump(c, sort_keys=False) for c in CONFIGS]
    barrier = threading.Barrier(len(clients))

    def one(i: int):
        barrier.wait()  # all eight submit together
        return clients[i].predict(texts[i], api_name="/merge")

    started = time.monotonic()
    with ThreadPoolExecutor(len(clients)) as pool:
        results = list(pool.map(one, range(len(clients))))
    wall = time.monotonic() - started

    # The limit held, and was reached.
    assert counter.calls == len(CONFIGS)
    assert counter.max == LIMIT, f"{counter.max} merges ran at once; the limit is {LIMIT}"
    busy = sum(end - start for start, end in counter.intervals)
    assert wall >= busy / LIMIT * 0.9, (wall, busy)  # the merges' total time could not have run wider than 2

    # Every result equals the library's merge of the same config, file by file.
    folders = []
    for i, (files, _archive, summary) in enumerate(results):
        expected_dir = tmp_path / f"direct-{i}"
        expected = run_merge(parse_config(texts[i]), expected_dir)
        got = {Path(f["path"]).name: Path(f["path"]) for f in files}
        assert set(got) == set(expected.files), (CONFIGS[i]["merge_method"], sorted(got))
        for name, path in got.items():
            want = (expected_dir / name).read_bytes()
            if name in ("README.md", "merge_config.yml"):  # a public server names the demo models demo:NAME
                want = served.settings.redact(want.decode()).encode()
            assert path.read_bytes() == want, (CONFIGS[i]["merge_method"], name)
        assert summary["tensors"] == expected.tensors
        folders.append({Path(f["path"]).parent.parent for f in files}.pop())

    # Each session wrote into its own folder; download links name only that random folder.
    session_folders = {served.sessions.get(c.session_hash).folder for c in clients}
    assert set(folders) == session_folders and len(session_folders) == len(clients)
    for client, (files, archive, _) in zip(clients, results):
        for f in files + [archive]:
            if f is None:
                continue
            folder = Path(f["path"]).parent.parent if "/merge-" in f["path"].rsplit("/", 1)[0] else Path(f["path"]).parent
            assert re.fullmatch(r"[0-9a-f]{24}", folder.name), folder  # 96 random bits
            assert client.session_hash not in f["url"]
    links = [f["url"] for files, _, _ in results for f in files]
    assert len(set(links)) == len(links)


def test_no_session_reaches_another_sessions_files(served):
    clients = [gradio_client.Client(served.url, verbose=False, download_files=False) for _ in range(3)]
    outputs = [c.predict(yaml.safe_dump(CONFIGS[i]), api_name="/merge")[0] for i, c in enumerate(clients)]
    for i, client in enumerate(clients):
        other = outputs[(i + 1) % len(clients)]
        other_model = next(f["path"] for f in other if f["path"].endswith(".safetensors"))
        for ref in (other_model, str(Path(other_model).parent), str(Path(other_model).parent.parent)):
            cfg = dict(CONFIGS[0], models=[model("digits"), {"model": ref}])
            for api in ("/merge", "/analyze"):
                with pytest.raises(gradio_client.exceptions.AppError) as err:
                    client.predict(yaml.safe_dump(cfg), api_name=api)
                assert "local paths are disabled" in str(err.value) and "\n" not in str(err.value)
        # A link is a capability: the same file under a guessed folder name does not exist.
        own = next(f for f in outputs[i] if f["path"].endswith(".safetensors"))
        folder = Path(own["path"]).parent.parent.name
        guessed = own["url"].replace(folder, secrets.token_hex(12))
        assert httpx.get(guessed).status_code in (403, 404)
        assert httpx.get(own["url"]).status_code == 200
