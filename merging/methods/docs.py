"""The README's table of methods, generated from the registry so that it cannot drift from the code.

``python -c "from merging.methods.docs import methods_table_markdown; print(methods_table_markdown())"``
"""

from __future__ import annotations

from . import REGISTRY
from .registry import MergeMethod, Param


def _default_text(p: Param) -> str:
    if isinstance(p.default, (list, tuple)):
        return "`[" + ", ".join(str(v) for v in p.default) + "]`"
    if p.default is None:
        return "—"
    if p.type is bool:
        return "true" if p.default else "false"
    if p.type is float:
        return f"{p.default:g}"
    return f"`{p.default}`" if p.type is str else str(p.default)


def _allowed_text(p: Param) -> str:
    if p.choices:
        return " / ".join(f"`{c}`" for c in p.choices)
    if p.type is bool:
        return "true / false"
    if p.type in (list, tuple):
        return "a list"
    if p.min is None and p.max is None:
        return "any"
    return p.range_text()


def _inputs_text(m: MergeMethod) -> str:
    if m.min_models == 0:  # passthrough: one model, or the sources of `slices`
        count = f"{m.max_models or 'any'}, or `slices`"
    elif m.max_models == m.min_models:
        count = str(m.min_models)
    elif m.max_models is None:
        count = f"≥ {m.min_models}"
    else:
        count = f"{m.min_models}–{m.max_models}"
    base = {"required": "base + ", "optional": "(base) + ", "none": ""}[m.base]
    return f"{base}{count}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def methods_table_markdown() -> str:
    """Two Markdown tables: one row per method (what, inputs, paper), then one row per method parameter.

    Inputs: "base + N" means a base model plus N others; per-model parameters (marked "per model") may be set
    under each model's ``parameters`` as well as globally. Ranges are closed unless written with a parenthesis.
    """
    methods = [REGISTRY[name] for name in REGISTRY]
    lines = ["| method | what it does | models | random | paper |", "|---|---|---|---|---|"]
    for m in methods:
        lines.append(f"| `{m.name}` | {_cell(m.summary)} | {_inputs_text(m)} | {'yes' if m.randomized else ''} "
                     f"| {_cell(m.paper)} |")
    lines += ["", "| method | parameter | default | allowed | scope | meaning |", "|---|---|---|---|---|---|"]
    for m in methods:
        if not m.params:
            lines.append(f"| `{m.name}` | — | | | | takes no parameters |")
        for p in m.params:
            scope = "per model" if p.per_model else "global"
            lines.append(f"| `{m.name}` | `{p.name}` | {_default_text(p)} | {_cell(_allowed_text(p))} | {scope} "
                         f"| {_cell(p.help)} |")
    return "\n".join(lines) + "\n"
