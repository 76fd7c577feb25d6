"""The rows of the zoo's table: each method with its protocol, and what each paper reports for it.

Fixed rows use the settings their papers fix; tuned rows (``tuned=True``) take their free settings (λ, α, a rank or a
keep fraction, TALL masks' λ_t) from ``<zoo>/tuned.json``, chosen on the validation split only by ``python -m merging
zoo tune`` (``merging.zoo.tune``), as the CMA-ES row takes ``evolved.yml``.

``PAPER_VIT_B32``: the average accuracy (%) each paper reports for the same method on CLIP ViT-B/32 with the eight
vision tasks, and the table it comes from (papers use checkpoint sets that differ by a few points: compare a row
with its own paper). A method no paper reports on that benchmark has none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

EMR = "Huang et al. 2024 (EMR-Merging), Table 2"
PAPER_VIT_B32: dict[str, tuple[float, str]] = {
    "individual": (90.5, EMR),
    "weight_averaging": (65.8, EMR),
    "fisher": (68.3, EMR),
    "regmean": (71.8, EMR),
    "task_arithmetic": (70.1, EMR),
    "ties_official": (73.6, EMR),
    "emr": (88.7, EMR),
    "emr_rescale_ta": (76.9, "Huang et al. 2024 (EMR-Merging), Table 6"),
    "emr_rescale_ties": (78.6, "Huang et al. 2024 (EMR-Merging), Table 6"),
    "tsv_m": (85.9, "Gargiulo et al. 2025 (TSV), Table 1"),
    "iso_c": (86.3, "Marczak et al. 2025 (Iso), Table 1"),
    "iso_cts": (86.2, "Marczak et al. 2025 (Iso), Table 1"),
    "cart": (84.7, "Choi et al. 2024 (CART), Table 1"),
    "pcb": (76.3, "Du et al. 2024 (PCB-Merging), Table 3"),
    "consensus": (75.2, "Wang et al. 2024 (TALL masks), Table 2"),
}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    method: str | None = None  # a registered merge method; None for rows computed otherwise
    params: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    tuned: bool = False  # the free settings come from tuned.json (validation split)
    protocol: str = ""


def rows(num_tasks: int) -> list[Row]:
    """The table's rows, each with its paper's protocol."""
    n = num_tasks
    return [
        Row("pretrained", "Pre-trained base (linear probe)", note="the base's body with each task's head",
            protocol="no merge: the pre-trained body, each task's own head"),
        Row("individual", "Individual fine-tunes", note="each task's own fine-tune",
            protocol="each task scored with its own fine-tune"),
        Row("weight_averaging", "Weight averaging", "linear", protocol="uniform average of the fine-tunes"),
        Row("task_arithmetic", "Task Arithmetic (λ=0.3)", "task_arithmetic", {"lambda": 0.3},
            protocol="λ = 0.3, the task-vectors paper's 8-task setting"),
        Row("ties", "TIES, mergekit's (per tensor, k=20%, mean, λ=1)", "ties", {"density": 0.2, "lambda": 1.0},
            protocol="mergekit's semantics: top 20 % per tensor, disjoint mean, λ = 1"),
        Row("ties_official", "TIES, official (whole model, k=20%, sum, λ=0.3)", "ties",
            {"density": 0.2, "topk_scope": "model", "merge": "sum", "lambda": 0.3},
            protocol="the official code's ViT protocol: top 20 % of the whole task vector, disjoint sum, λ = 0.3"),
        Row("dare", "DARE + TA (p=0.5, L1 rescale, λ=0.3)", "dare_linear", {"density": 0.5, "lambda": 0.3},
            protocol="drop 50 %, mergekit's L1 rescale, λ = 0.3"),
        Row("dare_paper", "DARE + TA (p=0.5, ÷(1−p), λ=0.3)", "dare_linear",
            {"density": 0.5, "rescale": "inverse_keep", "lambda": 0.3},
            protocol="drop 50 %, survivors ÷ (1 − p) (the paper's Eq. 2), λ = 0.3"),
        Row("emr", "EMR-Merging", "emr", {"skip": ["head."]}, note="per-task models: elect, mask, rescale",
            protocol="the paper's: no free settings; heads kept per task"),
        Row("emr_rescale_ta", "Task Arithmetic + EMR mask & rescale", "emr_rescale",
            {"unify": "task_arithmetic", "skip": ["head."]}, note="EMR's masks and rescalers on TA's task vector",
            protocol="EMR's masks and rescalers on task arithmetic's task vector"),
        Row("emr_rescale_ties", "TIES + EMR mask & rescale", "emr_rescale",
            {"unify": "ties", "density": 0.2, "skip": ["head."]}, note="EMR's masks and rescalers on TIES",
            protocol="EMR's masks and rescalers on TIES' (top 20 %) task vector"),
        # NAN's α_i sum to 1; λ = 0.3·N makes equal norms reproduce task arithmetic at λ = 0.3.
        Row("nan_task_arithmetic", f"NAN + Task Arithmetic (λ=0.3·{n})", "task_arithmetic",
            {"coefficients": "nan", "lambda": round(0.3 * n, 6)},
            protocol=f"NAN's α_i ∝ 1/‖θ_i‖ per tensor, λ = 0.3·{n}"),
        Row("nan_ties", "NAN + TIES (k=20%, λ=1)", "ties", {"coefficients": "nan", "density": 0.2, "lambda": 1.0},
            protocol="NAN's α_i per tensor as TIES' weights, top 20 % per tensor, λ = 1"),
        Row("tsv_m", "TSV-M", "tsv_m", tuned=True,
            protocol="top 1/N singular vectors per task and matrix, Procrustes-decorrelated; α on validation"),
        Row("iso_c", "Iso-C", "iso_c", tuned=True, protocol="flattened spectrum of the sum; α on validation"),
        Row("iso_cts", "Iso-CTS", "iso_cts", tuned=True,
            protocol="common subspace 80 % plus task-specific directions; α on validation"),
        Row("cart", "CART", "cart", tuned=True,
            protocol="average + low-rank centred task vectors; rank fraction and λ on validation"),
        Row("pcb", "PCB-Merging", "pcb", tuned=True,
            protocol="balanced scores over the whole model; keep ratio and λ on validation"),
        Row("consensus", "Consensus TA (TALL masks, k=2)", "consensus", tuned=True,
            protocol="each task's TALL-mask λ_t on its own validation data, then α on validation; k = 2"),
        Row("lines_ta", "Task Arithmetic + LiNeS", "task_arithmetic", tuned=True,
            protocol="λ(ℓ) = α + β ℓ/(L−1), α = 1/N from the norms; β on validation"),
        Row("fisher", "Fisher merging (256 ex./task)", note="diagonal Fisher on each task's training inputs",
            protocol="diagonal Fisher from 256 training examples per task"),
        Row("regmean", "RegMean (α=0.9, 256 ex./task)", note="Gram matrices of each task's training inputs",
            protocol="Gram matrices of 256 training examples per task, α = 0.9"),
        Row("evolved", "Evolutionary search (CMA-ES)", note="the committed evolved.yml, found on validation",
            protocol="CMA-ES over per-model weights on validation (evolved.yml)"),
    ]
