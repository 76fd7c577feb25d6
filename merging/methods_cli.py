"""``python -m merging methods [--markdown | --update-readme [README]]``: every registered merge method.

Without flags: one line per method (name, what it does, the models it takes, its paper) and its presets. With
``--markdown``: the README's two tables (methods, then every parameter). With ``--update-readme``: those tables
written into the README between its ``methods-table`` markers (the step after adding a method).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .errors import MergeError

DEFAULT_README = Path(__file__).resolve().parent.parent / "README.md"


def methods_listing() -> str:
    """The plain-text list: name, models, random or not, summary, paper, presets."""
    from .methods import REGISTRY
    from .methods.docs import inputs_text

    lines = []
    width = max(len(name) for name in REGISTRY)
    for name in sorted(REGISTRY):
        m = REGISTRY[name]
        random = ", random" if m.randomized else ""
        lines.append(f"{name:<{width}}  {m.summary} [{inputs_text(m).replace('`', '')}{random}]")
        lines.append(f"{'':<{width}}  {m.paper}")
        for preset in m.presets:
            lines.append(f"{'':<{width}}  preset {preset.name!r}: {preset.label}")
    return "\n".join(lines)


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods.docs import methods_table_markdown, with_methods_section

    if args.update_readme is not None:
        path = Path(args.update_readme)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise MergeError(f"{path}: cannot be read ({exc.strerror})") from None
        try:
            updated = with_methods_section(text)
        except ValueError as exc:
            raise MergeError(f"{path}: {exc}") from None
        if updated != text:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(updated, encoding="utf-8")
            tmp.replace(path)
        print(f"{path}: the methods section {'was updated' if updated != text else 'is up to date'}")
    elif args.markdown:
        print(methods_table_markdown(), end="")
    else:
        print(methods_listing())
    return 0


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("methods", help="list every merge method (name, summary, models, paper)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--markdown", action="store_true", help="print the README's methods and parameters tables")
    what.add_argument("--update-readme", nargs="?", const=str(DEFAULT_README), default=None, metavar="README",
                      help=f"rewrite the methods section of README (default {DEFAULT_README.name} of this checkout)")
    p.set_defaults(func=cmd_methods)
