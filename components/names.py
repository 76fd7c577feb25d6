"""The visitor's names for the server's files: what a public server shows instead of its own paths.

A server with local paths off (a Space, another ``--host``, ``--share``) never shows a path of its disk. What a
visitor may name there has a short name: ``demo:NAME`` for a demo model (a folder of the demo set) and
``upload:NAME`` for one of the session's own uploads. The page shows them (model boxes, the YAML, Apply's config);
a redacted model card or merge_config.yml says them too, so a downloaded config pastes back as it is.

- ``expand_names``: a loaded config's short names become paths (everywhere, local servers included);
- ``redact_paths``: paths become short names again, in messages and written files, and any other path under a
  server folder (the session root, Gradio's cache) loses that folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from merging.config import MergeConfig, config_from_dict
from merging.errors import ConfigError

DEMO, UPLOAD = "demo:", "upload:"
_SHORT = re.compile(r"^(demo|upload):([\w-][\w.-]*)$")  # a plain name: no separator, not . or ..
_HASH = r"[0-9a-f]{16,64}"  # a session folder's or a Gradio cache entry's name


def side_refs(config: MergeConfig) -> list[str]:
    """Models a config reads besides its inputs: a ``tokenizer_source`` / ``tokenizer.source`` model, and the models
    that added tokens' embeddings come from (``tokenizer.tokens``)."""
    refs = []
    if config.vocabulary_source not in (None, "base", "union"):
        refs.append(config.vocabulary_source)
    for entry in (config.tokenizer.tokens or {}).values() if config.tokenizer else ():
        source = entry.source
        if isinstance(source, str) and source not in ("base", "union"):
            refs.append(source)
        elif source is not None and getattr(source, "model", None):
            refs.append(source.model)
    return refs


def expand_names(config: MergeConfig, demo_root: Path | None, uploads: list[Path]) -> MergeConfig:
    """``config`` with every ``demo:NAME`` and ``upload:NAME`` replaced by the path it names; one line naming it when
    there is no such demo model or upload."""
    refs = config.model_refs() + side_refs(config)
    if not any(_SHORT.match(r) for r in refs):
        return config

    def path_of(kind: str, name: str) -> str:
        if kind == "demo":
            if demo_root is not None and (demo_root / name).is_dir():
                return str(demo_root / name)
            known = sorted(p.name for p in demo_root.iterdir() if p.is_dir()) if demo_root and demo_root.is_dir() \
                else []
            raise ConfigError(f"config: {DEMO}{name}: no such demo model" + (f" (there are {', '.join(known)})"
                                                                              if known else ""))
        for folder in uploads:
            if (folder / name).is_file():
                return str(folder / name)
        raise ConfigError(f"config: {UPLOAD}{name}: no such upload in this session; upload it first")

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, str) and (m := _SHORT.match(value)):
            return path_of(m.group(1), m.group(2))
        return value

    return config_from_dict(walk(yaml.safe_load(config.to_yaml())), source="config")


def short_name(path: str | Path, demo_root: Path | None, uploads: Path | None = None) -> str:
    """The visitor's name of a demo model's folder or an upload (``demo:base``, ``upload:mine.safetensors``)."""
    path = Path(path)
    if uploads is not None and path.parent == uploads:
        return UPLOAD + path.name
    if demo_root is not None and path.parent == demo_root:
        return DEMO + path.name
    return str(path)


def redact_paths(text: str, roots: list[Path], *, sessions_root: Path | None = None,
                 demo_root: Path | None = None) -> str:
    """``text`` as a visitor may see it: an upload's path as ``upload:NAME``, a demo model's as ``demo:NAME``, and
    ``<root>/[<hash>/]`` removed from any other absolute path under one of ``roots`` (symbolic links resolved or
    not), a bare root named in words. Relative paths (what a visitor typed) are left as they are."""
    for root in _spellings([sessions_root]):
        text = re.sub(root + "/" + _HASH + r"/uploads/(?=[\w-])", UPLOAD, text)
    for root in _spellings([demo_root]):
        text = re.sub(root + r"/(?=[\w-][\w.-]*(?![\w.-]*/))", DEMO, text)  # the folder itself, not a file in it
    for root in _spellings([*roots, sessions_root, demo_root]):
        text = re.sub(root + r"/(?:" + _HASH + r"/(?:uploads/)?)?(?=[^\s/`'\"])", "", text)
        text = re.sub(root + r"(?:/" + _HASH + r")?/?(?![\w.-])", "(a server folder)", text)
    return text


def _spellings(roots: list[Path | None]) -> list[str]:
    """Each root as an escaped pattern, absolute and resolved, longest first (a root inside another goes first)."""
    found = {str(p).rstrip("/") for r in roots if r is not None for p in (Path(r).absolute(), Path(r).resolve())}
    return [re.escape(s) for s in sorted(found, key=len, reverse=True)]
