"""Averages on the hypersphere of several models: Multi-SLERP and the Karcher mean (mergekit 0.1.5's semantics).

Both treat each tensor as one flat vector, average the directions on the unit sphere and give the result the
weighted mean of the norms. Neither is element-wise (the norms and angles are whole-tensor quantities).
"""

from __future__ import annotations

import torch

from ..errors import MergeError
from .registry import MergeMethod, Param, TensorContext, register


def multislerp(base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
               ctx: TensorContext) -> torch.Tensor:
    """Multi-SLERP (Goddard 2025, "Multi-SLERP", mergekit): barycentric interpolation on the hypersphere.

    With x_i = θ_i − θ_base (θ_i without a base), w_i the weights (divided by Σ w_i when ``normalize_weights``),
    u_i = x_i / (‖x_i‖ + ε) and the tangent plane at the normalized weighted mean μ = Σ w_i u_i / ‖Σ w_i u_i‖:

        t = Σ_i w_i (u_i − ⟨u_i, μ⟩ μ),   r = μ cos ‖t‖ + t · sin ‖t‖ / ‖t‖   (‖t‖ + ε in both places)
        θ = (Σ_i w_i ‖x_i‖) · r  (+ θ_base)

    One model is returned unchanged (no base added, as mergekit). Where Σ w_i u_i vanishes: with two models the
    weighted sum w_0 x_0 + w_1 x_1 (+ θ_base), with more an error (antipodal inputs with balancing weights).
    """
    if len(models) == 1:
        return models[0]
    eps = params["eps"]
    stacked = torch.stack(models)
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(models), -1)
    weights = torch.tensor(params["weight"], dtype=flat.dtype, device=flat.device)
    if params["normalize_weights"]:
        weights = weights / weights.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(models) != 2:
            raise MergeError(f"{ctx.name}: multislerp: the weighted sum of the unit task vectors is zero (antipodal "
                             "inputs whose weights balance out); change the weights")
        result = (stacked[0] * weights[0] + stacked[1] * weights[1]).reshape(models[0].shape)
        return result + base if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    result = mean * torch.cos(length) + tangent * (torch.sin(length) / length)
    result = (result * (norms.squeeze(-1) * weights).sum()).reshape(models[0].shape)
    return result + base if base is not None else result


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher (Riemannian) mean of the directions u_i = x_i / ‖x_i‖ on the unit sphere, by Riemannian
    gradient steps from the normalized Euclidean mean, times Σ α_i ‖x_i‖ (all inputs' norms, zero ones included).

    Each step: t = Σ α_i θ_i / sin θ_i · (u_i − cos θ_i μ) over inputs with θ_i = arccos⟨μ, u_i⟩ ≥ tol, then
    μ ← cos‖t‖ μ + sin‖t‖ t / ‖t‖, renormalized; it stops when ‖t‖ < tol or after ``max_iter`` steps. Inputs of norm
    ≤ tol take no part in the direction (their α renormalized away); if none remains the result is 0.
    """
    if len(tensors) == 1:
        return tensors[0]
    norms = [torch.linalg.vector_norm(t) for t in tensors]
    units = [t / n if float(n) != 0.0 else torch.zeros_like(t) for t, n in zip(tensors, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    kept = [units[i] for i in valid]
    mean = torch.zeros_like(kept[0])
    for w, u in zip(weights, kept):
        mean += w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = kept[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, kept):
            cos = torch.clamp(torch.dot(mean.reshape(-1), u.reshape(-1)), -1.0, 1.0)
            angle = torch.arccos(cos)
            if float(angle) < tol:
                continue
            tangent += w * (angle / torch.sin(angle)) * (u - cos * mean)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (tangent / length)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


def karcher(base: torch.Tensor | None, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Karcher mean (mergekit): the uniform Karcher mean of every input's weights as one flat vector each, the base
    included when given (mergekit takes the base as one more input for this method)."""
    tensors = list(models) + ([base] if base is not None else [])
    return karcher_mean(tensors, [1.0 / len(tensors)] * len(tensors), params["max_iter"], params["tol"])


register(MergeMethod(
    name="multislerp", fn=multislerp,
    summary="spherical barycentre of several task vectors (or models) in the tangent plane at their mean direction",
    paper="Goddard 2025, Multi-SLERP (mergekit; goddard.blog/posts/multislerp-wow-what-a-cool-idea)",
    params=(Param("weight", float, 1.0, "this model's weight in the barycentre", per_model=True),
            Param("normalize_weights", bool, True, "divide the weights by their sum"),
            Param("eps", float, 1e-8, "added to norms before dividing by them", min=0.0)),
    base="optional", separate_base=True, min_models=1,
))

register(MergeMethod(
    name="karcher", fn=karcher,
    summary="Riemannian (Karcher) mean of every input's direction on the sphere, scaled by the mean norm",
    paper="Karcher 1977, Riemannian center of mass (mergekit's karcher; arXiv:2603.04972)",
    params=(Param("max_iter", int, 10, "Riemannian gradient steps at most", min=0),
            Param("tol", float, 1e-5, "stop when the tangent step is shorter; inputs of smaller norm are ignored",
                  min=0.0, min_exclusive=True)),
    base="optional", separate_base=True, min_models=1, ignored=("weight",),
))
