"""The plan: every output tensor with its inputs and parameters, checked before anything is read or written.

The compatibility check is part of planning: every input tensor a task needs must exist with the reference's
shape; tensors that no task uses are reported too, and so are inputs of different architectures (refused unless
``allow_crimes``). All problems go into one grouped report.

As mergekit does: a tied model's output head is its embedding (``architectures.tied_alternatives``), so tied and
untied checkpoints merge together; per-layer parameters take ``t`` within each layer stack (an encoder's and a
decoder's own depth); ``modules:`` plan each part of the architecture with its own models and parameters.
Slices are planned in ``merging.slices``; a ``tokenizer_source`` rewrites the vocabulary (``merging.tokenizers``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import slices, tokenizers
from .architectures import (
    ONE_ARCHITECTURE,
    Layers,
    describe_family,
    family,
    layer_position,
    tied_partner,
    with_layer_position,
)
from .config import MergeConfig, Module, ignored_notes, input_entries, parts
from .errors import CompatibilityError, ConfigError
from .methods.registry import MergeMethod, get_method
from .params import resolve
from .sources import CheckpointSource, read_json_file
from .tasks import CompatibilityReport, Planner, TensorRef, TensorTask

__all__ = ["CompatibilityReport", "MergePlan", "TensorRef", "TensorTask", "build_plan", "layer_index",
           "with_layer_index"]
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
_STACK_COUNT_KEYS = {"encoder": ("encoder_layers", "num_layers", "num_encoder_layers"),
                     "decoder": ("decoder_layers", "num_decoder_layers")}


def layer_index(name: str) -> int | None:
    """The block index in a tensor name (``model.layers.7.mlp...`` → 7), or None outside the blocks."""
    pos = layer_position(name)
    return pos[1] if pos else None


with_layer_index = with_layer_position


@dataclass
class MergePlan:
    config: MergeConfig
    method: MergeMethod
    reference: str  # the model whose names, side files and non-float tensors the output follows
    tasks: list[TensorTask]
    report: CompatibilityReport
    num_layers: int | None
    out_config: dict | None  # config.json for the output (layer counts, ties, vocabulary size as the plan changed)
    side_files: dict[str, bytes] = field(default_factory=dict)  # written instead of the reference's (a tokenizer)
    side_source: str | None = None  # the model whose tokenizer files are copied (tokenizer_source), else reference

    def require_compatible(self) -> None:
        if not self.report.ok:
            raise CompatibilityError(f"inputs do not match {self.reference}: {self.report.text()}")

    @property
    def total_bytes_out(self) -> int:
        return sum(t.spec.nbytes for t in self.tasks)


def build_plan(config: MergeConfig, sources: dict[str, CheckpointSource]) -> MergePlan:
    """Plan a merge from already-opened sources (keyed by the config's model references).

    With a ``tokenizer_source``, the sources of the models are replaced in ``sources`` by views of them in the
    output vocabulary (the caller's dict: the engine reads through the same views)."""
    method = get_method(config.merge_method)
    reference = _reference(config, method)
    vocabulary = tokenizers.apply(config, sources, reference)
    ref_cfg = read_json_file(sources[reference], "config.json")
    ref_specs = sources[reference].specs()
    report = CompatibilityReport()
    planner = Planner(config, method, sources, reference, report, Layers.of(ref_specs, _config_layers(ref_cfg)))
    _check_families(planner)
    report.notes += ignored_notes(config) + [n for src in sources.values() for n in src.notes()]
    if vocabulary is not None:
        report.notes += vocabulary.notes
    tasks: list[TensorTask] = []
    members = _module_members(config, list(ref_specs), planner.layers)
    for (where, part), names in zip(parts(config), members):
        shared = (part.parameters, config.parameters) if part.parameters else (config.parameters,)
        if part.slices:
            tasks += slices.plan_slices(planner, part.slices, names, shared, where)
        else:
            tasks += _plan_models(planner, part, names, shared)
    if not config.slices and not config.modules:  # tensors only inputs have
        known = {t.name for t in tasks}
        for model in dict.fromkeys(r.model for t in tasks for r in t.inputs):
            report.extra += [f"{name} (in {model})" for name in sources[model].specs()
                             if name not in ref_specs and name not in known]
    _validate_tasks(method, tasks)
    report.notes[:] = list(dict.fromkeys(report.notes))
    dedup = list({t.name: t for t in tasks}.values())
    out_cfg = _output_config(planner, ref_cfg, vocabulary)
    plan = MergePlan(config, method, reference, dedup, report, planner.layers.total or None, out_cfg,
                     vocabulary.files if vocabulary else {}, vocabulary.side_source if vocabulary else None)
    return plan


def _reference(config: MergeConfig, method: MergeMethod) -> str:
    if config.base_model:
        return config.base_model
    _, first = parts(config)[0]
    if first.slices:
        return first.slices[0].sources[0].model
    return input_entries(config, method, first.models)[0].model


def _plan_models(planner: Planner, part: Module, names: list[str], shared: tuple) -> list[TensorTask]:
    config, method, reference = planner.config, planner.method, planner.reference
    entries = input_entries(config, method, part.models)
    ref_specs = planner.specs(reference)
    model_params = [e.parameters for e in entries]
    base = config.base_model if method.base != "none" else None
    tasks = []
    wanted = dict.fromkeys(names)  # ordered, and O(1) to ask
    for e in entries:  # heads a tied reference does not store, but an untied input does: the output gets them
        for name in planner.specs(e.model):
            if name not in ref_specs and name not in wanted and tied_partner(name, ref_specs):
                wanted[name] = None
                planner.untied.add(name)
    for name in wanted:
        ref_name = planner.input_name(reference, name)
        spec = ref_specs[ref_name]
        out_spec = planner.output_spec(spec)
        if not spec.is_float:
            tasks.append(TensorTask(name, out_spec, TensorRef(reference, ref_name), [], copy=True))
            continue
        in_names = [planner.input_name(e.model, name) for e in entries]
        task = TensorTask(name, out_spec, TensorRef(base, planner.input_name(base, name)) if base else None,
                          [TensorRef(e.model, n) for e, n in zip(entries, in_names)],
                          resolve(method, shared, model_params, name, planner.layers.depth(name)))
        for e, n in zip(entries, in_names):
            planner.check_input(task, spec, e.model, n)
        tasks.append(task)
    for name in sorted(planner.untied):
        planner.report.notes.append(f"{reference} ties `{name}` to its embedding, an input has its own: the output "
                                    f"writes `{name}` (the tied model's embedding merged with the others' heads) "
                                    "and sets tie_word_embeddings: false")
    return tasks


def _module_members(config: MergeConfig, names: list[str], layers: Layers) -> list[list[str]]:
    """The reference's tensor names each part of the config plans (all of them without ``modules:``)."""
    if not config.modules:
        return [names]
    modules = list(config.modules)
    owned: dict[str, list[str]] = {m: [] for m in modules}
    orphans = []
    for name in names:
        pos = layer_position(name)
        label = layers.labels.get(pos[0]) if pos else None
        owner = next((m for m in modules if m == label or name.startswith(f"{m}.") or f".{m}." in name), None)
        owner = owner or next((m for m in ("shared", "default") if m in owned), None)
        if owner is None:
            orphans.append(name)
        else:
            owned[owner].append(name)
    if orphans:
        raise ConfigError(f"config: modules: {', '.join(orphans[:4])} belong to no module (modules given: "
                          f"{', '.join(modules)}); add a `shared:` (or `default:`) module for them")
    return [owned[m] for m in modules]


def _check_families(planner: Planner) -> None:
    """Every input's architecture in the notes; different ones refused unless ``allow_crimes``."""
    described, seen = {}, {}
    for ref in planner.config.model_refs():
        cfg = read_json_file(planner.sources[ref], "config.json")
        described[ref] = describe_family(cfg)
        if family(cfg) is not None:
            seen.setdefault(family(cfg), ref)
    if len(described) > 1 and len(set(described.values())) == 1:  # one line, not the same words once a model
        planner.report.notes.append(f"{ONE_ARCHITECTURE}{len(described)} models are {next(iter(described.values()))}")
    else:
        planner.report.notes.append("architectures: " + "; ".join(f"`{r}`: {d}" for r, d in described.items()))
    if len(seen) > 1:
        mix = ", ".join(f"{fam} ({ref})" for fam, ref in seen.items())
        if planner.config.allow_crimes:
            planner.report.notes.append(f"different architectures merged (allow_crimes): {mix}")
        else:
            planner.report.architectures.append(f"{mix}; set `allow_crimes: true` (or pass --allow-crimes) to merge "
                                                "them anyway")


def _output_config(planner: Planner, ref_cfg: dict | None, vocabulary) -> dict | None:
    if ref_cfg is None:
        return None
    out = dict(ref_cfg)
    if planner.layer_counts:
        labels = planner.layers.labels
        for stack, count in planner.layer_counts.items():
            keys = _STACK_COUNT_KEYS.get(labels.get(stack, ""), _LAYER_COUNT_KEYS) if len(labels) > 1 \
                else _LAYER_COUNT_KEYS
            for key in keys:
                if key in out:
                    out[key] = count
    if planner.untied:
        out["tie_word_embeddings"] = False
    if vocabulary is not None:
        out["vocab_size"] = vocabulary.size
    return out


def _validate_tasks(method: MergeMethod, tasks: list[TensorTask]) -> None:
    """The method's cross-parameter rules on each tensor's resolved values, before any tensor is read (the config's
    validation checked them at probe points; per-layer lists and filters are exact only here)."""
    if method.validate is None:
        return
    checked: set[str] = set()
    for task in tasks:
        key = repr(sorted(task.params.items()))
        if not task.copy and key not in checked:
            checked.add(key)
            method.validate(task.params, task.name)


def _config_layers(cfg: dict | None) -> int | None:
    for key in _LAYER_COUNT_KEYS:
        if cfg and isinstance(cfg.get(key), int):
            return cfg[key]
    return None
