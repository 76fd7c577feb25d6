"""The merge configuration: mergekit-compatible YAML, validated once, then immutable.

Keys shared with mergekit keep mergekit's meaning (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters``, ``parameters``, ``dtype``, ``out_dtype``, ``slices`` with their ``parameters`` and
``base_model``, ``modules``, ``tokenizer_source`` / ``tokenizer``, ``chat_template``). Our extensions: ``seed``,
``allow_vocab_mismatch``, ``refuse_nonfinite`` and ``allow_crimes`` (mergekit's ``--allow-crimes``). An unknown key
is an error that suggests the nearest known one. YAML anchors and aliases are expanded within a budget of
``merging.yaml_budget.MAX_YAML_NODES`` nodes, so an alias bomb is refused as soon as it is composed.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .limits import check_config_limits, check_probes
from .methods.registry import MergeMethod, get_method
from .params import check_params, probe_points, resolve
from .yaml_budget import load_yaml

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_CONFIG_BYTES = 1_000_000
CHAT_TEMPLATES = {  # by name, as mergekit's `chat_template: chatml`
    "chatml": "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] = {}


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError(f"layer_range {list(value)} must be [start, end) with 0 <= start < end")
        return value


class Slice(_Strict):
    sources: list[SliceSource]
    base_model: str | None = None  # this slice's base (mergekit's `slices[].base_model`); else the config's
    parameters: dict[str, Any] = {}  # between the sources' own and the config's

    @field_validator("sources")
    @classmethod
    def _same_length(cls, sources: list[SliceSource]) -> list[SliceSource]:
        if not sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return sources


class Module(_Strict):
    """mergekit's ``modules:`` entry: the models (or slices) of one part of the architecture (``default`` for a
    model with one stack; ``encoder``/``decoder`` for an encoder-decoder), with parameters of its own."""

    models: list[ModelEntry] = []
    slices: list[Slice] | None = None
    parameters: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_kind(self) -> Module:
        if bool(self.models) == bool(self.slices):
            raise ValueError("each module gives either `models:` or `slices:`")
        return self


class TokenSource(_Strict):
    kind: Literal["model_token", "zero"]
    model: str | None = None
    token_id: int | None = None
    token: str | None = None

    @model_validator(mode="after")
    def _which(self) -> TokenSource:
        if self.kind == "model_token" and (self.model is None or (self.token_id is None) == (self.token is None)):
            raise ValueError("a `model_token` source needs `model` and one of `token_id` / `token`")
        return self


class TokenEmbedding(_Strict):
    source: str | TokenSource | None = None  # a model reference, a model's token, or zeros
    force: bool = False


class TokenizerSpec(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary and where added tokens' embeddings come from."""

    source: str = "union"  # "union", "base", or a model reference
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = None

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"pad_to_multiple_of must be a positive integer, got {value}")
        return value


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = []
    slices: list[Slice] | None = None
    modules: dict[str, Module] | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # "base", "union" or a model: the output vocabulary (merging.tokenizers)
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None  # a template's name (chatml, ...), a Jinja template, or "auto"
    seed: int = 0
    allow_vocab_mismatch: bool = False
    refuse_nonfinite: bool = False  # stop when a merged tensor holds NaN or Inf (always reported)
    allow_crimes: bool = False  # merge models of different architectures (mergekit's --allow-crimes)

    @field_validator("chat_template")
    @classmethod
    def _known_template(cls, value: str | None) -> str | None:
        if value is None or value in CHAT_TEMPLATES or value == "auto" or ("{" in value and len(value) >= 20):
            return value
        raise ValueError(f"{value!r} is not a chat template we ship ({', '.join(CHAT_TEMPLATES)}, or `auto`: the "
                         "inputs' most common one); give the Jinja text itself")

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        key = DTYPE_ALIASES.get(str(value).lower())
        if key is None:
            raise ValueError(f"unknown dtype {value!r} (use float32, float16 or bfloat16)")
        return key

    @model_validator(mode="after")
    def _has_inputs(self) -> MergeConfig:
        given = [k for k in ("models", "slices", "modules") if getattr(self, k)]
        if not given:
            raise ValueError("the config names no models (give `models:` or `slices:`)")
        if len(given) > 1:
            raise ValueError(f"give one of `models:`, `slices:` or `modules:`, not {' and '.join(given)}")
        if self.tokenizer_source and self.tokenizer:
            raise ValueError("give `tokenizer_source` or `tokenizer`, not both")
        return self

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from: "base", "union", a model reference, or None (the base's
        tokenizer files, copied)."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    @property
    def output_dtype(self) -> str | None:
        """The safetensors dtype written (F32, F16, BF16); None means 'as the base stores it'."""
        name = self.out_dtype or self.dtype
        return SAFETENSORS_DTYPE[name] if name else None

    def model_refs(self) -> list[str]:
        """Every distinct checkpoint the config reads, base first."""
        refs: list[str] = [self.base_model] if self.base_model else []
        parts = [(self.models, self.slices)] + [(m.models, m.slices) for m in (self.modules or {}).values()]
        for models, slices in parts:
            for sl in slices or []:
                refs += ([sl.base_model] if sl.base_model else []) + [s.model for s in sl.sources]
            refs += [m.model for m in models]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True, mode="json"), sort_keys=False)


def parse_config(text: str, *, source: str = "config") -> MergeConfig:
    """Parse YAML text into a validated MergeConfig, or raise ConfigError naming the problem."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = load_yaml(text, source)
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ConfigError(f"{source}: YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise ConfigError(_one_line(f"{source}: not valid YAML{where}: {problem}")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a YAML mapping with `merge_method` and `models`, "
                          f"got {type(data).__name__}")
    return config_from_dict(data, source=source)


def config_from_dict(data: dict, *, source: str = "config") -> MergeConfig:
    try:
        config = MergeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_one_line(f"{source}: {_first_error(exc)}")) from None
    try:
        validate_config(config, source=source)
    except ConfigError as exc:
        raise ConfigError(_one_line(str(exc))) from None
    return config


def _one_line(message: str) -> str:
    """Messages quote the user's strings (model paths, keys); a newline in one must not split the message."""
    return message.replace("\r", "\\r").replace("\n", "\\n")


def load_config(path: str) -> MergeConfig:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not UTF-8 text") from None
    return parse_config(text, source=path)


_BRANCHES = {"TokenSource", "TokenEmbedding", "TokenizerSpec", "Slice", "SliceSource", "Module", "ModelEntry"}
_FIELDS_AT = {"": MergeConfig, "models": ModelEntry, "slices": Slice, "sources": SliceSource, "modules": Module,
              "tokenizer": TokenizerSpec, "tokens": TokenEmbedding, "source": TokenSource}


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    # a typo is also a missing key: report the typo; a union's branches each complain: report the rule that failed
    err = next((e for e in errors if e["type"] == "extra_forbidden"), None) or \
        next((e for e in errors if e["type"] == "value_error"), errors[0])
    loc = tuple(p for p in err["loc"] if not _is_branch(p))
    where = ".".join(str(p) for p in loc) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown key `{where}`{_suggestion(loc)}"
    if err["type"] == "missing":
        return f"missing key `{where}`"
    msg = err["msg"].removeprefix("Value error, ")
    return f"`{where}`: {msg}"


def _is_branch(part) -> bool:
    """pydantic names the branch of a union it tried (``str``, ``TokenSource``) among the keys of a location."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or part in _BRANCHES
                                      or re.fullmatch(r"[\w-]+\[.*\]", part) is not None)


def _suggestion(loc: tuple) -> str:
    """`` (did you mean `dtype`?)`` for a misspelt key, from the keys allowed where it stands."""
    if not loc:
        return ""
    named = [p for p in loc[:-1] if isinstance(p, str)]
    parent = named[-1] if named else ""
    if len(named) >= 2 and named[-2] in ("modules", "tokens") and isinstance(loc[-2], str):
        parent = named[-2]  # modules.<name>.key, tokens.<token>.key
    model = _FIELDS_AT.get(parent)
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config: MergeConfig, *, source: str = "config") -> None:
    """Check the method, its inputs, every parameter value and the method's cross-parameter rules, once, before
    anything is read."""
    method = get_method(config.merge_method, source)
    check_config_limits(config, source)
    for where, part in parts(config):
        _validate_part(config, method, part, f"{source}: {where}" if where else source)
    check_params(method, config.parameters, f"{source}: parameters")


def parts(config: MergeConfig) -> list[tuple[str, Module]]:
    """The config as mergekit normalizes it: one part per module (``models:`` or ``slices:`` at the top level are
    the one module ``""``), each with its own parameters."""
    if config.modules:
        return [(f"modules.{name}", module) for name, module in config.modules.items()]
    return [("", Module.model_construct(models=list(config.models), slices=config.slices, parameters={}))]


def _validate_part(config: MergeConfig, method: MergeMethod, part: Module, source: str) -> None:
    scopes = (part.parameters, config.parameters) if part.parameters else (config.parameters,)
    if part.parameters:
        check_params(method, part.parameters, f"{source}.parameters")
    if part.slices:
        groups = []
        for si, sl in enumerate(part.slices):
            base = slice_base(config, sl)
            others = slice_inputs(method, sl, base)
            if method.base == "required" and not base:
                raise ConfigError(f"{source}: merge_method {method.name!r} needs a `base_model`")
            if method.base == "required" and len(others) == len(sl.sources):
                raise ConfigError(f"{source}: slices[{si}]: the base_model {base!r} is not among the slice's sources; "
                                  f"add it as a source with the same layer_range (its layers are the base)")
            _check_model_count(method, len(others), f"{source}: slices[{si}]")
            if sl.parameters:
                check_params(method, sl.parameters, f"{source}: slices[{si}].parameters")
            for j, src in enumerate(sl.sources):
                check_params(method, src.parameters, f"{source}: slices[{si}].sources[{j}] parameters",
                             global_allowed=False)
            groups.append(((sl.parameters, *scopes) if sl.parameters else scopes, [s.parameters for s in others]))
    else:
        if method.base == "required" and not config.base_model:
            raise ConfigError(f"{source}: merge_method {method.name!r} needs a `base_model`")
        entries = input_entries(config, method, part.models)
        _check_model_count(method, len(entries), source)
        for i, entry in enumerate(part.models):
            check_params(method, entry.parameters, f"{source}: models[{i}] ({entry.model}) parameters",
                         global_allowed=False)
        groups = [(scopes, [e.parameters for e in entries])]
    if method.validate is not None:
        for shared, model_params in groups:
            points = probe_points(_merged_scopes(shared), model_params)
            check_probes(len(points), f"{source}: parameters")
            for name, t in points:
                method.validate(resolve(method, shared, model_params, name, t), f"{source}: parameters")


def _merged_scopes(scopes: tuple[dict, ...]) -> dict:
    merged: dict = {}
    for scope in reversed(scopes):
        merged.update(scope)
    return merged


def slice_base(config: MergeConfig, sl: Slice) -> str | None:
    return sl.base_model or config.base_model


def slice_inputs(method: MergeMethod, sl: Slice, base: str | None) -> list[SliceSource]:
    """The sources a method combines in one slice: all but the base's, for methods built on a base (or that keep
    an optional base apart, ``separate_base``)."""
    if method.base == "required" or method.separate_base:
        return [s for s in sl.sources if s.model != base]
    return list(sl.sources)


def _check_model_count(method: MergeMethod, n: int, source: str) -> None:
    if n >= method.min_models and (method.max_models is None or n <= method.max_models):
        return
    want = (f"exactly {method.min_models}" if method.min_models == method.max_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
    last = method.max_models if method.max_models is not None else method.min_models  # the number shown last
    plural = "" if last == 1 else "s"
    what = f"model{plural} besides the base" if method.base == "required" else f"model{plural}"
    raise ConfigError(f"{source}: merge_method {method.name!r} takes {want} {what}, got {n}")


def input_entries(config: MergeConfig, method: MergeMethod, models: list[ModelEntry] | None = None
                  ) -> list[ModelEntry]:
    """The models a method combines: for methods built on a base (or that keep an optional base apart,
    ``separate_base``), every model except the base itself."""
    models = config.models if models is None else models
    if method.base == "required" or method.separate_base:
        return [m for m in models if m.model != config.base_model]
    return list(models)


def ignored_notes(config: MergeConfig) -> list[str]:
    """The parameters a config sets that its method accepts for mergekit's sake but does not use."""
    method = get_method(config.merge_method)
    found = []
    scopes = [config.parameters] + [m.parameters for m in config.models]
    for _, part in parts(config):
        scopes += [part.parameters] + [m.parameters for m in part.models]
        scopes += [p for sl in part.slices or [] for p in [sl.parameters] + [s.parameters for s in sl.sources]]
    for name in method.ignored:
        if any(name in scope for scope in scopes):
            found.append(f"`{name}` is ignored by {method.name} (accepted for mergekit compatibility)")
    return found
