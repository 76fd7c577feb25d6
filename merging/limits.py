"""Ceilings on what one config may ask for, so that a few bytes of YAML cannot make a job without end.

A public app takes any config from anyone: ``layer_range: [0, 1000000000]`` or a model listed 10 000 times are a
few bytes, and without a ceiling they hold a worker (and the memory it grows) for hours while every other
visitor's job waits. Each ceiling is far above what real merges use (mergekit's own example configs: at most 12
models, 9 slices, 80 layers, per-layer lists of 80 values) and is checked when the config is validated, before
anything is opened; ``layer_range`` is also checked against each source's own layers when the plan is built
(``merging.slices``), and the tensor count of a checkpoint when its headers are read (``merging.safetensors_io``).

=====================  =========  ==========================================================================
name                   value      what it bounds
=====================  =========  ==========================================================================
``MAX_MODELS``         64         distinct checkpoints a config reads (base, models, slice sources)
``MAX_MODULES``        16         entries of ``modules:``
``MAX_SLICES``         512        slices, over every module
``MAX_LAYERS``         4096       the end of any ``layer_range``, and the output's blocks over all slices
``MAX_VALUE_ENTRIES``  256        anchors, or ``{filter, value}`` entries, in one parameter's value
``MAX_PROBES``         10 000     (filter × depth) points at which a method's rules are checked
``MAX_TOKEN_ENTRIES``  4096       entries of ``tokenizer.tokens``
``MAX_TENSORS``        250 000    tensors in one checkpoint (DeepSeek-V3, 256 experts: about 91 000)
=====================  =========  ==========================================================================
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

MAX_MODELS = 64
MAX_MODULES = 16
MAX_SLICES = 512
MAX_LAYERS = 4096
MAX_VALUE_ENTRIES = 256
MAX_PROBES = 10_000
MAX_TOKEN_ENTRIES = 4096
MAX_TENSORS = 250_000


def check_config_limits(config: Any, source: str = "config") -> None:
    """Refuse a validated-by-type config (a ``merging.config.MergeConfig``) that asks for more than the ceilings,
    naming the key, the number asked for and the ceiling."""
    refs = config.model_refs()
    if len(refs) > MAX_MODELS:
        raise ConfigError(f"{source}: names {len(refs)} different models; at most {MAX_MODELS} are merged at once")
    modules = config.modules or {}
    if len(modules) > MAX_MODULES:
        raise ConfigError(f"{source}: `modules` has {len(modules)} entries; at most {MAX_MODULES} are allowed")
    parts = [("", config.slices, config.models, config.parameters)] + [
        (f"modules.{name}.", m.slices, m.models, m.parameters) for name, m in modules.items()]
    n_slices = sum(len(slices or []) for _, slices, _, _ in parts)
    if n_slices > MAX_SLICES:
        raise ConfigError(f"{source}: {n_slices} slices; at most {MAX_SLICES} are allowed")
    _check_values(config.parameters, f"{source}: parameters")
    for where, slices, models, parameters in parts:
        blocks = 0
        for i, sl in enumerate(slices or []):
            for j, src in enumerate(sl.sources):
                start, end = src.layer_range
                if end > MAX_LAYERS:
                    raise ConfigError(f"{source}: {where}slices[{i}].sources[{j}]: layer_range [{start}, {end}] "
                                      f"ends beyond layer {MAX_LAYERS}, the most a model may have here")
                _check_values(src.parameters, f"{source}: {where}slices[{i}].sources[{j}].parameters")
            blocks += sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
            _check_values(sl.parameters, f"{source}: {where}slices[{i}].parameters")
        if blocks > MAX_LAYERS:
            raise ConfigError(f"{source}: {where}slices stack {blocks} layers; at most {MAX_LAYERS} are allowed")
        for i, entry in enumerate(models or []):
            _check_values(entry.parameters, f"{source}: {where}models[{i}].parameters")
        if where:
            _check_values(parameters, f"{source}: {where}parameters")
    tokens = config.tokenizer.tokens if config.tokenizer is not None else None
    if tokens and len(tokens) > MAX_TOKEN_ENTRIES:
        raise ConfigError(f"{source}: tokenizer.tokens has {len(tokens)} entries; at most {MAX_TOKEN_ENTRIES} "
                          "are allowed")


def check_probes(count: int, source: str) -> None:
    """Refuse settings whose filters and anchors combine into more points than a method's rules are checked at."""
    if count > MAX_PROBES:
        raise ConfigError(f"{source}: the filters and per-layer lists combine into {count:,} (name, depth) points "
                          f"to check; at most {MAX_PROBES:,} are allowed (fewer filters or shorter lists)")


def _check_values(params: dict, where: str) -> None:
    for name, value in (params or {}).items():
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, dict):
                v = [v]
            if isinstance(v, list):
                if len(v) > MAX_VALUE_ENTRIES:
                    raise ConfigError(f"{where}.{name}: a list of {len(v)} values; at most {MAX_VALUE_ENTRIES} "
                                      "anchors or filters are allowed")
                stack += [e.get("value") if isinstance(e, dict) else e for e in v]
