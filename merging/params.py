"""Per-tensor parameter values, written the way mergekit users write them.

A parameter may be a value, a list of anchors interpolated piecewise-linearly across layers
(``t: [0, 0.5, 1]``), or a list of ``{filter, value}`` entries: the first whose filter is a substring of the tensor
name wins (``*`` or no filter matches all). Per-model parameters look in the model's own ``parameters`` first,
then the global ones, then the method's default.
"""

from __future__ import annotations

from typing import Any, Mapping

from .config import MergeConfig
from .errors import ConfigError
from .methods.registry import MergeMethod, Param, get_method


def evaluate(setting: Any, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at relative depth ``t`` in [0, 1]; None when no filter matches."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, dict) for e in setting):
            for entry in setting:
                pattern = entry.get("filter")
                if pattern in (None, "*") or pattern in tensor_name:
                    return evaluate(entry["value"], tensor_name, t)
            return None
        if all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            scaled = t * (len(setting) - 1)
            i0 = int(scaled)
            i1 = min(len(setting) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * setting[i0] + frac * setting[i1]
        return setting[int(t * (len(setting) - 1))]
    return setting


def resolve(method: MergeMethod, global_params: Mapping[str, Any], model_params: list[Mapping[str, Any]],
            tensor_name: str, t: float) -> dict[str, Any]:
    """Resolve every parameter of ``method`` for one tensor; per-model ones become lists, one per input."""
    out: dict[str, Any] = {}
    for p in method.params:
        if p.per_model:
            out[p.name] = [_lookup(p, (mp, global_params), tensor_name, t) for mp in model_params]
        else:
            out[p.name] = _lookup(p, (global_params,), tensor_name, t)
    return out


def _lookup(p: Param, scopes: tuple[Mapping[str, Any], ...], tensor_name: str, t: float) -> Any:
    for scope in scopes:
        if p.name in scope and p.type is list:  # a list of strings is one value, not per-layer anchors
            setting = scope[p.name]
            return tuple(setting) if isinstance(setting, list) else (setting,)
        if p.name in scope:
            value = evaluate(scope[p.name], tensor_name, t)
            if value is not None:
                return p.type(value) if p.type in (int, float) else value
    return p.default


def validate_config(config: MergeConfig, *, source: str = "config") -> None:
    """Check the method, its inputs and every parameter value once, before anything is read."""
    method = get_method(config.merge_method, source)
    if method.base == "required" and not config.base_model:
        raise ConfigError(f"{source}: merge_method {method.name!r} needs a `base_model`")
    if config.slices and method.name != "passthrough":
        counts = {len(s.sources) for s in config.slices}
    else:
        counts = {len(input_entries(config, method))}
    for n in counts:
        if n < method.min_models or (method.max_models is not None and n > method.max_models):
            want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                    else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
            last = method.max_models if method.max_models is not None else method.min_models  # the number shown last
            plural = "" if last == 1 else "s"
            what = f"model{plural} besides the base" if method.base == "required" else f"model{plural}"
            raise ConfigError(f"{source}: merge_method {method.name!r} takes {want} {what}, got {n}")
    _check_params(method, config.parameters, f"{source}: parameters", per_model_allowed=True)
    for i, entry in enumerate(config.models):
        _check_params(method, entry.parameters, f"{source}: models[{i}] ({entry.model}) parameters", per_model_allowed=True,
                      global_allowed=False)
    for si, sl in enumerate(config.slices or []):
        for j, src in enumerate(sl.sources):
            _check_params(method, src.parameters, f"{source}: slices[{si}].sources[{j}] parameters", per_model_allowed=True,
                          global_allowed=False)


def input_entries(config: MergeConfig, method: MergeMethod):
    """The models a method combines: for methods built on a base, every model except the base itself."""
    if method.base == "required":
        return [m for m in config.models if m.model != config.base_model]
    return list(config.models)


def _check_params(method: MergeMethod, params: Mapping[str, Any], where: str, *, per_model_allowed: bool,
                  global_allowed: bool = True) -> None:
    known = {p.name: p for p in method.params}
    for name, setting in params.items():
        p = known.get(name)
        if p is None:
            hint = f" (its parameters: {', '.join(known)})" if known else " (it takes none)"
            raise ConfigError(f"{where}: unknown parameter `{name}` for {method.name!r}{hint}")
        if not global_allowed and not p.per_model:
            raise ConfigError(f"{where}: `{name}` is a global parameter of {method.name!r}; set it under the top-level `parameters`")
        if p.type is list and not all(isinstance(v, str) for v in (setting if isinstance(setting, list) else [setting])):
            raise ConfigError(f"{where}: `{name}` must be a string or a list of strings, got {setting!r}")
        for value in _scalars(setting, f"{where}.{name}"):
            p.check(value, where)


def _scalars(setting: Any, where: str):
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if not setting:
            raise ConfigError(f"{where}: an empty list")
        for entry in setting:
            if isinstance(entry, dict):
                extra = set(entry) - {"filter", "value"}
                if extra or "value" not in entry:
                    raise ConfigError(f"{where}: each entry of a filter list needs `value` (and optionally `filter`), got keys {sorted(map(str, entry))}")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ConfigError(f"{where}: `filter` must be a string, got {entry['filter']!r}")
                yield from _scalars(entry["value"], where)
            elif isinstance(entry, list):
                raise ConfigError(f"{where}: nested lists are not allowed")
            else:
                yield entry
    else:
        yield setting
