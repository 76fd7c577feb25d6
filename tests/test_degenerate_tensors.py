"""Every registered method on degenerate tensors: zero task vectors, rank-1 task vectors, 1×N and N×1 matrices, and
NaN in a fine-tune. Parametrized over ``REGISTRY``, so a method added later (the SVD-based ones: TSV-M, Iso-C, ...)
is held to the same rule without a new line here: the merge either finishes with finite weights of the right shape
(NaN inputs: reported in the notes) or refuses with one line and leaves no folder; never a traceback.

Each case is a real checkpoint on disk (a base and two fine-tunes of one 2-D tensor) merged through the CLI's
entry point with the method's smallest valid config (tests/test_methods_cli.py's ``minimal_config``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from checkpoints import load_folder, save_checkpoint
from test_bad_inputs import run_cli
from test_methods_cli import minimal_config

from merging.methods import REGISTRY

NAME = "model.layers.0.mlp.up_proj.weight"


def _tensors(case: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    shape = {"row_1xN": (1, 24), "column_Nx1": (24, 1)}.get(case, (12, 16))
    base = torch.randn(*shape, generator=g)
    if case == "zero_task_vectors":
        return base, [base.clone(), base.clone()]
    if case == "rank_1":
        u, v = torch.randn(shape[0], 1, generator=g), torch.randn(1, shape[1], generator=g)
        return base, [base + 0.1 * u @ v, base - 0.05 * u @ v]
    tunes = [base + 0.05 * torch.randn(*shape, generator=g) for _ in range(2)]
    if case == "nan_fine_tune":
        tunes[1][0, :3] = float("nan")
    return base, tunes


CASES = ["zero_task_vectors", "rank_1", "row_1xN", "column_Nx1", "nan_fine_tune"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_degenerate_tensors_merge_or_are_refused_in_one_line(name, case, tmp_path):
    base, tunes = _tensors(case)
    save_checkpoint(tmp_path / "base", {NAME: base})
    folders = [save_checkpoint(tmp_path / f"ft{i}", {NAME: t}) for i, t in enumerate(tunes)]
    # the NaN fine-tune first: a method that takes one model takes that one
    config = minimal_config(REGISTRY[name], tmp_path / "base", folders[::-1], dtype="float32")
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = tmp_path / "out"
    done = run_cli("merge", str(tmp_path / "config.yml"), str(out))
    assert "Traceback" not in done.stderr
    if done.returncode != 0:  # refused: one line naming the problem, nothing left behind
        assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
        assert not out.exists() and not list(tmp_path.glob(".out.*"))
        return
    merged = load_folder(out)
    for tensor in merged.values():
        assert tensor.dtype.is_floating_point or tensor.dtype == torch.uint8
    if REGISTRY[name].model_output:
        assert merged[NAME].shape == base.shape
    used = [Path(m["model"]).name for m in config["models"]]
    if case == "nan_fine_tune" and "ft1" in used:  # the NaN is said, whether it reached the output or not
        assert "NaN/Inf" in done.stdout, done.stdout
    elif REGISTRY[name].model_output:
        assert bool(torch.isfinite(merged[NAME]).all()), done.stdout
