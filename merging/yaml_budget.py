"""YAML as people write it: anchors and aliases expanded within a budget, exponent floats, no duplicate keys, no
control characters.

- PyYAML resolves YAML 1.1, whose floats need a dot: ``1e-3`` and ``5e-1`` would be strings, and a weight written so
  refused. They are floats here, as in YAML 1.2 (and JSON, Python and mergekit's users' heads).
- A key given twice in one mapping (``density:`` twice) is refused with the key and both lines; PyYAML keeps the
  last silently. Keys brought in by a merge key (``<<: *defaults``) may be overridden, as YAML means.
- A control character (a NUL byte, an escape ``"\0"``, ``"\x07"`` in a quoted string) is refused with one line: no
  path, repo id or parameter holds one, and a NUL would reach the file system.

``yaml.safe_dump`` writes an anchor for any block that appears twice, and people write ``&defaults`` / ``*defaults``
by hand, so aliases are accepted. An alias is the node it names, so the composed graph is as small as the text while
its expansion may be exponential (each level of ``[*a, *a, ...]`` multiplies it: the "billion laughs"): the
expanded size is counted on the composed graph, once per distinct node, and a document beyond ``MAX_YAML_NODES``
values, or with an alias inside the block it names, is refused before anything is built.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from .errors import ConfigError

MAX_YAML_NODES = 200_000  # scalars, lists and mappings after aliases are expanded
# YAML 1.2's exponent floats without a dot (1e-3, 5E+1, -2e3); those with a dot PyYAML already reads.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class _Loader(yaml.SafeLoader):
    """SafeLoader with exponent floats and duplicate keys refused (``source`` names the config in messages)."""

    source = "config"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            try:
                if key in seen:
                    shown = str(key).replace("\n", "\\n").replace("\r", "\\r")[:80]
                    raise ConfigError(f"{self.source}: the key `{shown}` appears twice in one mapping (lines "
                                      f"{seen[key]} and {line}); keep one")
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                continue
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


def load_yaml(text: str, source: str) -> Any:
    """Compose the YAML, check what its aliases expand to, then build it (PyYAML's safe constructors, exponent
    floats, duplicate keys refused), and refuse control characters in it."""
    bad = _CONTROL.search(text)
    if bad:
        raise ConfigError(_control_message(source, text, bad.start(), "the text"))
    loader = _Loader(text)
    loader.source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        data = loader.construct_document(node)
    finally:
        loader.dispose()
    _check_strings(data, source)
    return data


def _control_message(source: str, text: str, at: int, where: str) -> str:
    line = text.count("\n", 0, at) + 1
    column = at - (text.rfind("\n", 0, at) + 1) + 1
    char = text[at]
    what = "a NUL byte" if char == "\0" else f"the control character U+{ord(char):04X}"
    return f"{source}: {where} holds {what} at line {line}, column {column}; a config is plain text"


def _check_strings(data: Any, source: str) -> None:
    """Refuse control characters that escapes in quoted strings produced (``"a\\0b"``): in keys and values."""
    seen: set[int] = set()
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            bad = _CONTROL.search(value)
            if bad:
                shown = value if len(value) <= 60 else value[:57] + "..."
                char = value[bad.start()]
                what = "a NUL byte" if char == "\0" else f"the control character U+{ord(char):04X}"
                raise ConfigError(f"{source}: the string {shown!r} holds {what}; a config is plain text")
        elif isinstance(value, (list, dict)) and id(value) not in seen:
            seen.add(id(value))
            stack += list(value.items()) if isinstance(value, dict) else value
        elif isinstance(value, tuple):
            stack += value


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse a document whose aliases expand beyond MAX_YAML_NODES values, or refer to themselves; one pass over
    the composed graph, however large the expansion would be."""
    size: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            size[key] = min(MAX_YAML_NODES + 1, 1 + sum(size[id(c)] for c in children))
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{source}: a YAML alias refers to the block that contains it (line "
                              f"{node.start_mark.line + 1})")
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                raise ConfigError(f"{source}: a YAML alias refers to the block that contains it (line "
                                  f"{child.start_mark.line + 1})")
            if id(child) not in size:
                stack.append((child, False))
    if size[id(root)] > MAX_YAML_NODES:
        raise ConfigError(f"{source}: YAML aliases expand to more than {MAX_YAML_NODES:,} values; a merge config "
                          "needs far fewer (an alias bomb?)")


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []
