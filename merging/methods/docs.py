"""The README's table of methods, generated from the registry so that it cannot drift from the code.

``python -m merging methods --markdown`` prints it; ``python -m merging methods --update-readme`` rewrites the
README's section between the ``methods-table`` markers with it.
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


def inputs_text(m: MergeMethod) -> str:
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
    methods = [REGISTRY[name] for name in sorted(REGISTRY)]
    lines = ["| method | what it does | models | random | paper |", "|---|---|---|---|---|"]
    for m in methods:
        lines.append(f"| `{m.name}` | {_cell(m.summary)} | {inputs_text(m)} | {'yes' if m.randomized else ''} "
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


TABLE_START = "<!-- methods-table:start -->"
TABLE_END = "<!-- methods-table:end -->"
UPDATE_COMMAND = "python -m merging methods --update-readme"


def readme_section(table: str) -> str:
    """What goes between the README's markers: the methods table, and the parameters table folded away."""
    methods, params = table.strip().split("\n\n", 1)
    return (f"\n{methods}\n\n<details><summary>Every parameter: default, range, scope</summary>\n\n{params}\n\n"
            "</details>\n")


def with_methods_section(readme: str) -> str:
    """``readme`` with the text between its methods-table markers replaced by the registry's tables."""
    if TABLE_START not in readme or TABLE_END not in readme:
        raise ValueError(f"the README has no {TABLE_START} ... {TABLE_END} section")
    head, rest = readme.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    return head + TABLE_START + readme_section(methods_table_markdown()) + TABLE_END + tail
