"""The analysis JSON's schema as data: every key with its meaning, rendered to the Markdown the README embeds.

A row is (key, meaning): the key is one name or a tuple of names that share a meaning, the meaning Markdown (empty
where the name says it all). Tests check that the JSON has exactly these keys and that the README holds
``JSON_SCHEMA_DOC``.
"""

from __future__ import annotations

import textwrap

SCHEMA_VERSION = 1
PROSE_WIDTH = 112  # the README's line length for the schema's paragraphs

Key = str | tuple[str, ...]

TOP_LEVEL: tuple[tuple[Key, str], ...] = (
    ("schema_version", f"`{SCHEMA_VERSION}`"),
    ("meta", "how the statistics were gathered (below)"),
    ("config_yaml", "the merge config, as YAML"),
    ("model", "the statistics of the whole model (a *stats object*, below)"),
    ("groups", "one stats object per group, in model order: `embeddings`, `layer 0` … `layer L−1` (per stack in a "
               "model with several: `encoder 0` …, `decoder 0` …), `head`, `other` "
               "(only groups that have tensors); each also has `name`, `kind` (`embeddings`/`layer`/`head`/`other`), "
               "`layer` (the block index or null) and `tensors` (how many)"),
    ("tensors", "one stats object per analyzed tensor, with `name`, `group` and `shape`"),
)

META: tuple[tuple[Key, str], ...] = (
    ("mode", "`exact` or `sampled`"),
    ("sample_fraction", "null when exact; `--sample 1` is an exact pass"),
    ("tensors_sampled", "tensors read by sampled rows; the others, at most `whole_tensor_bytes` per input, are read "
                        "whole"),
    ("seed", "row sampling"),
    ("bytes_read", "tensor bytes read from every source, summed `bytes_read()`"),
    ("bytes_total", "the inputs' stored bytes: one full pass; an exact pass reads the bands of a tensor whose inputs "
                    "exceed 256 MiB again for each statistics pass (the trim's exact top-k, a sparsifying method's "
                    "own), from the page cache"),
    ("seconds", ""),
    ("spectral_seconds", "of `seconds`, what the spectral diagnostics took: their SVDs and passes"),
    ("passes", "1, or 2 when the method needs a whole-model reduction first"),
    ("device", ""),
    ("method", ""),
    ("base_model", ""),
    ("models", "the fine-tunes' references, in config order: every per-model list below follows it"),
    ("model_labels", "short unique names for charts"),
    ("trim", "`density_from`: `config` or `default`, `default`: 0.2, `densities`: the first tensor's per-model "
             "densities"),
    ("nan_on", "`weights` or `task_vector`"),
    ("emr_rescalers", "the paper's whole-model λ_i"),
    ("method_rescalers", "for `emr`/`emr_rescale` configs: the method's own λ_i, else null"),
    ("interval", "how the 95% intervals are computed; null when exact"),
    ("sample_threshold_bytes", ""),
    ("whole_tensor_bytes", ""),
    ("notes", ""),
)

STATS_OBJECT: tuple[tuple[Key, str], ...] = (
    (("elements", "rows", "rows_read"), "the size analyzed and how many first-dimension rows were read"),
    ("base_norm", "‖θ_base‖_F"),
    ("weight_norm", "[‖θ_i‖_F]"),
    ("task_vector_norm", "[‖τ_i‖_F], τ_i = θ_i − θ_base"),
    ("relative_task_vector_norm", "[‖τ_i‖ / ‖θ_base‖]"),
    ("sign_conflict", "a *rate*: among elements where ≥ 2 task vectors are non-zero, the fraction whose non-zero "
                      "signs differ"),
    ("trimmed_sign_disagreement", "a *rate*: after the top-`density` trim, the fraction of Σ\\|τ̃_i\\| whose sign is "
                                  "not the elected sign(Σ τ̃_i)"),
    ("cosine_similarity", "N×N matrix of cos(τ_i, τ_j)"),
    ("nan_coefficients", "[α_i], α_i ∝ 1/‖x_i‖ over this tensor/group/model, summing to 1"),
    ("emr.mask_density", "[*rate*]: Σ M_i / elements"),
    ("emr.rescaler", "[*rate*-shaped ratio]: Σ\\|τ_i\\| / Σ\\|M_i ⊙ τ_uni\\| over this tensor/group (at `model`: the "
                     "paper's λ_i)"),
    ("emr.reconstruction_error", "`unified`, `masked`, `masked_rescaled`: [‖τ_i − τ̂_i‖ / ‖τ_i‖] for τ̂_i = τ_uni, "
                                 "M_i ⊙ τ_uni, λ_i M_i ⊙ τ_uni (whole-model λ_i)"),
    ("merged_distance", "[‖θ_merged − θ_i‖ / ‖τ_i‖] for the configured method (for EMR methods, task i's rebuilt "
                        "model)"),
    ("spectral", "the task matrices' spectra (`merging.analysis.spectral`): null for a tensor that is not 2-D and "
                 "a group without one; a group's and the model's values are element-weighted means over their 2-D "
                 "tensors"),
    ("spectral.method", "`exact` (SVD of the whole tensor), `randomized` (a streamed randomized SVD of the top ⌈5 %⌉ "
                        "+ 10 directions, above 1 048 576 elements), `sampled` (of the sampled rows) or, for a group "
                        "mixing them, `approximate`"),
    ("spectral.error_bound", "randomized: [‖τ_i − QQᵀτ_i‖_F / ‖τ_i‖_F], each computed σ̃_j ≤ σ_j ≤ σ̃_j + that "
                             "× ‖τ_i‖_F (a group: the largest); else null"),
    ("spectral.rank", "r = min(m, n) of the tensor (null for groups)"),
    ("spectral.tensors", "how many 2-D tensors it covers"),
    ("spectral.singular_values", "[[σ_j / ‖τ_i‖_F for the top 32]] per model (null for groups)"),
    ("spectral.effective_rank", "[exp(−Σ p_j log p_j)], p_j = σ_j / Σσ (Roy & Vetterli); randomized: the unseen tail "
                                "completed flat with its known energy"),
    ("spectral.effective_rank_ratio", "[effective rank / r]: 1 for a flat spectrum, near 0 for a low-rank update"),
    (("spectral.energy_top_1", "spectral.energy_top_5"), "[Σ_{j ≤ ⌈f·r⌉} σ_j² / ‖τ_i‖_F²] for f = 1 %, 5 %"),
    ("spectral.subspace_overlap", "N×N: (‖U_iᵀU_j‖_F² + ‖V_iᵀV_j‖_F²) / 2k over the top k = ⌈5 % · r⌉ singular "
                                  "vectors (1 on the diagonal, 0 for orthogonal subspaces)"),
    ("spectral.interference", "the mean subspace overlap over the pairs of tasks (the interference TSV-M removes)"),
    ("spectral.sum_flatness", "effective rank of Σ_i τ_i / r (1 for the isotropic spectrum Iso-C gives it)"),
)

STATS_OBJECT_NOTE = ("A *stats object* (per-model lists have one entry per model; numbers are null where undefined, "
                     "e.g. a zero norm):")
RATE_NOTE = ('A *rate* is `{"rate": r, "ci95": [low, high]}`; `ci95` is null in exact mode. In sampled mode it is a '
             "95% interval from the linearized variance of a ratio estimator with the runs of consecutive rows read "
             "as clusters and tensors as strata.",
             "Sampled totals are scaled by rows / rows read.")  # each sentence group starts a line


def names(rows: tuple[tuple[Key, str], ...]) -> list[str]:
    """Every key the rows document, in order (a dotted key names a nested one)."""
    return [name for key, _ in rows for name in ((key,) if isinstance(key, str) else key)]


def _keys(key: Key) -> str:
    return ", ".join(f"`{name}`" for name in ((key,) if isinstance(key, str) else key))


def _table(rows: tuple[tuple[Key, str], ...]) -> str:
    return "\n".join(["| key | meaning |", "|---|---|", *(f"| {_keys(key)} | {meaning} |" for key, meaning in rows)])


def _paragraph(*texts: str) -> str:
    return "\n".join(textwrap.fill(text, PROSE_WIDTH, break_long_words=False, break_on_hyphens=False)
                     for text in texts)


def _listing(name: str, rows: tuple[tuple[Key, str], ...]) -> str:
    items = ", ".join(_keys(key) + (f" ({meaning})" if meaning else "") for key, meaning in rows)
    return _paragraph(f"`{name}`: {items}.")


def schema_markdown() -> str:
    """The schema as the README shows it."""
    parts = ["### The analysis JSON (`python -m merging analyze CONFIG --json OUT.json`)", "Top level:",
             _table(TOP_LEVEL), _listing("meta", META), STATS_OBJECT_NOTE, _table(STATS_OBJECT),
             _paragraph(*RATE_NOTE)]
    return "\n\n".join(parts) + "\n"


JSON_SCHEMA_DOC = schema_markdown()
