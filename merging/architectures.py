"""What tensor names and ``config.json`` say about a model: its layer stacks, its tied weights, its family, and the
names transformers 5 uses at runtime where they differ from the checkpoint's.

Everything here is plain name logic (no tensors, no files), shared by the sources, the plan, the analysis and
``inspect``.

Layer stacks. A tensor inside the blocks has a *stack* (the name up to the block container: ``model.layers``,
``encoder.block``, ``model.decoder.layers``) and an index. Encoder–decoder models have two stacks, and each is
counted on its own: mergekit gives per-layer parameters ``t = i / (n − 1)`` within each stack, and the analysis
groups are named ``encoder 3`` and ``decoder 1`` (``layer 3`` when a model has one stack).

Tied weights. A model that ties its output head to its token embedding stores only the embedding; its head *is*
the embedding. ``tied_alternatives`` names the tensors a missing head (or per-stack embedding) is read as.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
_GENERIC = {"model", "transformer", "base_model", "language_model", "text_model"}


def layer_position(name: str) -> tuple[str, int] | None:
    """(stack, index) of a tensor inside the blocks (``model.encoder.layers.3.fc1.weight`` →
    (``model.encoder.layers``, 3)), or None outside them."""
    m = _LAYER.search(name)
    if m is None:
        return None
    return name[:m.start(1)].rstrip("."), int(m.group(1))


def with_layer_position(name: str, index: int) -> str:
    """The same tensor name at another block index."""
    m = _LAYER.search(name)
    assert m is not None, name
    return name[: m.start(1)] + str(index) + name[m.end(1):]


def stack_labels(stacks: set[str] | list[str]) -> dict[str, str]:
    """Short names for the stacks of one model: ``layer`` when there is one, else the shortest distinct tail of
    each stack's path without generic parts (``encoder``, ``decoder``, ``vision_model.encoder``)."""
    stacks = sorted(set(stacks))
    if len(stacks) <= 1:
        return {s: "layer" for s in stacks}
    parts = {s: [p for p in s.split(".")[:-1] if p not in _GENERIC] or [s.split(".")[-1]] for s in stacks}
    labels = {}
    for s in stacks:
        for k in range(1, len(parts[s]) + 1):
            tail = ".".join(parts[s][-k:])
            if sum(".".join(parts[o][-k:]) == tail for o in stacks) == 1:
                labels[s] = tail
                break
        else:
            labels[s] = s
    return labels


@dataclass(frozen=True)
class Layers:
    """The layer stacks of one model, from its tensor names: how many blocks each has and what it is called."""

    counts: dict[str, int]
    labels: dict[str, str]

    @classmethod
    def of(cls, names, single_count: int | None = None) -> Layers:
        """From tensor names; ``single_count`` (config.json's layer count) wins for a model with one stack."""
        counts: dict[str, int] = {}
        for name in names:
            pos = layer_position(name)
            if pos is not None:
                counts[pos[0]] = max(counts.get(pos[0], 0), pos[1] + 1)
        if len(counts) == 1 and single_count:
            counts = {next(iter(counts)): single_count}
        labels = stack_labels(counts)
        seen = list(counts)  # encoders first (a checkpoint lists its tensors alphabetically: decoder first)
        order = sorted(seen, key=lambda s: (0 if any(w in labels[s] for w in ("encoder", "vision")) else 1,
                                            seen.index(s)))
        return cls({s: counts[s] for s in order}, labels)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def depth(self, name: str) -> float:
        """mergekit's ``t`` for anchors: index / (blocks in its stack − 1) inside the blocks, 0 outside them."""
        pos = layer_position(name)
        if pos is None or pos[0] not in self.counts:
            return 0.0
        n = self.counts[pos[0]]
        return pos[1] / (n - 1) if n > 1 else 1.0

    def group(self, name: str) -> tuple[str, int] | None:
        """(``layer 3`` / ``encoder 3``, index) of a tensor inside the blocks, else None."""
        pos = layer_position(name)
        if pos is None:
            return None
        return f"{self.labels.get(pos[0], 'layer')} {pos[1]}", pos[1]


# --- tied weights ------------------------------------------------------------------------------------------------

_TIED: dict[str, tuple[str, ...]] = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "shared.weight", "model.shared.weight",
                       "model.language_model.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                       "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight",
                       "transformer.embed_tokens.weight", "model.embed.weight"),
    "embed_out.weight": ("gpt_neox.embed_in.weight",),
    "cls.predictions.decoder.weight": ("bert.embeddings.word_embeddings.weight",),
    "lm_head.decoder.weight": ("roberta.embeddings.word_embeddings.weight",),
    "encoder.embed_tokens.weight": ("shared.weight",),
    "decoder.embed_tokens.weight": ("shared.weight",),
    "model.encoder.embed_tokens.weight": ("model.shared.weight",),
    "model.decoder.embed_tokens.weight": ("model.shared.weight",),
}
HEAD_NAMES = tuple(n for n in _TIED if "embed_tokens" not in n)


def tied_alternatives(name: str) -> tuple[str, ...]:
    """The tensors that stand for ``name`` in a model that ties it (an output head read as the embedding)."""
    return _TIED.get(name, ())


def tied_partner(name: str, names) -> str | None:
    """The first of ``name``'s tied alternatives present in ``names``, or None."""
    return next((alt for alt in tied_alternatives(name) if alt in names), None)


# --- families ----------------------------------------------------------------------------------------------------

def family(config: dict | None) -> str | None:
    """What a config.json says the model is: its first ``architectures`` entry, else its ``model_type``."""
    if not isinstance(config, dict):
        return None
    archs = config.get("architectures")
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None


# the note's start when every input has one architecture: a description, not a warning (the advice leaves it out)
ONE_ARCHITECTURE = "architectures: all "


def describe_family(config: dict | None) -> str:
    """``LlamaForCausalLM (llama)``, or ``unknown (no config.json)``."""
    if not isinstance(config, dict):
        return "unknown (no config.json)"
    archs = config.get("architectures")
    arch = ", ".join(a for a in archs if isinstance(a, str)) if isinstance(archs, list) and archs else None
    model_type = config.get("model_type")
    if arch and model_type:
        return f"{arch} ({model_type})"
    return arch or (f"model_type {model_type}" if model_type else "unknown (config.json names no architecture)")


# --- transformers 5 runtime names --------------------------------------------------------------------------------

# Checkpoint name → runtime name, as transformers 5 renames modules of these families when it loads them (PEFT
# writes adapter keys with the runtime names). Used when transformers itself is not installed.
_VIT_STYLE = (
    (r"\.encoder\.layer\.(\d+)\.", r".layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"(\.layers\.\d+)\.output\.dense\.", r"\1.mlp.fc2."),
)
RUNTIME_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    t: _VIT_STYLE for t in ("vit", "deit", "vit_mae", "vit_msn", "ijepa", "audio-spectrogram-transformer", "vivit")}


def runtime_names(names, config: dict | None) -> dict[str, str]:
    """{runtime name: checkpoint name} for the checkpoint names that transformers 5 renames at load time.

    With transformers installed its own renaming rules are used (every family it knows); otherwise the built-in
    rules of ``RUNTIME_RENAMES``."""
    model_type = config.get("model_type") if isinstance(config, dict) else None
    rename = _transformers_renamer(config) or _builtin_renamer(model_type)
    if rename is None:
        return {}
    out = {}
    for name in names:
        runtime = rename(name)
        if runtime != name:
            out[runtime] = name
    return out


def _builtin_renamer(model_type: str | None):
    rules = RUNTIME_RENAMES.get(model_type or "")
    if not rules:
        return None

    def rename(name: str) -> str:
        for pattern, repl in rules:
            name = re.sub(pattern, repl, name)
        return name

    return rename


def _transformers_renamer(config: dict | None):
    """transformers' own checkpoint → runtime renames for this config's classes (None without transformers)."""
    if not isinstance(config, dict):
        return None
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
        from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
    except Exception:  # not installed, or another version's layout: the built-in rules apply
        return None
    model_type = config.get("model_type")
    keys = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    keys += [MODEL_MAPPING_NAMES.get(model_type), model_type]
    renames = []
    for key in dict.fromkeys(k for k in keys if k):
        try:
            renames += [t for t in get_checkpoint_conversion_mapping(key) or [] if isinstance(t, WeightRenaming)]
        except Exception:
            continue
    if not renames:
        return None

    def rename(name: str) -> str:
        for t in renames:
            try:
                name = t.rename_source_key(name)[0]
            except Exception:
                pass
        return name

    return rename


# --- mixture-of-experts layouts ----------------------------------------------------------------------------------

# Families whose experts transformers 5 keeps fused in one 3-D tensor per projection at runtime (and mergekit merges
# fused): per-expert checkpoint names (the expert index as the group) → the fused names and how rows are built.
#   (per-expert pattern, fused name template, parts joined along the expert's first dim)
_MIXTRAL = (
    (r"^(?P<p>.+\.layers\.\d+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w1|w3)\.weight$",
     "{p}.mlp.experts.gate_up_proj", ("w1", "w3")),
    (r"^(?P<p>.+\.layers\.\d+)\.block_sparse_moe\.experts\.(?P<e>\d+)\.(?P<w>w2)\.weight$",
     "{p}.mlp.experts.down_proj", ("w2",)),
)
_QWEN2_MOE = (
    (r"^(?P<p>.+\.layers\.\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<w>gate_proj|up_proj)\.weight$",
     "{p}.mlp.experts.gate_up_proj", ("gate_proj", "up_proj")),
    (r"^(?P<p>.+\.layers\.\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<w>down_proj)\.weight$",
     "{p}.mlp.experts.down_proj", ("down_proj",)),
)
FUSED_EXPERTS: dict[str, tuple] = {
    **{t: _MIXTRAL for t in ("mixtral", "minimax", "minimax_m2")},
    **{t: _QWEN2_MOE for t in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
                               "dots1", "ernie4_5_moe", "hunyuan_v1_moe", "flex_olmo", "qwen3_next", "exaone_moe",
                               "cohere2_moe", "solar_open")},
}
# other per-expert names renamed on the way (mixtral's router)
FUSED_RENAMES = {"mixtral": ((r"\.block_sparse_moe\.gate\.weight$", ".mlp.gate.weight"),)}
FUSED_RENAMES["minimax"] = FUSED_RENAMES["minimax_m2"] = FUSED_RENAMES["mixtral"]


def fused_expert_groups(names, model_type: str | None) -> tuple[dict[str, list[list[str]]], dict[str, str]]:
    """For a per-expert MoE checkpoint of a family transformers 5 fuses: ({fused name: [[part names of expert 0],
    [of expert 1], ...]}, {renamed router name: checkpoint name}); ({}, {}) otherwise."""
    rules = FUSED_EXPERTS.get(model_type or "")
    if not rules:
        return {}, {}
    groups: dict[str, dict[int, dict[str, str]]] = {}
    order: dict[str, tuple[str, ...]] = {}
    for name in names:
        for pattern, template, parts in rules:
            m = re.match(pattern, name)
            if m:
                fused = template.format(p=m["p"])
                groups.setdefault(fused, {}).setdefault(int(m["e"]), {})[m["w"]] = name
                order[fused] = parts
                break
    out = {}
    for fused, experts in groups.items():
        indices = sorted(experts)
        if indices != list(range(len(indices))) or any(set(e) != set(order[fused]) for e in experts.values()):
            return {}, {}  # an unusual layout: leave the checkpoint as it is
        out[fused] = [[experts[i][w] for w in order[fused]] for i in indices]
    renames = {}
    for pattern, repl in FUSED_RENAMES.get(model_type or "", ()):
        for name in names:
            if re.search(pattern, name):
                renames[re.sub(pattern, repl, name)] = name
    return (out, renames) if out else ({}, {})
