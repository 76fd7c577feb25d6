"""The fake-Hub world the Hub tests share: checkpoints on disk and the same checkpoints as repos on tests/fakehub.py.

tests/conftest.py turns ``hub_world`` into the ``world`` fixture and ``clear_ambient_token`` into
``no_ambient_token``, which the Hub test modules use.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import yaml
from checkpoints import load_folder, save_checkpoint, write_family
from fakehub import FakeHub

from merging.hub import hub_resolver

SECRET = "hf_TestSecretToken0123456789abcdefXYZ"
DIMS = dict(hidden=128, intermediate=512, vocab=2048, layers=2)  # about 4.2 MB per checkpoint


@contextmanager
def hub_world(root: Path):
    """Checkpoints on disk under ``root`` and the same checkpoints as repos on a running fake Hub."""
    base, (ft0, ft1, ft2) = write_family(root / "models", n_models=3, **DIMS)
    sharded = save_checkpoint(root / "ft1-sharded", load_folder(ft1), yaml.safe_load((ft1 / "config.json").read_text()),
                              shards=3)
    # Many Hub repos carry a pickle copy and training files next to the safetensors: never downloaded.
    (ft0 / "pytorch_model.bin").write_bytes(b"\0" * 1000)
    (ft0 / "training_args.bin").write_bytes(b"\0" * 100)
    _, (small,) = write_family(root / "small", n_models=1, hidden=64, intermediate=128, vocab=2048, layers=2)
    pickled = root / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\0" * 100)
    hub = FakeHub()
    hub.add_repo("acme/base", base, downloads=900, likes=5)
    hub.add_repo("acme/ft0", ft0, downloads=300, base_models=["acme/base"], revisions={"v2": ft2})
    hub.add_repo("acme/ft1", sharded, downloads=500, base_models=["acme/base"])
    hub.add_repo("acme/ft-lora", ft2, downloads=700, base_models=["acme/base"], relation="adapter")
    hub.add_repo("acme/gated", ft2, downloads=10, base_models=["acme/base"], gated_token=SECRET)
    hub.add_repo("other/small", small, downloads=50, base_models=["other/base"])
    hub.add_repo("acme/pickled", pickled, downloads=20)
    with hub:
        yield dict(hub=hub, base=base, ft0=ft0, ft1=ft1, ft1_sharded=sharded, ft2=ft2, root=root)


def clear_ambient_token(monkeypatch, tmp_path, world) -> None:
    """No HF_TOKEN and no stored login leak in from the machine; counters start at zero."""
    import huggingface_hub.constants as constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT", "MERGESCOPE_HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    world["hub"].reset_counts()


def resolver(world, **kw):
    return hub_resolver(endpoint=world["hub"].url, backoff_s=0.01, **kw)


def ta_config(base: str, a: str, b: str) -> str:
    return f"""
merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {a}, parameters: {{weight: 0.6}}}}
  - {{model: {b}, parameters: {{weight: [0.2, 0.9]}}}}
parameters: {{lambda: 0.8}}
"""


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


def total_size(*folders: Path) -> int:
    return sum(p.stat().st_size for f in folders for p in f.glob("*.safetensors"))
