"""Merge diagnostics: where the fine-tunes agree, where they fight, and how the configured method resolves it.

From the same config as a merge, one streaming pass over the plan's tensor tasks gathers, per tensor, additive
sums from which every statistic is derived per tensor, per layer (the block of ``merging.architectures.Layers``;
embeddings, head and the rest as their own groups) and for the whole model. An exact pass goes by the engine's row
bands, like a merge: each tensor first gets the trim's exact top-k cuts (and a sparsifying method's own) from the
engine's statistics passes, a strided sample and a counting pass over bands held or served by the page cache, so a
banded tensor is never held whole. The sums run in one fused kernel (``merging.native``) on the CPU, else in torch.
With τ_i = θ_i − θ_base (float32, on the stored values):

- task-vector norm ‖τ_i‖_F, and ‖τ_i‖ / ‖θ_base‖;
- sign-conflict rate: among elements where at least two τ_i are non-zero, the fraction whose non-zero signs are
  not all equal;
- trimmed sign disagreement: each τ_i trimmed to its top ``density`` fraction by |τ_i| (TIES' trim, exact top-k
  per tensor with ties broken by flat position), s = sign(Σ_i τ̃_i) (0 counts as +, as in TIES), then
  Σ |τ̃_i| over entries whose sign is not s, divided by Σ |τ̃_i|. ``density`` is the config's (per model and
  tensor) when the method has that parameter, else 0.2, the TIES paper's value; the weights are not applied;
- pairwise cosine similarity cos(τ_i, τ_j) = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖);
- NAN coefficients (Si et al. 2025): α_i ∝ 1/‖x_i‖_F normalized to sum to 1, with x_i = θ_i (or τ_i when the
  config sets ``nan_on: task_vector``), from the norms of the tensor, of the group, of the whole model
  (``merging.coefficients.nan_coefficients``);
- EMR-Merging (Huang et al. 2024), by the paper's formulas (``merging.methods.emr``): τ_uni = s · max of the
  agreeing |τ_i| with s = sign(Σ τ_i); M_i = (τ_i ⊙ τ_uni > 0); mask density Σ M_i / numel; the paper's
  whole-model rescaler λ_i = Σ|τ_i| / Σ|M_i ⊙ τ_uni| (groups also report their own local ratio); and the relative
  reconstruction error ‖τ_i − τ̂_i‖ / ‖τ_i‖ of θ̂_i = θ_base + τ̂_i for τ̂_i = τ_uni, M_i ⊙ τ_uni, and
  λ_i M_i ⊙ τ_uni (λ_i the whole-model value). The squared error expands into sums (‖τ_i‖² − 2λ⟨τ_i, M_i τ_uni⟩
  + λ²‖M_i τ_uni‖²), so the whole-model λ_i is applied after the pass without reading anything again;
- merged distance ‖θ_merged − θ_i‖ / ‖τ_i‖: the configured method run (through the registry) on the same
  tensors, θ_merged in the output dtype as the merge writes it. For a method that shares one task vector across
  tasks (``MergeMethod.unified``: ``emr``, ``emr_rescale``) the "merged" model of task i is its rebuilt
  θ_base + λ_i M_i ⊙ τ_uni with the method's own τ_uni and rescaler variant (tensors it keeps per task,
  ``MergeMethod.skipped``: distance 0). A method that needs a whole-model reduction before merging (NAN with
  ``nan_scope: model``) gets it from a first pass over the same rows: the one case where inputs are read twice
  (``meta.passes`` says 2); whole-model statistics (TIES' ``topk_scope: model``, PCB) are gathered first too;
- spectra of the task matrices (``spectral``), per 2-D tensor, layer and model: each task vector's effective rank
  and the energy in its top 1 % / 5 % of singular directions, the overlap of the tasks' top singular subspaces
  (the interference TSV-M removes) and the flatness of Σ τ_i's spectrum (what Iso-C flattens); exact SVDs up to a
  size, a streamed randomized SVD with its error bound above it.

**Sampled mode** (``reader``) reads a seeded random subset of runs of consecutive whole rows of each tensor (one
range request each on the Hub). Sums are scaled by
rows / rows read (unbiased totals), so norms, cosines, NAN coefficients, rescalers and errors are estimates.
Sparsifying methods and the trim then act on the sampled rows as if they were the tensor (their thresholds are
estimated from the sample). Each rate gets a 95% confidence interval (``estimate``). Sampling is the default when
the inputs total more than ``SAMPLE_THRESHOLD_BYTES`` (2 GB), at ``DEFAULT_SAMPLE_FRACTION`` (5%) of the rows;
``exact=True`` forces a full pass.

The modules: ``run`` (the pass, ``analyze``), ``reader`` (what is read), ``trim``, ``sums`` (per-tensor sums),
``estimate`` (ratio estimators), ``figures`` (statistics from sums, groups, labels), ``spectral`` (the SVD-based
diagnostics), ``schema`` (the JSON's keys as data, ``JSON_SCHEMA_DOC``).
"""

from .estimate import Z95, RatioStrata
from .figures import StatsContext, derive, group_of, model_labels
from .reader import DEFAULT_SAMPLE_FRACTION, SAMPLE_THRESHOLD_BYTES, WHOLE_TENSOR_BYTES
from .run import analyze
from .schema import JSON_SCHEMA_DOC, SCHEMA_VERSION
from .sums import TensorSums, tensor_sums
from .trim import DEFAULT_TRIM_DENSITY

__all__ = [
    "DEFAULT_SAMPLE_FRACTION", "DEFAULT_TRIM_DENSITY", "JSON_SCHEMA_DOC", "SAMPLE_THRESHOLD_BYTES", "SCHEMA_VERSION",
    "WHOLE_TENSOR_BYTES", "Z95", "RatioStrata", "StatsContext", "TensorSums", "analyze", "derive", "group_of",
    "model_labels", "tensor_sums",
]
