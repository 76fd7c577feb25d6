"""Loading with transformers, offline and quiet, and the memory pre-flight of a check.

transformers is imported here, on first use only (a merge, the CLI's ``--help`` and the app's start never load it).
Every load is ``local_files_only=True``, ``use_safetensors=True`` and never runs a repository's own code; a model
type transformers does not know, a missing config or weights that do not fit the config give one line naming the
folder.

Memory (one model is loaded at a time and freed before the next):

    host   ≈ EVAL_OVERHEAD + the largest model's weights at the evaluation dtype (on CUDA: as stored, before the copy)
             + its activations on CPU
    device ≈ the largest model's weights at the evaluation dtype + its activations (CUDA only)
    activations ≈ 4 B · W · (3 · vocab + 16 · hidden + 4 · intermediate) + 4 B · W² · heads   (one window of W)

compared with what is free (``merging.resources``: MemAvailable or the container's limit, or
``MERGESCOPE_MEMORY_LIMIT``; on CUDA ``torch.cuda.mem_get_info``), before any weight is read.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import SourceError
from ..resources import require_memory
from .inputs import Candidate, read_config

EVAL_OVERHEAD = 384 * 1024 * 1024  # transformers' modules and one model's Python objects
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STORED = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float32"}
SMALL_MODEL = 32_000_000
KINDS = ("causal_lm", "seq2seq", "sequence_classifier", "image_classifier")


def transformers_module():
    try:
        import transformers
    except ImportError:
        raise SourceError("evaluate needs transformers (pip install transformers==5.23.0)") from None
    return transformers


@contextlib.contextmanager
def quiet():
    """transformers' warnings and progress bars off while we load (what matters is reported by the check)."""
    tf = transformers_module()
    log = tf.utils.logging
    level = log.get_verbosity()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield tf
    finally:
        log.set_verbosity(level)
        log.enable_progress_bar()


@contextlib.contextmanager
def threads_for(c: Candidate, device: str):
    """One CPU thread for small models (under SMALL_MODEL parameters): their matrix products are too small to
    split, and on a shared machine torch's worker threads wait on each other (40× slower on 2 busy cores)."""
    import torch

    small = device == "cpu" and (c.parameters or 0) < SMALL_MODEL
    before = torch.get_num_threads()
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)


def model_kind(folder: Path, label: str) -> str:
    """Which check a folder gets, from its config.json alone (one of KINDS), or a one-line SourceError."""
    cfg = read_config(folder)
    tf = transformers_module()
    from transformers.models.auto import configuration_auto as ca
    from transformers.models.auto import modeling_auto as ma

    model_type = cfg.get("model_type")
    if not model_type:
        raise SourceError(f"{label}: its config.json has no model_type, so transformers cannot load it")
    if cfg.get("auto_map"):
        raise SourceError(f"{label}: model type '{model_type}' needs the repository's own code (auto_map), which "
                          "evaluate never runs")
    if model_type not in ca.CONFIG_MAPPING_NAMES:
        raise SourceError(f"{label}: model type '{model_type}' is not one transformers {tf.__version__} knows")

    def names(mapping: dict) -> set[str]:
        out = set()
        for value in mapping.values():
            out |= set(value) if isinstance(value, (tuple, list)) else {value}
        return out

    tables = [("causal_lm", ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
              ("seq2seq", ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
              ("sequence_classifier", ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
              ("image_classifier", ma.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)]
    archs = cfg.get("architectures") or []
    for arch in archs[:1]:
        for kind, mapping in tables:
            if arch in names(mapping):
                return kind
    if not archs:
        for kind, mapping in tables:
            if model_type in mapping:
                return kind
    shown = archs[0] if archs else f"model type '{model_type}'"
    raise SourceError(f"{label}: {shown} is not a causal LM, seq2seq model or sequence/image classifier, the kinds "
                      "evaluate checks")


def eval_dtype(requested: str, device: str, stored: str) -> str:
    """float32 on the CPU (bf16/fp16 arithmetic there is slow or missing), the stored dtype on CUDA."""
    if requested != "auto":
        return requested
    return STORED.get(stored, "float32") if device.startswith("cuda") else "float32"


def load_model(c: Candidate, kind: str, device: str, dtype: str):
    """The model on ``device`` in eval mode; SourceError if transformers cannot load it here. Returns
    (model, weights transformers had to initialize because the folder lacks them)."""
    import torch

    with quiet() as tf:
        cls = {"causal_lm": tf.AutoModelForCausalLM, "seq2seq": tf.AutoModelForSeq2SeqLM,
               "sequence_classifier": tf.AutoModelForSequenceClassification,
               "image_classifier": tf.AutoModelForImageClassification}[kind]
        try:
            model, info = cls.from_pretrained(str(c.folder), local_files_only=True, use_safetensors=True,
                                              trust_remote_code=False, dtype=getattr(torch, dtype),
                                              output_loading_info=True)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
            text = " ".join(str(exc).split())
            raise SourceError(f"{c.ref}: transformers could not load it as a {kind.replace('_', ' ')} "
                              f"({text[:300]})") from None
    missing = sorted(info.get("missing_keys") or [])
    return model.to(device).eval(), missing


def load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it has no tokenizer files."""
    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
    if not any((folder / n).is_file() for n in names):
        return None
    with quiet() as tf:
        try:
            return tf.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError, ImportError) as exc:
            text = " ".join(str(exc).split())
            raise SourceError(f"{folder}: its tokenizer could not be loaded ({text[:200]})") from None


def dims(folder: Path) -> dict[str, int]:
    """Vocabulary, hidden and feed-forward widths, heads and context length from config.json (names vary)."""
    cfg = read_config(folder)
    cfg = {**(cfg.get("text_config") or {}), **cfg}

    def first(*keys: str, default: int = 0) -> int:
        for k in keys:
            if isinstance(cfg.get(k), int):
                return cfg[k]
        return default

    hidden = first("hidden_size", "n_embd", "d_model", "dim", default=1024)
    return {"vocab": first("vocab_size", "num_labels", default=32000), "hidden": hidden,
            "intermediate": first("intermediate_size", "n_inner", "d_ff", "ffn_dim", default=4 * hidden),
            "heads": first("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", default=16),
            "context": first("max_position_embeddings", "n_positions", "n_ctx", "max_length", default=0)}


def check_memory(models: list[Candidate], device: str, dtype: str, window: int) -> int:
    """Refuse up front, with the figures, when the largest model and one window's activations cannot fit."""
    if not models:
        return 0
    from .report import params

    biggest = max(models, key=lambda c: (_weights(c, dtype), c.role == "merged"))
    d = dims(biggest.folder)
    act = 4 * window * (3 * d["vocab"] + 16 * d["hidden"] + 4 * d["intermediate"]) + 4 * window ** 2 * d["heads"]
    weights = _weights(biggest, dtype)
    what = (f"checking the merged model ({biggest.label}: {params(biggest.parameters)} parameters as {dtype}, "
            "one at a time)")
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        require_memory(weights + act, f"{what} on {device}", free, f"free on {device}")
        host = EVAL_OVERHEAD + _weights(biggest, None)
    else:
        host = EVAL_OVERHEAD + weights + act
    require_memory(host, what)
    return host


def _weights(c: Candidate, dtype: str | None) -> int:
    """Bytes of a model's tensors at ``dtype`` (None: as stored); integer tensors stay as stored."""
    from ..safetensors_io import dtype_size

    total = 0
    for name, n in c.dtypes.items():
        if dtype is not None and name in STORED:
            total += n * DTYPE_BYTES[dtype]
        else:
            total += n * dtype_size(name)
    return total
