"""YAML with anchors and aliases, expanded within a budget.

``yaml.safe_dump`` writes an anchor for any block that appears twice, and people write ``&defaults`` / ``*defaults``
by hand, so aliases are accepted. An alias is the node it names, so the composed graph is as small as the text while
its expansion may be exponential (each level of ``[*a, *a, ...]`` multiplies it: the "billion laughs"): the
expanded size is counted on the composed graph, once per distinct node, and a document beyond ``MAX_YAML_NODES``
values, or with an alias inside the block it names, is refused before anything is built.
"""

from __future__ import annotations

from typing import Any

import yaml

from .errors import ConfigError

MAX_YAML_NODES = 200_000  # scalars, lists and mappings after aliases are expanded


def load_yaml(text: str, source: str) -> Any:
    """Compose the YAML, check what its aliases expand to, then build it (PyYAML's safe constructors)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


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
