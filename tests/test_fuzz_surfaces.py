"""Property tests of the newer surfaces: the advice (findings and a recommended config from the analysis' numbers),
the tokenizer union's reader of tokenizer.json, and every registered method on degenerate tensors.

The same rule as tests/test_fuzz_properties.py: whatever arrives, a consistent result or the project's own
one-line error; never another exception. ``scripts/fuzz.py`` runs these properties for longer too.
"""

from __future__ import annotations

import atexit
import copy
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_advice import hand_built

from merging.advice import advise, recommended_yaml
from merging.config import parse_config
from merging.errors import MergeError, SourceError
from merging.methods import REGISTRY

CI = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
ENGINE = settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck))
ODD = st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-45, 1e38, -1e38, math.inf, -math.inf, math.nan, None, 2.0, 0.5])


# --- the advice ------------------------------------------------------------------------------------------------------

def check_advice(stats: dict) -> None:
    """The property: up to 8 findings with text and no number shown as nan/inf, and a recommendation whose config
    is a valid config. (One fine-tune gives 2 findings: no sign conflicts or similarity between models.)"""
    advice = advise(stats)
    assert 1 <= len(advice["findings"]) <= 8, advice["findings"]
    for finding in advice["findings"]:
        assert finding["text"] and finding["level"] in ("info", "warn")
        words = finding["text"].replace(",", " ").replace("(", " ").replace(")", " ").replace("–", " ").split()
        assert not {"nan", "inf", "-inf", "nan%", "inf%"} & set(words), finding["text"]
    rec = advice["recommendation"]
    assert rec["method"] in REGISTRY and rec["reason"]
    parse_config(recommended_yaml(advice))


def _numbers(value, path=()):
    """Every numeric leaf's path in a JSON-like value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, (*path, i))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield path


def _set(doc, path, value) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


@CI
@given(st.integers(1, 6), st.data())
def test_advice_on_statistics_with_odd_numbers(n, data):
    """The analysis of degenerate models (zero task vectors, NaN, Inf, a zero base) writes NaN, None, 0 and huge
    numbers into its statistics; the advice reads any of them without breaking or printing 'nan'."""
    stats = hand_built(n)
    paths = [p for p in _numbers(stats) if p[0] != "meta"]
    for path in data.draw(st.lists(st.sampled_from(paths), max_size=12)):
        _set(stats, path, data.draw(ODD))
    check_advice(copy.deepcopy(stats))


# --- the tokenizer union's reader ------------------------------------------------------------------------------------

json_leaf = st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=6)
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
vocabularies = (st.dictionaries(st.text(max_size=6), st.integers(-3, 70) | json_leaf, max_size=8)
                | st.lists(st.lists(json_leaf, max_size=3) | json_leaf, max_size=6) | json_value)
added_tokens = st.lists(st.fixed_dictionaries({}, optional={"content": st.text(max_size=6) | json_leaf,
                                                            "id": st.integers(-3, 2**30) | json_leaf,
                                                            "special": st.booleans()}) | json_leaf, max_size=4)
tokenizer_docs = st.fixed_dictionaries({}, optional={
    "model": st.fixed_dictionaries({}, optional={"type": st.sampled_from(["BPE", "WordLevel", "Unigram"]) | json_leaf,
                                                 "vocab": vocabularies}) | json_value,
    "added_tokens": added_tokens | json_value})


@functools.cache
def _tokenizer_folder() -> Path:
    """One checkpoint folder (a real safetensors file) whose tokenizer.json each example rewrites."""
    from safetensors.torch import save_file

    folder = Path(tempfile.mkdtemp(prefix="fuzz-tokenizer-"))
    atexit.register(shutil.rmtree, folder, True)
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    return folder


def check_tokenizer(doc) -> None:
    """The property: ``read_vocab`` gives string tokens with integer ids in range, or a one-line SourceError."""
    from merging.limits import MAX_VOCAB
    from merging.sources import open_source
    from merging.tokenizers import read_vocab

    folder = _tokenizer_folder()
    (folder / "tokenizer.json").write_text(json.dumps(doc))
    source = open_source(str(folder))
    try:
        vocab = read_vocab(source)
    except SourceError as exc:
        assert "\n" not in str(exc) and "tokenizer.json" in str(exc), str(exc)
        return
    finally:
        source.close()
    if vocab is not None:
        assert all(isinstance(t, str) and isinstance(i, int) and 0 <= i < MAX_VOCAB for t, i in vocab.tokens.items())


@CI
@given(tokenizer_docs | json_value)
def test_tokenizer_json_of_any_shape(doc):
    check_tokenizer(doc)


# --- every method on degenerate tensors ------------------------------------------------------------------------------

shapes = st.sampled_from([(1, 1), (1, 7), (7, 1), (3, 5), (6,), (2, 2, 3)])


@st.composite
def degenerate(draw):
    """A base and two fine-tunes of one shape: random, equal to the base, rank 1, or with odd values written in."""
    shape = draw(shapes)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(*shape, generator=g)
    tunes = []
    for _ in range(2):
        kind = draw(st.sampled_from(["noise", "same", "rank1", "odd"]))
        tune = base.clone()
        if kind == "noise":
            tune = base + 0.1 * torch.randn(*shape, generator=g)
        elif kind == "rank1" and len(shape) == 2:
            tune = base + torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
        elif kind == "odd":
            flat = tune.view(-1)
            for i in draw(st.lists(st.integers(0, flat.numel() - 1), min_size=1, max_size=3)):
                flat[i] = draw(st.sampled_from([0.0, 1e38, -1e38, 1e-45, math.inf, -math.inf, math.nan]))
        tunes.append(tune)
    return draw(st.sampled_from(sorted(REGISTRY))), base, tunes


def check_method(name: str, base: torch.Tensor, tunes: list[torch.Tensor]) -> None:
    """The property: the merge writes the tensor's shape (finite when every input was finite), or refuses with
    one line and leaves no folder."""
    from checkpoints import load_folder, save_checkpoint
    from test_methods_cli import minimal_config

    from merging.engine import run_merge

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_checkpoint(root / "base", {"model.layers.0.mlp.up_proj.weight": base})
        folders = [save_checkpoint(root / f"ft{i}", {"model.layers.0.mlp.up_proj.weight": t})
                   for i, t in enumerate(tunes)]
        config = minimal_config(REGISTRY[name], root / "base", folders, dtype="float32")
        try:
            run_merge(parse_config(yaml.safe_dump(config)), root / "out")
        except MergeError as exc:
            assert "\n" not in str(exc) and not (root / "out").exists(), str(exc)
            return
        merged = load_folder(root / "out")
    used = [base] + tunes[:len(config["models"])]
    if REGISTRY[name].model_output:
        out = merged["model.layers.0.mlp.up_proj.weight"]
        assert out.shape == base.shape
        if all(bool(torch.isfinite(t).all()) and float(t.abs().max()) < 1e30 for t in used):
            assert bool(torch.isfinite(out).all()), (name, out)


@ENGINE
@given(degenerate())
def test_every_method_on_degenerate_tensors(case):
    check_method(*case)
