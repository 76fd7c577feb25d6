"""Interpolations between weights: spherical (slerp, nuslerp) and Model Stock's geometric average."""

from __future__ import annotations

import math

import torch

from .coefficients import ordered_sum
from .registry import MergeMethod, Param, Preset, TensorContext, register

COLINEAR_DOT = 0.9995  # above this |cos| the arc is too flat for the spherical formula: interpolate linearly


def slerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two whole tensors, each seen as one flat vector.

    cos Ω = ⟨v0/‖v0‖, v1/‖v1‖⟩;  if |cos Ω| > 0.9995:  (1 − t)·v0 + t·v1
    else:  sin((1 − t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1   (applied to the unnormalized tensors).
    A norm below ``eps`` counts as 1 (a zero tensor then has cos 0). Sums run in a fixed order (``ordered_sum``):
    the same bytes on any number of threads.
    """
    a = v0.reshape(-1)
    b = v1.reshape(-1)
    norm_a = float(ordered_sum(a.square()).sqrt())
    norm_b = float(ordered_sum(b.square()).sqrt())
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    dot = min(1.0, max(-1.0, float(ordered_sum((a / norm_a) * (b / norm_b)))))
    if abs(dot) > COLINEAR_DOT:
        return (1 - t) * v0 + t * v1
    omega = math.acos(dot)
    sin_omega = math.sin(omega)
    return (math.sin((1 - t) * omega) / sin_omega) * v0 + (math.sin(t * omega) / sin_omega) * v1


def slerp(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """SLERP (Shoemake 1985) from the base (t = 0) to the one other model (t = 1): ``slerp_tensors``."""
    return slerp_tensors(params["t"], base, models[0])


def nuslerp_vectors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool,
                    eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of each vector along the last dimension (the rows of a matrix), or along the first
    with ``row_wise`` (mergekit's naming), or of the whole flattened tensor with ``flatten``.

    Per vector: cos Ω from the unit vectors; where 1 − cos² Ω ≤ eps² the two are colinear and lerp is used;
    else (sin((1 − t)Ω) v0 + sin(tΩ) v1) / sin Ω.
    """
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    unit0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    unit1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit0 * unit1).sum(dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    spherical = (torch.sin((1 - t) * omega) * v0 + torch.sin(t * omega) * v1) / torch.sin(omega)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(base: torch.Tensor | None, models: list[torch.Tensor], params: dict,
            ctx: TensorContext) -> torch.Tensor:
    """NuSLERP (mergekit): spherical interpolation of the two task vectors, t = w_1 / (w_0 + w_1) (0.5 when the
    weights sum to 0): θ = θ_base + nuslerp(t, τ_0, τ_1); without a base, of the two models' weights:
    θ = nuslerp(t, θ_0, θ_1)."""
    w0, w1 = params["weight"]
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise, flatten = params["nuslerp_row_wise"], params["nuslerp_flatten"]
    if base is None:
        return nuslerp_vectors(t, models[0], models[1], row_wise, flatten)
    return base + nuslerp_vectors(t, models[0] - base, models[1] - base, row_wise, flatten)


def model_stock(base: torch.Tensor, models: list[torch.Tensor], params: dict, ctx: TensorContext) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): with offsets d_i = θ_i − θ_0 and cos = the mean pairwise cosine of the d_i,
    t = N·cos / (1 + (N − 1)·cos) and θ = t · mean_i θ_i + (1 − t) · θ_0. Per tensor, or per row with
    ``filter_wise``. Where 1 + (N − 1)·cos ≈ 0 there is no finite estimate and the base is kept (t = 0)."""
    shape = base.shape
    if params["filter_wise"]:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [m.unsqueeze(0) if m.dim() == 1 else m for m in models]
    else:
        w0 = base.reshape(-1)
        ws = [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]

    def dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # per row, or over the whole tensor in a thread-count-independent order
        return (x * y).sum(dim=-1) if x.dim() > 1 else ordered_sum(x * y)

    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = dot(a, a).sqrt() * dot(b, b).sqrt()
            cosines.append((dot(a, b) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


register(MergeMethod(
    name="slerp", fn=slerp,
    summary="spherical interpolation between the base (t = 0) and one other model (t = 1)",
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    params=(Param("t", float, 0.5, "position on the arc from the base (0) to the other model (1)", min=0.0, max=1.0),),
    presets=(Preset("halfway", "halfway along the arc: t = 0.5", {"t": 0.5}),),
    base="required", min_models=1, max_models=1, ignored=("weight",),
))

register(MergeMethod(
    name="nuslerp", fn=nuslerp,
    summary="spherical interpolation of two task vectors (two models without a base), per row or flattened",
    paper="mergekit's NuSLERP (Goddard et al. 2024, arXiv:2403.13257)",
    params=(Param("weight", float, 1.0, "relative weight; t = w_1 / (w_0 + w_1)", per_model=True),
            Param("nuslerp_row_wise", bool, False, "interpolate vectors along the first dimension instead of the last"),
            Param("nuslerp_flatten", bool, True, "interpolate each tensor as one flat vector (overrides row_wise)")),
    base="optional", separate_base=True, min_models=2, max_models=2,
))

register(MergeMethod(
    name="model_stock", fn=model_stock,
    summary="moves from the base toward the fine-tunes' average by an amount set by their offsets' angle",
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    params=(Param("filter_wise", bool, False, "one interpolation ratio per row instead of per tensor"),),
    base="required", min_models=2, ignored=("weight",),
))
