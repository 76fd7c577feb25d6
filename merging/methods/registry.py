"""The method registry: each merge method is a pure function on tensors plus a parameter schema.

The schema drives everything that is not tensor math: config validation, the CLI, the app's method form, the
README's table of methods. Adding a method is one function and one ``@register`` call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import ConfigError
from ..native.rng import stable_seed


@dataclass(frozen=True)
class Param:
    """One parameter of a method: what the form shows, what validation enforces."""

    name: str
    type: type  # float, int, bool, str, or list (a list of strings, e.g. name filters; never per-layer)
    default: Any
    help: str
    per_model: bool = False  # set in models[].parameters (a value per input) or globally
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    aliases: tuple[tuple[Any, Any], ...] = ()  # (written, meant): e.g. mergekit's `rescale: true` for `l1`

    def normalized(self, value: Any) -> Any:
        """``value`` with an alias replaced by what it stands for (booleans matched as booleans, not as 0/1)."""
        for written, meant in self.aliases:
            if value is written or (type(value) is type(written) and value == written):
                return meant
        return value

    def check(self, value: Any, where: str) -> Any:
        """Validate one scalar value; returns it converted to the parameter's type."""
        value = self.normalized(value)
        if value is None and self.default is None:  # an optional parameter left unset (passthrough's `scale`)
            return None
        if self.type is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: `{self.name}` must be true or false, got {value!r}")
            return value
        if self.type is list:
            if not isinstance(value, str):
                raise ConfigError(f"{where}: `{self.name}` must be a list of strings, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                options = f" (one of: {', '.join(self.choices)})" if self.choices else ""
                raise ConfigError(f"{where}: `{self.name}` must be a string{options}, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: `{self.name}` must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: `{self.name}` must be finite, got {value!r}")
        if self.type is int and value != int(value):
            raise ConfigError(f"{where}: `{self.name}` must be an integer, got {value!r}")
        low_ok = self.min is None or (value > self.min if self.min_exclusive else value >= self.min)
        if not low_ok or (self.max is not None and value > self.max):
            raise ConfigError(f"{where}: `{self.name}` = {value} is outside {self.range_text()}")
        return self.type(value)

    def range_text(self) -> str:
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "inf" if self.max is None else f"{self.max:g}"
        opening = "(" if self.min_exclusive or self.min is None else "["
        return f"{opening}{low}, {high}{')' if self.max is None else ']'}"


@dataclass
class TensorContext:
    """What a method may know about the tensor it merges, besides the tensors themselves."""

    name: str
    seed: int = 0
    reduced: torch.Tensor | None = None  # the whole-model totals from the method's reduction pass
    model_names: tuple[str, ...] = ()
    # Element-wise methods may be called on a band of rows: ``band`` is (start, stop) then, None for the whole
    # tensor; ``shape`` is always the whole tensor's (so a reduction can divide by its full size).
    band: tuple[int, int] | None = None
    shape: tuple[int, ...] = ()
    stats: Any = None  # the result of the method's per-tensor statistics passes (see StatsPass)
    model_stats: Any = None  # the result of the method's whole-model statistics passes (``MergeMethod.model_stats``)
    layer: int | None = None  # the block index of the tensor (``merging.plan.layer_index``), None outside the blocks
    num_layers: int | None = None  # the output's block count

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor name[, first row of the band]): the same bytes in any order, on any
        number of threads (bands are a fixed size, not a function of the thread count)."""
        gen = torch.Generator(device=device)
        name = self.name if not self.band or self.band[0] == 0 else f"{self.name}@{self.band[0]}"
        gen.manual_seed(stable_seed(self.seed, name))
        return gen


@dataclass(frozen=True)
class StatsPass:
    """A pass over one tensor's row bands that gathers what a method needs before merging it band by band.

    ``collect(base, models, params, ctx)`` returns named tensors for one band (ctx.stats holds the previous
    pass's result); the engine sums them over the bands, or concatenates the keys listed in ``concat``; then
    ``finish(combined, params, ctx)`` turns the totals into what the next pass and the method see as ctx.stats.
    Top-k thresholds, norms and cosines of whole tensors are computed this way without holding a whole tensor.
    """

    collect: Callable[..., dict[str, torch.Tensor]]
    finish: Callable[..., Any] | None = None
    concat: tuple[str, ...] = ()
    needed: Callable[[dict], bool] | None = None  # from the tensor's params: skip the pass (and its reads)
    only_if: Callable[[Any], bool] | None = None  # from the stats so far: skip unless this holds
    sample_stride: int = 1  # >1: collect sees only every n-th element of each band (flattened), for sampling
    # The same as ``collect`` on the inputs as stored (any float dtype, on the CPU) with a fused kernel, or None
    # to let ``collect`` run on float32 copies (see merging/native). It sees whole bands: a sampling pass's kernel
    # keeps every ``sample_stride``-th element itself.
    native: Callable[..., dict[str, torch.Tensor] | None] | None = None


REDUCED = "__reduced__"  # a result dict's entry with this unit's share of the reduction (see reduce_after_merge)


class MergeFn(Protocol):
    def __call__(self, base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
                 ctx: TensorContext) -> torch.Tensor | dict[str, torch.Tensor]: ...


class ReduceFn(Protocol):
    def __call__(self, base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
                 ctx: TensorContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class Preset:
    """A named parameter set a method recommends (``paper``: its paper's settings), shown in the app's form."""

    name: str
    label: str  # one line for the form: the settings and where they come from
    values: Mapping[str, Any]


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: a pure function over tensors, its parameter schema, and what the engine must do for it.

    Everything but ``fn`` is optional. Read top to bottom, the hooks say:

    What it is (the CLI's ``methods`` list, the README table, the app's form):
        ``name``, ``summary`` (one line), ``paper`` (authors, year, title, arXiv id), ``params`` (the schema:
        config validation and the form come from it), ``presets`` (named parameter sets; "paper" for the paper's
        settings), ``randomized`` (draws from the seeded generators).
    What it takes:
        ``base`` ("required", "optional" or "none"), ``min_models``/``max_models`` (models besides the base),
        ``separate_base`` (with an optional base: a base also listed under ``models`` is not one of the models, as
        mergekit's non-base inputs; default: only for a required base),
        ``validate(params, where)`` (rules between parameters, on resolved values; raises ConfigError): run on
        the config at its probe points (``merging.params.probe_points``) and on every tensor's values when the
        merge is planned, so a config the app calls valid never fails on its first tensor;
        ``ignored``: parameters mergekit configs give this method that it does not use (``weight`` on slerp):
        accepted, and the report says they were ignored.
    How it computes, per output tensor (``fn(base, models, params, ctx)``: float32 tensors, parameters resolved
    for this tensor with per-model ones as lists, a ``TensorContext``; returns a tensor, or a dict of outputs):
        ``elementwise`` (True, or a function of the plan): each output element depends only on the inputs at that
        element, so the engine may call ``fn`` on row bands (``ctx.band``);
        ``stats`` (StatsPass, run over a tensor's bands before ``fn``; the result is ``ctx.stats``): whole-tensor
        quantities such as top-k thresholds or norms;
        ``native(base, models, params, ctx, out_dtype)``: the same result from fused CPU kernels on the inputs as
        stored, or None to let ``fn`` run.
    Whole-model quantities:
        ``model_stats`` (StatsPass, each run over every band of every merged tensor before the merge: parts summed
        or concatenated over the whole model, then ``finish(combined, params, ctx)`` with ``ctx.shape`` the whole
        task vector's length; the result is ``ctx.model_stats``: e.g. TIES' exact global top-k threshold),
        ``model_stats_needed(plan)`` (whether this plan needs them; it also validates the plan);
        ``reduce`` (a streaming pass before the merge, its 1-D results summed over every tensor into
        ``ctx.reduced``), ``reduce_needed(plan)`` (whether this plan needs it; it may also validate the plan),
        ``reduce_after_merge`` (only ``finalize`` reads the totals, so the engine gathers them during the merge
        pass itself), ``native_reduce`` (``reduce`` on the stored inputs), ``reduce_stats(params)`` (whether a
        tensor's ``reduce`` needs its ``stats`` passes first, e.g. to merge it: ``ctx.stats`` is None otherwise).
    What it writes:
        ``outputs(task)`` (the (name, spec) pairs written for one input tensor, when not one tensor of the same
        name), ``finalize(plan, reduced)`` (extra files for the output folder), ``model_output`` (False when the
        output is not a model by itself, as EMR's: its tensors go to ``merge.safetensors``, so transformers
        refuses the folder instead of loading a model without its weights).
    What the analysis needs to know about it (``merging.analysis``):
        ``trim_key``: the key of ``ctx.stats`` holding the method's own magnitude top-k cuts of each task vector
        at its ``density`` (per model a list of ``selection.Cut``, the first its top-k): the analysis' trim
        (TIES), so it need not find them again;
        ``unified(result, name)``: from ``fn``'s dict of outputs, the task vector every task shares (EMR's
        τ_uni; None for a tensor kept per task), when the method stores one task vector and per-task masks and
        rescalers λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| instead of one merged tensor: the analysis then rebuilds each task
        for its merged distance and finds λ_i from its own sums (it runs no ``reduce`` pass for such a method);
        ``elects``: that shared task vector is the paper's election of the task vectors (``emr.elect``), which
        the analysis computes anyway: it takes the method's own sums from it instead of running the method;
        ``skipped(name, params)``: tensors such a method keeps per task instead of merging;
        ``rescaler_from_means(params)``: whether its λ_i are ratios of per-tensor means (each tensor's sums
        divided by its numel, EMR's ``rescaler: tensor_mean``) rather than of sums over every element.
    """

    name: str
    fn: MergeFn
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    presets: tuple[Preset, ...] = ()
    randomized: bool = False
    base: str = "required"  # "required", "optional" or "none"
    min_models: int = 1
    max_models: int | None = None
    separate_base: bool = False
    validate: Callable[[dict[str, Any], str], None] | None = None
    ignored: tuple[str, ...] = ()
    elementwise: bool | Callable[..., bool] = False
    stats: tuple[StatsPass, ...] = ()
    native: Callable[..., tuple[Any, int | None] | None] | None = None
    model_stats: tuple[StatsPass, ...] = ()
    model_stats_needed: Callable[..., bool] | None = None
    reduce: ReduceFn | None = None
    reduce_needed: Callable[..., bool] | None = None
    reduce_after_merge: bool = False
    reduce_stats: Callable[[dict[str, Any]], bool] | None = None
    native_reduce: Callable[..., torch.Tensor | None] | None = None
    outputs: Callable[..., list] | None = None
    finalize: Callable[..., dict[str, bytes]] | None = None
    model_output: bool = True
    trim_key: str | None = None
    unified: Callable[[dict, str], torch.Tensor | None] | None = None
    elects: bool = False
    skipped: Callable[[str, dict], bool] | None = None
    rescaler_from_means: Callable[[dict], bool] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def preset(self, name: str) -> Preset:
        for preset in self.presets:
            if preset.name == name:
                return preset
        raise KeyError(name)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (once per name); its presets must name its own parameters, in range."""
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    for preset in method.presets:
        for key, value in preset.values.items():
            try:
                p = method.param(key)
            except KeyError:
                raise ValueError(f"{method.name}: preset {preset.name!r} sets {key!r}, not a parameter") from None
            if p.type is not list:
                p.check(value, f"{method.name}: preset {preset.name!r}")
    REGISTRY[method.name] = method
    return method


def get_method(name: str, where: str = "config") -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown merge_method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
