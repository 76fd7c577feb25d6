"""Property tests of the two parsers that read untrusted input: the safetensors header and the merge config.

Whatever bytes or text arrive, the parser either returns something consistent or raises its own error type
(SourceError / ConfigError) with a one-line message; never another exception (a TypeError, RecursionError...),
which the app would show as an "internal error" and the CLI as a traceback. Bounded for CI (a few seconds each);
``scripts/fuzz.py`` runs the same properties for longer.
"""

from __future__ import annotations

import json
import math
import struct

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from merging.config import MergeConfig, parse_config
from merging.errors import ConfigError, SourceError
from merging.safetensors_io import DTYPES, dtype_size, header_bytes, parse_header

CI = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della", "breadcrumbs", "model_stock",
           "passthrough", "emr", "nuslerp", "dare_linear", "no_such_method"]
KEYS = ["merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "tokenizer_source",
        "seed", "allow_vocab_mismatch", "refuse_nonfinite", "unknown_key"]
PARAMS = ["weight", "density", "lambda", "t", "epsilon", "gamma", "normalize", "int8_mask", "rescale", "k",
          "coefficients", "nan_scope", "select_topk", "bogus"]


# --- the safetensors header ---------------------------------------------------------------------------------

def parse(raw_file: bytes):
    return parse_header(lambda off, n: raw_file[off:off + n], len(raw_file), "fuzz.safetensors")


def check_header(raw_file: bytes) -> None:
    """The property: a consistent result or a one-line SourceError naming the file."""
    try:
        tensors, metadata = parse(raw_file)
    except SourceError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("fuzz.safetensors"), str(exc)
        return
    (header_len,) = struct.unpack("<Q", raw_file[:8])
    data_start, size = 8 + header_len, len(raw_file)
    assert isinstance(metadata, dict)
    spans = []
    for name, info in tensors.items():
        assert info.name == name and name and "/" not in name and "\\" not in name
        assert info.dtype in DTYPES and all(isinstance(d, int) and d >= 0 for d in info.shape)
        assert data_start <= info.start <= info.end <= size
        assert info.nbytes == math.prod(info.shape) * dtype_size(info.dtype)
        if info.end > info.start:
            spans.append((info.start, info.end))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "overlapping tensors"


names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
entries = st.lists(st.tuples(names, st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
                   max_size=5, unique_by=lambda e: e[0])


def valid_file(spec: list[tuple[str, str, list[int]]]) -> bytes:
    head, _ = header_bytes([(n, dt, tuple(shape)) for n, dt, shape in spec], {"format": "pt"})
    return head + bytes(sum(math.prod(s) * dtype_size(dt) for _, dt, s in spec))


@CI
@given(st.binary(max_size=300))
@example(struct.pack("<Q", 100_000) + b"[" * 100_000)  # nesting deeper than the JSON decoder's recursion limit
@example(struct.pack("<Q", 5010) + b'{"a": ' + b"1" * 5000 + b"}    ")  # an integer over Python's 4300 digits
@example(struct.pack("<Q", 2**64 - 1))
def test_header_of_arbitrary_bytes(raw):
    check_header(raw)


@CI
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.binary(max_size=64))
@example({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)  # an unhashable dtype
@example({"a": {"dtype": {}, "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)
@example({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4)
def test_header_of_arbitrary_json_objects(header, data):
    raw = json.dumps(header).encode()
    check_header(struct.pack("<Q", len(raw)) + raw + data)


@CI
@given(entries)
def test_valid_headers_parse_to_exactly_what_was_written(spec):
    if any(not n or not n.isprintable() or "/" in n or "\\" in n or n == "__metadata__" for n, _, _ in spec):
        check_header(valid_file(spec))  # an invalid name: refused with a message, or (never) accepted consistently
        return
    tensors, metadata = parse(valid_file(spec))
    assert metadata == {"format": "pt"}
    assert {n: (t.dtype, list(t.shape)) for n, t in tensors.items()} == {n: (dt, s) for n, dt, s in spec}


@CI
@given(entries, st.data())
def test_mutated_valid_headers(spec, data):
    raw = bytearray(valid_file(spec))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "json"]))
    if kind == "flip" and raw:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw)))]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=16))
    else:  # replace one field of one entry by an arbitrary JSON value, keeping the header well-formed JSON
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        names_ = [k for k in header if k != "__metadata__"]
        if names_:
            entry = header[data.draw(st.sampled_from(names_))]
            entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]))] = data.draw(json_values)
        text = json.dumps(header).encode()
        raw = bytearray(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    check_header(bytes(raw))


# --- the merge config ---------------------------------------------------------------------------------------

def check_config(text: str) -> None:
    """The property: a valid MergeConfig or a one-line ConfigError; nothing else."""
    try:
        config = parse_config(text)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        return
    assert isinstance(config, MergeConfig)
    assert config.models or config.slices
    assert parse_config(config.to_yaml()) == config  # what we write into merge_config.yml reads back the same


yaml_tokens = st.sampled_from(["merge_method:", "models:", "- model:", "base_model:", "parameters:", " ", "\n",
                               "  ", "- ", "[", "]", "{", "}", ":", ",", "&a", "*a", "!!str", "!!python/object",
                               "'", '"', "#", "|", ">", "?", "~", "null", "1e309", ".nan", "-", "weight: 0.5",
                               "ties", "linear", "slerp", "x/y", "@", "\t", "%YAML 1.1", "---", "...", "!!set"])


@CI
@given(st.text(max_size=200))
@example("[" * 5000)  # deeper than PyYAML's recursive composer goes
@example("merge_method: linear\nmodels: [{model: a, parameters: {weight: {1: 2, b: 3}}}]")  # mixed-type keys
def test_config_of_arbitrary_text(text):
    check_config(text)


@CI
@given(st.lists(yaml_tokens, max_size=40))
def test_config_of_yaml_ish_tokens(tokens):
    check_config("".join(tokens))


scalars = (st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=6) | st.sampled_from(["ties", "a/b", "*", "nan", "bf16", "\n", "x\ny"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["filter", "value", "x", 1]), inner, max_size=2), max_leaves=6)
param_dicts = st.dictionaries(st.sampled_from(PARAMS), values, max_size=3)
model_entries = st.fixed_dictionaries({"model": st.sampled_from(["org/a", "org/b", "/abs/c", "x\ny", ""]) | scalars},
                                      optional={"parameters": param_dicts | scalars, "extra": scalars})
slice_sources = st.fixed_dictionaries({"model": st.sampled_from(["org/a", "org/b"]),
                                       "layer_range": st.lists(st.integers(-1, 4), max_size=3) | scalars},
                                      optional={"parameters": param_dicts})


@st.composite
def configs(draw) -> dict:
    doc = {"merge_method": draw(st.sampled_from(METHODS) | scalars)}
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=5, unique=True)):
        if key == "models":
            doc[key] = draw(st.lists(model_entries, max_size=4) | scalars)
        elif key == "slices":
            doc[key] = draw(st.lists(st.fixed_dictionaries({"sources": st.lists(slice_sources, max_size=3)}),
                                     max_size=2) | scalars)
        elif key == "parameters":
            doc[key] = draw(param_dicts | scalars)
        elif key in ("dtype", "out_dtype"):
            doc[key] = draw(st.sampled_from(["bfloat16", "fp16", "float32", "int8"]) | scalars)
        else:
            doc[key] = draw(scalars | values)
    return doc


numbers = st.floats(-2, 2) | st.sampled_from([0.0, 1.0, 0.5, -1.0, 1e-9, 1.5])
near_values = numbers | st.lists(numbers, min_size=1, max_size=4) | st.lists(
    st.fixed_dictionaries({"value": numbers}, optional={"filter": st.sampled_from(["mlp", "self_attn", "*", "embed"])}),
    min_size=1, max_size=3) | st.booleans()


@st.composite
def near_valid_configs(draw) -> dict:
    """Mostly well-formed configs (real methods, repo ids, plausible values): they reach the deeper checks."""
    from merging.methods import REGISTRY

    method = REGISTRY[draw(st.sampled_from(sorted(REGISTRY)))]
    names = [p.name for p in method.params]
    per_model = [p.name for p in method.params if p.per_model]
    n = draw(st.integers(1, 4))
    models = [{"model": f"org/model-{k}"} for k in range(n)]
    for m in models:
        if per_model and draw(st.booleans()):
            m["parameters"] = draw(st.dictionaries(st.sampled_from(per_model), near_values, max_size=2))
    doc = {"merge_method": method.name, "models": models}
    if draw(st.booleans()) or method.base == "required":
        doc["base_model"] = draw(st.sampled_from(["org/base", "org/model-0"]))
    if names and draw(st.booleans()):
        doc["parameters"] = draw(st.dictionaries(st.sampled_from(names), near_values, max_size=3))
    for key, strategy in (("dtype", st.sampled_from(["bfloat16", "float16", "float32", "fp8"])),
                          ("seed", st.integers(-1, 2**31)), ("allow_vocab_mismatch", st.booleans())):
        if draw(st.integers(0, 3)) == 0:
            doc[key] = draw(strategy)
    return doc


@CI
@given(configs() | near_valid_configs())
@example({"merge_method": "linear", "models": [{"model": "a\nb", "parameters": {"wieght": 1}}]})
@example({"merge_method": "ties\nx", "models": [{"model": "a"}]})
def test_config_of_structured_random_documents(doc):
    check_config(yaml.safe_dump(doc, allow_unicode=True))


@CI
@given(near_valid_configs())
def test_valid_configs_survive_a_yaml_round_trip(doc):
    """Any config that parses writes a merge_config.yml that parses to the same config."""
    check_config(yaml.safe_dump(doc))
