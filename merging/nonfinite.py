"""NaN and Inf during a merge: counted in the merged tensors and in the inputs, and reported in the notes.

A merged tensor's NaN/Inf come from its inputs and are always reported (``refuse_nonfinite`` stops the merge at the
first). Some methods also make an input's NaN disappear: TIES' sign election and trim, DARE's drop and
breadcrumbs' cut compare magnitudes, and a NaN loses every comparison, so a fine-tune full of NaN is silently left
out and the merge looks clean. Counting the inputs too makes that visible: the notes (CLI, app status, model card)
name each input with non-finite values, and say when the method dropped them.

The inputs are counted only for methods that may drop a NaN: a weighted sum or an interpolation carries every
input's NaN into the merged tensor, where it is counted anyway, so those (``PROPAGATING``) pay nothing more; any
other method, a new one included, has its inputs counted: on the CPU by a kernel that reads their exponent bits as
stored (``native.ops.count_nonfinite``); elsewhere, a finite float32-accumulated sum proves a tensor finite (NaN
and Inf propagate through a sum) and only a non-finite sum pays for an exact count.
"""

from __future__ import annotations

import torch

from . import native
from .errors import MergeError
from .native import ops

# Methods whose merged value at an element is NaN whenever an input's is (weights of 0 too: 0 · NaN = NaN).
PROPAGATING = frozenset({"linear", "task_arithmetic", "slerp", "nuslerp", "model_stock", "passthrough"})


# Methods with no meaning for a NaN input: their SVDs do not converge on one (TSV-M, Iso-C/CTS, CART), or a
# whole-model ranking cannot place it (PCB's scores). Such an input is refused in one line, naming it.
FINITE_ONLY = frozenset({"tsv_m", "iso_c", "iso_cts", "cart", "pcb"})


def require_finite(method: str, task, base: torch.Tensor | None, models: list[torch.Tensor]) -> None:
    """For a ``FINITE_ONLY`` method: refuse the first input of this unit holding NaN/Inf, naming model and tensor."""
    if method in FINITE_ONLY:
        for ref, bad in _nonfinite_inputs(task, base, models):
            _refuse_input(method, ref, task, bad)


def _nonfinite_inputs(task, base: torch.Tensor | None, models: list[torch.Tensor]):
    """(input ref, NaN/Inf count) for each input of the unit that has any (``task``: a merging.tasks.TensorTask)."""
    pairs = ([(task.base, base)] if task.base is not None and base is not None else []) + list(zip(task.inputs, models))
    for ref, tensor in pairs:
        bad = count(tensor)
        if bad:
            yield ref, bad


def _refuse_input(method: str, ref, task, bad: int) -> None:
    raise MergeError(f"input {ref.model}: tensor {task.name} holds {bad} NaN/Inf values; {method} needs "
                     "finite inputs (find them with `python -m merging inspect`)")


def count(tensor: torch.Tensor) -> int:
    """NaN/Inf values in ``tensor`` (0 for integer tensors): by the fused kernel where it takes the tensor (its bits
    read as stored, on every core), else from a float32-accumulated sum."""
    if not tensor.is_floating_point():
        return 0
    if native.usable(tensor.device, tensor):
        return ops.count_nonfinite(tensor)
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32 if tensor.dtype != torch.float64 else torch.float64))):
        return 0
    return int(tensor.numel() - torch.isfinite(tensor).sum())


class NonFinite:
    """The counts of one merge: per merged tensor, and per input model and tensor."""

    def __init__(self, refuse: bool, method: str) -> None:
        self.refuse, self.method = refuse, method
        self.count_inputs = method not in PROPAGATING
        self.merged: dict[str, int] = {}
        self.inputs: dict[str, dict[str, int]] = {}  # model -> tensor -> values
        self.checked: set[str] = set()  # merged tensors counted (a method's several outputs are not)

    def check_inputs(self, task, base: torch.Tensor | None, models: list[torch.Tensor]) -> None:
        """Count the unit's inputs (``task``: a merging.tasks.TensorTask, ``base`` and ``models`` as read), unless
        the method carries every NaN into its output."""
        if not self.count_inputs:
            return
        for ref, bad in _nonfinite_inputs(task, base, models):  # counted once, refused or recorded
            if self.method in FINITE_ONLY:
                _refuse_input(self.method, ref, task, bad)
            per_tensor = self.inputs.setdefault(ref.model, {})
            per_tensor[task.name] = per_tensor.get(task.name, 0) + bad

    def check_merged(self, tensor: torch.Tensor, name: str, bad: int | None = None) -> None:
        """Count a merged unit (``bad``: the count when a kernel already took it); stop at the first when refusing."""
        self.checked.add(name)
        if not tensor.is_floating_point():
            return
        bad = count(tensor) if bad is None else bad
        if bad:
            if self.refuse:
                raise MergeError(f"{name}: {bad} NaN/Inf values in the merged tensor (refuse_nonfinite is set); "
                                 "check the inputs with `python -m merging inspect`")
            self.merged[name] = self.merged.get(name, 0) + bad

    def notes(self) -> list[str]:
        """One note per merged tensor with NaN/Inf, then one per input model with NaN/Inf (and whether the method
        dropped them: every tensor they were in came out finite)."""
        notes = [f"{name}: {n} NaN/Inf values in the merged tensor" for name, n in self.merged.items()]
        for model, per_tensor in self.inputs.items():
            names = list(per_tensor)
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            total = sum(per_tensor.values())
            line = f"input {model}: {total} NaN/Inf values in {len(names)} tensor{'s' * (len(names) != 1)} ({shown})"
            if all(name in self.checked and name not in self.merged for name in names):
                line += (f"; {self.method} dropped them (the merged tensors are finite): this input counts for nothing "
                         "where they are")
            notes.append(line)
        return notes
