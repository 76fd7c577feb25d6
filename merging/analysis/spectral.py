"""Spectral diagnostics of the task matrices: how low-rank each task vector is, how much the tasks' top singular
subspaces overlap (the interference TSV-M removes) and how flat the summed task vector's spectrum is (what Iso-C
makes flat), per 2-D tensor, per layer and for the whole model.

For each 2-D tensor (r = min(m, n); τ_i = θ_i − θ_base; σ_1 ≥ σ_2 ≥ … its singular values):

- effective rank (Roy & Vetterli 2007): exp(−Σ_j p_j log p_j) with p_j = σ_j / Σ_k σ_k; its ratio to r;
- energy in the top 1 % and 5 % of directions: Σ_{j ≤ ⌈f·r⌉} σ_j² / ‖τ_i‖_F²;
- subspace overlap of tasks i and j: (‖U_iᵀ U_j‖_F² + ‖V_iᵀ V_j‖_F²) / (2k), U_i and V_i the top k = ⌈5 % · r⌉ left
  and right singular vectors (1 on the diagonal; 0 for orthogonal subspaces, TSV's "no interference"), and
  ``interference``, its mean over the pairs i ≠ j;
- ``sum_flatness``: the effective rank of Σ_i τ_i over r (1 for the isotropic spectrum Iso-C gives it).

The SVD is exact (``torch.linalg.svd``, on the analysis' device) for a tensor of at most ``EXACT_ELEMENTS`` held
whole; above, a randomized SVD (Halko, Martinsson & Tropp 2011, Alg. 4.4, one power iteration, 10 extra columns)
streams the tensor's row bands through four statistics passes, never holding it whole, and finds the top K =
⌈5 % · r⌉ + 10 triplets. It is labelled ``randomized`` with its error bound: each model's relative residual
‖τ − QQᵀτ‖_F / ‖τ‖_F, exact from ‖τ‖_F² − ‖Qᵀτ‖_F² (every computed σ̃_j ≤ σ_j ≤ σ̃_j + that residual · ‖τ‖_F);
the effective rank then completes the unseen tail flat with its known energy (approximate). In sampled mode a
tensor's spectrum is that of its sampled rows (``sampled``, approximate, no bound).

Groups and the whole model: element-weighted means over their 2-D tensors.
"""

from __future__ import annotations

import math

import torch

from .. import native
from ..methods.registry import StatsPass
from ..native import ops
from ..native.rng import stable_seed
from ..plan import layer_index

EXACT_ELEMENTS = 1 << 20
# The randomized SVDs cost four passes of (N + 1) thin matmuls over a tensor: on a 0.54 B model about 1 TFLOP, ten
# times its merge. Above this many elements of such tensors, only the blocks' matrices are taken, every k-th
# (spread over the layers), so the analysis stays near a merge's cost; ``--spectral-elements`` moves the budget.
SPECTRAL_ELEMENTS = 1 << 25
# A sampled analysis is the quick look: exact SVDs of its sampled rows took 80 % of it on the bench model, so its
# budget (elements read) is a quarter of an exact pass's.
SAMPLED_SPECTRAL_ELEMENTS = 1 << 23
TOP_FRACTIONS = (("energy_top_1", 0.01), ("energy_top_5", 0.05))
OVERLAP_FRACTION = 0.05
OVERSAMPLE = 10
SHOWN_VALUES = 32  # singular values kept per tensor and model in the JSON, as fractions of ‖τ_i‖_F
KEYS = ("method", "error_bound", "rank", "tensors", "singular_values", "effective_rank", "effective_rank_ratio",
        "energy_top_1", "energy_top_5", "subspace_overlap", "interference", "sum_flatness")


def top_count(fraction: float, rank: int) -> int:
    return min(rank, max(1, math.ceil(fraction * rank)))


def effective_rank(values: torch.Tensor, rank: int, energy: float) -> float:
    """exp(entropy) of the normalized singular values; with fewer than ``rank`` values known, the rest carry the
    remaining energy (``energy`` = ‖τ‖_F²) spread evenly (an approximation)."""
    values = values.double().clamp(min=0)
    missing = rank - values.numel()
    if missing > 0:
        tail = max(0.0, energy - float(values.square().sum()))
        values = torch.cat([values, torch.full((missing,), math.sqrt(tail / missing), dtype=torch.float64)])
    total = float(values.sum())
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _summary(svds: list[tuple], energies: list[float], rank: int, method: str, bounds) -> dict:
    """The tensor's spectral object from (U, S, Vᵀ) per task vector and, last, of their sum."""
    tasks, (_, s_sum, _) = svds[:-1], svds[-1]
    k = top_count(OVERLAP_FRACTION, rank)
    out: dict = {"method": method, "error_bound": bounds, "rank": rank, "tensors": 1}
    out["singular_values"] = [[float(v) / math.sqrt(e) if e > 0 else 0.0 for v in s[:SHOWN_VALUES]]
                              for (_, s, _), e in zip(tasks, energies)]
    eranks = [effective_rank(s, rank, e) for (_, s, _), e in zip(tasks, energies[:-1])]
    out["effective_rank"] = eranks
    out["effective_rank_ratio"] = [e / rank for e in eranks]
    for key, fraction in TOP_FRACTIONS:
        count = top_count(fraction, rank)
        out[key] = [float(s[:count].double().square().sum()) / e if e > 0 else None
                    for (_, s, _), e in zip(tasks, energies)]
    n = len(tasks)
    overlap = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            ui, vi, uj, vj = tasks[i][0][:, :k], tasks[i][2][:k], tasks[j][0][:, :k], tasks[j][2][:k]
            value = (float((ui.T @ uj).square().sum()) + float((vi @ vj.T).square().sum())) / (2 * k)
            overlap[i][j] = overlap[j][i] = value
    out["subspace_overlap"] = overlap
    pairs = [overlap[i][j] for i in range(n) for j in range(n) if i != j]
    out["interference"] = sum(pairs) / len(pairs) if pairs else None
    out["sum_flatness"] = effective_rank(s_sum, rank, energies[-1]) / rank
    return out


def exact_spectrum(base: torch.Tensor, models: list[torch.Tensor], sampled: bool = False) -> dict | None:
    """The spectral object of a 2-D tensor in hand (float32 inputs), by exact SVDs."""
    matrices = _matrices(base, models)
    energies = [float(_energy(a)) for a in matrices]
    if not all(math.isfinite(e) for e in energies):  # NaN/Inf inputs (said in the notes): no spectrum, no SVD
        return None
    svds = [torch.linalg.svd(a, full_matrices=False) for a in matrices]
    return _summary(svds, energies, min(base.shape), "sampled" if sampled else "exact", None)


def _matrices(base, models):
    taus = [m - base for m in models]
    return [*taus, sum(taus)]


def _energy(a: torch.Tensor) -> torch.Tensor:
    """‖a‖_F² in float64 from float32 row sums (a quarter of the cost of squaring a float64 copy)."""
    return a.reshape(a.shape[0], -1).square().sum(dim=1).double().sum()


def _rows(ctx, q: torch.Tensor) -> torch.Tensor:
    return q if ctx.band is None else q[ctx.band[0]:ctx.band[1]]


def _on_matrices(step) -> dict:
    """A pass's ``collect`` and ``native`` for ``step(matrices, params, ctx)``, which sees the band's task matrices:
    computed in torch from float32 inputs, or by the fused kernels from the inputs as stored (``ops.task_matrices``,
    the same values)."""
    return dict(collect=lambda base, models, params, ctx: step(_matrices(base, models), params, ctx),
                native=lambda base, models, params, ctx: step(ops.task_matrices(base, models), params, ctx))


def randomized_passes() -> tuple[StatsPass, ...]:
    """The four statistics passes of the randomized SVD over a tensor's row bands (see the module docstring)."""

    def width(ctx) -> int:
        rank = min(ctx.shape)
        return min(rank, top_count(OVERLAP_FRACTION, rank) + OVERSAMPLE)

    def sketch(mats, params, ctx):
        gen = torch.Generator().manual_seed(stable_seed(params["seed"], f"spectral:{ctx.name}"))
        omega = torch.randn(ctx.shape[1], width(ctx), generator=gen).to(mats[0].device)
        part = {f"y{i}": a @ omega for i, a in enumerate(mats)}
        part["energy"] = torch.stack([_energy(a) for a in mats]).cpu()
        return part

    def orthonormal(prefix: str):
        def finish(combined, params, ctx):
            stats = dict(ctx.stats or {})
            for key, value in combined.items():
                stats[key if key == "energy" else prefix + key[1:]] = (
                    torch.linalg.qr(value).Q if key != "energy" else value)
            return stats
        return finish

    def back(mats, params, ctx):  # Z = Aᵀ Q, summed over bands
        return {f"z{i}": a.T @ _rows(ctx, ctx.stats[f"q{i}"]) for i, a in enumerate(mats)}

    def forward(mats, params, ctx):  # Y = A Q₂, concatenated over bands
        return {f"y{i}": a @ ctx.stats[f"p{i}"] for i, a in enumerate(mats)}

    def project(mats, params, ctx):  # B = Qᵀ A, summed over bands
        return {f"b{i}": _rows(ctx, ctx.stats[f"q{i}"]).T @ a for i, a in enumerate(mats)}

    def decompose(combined, params, ctx):
        stats = dict(ctx.stats)
        if not bool(torch.isfinite(stats["energy"]).all()):  # NaN/Inf inputs (said in the notes): no SVD
            stats["svds"] = None
            return stats
        svds = []
        for i in range(len([k for k in combined if k.startswith("b")])):
            u, s, vh = torch.linalg.svd(combined[f"b{i}"], full_matrices=False)
            svds.append((stats[f"q{i}"] @ u, s, vh, float(combined[f"b{i}"].double().square().sum())))
        stats["svds"] = svds
        return stats

    many = tuple(f"y{i}" for i in range(64))
    return (StatsPass(**_on_matrices(sketch), finish=orthonormal("q"), concat=many),
            StatsPass(**_on_matrices(back), finish=orthonormal("p")),
            StatsPass(**_on_matrices(forward), finish=orthonormal("q"), concat=many),
            StatsPass(**_on_matrices(project), finish=decompose))


RANDOMIZED_PASSES = randomized_passes()


def randomized_spectrum(found: dict, rank: int, sampled: bool) -> dict | None:
    """The spectral object from the randomized passes' result (``found``: their ``ctx.stats``)."""
    if found.get("svds") is None:
        return None
    energies = [float(e) for e in found["energy"]]
    svds = [(u, s, vh) for u, s, vh, _ in found["svds"]]
    captured = [c for _, _, _, c in found["svds"]]
    bounds = [math.sqrt(max(0.0, e - c) / e) if e > 0 else 0.0 for e, c in zip(energies[:-1], captured[:-1])]
    return _summary(svds, energies, rank, "sampled" if sampled else "randomized", None if sampled else bounds)


def spectral_choice(tasks, budget: int = SPECTRAL_ELEMENTS, read_elements=None) -> tuple[set[str] | None, str | None]:
    """The tensors above ``EXACT_ELEMENTS`` whose spectrum is computed (None: all of them), and a note when some are
    left out: every k-th block matrix in plan order, k the smallest that keeps their elements within ``budget``.

    ``read_elements(task)``: in sampled mode, the elements read of a tensor (its sampled rows), which its SVDs are
    of; the budget then counts those (exact SVDs of samples cost as much per element as the randomized passes, and a
    7 B model's 5 % is ten budgets)."""
    large = [t for t in tasks if len(t.spec.shape) == 2 and min(t.spec.shape) >= 2 and t.spec.numel > EXACT_ELEMENTS]
    size = read_elements or (lambda t: t.spec.numel)
    if sum(size(t) for t in large) <= budget:
        return None, None
    blocks = [t for t in large if layer_index(t.name) is not None]  # not the vocabulary's embeddings and head
    step = max(1, math.ceil(sum(size(t) for t in blocks) / max(budget, 1)))  # no block matrices: none chosen
    chosen = {t.name for t in blocks[::step]}
    what = "randomized SVDs" if read_elements is None else "SVDs of the sampled rows"
    every = {1: "every", 2: "every 2nd", 3: "every 3rd"}.get(step, f"every {step}th")
    read = "" if read_elements is None else " read"
    note = (f"spectral diagnostics: {what} of {len(chosen)} of the {len(large)} matrices above "
            f"{EXACT_ELEMENTS:,} elements ({every} block matrix, within {budget:,} elements{read}; "
            "--spectral-elements raises it); the per-layer and model figures are over those")
    return chosen, note


def tensor_spectrum(executor, task, reduced, band, base, inputs, seed: int,
                    chosen: set[str] | None = None) -> dict | None:
    """A tensor's spectral object, or None when it is not a matrix: exact SVDs when it is in hand whole and small,
    else the randomized passes over its bands (``executor.tensor_stats``; ``band, (base, inputs)``: the unit in
    hand, not read again)."""
    shape = tuple(executor.read_shape(task)) if band is None else tuple(task.spec.shape)
    if len(shape) != 2 or min(shape) < 2 or task.shared_rows is not None:
        return None
    sampled = task.name in getattr(executor, "sampled_rows", {})
    if chosen is not None and task.spec.numel > EXACT_ELEMENTS and task.name not in chosen:  # over the budget
        return None
    if band is None and math.prod(shape) <= EXACT_ELEMENTS:
        b, ms = executor.inputs(task, base, inputs)
        with native.torch_cores():
            return exact_spectrum(b, ms, sampled)
    with native.torch_cores():
        found = executor.tensor_stats(task, reduced, passes=RANDOMIZED_PASSES, params={"seed": seed},
                                      first=(band, (base, inputs)))
    return randomized_spectrum(found, min(shape), sampled)


def _weighted(entries: list[tuple[dict, int]], key: str):
    """The element-weighted mean of a per-model list (or matrix, or number) over spectral objects."""

    def mean(values):
        present = [(v, w) for v, w in values if v is not None]
        if not present:
            return None
        weight = sum(w for _, w in present)
        return sum(v * w for v, w in present) / weight

    first = entries[0][0][key]
    if isinstance(first, list) and first and isinstance(first[0], list):
        return [[mean([(e[key][i][j], w) for e, w in entries]) for j in range(len(first[i]))]
                for i in range(len(first))]
    if isinstance(first, list):
        return [mean([(e[key][i], w) for e, w in entries]) for i in range(len(first))]
    return mean([(e[key], w) for e, w in entries])


def aggregate(entries: list[tuple[dict, int]]) -> dict | None:
    """A group's (or the model's) spectral object from its tensors' (spectral object, elements) pairs."""
    entries = [(e, w) for e, w in entries if e is not None]
    if not entries:
        return None
    methods = {e["method"] for e, _ in entries}
    bounds = [e["error_bound"] for e, _ in entries if e["error_bound"] is not None]
    out = {"method": methods.pop() if len(methods) == 1 else "approximate",
           "error_bound": [max(b[i] for b in bounds) for i in range(len(bounds[0]))] if bounds else None,
           "rank": None, "tensors": sum(e["tensors"] for e, _ in entries), "singular_values": None}
    for key in ("effective_rank", "effective_rank_ratio", "energy_top_1", "energy_top_5", "subspace_overlap",
                "interference", "sum_flatness"):
        out[key] = _weighted(entries, key)
    return out


def attach(stats: dict, spectra: dict[str, dict | None]) -> None:
    """Add ``spectral`` to every tensor, group and the model of the analysis JSON (None without 2-D tensors)."""
    by_group: dict[str, list] = {}
    everything = []
    for entry in stats["tensors"]:
        spectrum = spectra.get(entry["name"])
        entry["spectral"] = spectrum
        pair = (spectrum, math.prod(entry["shape"]))
        by_group.setdefault(entry["group"], []).append(pair)
        everything.append(pair)
    for group in stats["groups"]:
        group["spectral"] = aggregate(by_group.get(group["name"], []))
    stats["model"]["spectral"] = aggregate(everything)
