import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from checkpoints import write_family  # noqa: E402


@pytest.fixture
def family(tmp_path):
    """A float32 base with three fine-tunes, two layers, llama names."""
    return write_family(tmp_path / "models", n_models=3)


@pytest.fixture
def family_bf16(tmp_path):
    return write_family(tmp_path / "models16", n_models=3, dtype="bfloat16")
