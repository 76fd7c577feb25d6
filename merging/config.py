"""The merge configuration: mergekit-compatible YAML, validated once, then immutable.

Keys shared with mergekit keep mergekit's meaning (``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters``, ``parameters``, ``dtype``, ``out_dtype``, ``slices``). Our extensions: ``seed`` and
``allow_vocab_mismatch``.
"""

from __future__ import annotations

import math
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .methods.registry import MergeMethod, get_method
from .params import check_params, probe_points, resolve

DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "f16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SAFETENSORS_DTYPE = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
MAX_CONFIG_BYTES = 1_000_000


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

    @field_validator("sources")
    @classmethod
    def _same_length(cls, sources: list[SliceSource]) -> list[SliceSource]:
        if not sources:
            raise ValueError("a slice needs at least one source")
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ValueError("all sources of a slice must span the same number of layers")
        return sources


class MergeConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] = []
    slices: list[Slice] | None = None
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # accepted for mergekit compatibility; tokenizer files come from the base
    seed: int = 0
    allow_vocab_mismatch: bool = False
    refuse_nonfinite: bool = False  # stop when a merged tensor holds NaN or Inf (always reported)

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
        if not self.models and not self.slices:
            raise ValueError("the config names no models (give `models:` or `slices:`)")
        if self.models and self.slices:
            raise ValueError("give either `models:` or `slices:`, not both")
        return self

    @property
    def output_dtype(self) -> str | None:
        """The safetensors dtype written (F32, F16, BF16); None means 'as the base stores it'."""
        name = self.out_dtype or self.dtype
        return SAFETENSORS_DTYPE[name] if name else None

    def model_refs(self) -> list[str]:
        """Every distinct checkpoint the config reads, base first."""
        refs: list[str] = [self.base_model] if self.base_model else []
        if self.slices:
            refs += [s.model for sl in self.slices for s in sl.sources]
        refs += [m.model for m in self.models]
        return list(dict.fromkeys(refs))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_defaults=True, mode="json"), sort_keys=False)


class _AliasFound(Exception):
    def __init__(self, line: int) -> None:
        self.line = line


class _NoAliasLoader(yaml.SafeLoader):
    """A YAML loader that refuses aliases: a few lines of them can expand to gigabytes."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            raise _AliasFound(self.peek_event().start_mark.line + 1)
        return super().compose_node(parent, index)


def parse_config(text: str, *, source: str = "config") -> MergeConfig:
    """Parse YAML text into a validated MergeConfig, or raise ConfigError naming the problem."""
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _AliasFound as found:
        raise ConfigError(f"{source}: YAML aliases are not allowed (line {found.line})") from None
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


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown key `{where}`"
    if err["type"] == "missing":
        return f"missing key `{where}`"
    msg = err["msg"].removeprefix("Value error, ")
    return f"`{where}`: {msg}"


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config: MergeConfig, *, source: str = "config") -> None:
    """Check the method, its inputs, every parameter value and the method's cross-parameter rules, once, before
    anything is read."""
    method = get_method(config.merge_method, source)
    if method.base == "required" and not config.base_model:
        raise ConfigError(f"{source}: merge_method {method.name!r} needs a `base_model`")
    if config.slices and method.name != "passthrough":
        counts = {len(s.sources) for s in config.slices}
    else:
        counts = {len(input_entries(config, method))}
    for n in counts:
        _check_model_count(method, n, source)
    check_params(method, config.parameters, f"{source}: parameters")
    for i, entry in enumerate(config.models):
        check_params(method, entry.parameters, f"{source}: models[{i}] ({entry.model}) parameters",
                     global_allowed=False)
    for si, sl in enumerate(config.slices or []):
        for j, src in enumerate(sl.sources):
            check_params(method, src.parameters, f"{source}: slices[{si}].sources[{j}] parameters",
                         global_allowed=False)
    if method.validate is not None:
        groups = [[s.parameters for s in sl.sources] for sl in config.slices] if config.slices else \
            [[e.parameters for e in input_entries(config, method)]]
        for model_params in groups:
            for name, t in probe_points(config.parameters, model_params):
                method.validate(resolve(method, config.parameters, model_params, name, t), f"{source}: parameters")


def _check_model_count(method: MergeMethod, n: int, source: str) -> None:
    if n >= method.min_models and (method.max_models is None or n <= method.max_models):
        return
    want = (f"exactly {method.min_models}" if method.min_models == method.max_models
            else f"at least {method.min_models}" + (f" and at most {method.max_models}" if method.max_models else ""))
    last = method.max_models if method.max_models is not None else method.min_models  # the number shown last
    plural = "" if last == 1 else "s"
    what = f"model{plural} besides the base" if method.base == "required" else f"model{plural}"
    raise ConfigError(f"{source}: merge_method {method.name!r} takes {want} {what}, got {n}")


def input_entries(config: MergeConfig, method: MergeMethod) -> list[ModelEntry]:
    """The models a method combines: for methods built on a base (or that keep an optional base apart,
    ``separate_base``), every model except the base itself."""
    if method.base == "required" or method.separate_base:
        return [m for m in config.models if m.model != config.base_model]
    return list(config.models)
