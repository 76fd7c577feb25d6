"""Slices: layer ranges of several models stacked into one (passthrough frankenmerges), or merged range by range
with any method, as mergekit plans them.

- Each output block takes every per-block tensor of its source block: the templates are the union of the
  reference's per-block names over all its blocks, so a tensor only some blocks have (T5's relative attention
  bias, in block 0 alone) is copied where the source block has it. An output stack's first block gets such a
  first-block-only tensor from its source model's first block when its own source block lacks it (T5 computes
  the bias there for every block).
- A model with several stacks (encoder and decoder) is sliced per stack, through ``modules:`` (``encoder:``,
  ``decoder:``, each with its own slices), as mergekit requires.
- In a slice, the base is the slice's ``base_model`` or the config's and must be one of its sources; the others
  are merged onto it. ``t`` runs from 0 to 1 over each slice's blocks; a source's own parameters match their
  filters against the name it is read under (its block), shared ones against the output's name.
"""

from __future__ import annotations

from .architectures import layer_position, with_layer_position
from .config import Slice, slice_base, slice_inputs
from .errors import ConfigError
from .params import resolve
from .tasks import Planner, TensorRef, TensorTask

_PRE_HINTS = ("embed", "wte", "wpe", "patch", "cls_token", "pos_", "shared")


def plan_slices(planner: Planner, slices: list[Slice], names: list[str], shared: tuple, where: str
                ) -> list[TensorTask]:
    reference = planner.reference
    stacks = {layer_position(n)[0] for n in names if layer_position(n) is not None}
    if not stacks:
        raise ConfigError(f"config: slices need layered tensors, but {reference} has no `layers.N.` names")
    if len(stacks) > 1:
        labels = sorted(planner.layers.labels[s] for s in stacks)
        raise ConfigError(f"config{': ' + where if where else ''}: {reference} has {len(stacks)} layer stacks "
                          f"({', '.join(labels)}); slice each on its own with `modules:` "
                          f"({', '.join(f'{label}: {{slices: [...]}}' for label in labels)})")
    stack = stacks.pop()
    _check_ranges(planner, slices, stack, where)
    blocks_of = _template_blocks(names, stack)  # every per-block tensor (as its name in block 0) -> its blocks
    templates = list(blocks_of)
    every = set().union(*blocks_of.values())
    first_only = {t for t in templates if len(every) > 1 and blocks_of[t] == {0}}
    non_layer = [n for n in names if layer_position(n) is None]
    pre = [n for n in non_layer if any(h in n for h in _PRE_HINTS)]
    post = [n for n in non_layer if n not in pre]
    tasks: list[TensorTask] = []
    for name in pre:
        tasks += _task(planner, name, slices[0], lambda s, n=name: planner.input_name(s.model, n), 0.0, shared)
    out_layer = 0
    for sl in slices:
        start = sl.sources[0].layer_range[0]
        length = sl.sources[0].layer_range[1] - start
        for idx in range(length):
            t = idx / (length - 1) if length > 1 else 1.0
            for template in templates:
                if template in first_only and out_layer > 0:
                    continue

                def in_of(s, tpl=template, i=idx, first=out_layer == 0):
                    name = with_layer_position(tpl, s.layer_range[0] + i)
                    if first and tpl in first_only and name not in planner.specs(s.model):
                        return with_layer_position(tpl, 0)
                    return name

                lead = sl.sources[0]
                if template not in first_only and in_of(lead) not in planner.specs(lead.model) \
                        and blocks_of[template] != every:
                    continue  # a tensor only some blocks have, and this source block has not
                tasks += _task(planner, with_layer_position(template, out_layer), sl, in_of, t, shared)
            out_layer += 1
    for name in post:
        tasks += _task(planner, name, slices[-1], lambda s, n=name: planner.input_name(s.model, n), 0.0, shared)
    planner.layer_counts[stack] = out_layer
    if first_only:
        planner.report.notes.append(f"slices: {', '.join(sorted(first_only))} exist only in the first block; the "
                                    "output's first block takes them from its source model's first block")
    return tasks


def _task(planner: Planner, out_name: str, sl: Slice, in_of, t: float, shared: tuple) -> list[TensorTask]:
    config, method = planner.config, planner.method
    lead = sl.sources[0]
    lead_spec = planner.specs(lead.model).get(in_of(lead))
    if lead_spec is None:
        planner.report.missing.append(f"{in_of(lead)} (in {lead.model})")
        return []
    out_spec = planner.output_spec(lead_spec)
    scopes = (sl.parameters, *shared) if sl.parameters else shared
    if method.name == "passthrough" and lead_spec.is_float:
        params = resolve(method, scopes, [lead.parameters], out_name, t, input_names=[in_of(lead)])
        if params.get("scale", [None])[0] is not None:  # mergekit's `scale`: computed, not copied
            return [TensorTask(out_name, out_spec, None, [TensorRef(lead.model, in_of(lead))], params)]
    if method.name == "passthrough" or not lead_spec.is_float:
        return [TensorTask(out_name, out_spec, TensorRef(lead.model, in_of(lead)), [], copy=True)]
    base_ref = slice_base(config, sl)
    base_src = next((s for s in sl.sources if s.model == base_ref), None) if method.base != "none" else None
    others = slice_inputs(method, sl, base_ref)
    params = resolve(method, scopes, [s.parameters for s in others], out_name, t,
                     input_names=[in_of(s) for s in others])
    task = TensorTask(out_name, out_spec, TensorRef(base_src.model, in_of(base_src)) if base_src else None,
                      [TensorRef(s.model, in_of(s)) for s in others], params)
    for s in sl.sources:
        planner.check_input(task, lead_spec, s.model, in_of(s))
    return [task]


def _template_blocks(names: list[str], stack: str) -> dict[str, set[int]]:
    """Every per-block tensor of a stack, as its name in block 0 (in first-seen order), with the blocks that hold it:
    one pass over the names, so that a checkpoint of many tensors per block plans in time linear in its size."""
    out: dict[str, set[int]] = {}
    for n in names:
        pos = layer_position(n)
        if pos is not None and pos[0] == stack:
            out.setdefault(with_layer_position(n, 0), set()).add(pos[1])
    return out


def _check_ranges(planner: Planner, slices: list[Slice], stack: str, where: str) -> None:
    """Every ``layer_range`` within its source's own layers (the config's validation bounded them by MAX_LAYERS;
    here each model's count is known), so that a range past the end is refused with both numbers."""
    counts: dict[str, int] = {}
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl.sources):
            if src.model not in counts:
                blocks = [pos[1] for n in planner.specs(src.model)
                          if (pos := layer_position(n)) is not None and pos[0] == stack]
                counts[src.model] = max(blocks) + 1 if blocks else 0
            start, end = src.layer_range
            n = counts[src.model]
            if end > n:
                has = f"which has {n} layers (0 to {n - 1})" if n else f"which has no `{stack}.N` layers"
                raise ConfigError(f"config: {where + ': ' if where else ''}slices[{i}].sources[{j}]: layer_range "
                                  f"[{start}, {end}] goes past the end of {src.model}, {has}")
