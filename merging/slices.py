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
    templates = _templates(names, stack)
    first_only = {t for t in templates if _only_in_first(names, t, stack)}
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
                        and not _in_every_block(names, template, stack):
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


def _templates(names: list[str], stack: str) -> list[str]:
    """Every per-block tensor of a stack, as its name in block 0, in first-seen order."""
    out: dict[str, None] = {}
    for n in names:
        pos = layer_position(n)
        if pos is not None and pos[0] == stack:
            out[with_layer_position(n, 0)] = None
    return list(out)


def _blocks(names: list[str], stack: str, template: str | None = None) -> set[int]:
    """The blocks of a stack (that hold ``template``, when given)."""
    found = set()
    for n in names:
        pos = layer_position(n)
        if pos is not None and pos[0] == stack and (template is None or with_layer_position(n, 0) == template):
            found.add(pos[1])
    return found


def _only_in_first(names: list[str], template: str, stack: str) -> bool:
    return len(_blocks(names, stack)) > 1 and _blocks(names, stack, template) == {0}


def _in_every_block(names: list[str], template: str, stack: str) -> bool:
    return _blocks(names, stack, template) == _blocks(names, stack)
