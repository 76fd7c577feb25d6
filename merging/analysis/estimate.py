"""Ratio estimates with cluster-sampling intervals: the rates of a sampled analysis and their 95% intervals.

A rate R = Σy / Σx is estimated from the clusters read of each tensor: a cluster is a run of consecutive rows (one
row in an exact pass; ``RowSample.run`` rows in a sampled one, so that each range request fetches one cluster),
elements of a cluster are correlated, so a binomial interval over elements would be far too narrow; tensors are
the strata. Its variance is the Taylor-linearized variance of a ratio estimator under stratified cluster sampling,
with the finite-population correction (an exact pass has zero width): the analytic counterpart of a cluster
bootstrap over runs of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

Z95 = 1.959963984540054
MOMENTS = ("sy", "sx", "syy", "sxx", "sxy")


@dataclass
class RatioStrata:
    """Sample moments of k ratios R = Σy / Σx over the rows (clusters) read of each tensor (stratum).

    Row arrays: ``rows`` N_t and ``read`` n_t, shape (T,); moment sums Σy, Σx, Σy², Σx², Σxy over the rows read,
    shape (T, k). Several tensors are combined by concatenating their strata.
    """

    rows: np.ndarray
    read: np.ndarray
    sy: np.ndarray
    sx: np.ndarray
    syy: np.ndarray
    sxx: np.ndarray
    sxy: np.ndarray

    @staticmethod
    def concat(parts: list[RatioStrata]) -> RatioStrata:
        return RatioStrata(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("rows", "read", *MOMENTS)))

    def totals(self) -> tuple[np.ndarray, np.ndarray]:
        """Estimated population totals (Ŷ, X̂): each tensor's sums scaled by N_t / n_t."""
        w = (self.rows / np.maximum(self.read, 1))[:, None]
        return (w * self.sy).sum(axis=0), (w * self.sx).sum(axis=0)

    def estimate(self) -> tuple[np.ndarray, np.ndarray]:
        """(R̂, standard error) per ratio; R̂ = Ŷ / X̂ (NaN where X̂ = 0).

        Var(R̂) ≈ Var(Ŷ − R X̂) / X̂², with Var = Σ_t N_t² (1 − n_t/N_t) s²_t / n_t and s²_t the sample variance
        over the rows of tensor t of z_r = y_r − R x_r (Taylor linearization; rows are clusters).
        """
        y_total, x_total = self.totals()
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = np.where(x_total > 0, y_total / np.where(x_total > 0, x_total, 1), np.nan)
        r = np.nan_to_num(ratio)[None, :]
        sz = self.sy - r * self.sx
        szz = self.syy - 2 * r * self.sxy + r * r * self.sxx
        n = self.read[:, None]
        big_n = self.rows[:, None]
        with np.errstate(invalid="ignore", divide="ignore"):
            s2 = np.where(n > 1, np.maximum(szz - sz * sz / np.maximum(n, 1), 0) / np.maximum(n - 1, 1), 0.0)
            var = (big_n * big_n * (1 - n / np.maximum(big_n, 1)) * s2 / np.maximum(n, 1)).sum(axis=0)
            se = np.where(x_total > 0, np.sqrt(np.maximum(var, 0)) / np.where(x_total > 0, x_total, 1), np.nan)
        return ratio, se


class RowMoments:
    """Accumulates one tensor's per-cluster moment sums chunk by chunk, then becomes a one-stratum RatioStrata.

    ``rows``: the tensor's rows N, ``read``: the rows read, in clusters of ``run`` consecutive rows (the last one of
    the tensor may be shorter, and then comes last); the strata count clusters: ⌈N / run⌉ and ⌈read / run⌉."""

    def __init__(self, rows: int, read: int, k: int, run: int = 1) -> None:
        self.rows, self.read, self.run = -(-rows // run), -(-read // run), run
        self.sums = np.zeros((len(MOMENTS), k))

    def add(self, y: torch.Tensor, x: torch.Tensor) -> None:
        """``y``, ``x``: per-row values of shape (k, r) (or (r,) when x is shared by every ratio), for rows that
        start a cluster and end one (or end the rows read)."""
        y = y.to(torch.float64)
        x = x.to(torch.float64).expand_as(y)
        if self.run > 1:
            y, x = _cluster_sums(y, self.run), _cluster_sums(x, self.run)
        parts = torch.stack([y.sum(-1), x.sum(-1), (y * y).sum(-1), (x * x).sum(-1), (x * y).sum(-1)])
        self.sums += parts.cpu().numpy().reshape(len(MOMENTS), -1)

    def strata(self) -> RatioStrata:
        return RatioStrata(np.array([float(self.rows)]), np.array([float(self.read)]),
                           *(self.sums[i][None, :].copy() for i in range(len(MOMENTS))))


def _cluster_sums(values: torch.Tensor, run: int) -> torch.Tensor:
    """(k, r) per-row values → (k, ⌈r / run⌉) sums over each run of ``run`` rows (the last may be shorter)."""
    k, r = values.shape
    padded = values.new_zeros(k, -(-r // run) * run)
    padded[:, :r] = values
    return padded.reshape(k, -1, run).sum(-1)


def finite(x: float | np.floating | None) -> float | None:
    """A number for the JSON: None for a missing or non-finite value."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def rates(strata: RatioStrata, sampled: bool, clip: bool = True) -> list[dict]:
    """Each ratio as ``{"rate": r, "ci95": [low, high]}``: a 95% interval when sampled (clipped to [0, 1] for a
    fraction, only below at 0 for ``clip=False``), else None."""
    ratio, se = strata.estimate()
    out = []
    for r, s in zip(ratio, se):
        ci = None
        if sampled and math.isfinite(r) and math.isfinite(s):
            low, high = r - Z95 * s, r + Z95 * s
            ci = [max(0.0, float(low)), min(1.0, float(high)) if clip else float(high)]
        out.append({"rate": finite(r), "ci95": ci})
    return out
