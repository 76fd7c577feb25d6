"""Views of a checkpoint under other names: a per-expert MoE checkpoint seen with its experts fused, as
transformers 5 holds them at runtime and as mergekit merges them.

transformers 5 loads the experts of Mixtral, Qwen2-MoE and their kin as one 3-D tensor per projection
(``mlp.experts.gate_up_proj`` of shape [experts, 2·intermediate, hidden], ``mlp.experts.down_proj`` of
[experts, hidden, intermediate]) and saves them back per expert. mergekit converts per-expert checkpoints to the
fused layout before merging, so a method that looks at a whole tensor (TIES' top-k, model_stock's angle, SLERP's
arc) sees all experts of a layer at once; merging the fused view gives mergekit's bytes, and the fused output is
what transformers 5 loads. A row of a fused tensor is one expert.
"""

from __future__ import annotations

import torch

from ..architectures import fused_expert_groups
from .base import CheckpointSource, SourceView, TensorSpec, frozen_specs


class FusedExperts(SourceView):
    def __init__(self, source: CheckpointSource, groups: dict[str, list[list[str]]], renames: dict[str, str]) -> None:
        super().__init__(source)
        self._groups = groups
        self._renames = renames
        inner = source.specs()
        part_of = {p: fused for fused, experts in groups.items() for parts in experts for p in parts}
        back = {v: k for k, v in renames.items()}
        specs: dict[str, TensorSpec] = {}
        for name, spec in inner.items():
            fused = part_of.get(name)
            if fused is None:
                specs[back.get(name, name)] = spec
            elif fused not in specs:
                first = [inner[p] for p in groups[fused][0]]
                rows = sum(s.shape[0] for s in first)
                specs[fused] = TensorSpec(first[0].dtype, (len(groups[fused]), rows, *first[0].shape[1:]))
        self._specs = frozen_specs(specs)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        experts = self._groups.get(name)
        if experts is None:
            return self._src.read(self._renames.get(name, name), rows)
        lo, hi = rows if rows is not None else (0, len(experts))
        if hi <= lo:
            spec = self._specs[name]
            return self._src.read(experts[0][0], (0, 0)).reshape(0, *spec.shape[1:])
        return torch.stack([torch.cat([self._src.read(p) for p in experts[e]]) for e in range(lo, hi)])

    def notes(self) -> list[str]:
        return [f"{self.label}: per-expert weights read fused ({len(self._groups)} tensors such as "
                f"{next(iter(self._groups))}), as transformers 5 loads them and mergekit merges them",
                *self._src.notes()]

    def __getattr__(self, item):  # Hub sources' extras (network_bytes, weight_files, ...) pass through
        src = self.__dict__.get("_src")
        if src is None:
            raise AttributeError(item)
        return getattr(src, item)


def fuse_experts(source: CheckpointSource, config: dict | None) -> CheckpointSource:
    """``source`` seen with its experts fused when it is a per-expert checkpoint of a family transformers 5 fuses."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    groups, renames = fused_expert_groups(list(source.specs()), model_type)
    return FusedExperts(source, groups, renames) if groups else source
