"""The method registry: each merge method is a pure function on tensors plus a parameter schema.

The schema drives everything that is not tensor math: config validation, the CLI, the app's method form, the
README's table of methods. Adding a method is one function and one ``@register`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from ..errors import ConfigError


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

    def check(self, value: Any, where: str) -> Any:
        """Validate one scalar value; returns it converted to the parameter's type."""
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
        return f"{'(' if self.min_exclusive or self.min is None else '['}{low}, {high}{')' if self.max is None else ']'}"


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

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded by (seed, tensor name[, first row of the band]): the same bytes in any order, on any
        number of threads (bands are a fixed size, not a function of the thread count)."""
        gen = torch.Generator(device=device)
        name = self.name if not self.band or self.band[0] == 0 else f"{self.name}@{self.band[0]}"
        gen.manual_seed(stable_seed(self.seed, name))
        return gen


def stable_seed(seed: int, name: str) -> int:
    import hashlib

    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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
    # to let ``collect`` run on float32 copies (see merging/native).
    native: Callable[..., dict[str, torch.Tensor] | None] | None = None


REDUCED = "__reduced__"  # a result dict's entry with this unit's share of the reduction (see reduce_after_merge)


class MergeFn(Protocol):
    def __call__(self, base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
                 ctx: TensorContext) -> torch.Tensor | dict[str, torch.Tensor]: ...


class ReduceFn(Protocol):
    def __call__(self, base: torch.Tensor | None, models: list[torch.Tensor], params: dict[str, Any],
                 ctx: TensorContext) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``fn`` gets float32 tensors and resolved parameters (per-model ones as lists)."""

    name: str
    fn: MergeFn
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    base: str = "required"  # "required", "optional" or "none"
    min_models: int = 1
    max_models: int | None = None
    # A streaming first pass over every tensor; its per-tensor 1-D results are summed and given to fn as
    # ctx.reduced. For whole-model quantities (EMR rescalers, whole-model NAN).
    reduce: ReduceFn | None = None
    # Whether this plan needs the reduction pass at all (e.g. NAN only with `nan_scope: model`); None: always
    # when `reduce` is set. Saves a whole extra read of every input when the parameters do not need it.
    reduce_needed: Callable[..., bool] | None = None
    # True when only ``finalize`` uses the totals (``fn`` never reads ctx.reduced): the engine then gathers them
    # during the merge pass itself, from a result dict's REDUCED entry or by calling ``reduce`` on the same
    # inputs, and skips the extra read of every input.
    reduce_after_merge: bool = False
    randomized: bool = False
    # True when each output element depends only on the inputs at that element (plus per-tensor parameters and
    # ctx.reduced): the engine then runs fn (and reduce, whose per-band results must add up) on row bands.
    elementwise: bool | Callable[..., bool] = False  # or a function of the plan
    # Per-tensor passes run before fn on each tensor (their result reaches fn as ctx.stats); see StatsPass.
    stats: tuple[StatsPass, ...] = ()
    # An optional hook that turns the reduction totals into extra files for the output folder.
    finalize: Callable[..., dict[str, bytes]] | None = None
    # For methods whose result is not one tensor per input tensor (EMR): the (name, spec) pairs a task writes.
    outputs: Callable[..., list] | None = None
    # Optional fused CPU kernels (merging/native) taking the inputs as stored: ``native(base, models, params, ctx,
    # out_dtype)`` returns (the result in ``out_dtype``, its count of NaN/Inf or None), or None to let ``fn`` run on
    # float32 copies; ``native_reduce`` stands in for ``reduce`` the same way.
    native: Callable[..., tuple[Any, int | None] | None] | None = None
    native_reduce: Callable[..., torch.Tensor | None] | None = None
    tags: tuple[str, ...] = field(default=())

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} registered twice")
    REGISTRY[method.name] = method
    return method


def get_method(name: str, where: str = "config") -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"{where}: unknown merge_method {name!r} (known: {', '.join(sorted(REGISTRY))})") from None
