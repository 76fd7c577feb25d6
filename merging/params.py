"""Per-tensor parameter values, written the way mergekit users write them.

A parameter may be a value, a list of anchors interpolated piecewise-linearly across layers
(``t: [0, 0.5, 1]``), or a list of ``{filter, value}`` entries: the first whose filter is a substring of the tensor
name wins (``*`` or no filter matches all). Per-model parameters look in the model's own ``parameters`` first,
then the global ones, then the method's default.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .methods.registry import MergeMethod, Param


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


Scopes = Mapping[str, Any] | tuple[Mapping[str, Any], ...]


def _scopes(scopes: Scopes) -> tuple[Mapping[str, Any], ...]:
    return (scopes,) if isinstance(scopes, Mapping) else tuple(scopes)


def resolve(method: MergeMethod, global_params: Scopes, model_params: list[Scopes], tensor_name: str, t: float,
            input_names: list[str] | None = None) -> dict[str, Any]:
    """Resolve every parameter of ``method`` for one tensor; per-model ones become lists, one per input.

    As mergekit does: ``global_params`` may be several scopes, highest precedence first (a slice's, a module's,
    the config's); each input looks in its own scopes first (``model_params[i]``, one or several), then in the
    global ones. Global values match filters against the output tensor's name, an input's values against the
    name that input is read under (``input_names[i]``: a slice's source layer)."""
    shared = _scopes(global_params)
    names = input_names or [tensor_name] * len(model_params)
    out: dict[str, Any] = {}
    for p in method.params:
        if p.per_model:
            out[p.name] = [_lookup(p, _scopes(mp) + shared, name, t) for mp, name in zip(model_params, names)]
        else:
            out[p.name] = _lookup(p, shared, tensor_name, t)
    return out


def _lookup(p: Param, scopes: tuple[Mapping[str, Any], ...], tensor_name: str, t: float) -> Any:
    for scope in scopes:
        if p.name in scope and p.type is list:  # a list of strings is one value, not per-layer anchors
            setting = scope[p.name]
            return tuple(setting) if isinstance(setting, list) else (setting,)
        if p.name in scope:
            value = evaluate(scope[p.name], tensor_name, t)
            if value is not None:
                return p.type(value) if p.type in (int, float) else p.normalized(value)
    return p.default


def check_params(method: MergeMethod, params: Mapping[str, Any], where: str, *,
                 global_allowed: bool = True) -> None:
    """Every setting in ``params`` names a parameter of ``method`` and each of its values is in range."""
    known = {p.name: p for p in method.params}
    for name, setting in params.items():
        p = known.get(name)
        if p is None and name in method.ignored:
            continue
        if p is None:
            close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
            listed = f"its parameters: {', '.join(known)}" if known else "it takes none"
            hint = f" (did you mean `{close[0]}`? {listed})" if close else f" ({listed})"
            raise ConfigError(f"{where}: unknown parameter `{name}` for {method.name!r}{hint}")
        if not global_allowed and not p.per_model:
            raise ConfigError(f"{where}: `{name}` is a global parameter of {method.name!r}; set it under the "
                              "top-level `parameters`")
        values = setting if isinstance(setting, list) else [setting]
        if p.type is list and not all(isinstance(v, str) for v in values):
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
                    raise ConfigError(f"{where}: each entry of a filter list needs `value` (and optionally "
                                      f"`filter`), got keys {sorted(map(str, entry))}")
                if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                    raise ConfigError(f"{where}: `filter` must be a string, got {entry['filter']!r}")
                yield from _scalars(entry["value"], where)
            elif isinstance(entry, list):
                raise ConfigError(f"{where}: nested lists are not allowed")
            else:
                yield entry
    else:
        yield setting


def probe_points(global_params: Mapping[str, Any], model_params: list[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """(tensor name, depth) pairs at which every combination of values the settings can take is reached.

    Anchor lists are piecewise linear in the depth t, so a rule that is linear in the values holds everywhere once
    it holds at every anchor of every list; filter lists pick their value by name, so each filter's own pattern
    (and a name no filter matches) stands for the tensors it selects. Config validation checks a method's
    cross-parameter rules at these points before any tensor is known; the plan checks them again per tensor.
    """
    depths, names = {0.0, 1.0}, {""}
    for scope in (global_params, *model_params):
        for setting in scope.values():
            _collect_probes(setting, depths, names)
    return [(name, t) for name in sorted(names) for t in sorted(depths)]


def _collect_probes(setting: Any, depths: set[float], names: set[str]) -> None:
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not setting:
        return
    if all(isinstance(e, dict) for e in setting):
        for entry in setting:
            if isinstance(entry.get("filter"), str) and entry["filter"] != "*":
                names.add(entry["filter"])
            _collect_probes(entry.get("value"), depths, names)
    elif len(setting) > 1:
        depths.update(i / (len(setting) - 1) for i in range(len(setting)))
