"""What the diagnostics mean, and which merge to try: findings and a recommendation from the analysis JSON.

``advise(stats, report=None)`` reads the statistics of ``merging.analysis`` (schema: its ``JSON_SCHEMA_DOC``) and,
optionally, the plan's compatibility report (``CompatibilityReport.to_dict()``), and returns plain data:

- ``findings``: 3 to 8 plain-language observations, each with the number behind it (``key``, ``text``, ``value``,
  ``level``: ``info`` or ``warn``);
- ``recommendation``: a method, its parameters and the reason, and ``config``, the analyzed config with that
  method and those parameters (the models, base, dtype and other keys as they were);
- ``alternative``: a second option worth knowing (EMR when one model per task is acceptable), or None.

Pure: no torch, no plotly, no I/O. The rules and thresholds (``THRESHOLDS``) are documented in the README's
"What the diagnostics mean" section with the sweeps that calibrated them (``scripts/calibrate_advice.py``); in
short, first match wins:

1. one fine-tune: ``slerp`` from the base toward it (t = 0.5);
2. one dominant model (largest ‖τ_i‖ ≥ ``dominant_ratio`` × the median): task arithmetic with NAN coefficients on
   the task vectors (α_i ∝ 1/‖τ_i‖, summing to 1: an average weighted against the big one);
3. big steps (the median block moved ≥ ``big_step`` of its norm): ``iso_c`` when the tasks' top singular subspaces
   overlap (``interference`` of the spectral statistics ≥ ``subspace_overlap``: they compete for the same
   directions, which Iso-C's flattened spectrum shares out), its λ keeping the sum within ``sum_budget`` as rule 6;
   otherwise ``linear`` (average the weights);
4. two fine-tunes: ``nuslerp`` (t = 0.5);
5. the trim leaves ≥ ``trim_conflict`` of the kept mass against the elected sign: ``ties`` (k = 20 %, λ = 1);
6. otherwise the task vectors hardly interfere: ``task_arithmetic`` with λ = 1, scaled down so that the summed task
   vector stays within ``sum_budget`` of the base's norm.
"""

from __future__ import annotations

import copy
import math
import statistics
from typing import Any

import yaml

from .architectures import ONE_ARCHITECTURE

THRESHOLDS = {  # the sweeps of scripts/calibrate_advice.py, quoted in the README
    "big_step": 0.04,  # median block ‖τ_i‖/‖θ_base‖; zoo: TIES above averaging at 3.15 %, below at 5.25 %
    "dominant_ratio": 4.0,  # max/median ‖τ_i‖; TIES or TA ahead of the averages at 3.3×, behind at 4.4×
    "trim_conflict": 0.025,  # trimmed sign disagreement; 4 disjoint task vectors: TA ahead at 0.020, TIES at 0.028
    "sum_budget": 0.06,  # median block ‖Σ τ_i‖/‖θ_base‖; zoo: TA above averaging at 3.6 %, below at 7.2 %
    "duplicate_cos": 0.9,  # two task vectors this similar count twice
    "opposed_cos": -0.3,  # two task vectors this opposed undo each other
    "nan_spread": 0.05,  # NAN's α_i within this fraction of 1/N of each other: NAN changes next to nothing
    "head_ratio": 5.0,  # a head or embedding group moved this many times more (relative) than the blocks
    "subspace_overlap": 0.1,  # mean overlap of the tasks' top 5 % singular subspaces: 2× random subspaces' 5 %;
    # zoo (0.167): Iso-C at λ 0.125-0.3 ahead of averaging (78.1-78.5 against 77.8)
}
TIES_DENSITY = 0.2  # TIES' k = 20 % (Yadav et al. 2023)
MAX_FINDINGS = 8


def advise(stats: dict, report: dict | None = None) -> dict[str, Any]:
    """Findings and a recommended merge for the analysis ``stats`` (see the module docstring); a NaN or infinite
    number in them (a statistics JSON written by hand or by another tool) counts as missing, as the analysis' None."""
    stats = _finite(stats)
    view = _View(stats)
    findings = [f for f in (_relative_size(view), _sign_conflicts(view), _trimmed(view), _similarity(view),
                            _norms(view), _nan(view), _emr(view), _outlier_groups(view), _spectral(view)) if f]
    findings += _warnings(stats, report)
    recommendation = _recommend(view)
    return {"findings": _select(findings), "recommendation": recommendation, "alternative": _alternative(view),
            "thresholds": dict(THRESHOLDS)}


def _finite(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _select(findings: list[dict]) -> list[dict]:
    """At most MAX_FINDINGS, warnings first to stay, in their order of the list."""
    keep = sorted(range(len(findings)), key=lambda i: (findings[i]["level"] != "warn", i))[:MAX_FINDINGS]
    return [findings[i] for i in sorted(keep)]


def advice_text(advice: dict) -> str:
    """The advice as plain text lines (what ``python -m merging analyze CONFIG --advice`` prints)."""
    lines = ["findings:"]
    lines += [f"  - {f['text']}" for f in advice["findings"]]
    rec = advice["recommendation"]
    lines.append(f"recommendation: {rec['summary']}")
    lines.append(f"  why: {rec['reason']}")
    if advice.get("alternative"):
        lines.append(f"  alternative: {advice['alternative']}")
    return "\n".join(lines)


def recommended_yaml(advice: dict) -> str:
    return yaml.safe_dump(advice["recommendation"]["config"], sort_keys=False, default_flow_style=None,
                          allow_unicode=True, width=1000)


# --- reading the statistics ----------------------------------------------------------------------------------------

class _View:
    """The numbers the rules read, from the JSON (undefined ones are None or left out)."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats
        meta = stats.get("meta") or {}
        self.meta = meta
        self.models = list(meta.get("models") or [])
        self.labels = list(meta.get("model_labels") or self.models)
        self.n = len(self.models)
        self.whole = stats.get("model") or {}
        self.groups = list(stats.get("groups") or [])
        self.blocks = [g for g in self.groups if g.get("kind") == "layer"] or self.groups
        self.norms = _clean(self.whole.get("task_vector_norm"))
        rel = [v for g in self.blocks for v in _clean(g.get("relative_task_vector_norm"))]
        self.rel_step = statistics.median(rel) if rel else None
        sums = [s for g in self.blocks if (s := _sum_norm(g)) is not None]
        self.sum_step = statistics.median(sums) if sums else None
        self.trim_rate = _rate(self.whole.get("trimmed_sign_disagreement"))
        self.conflict = _rate(self.whole.get("sign_conflict"))
        spectral = self.whole.get("spectral") or {}
        self.overlap = _clean([spectral.get("interference")])
        self.overlap = self.overlap[0] if self.overlap else None
        self.flatness = _clean([spectral.get("sum_flatness")])
        self.flatness = self.flatness[0] if self.flatness else None
        self.spectral_method = spectral.get("method")
        self.densities = sorted(set((meta.get("trim") or {}).get("densities") or [])) or [TIES_DENSITY]
        self.dominant = None
        if self.n >= 2 and len(self.norms) == self.n and statistics.median(self.norms) > 0:
            i = max(range(self.n), key=lambda k: self.norms[k])
            self.dominant = (i, self.norms[i] / statistics.median(self.norms))

    def label(self, i: int) -> str:
        return self.labels[i] if i < len(self.labels) else str(i)


def _clean(values: Any) -> list[float]:
    return [float(v) for v in (values or []) if isinstance(v, (int, float)) and math.isfinite(v)]


def _rate(entry: Any) -> float | None:
    value = entry.get("rate") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _sum_norm(group: dict) -> float | None:
    """‖Σ_i τ_i‖ / ‖θ_base‖ of a group, from its norms and cosines: Σ_ij cos_ij ‖τ_i‖ ‖τ_j‖."""
    norms, cos, base = group.get("task_vector_norm"), group.get("cosine_similarity"), group.get("base_norm")
    if not norms or not cos or not base or any(v is None for v in norms):
        return None
    total = sum((cos[i][j] if cos[i][j] is not None else (1.0 if i == j else 0.0)) * norms[i] * norms[j]
                for i in range(len(norms)) for j in range(len(norms)))
    return math.sqrt(max(total, 0.0)) / base


def _pct(x: float) -> str:
    return f"{100 * x:.3g} %"


def _g(x: float) -> str:
    return f"{x:.3g}"


# --- findings ------------------------------------------------------------------------------------------------------

def _finding(key: str, text: str, value: float | None, level: str = "info") -> dict:
    return {"key": key, "text": text, "value": value, "level": level}


def _relative_size(v: _View) -> dict | None:
    if v.rel_step is None:
        return None
    big = v.rel_step >= THRESHOLDS["big_step"]
    text = (f"Each fine-tune moved the blocks by {_pct(v.rel_step)} of their norm (median ‖τ_i‖/‖θ_base‖): "
            + ("big steps, beyond the few percent where task vectors add up like independent skills; averaging "
               "keeps closest to every model." if big else "small steps, where adding task vectors tends to work."))
    return _finding("step_size", text, v.rel_step, "warn" if big else "info")


def _sign_conflicts(v: _View) -> dict | None:
    if v.conflict is None or v.n < 2:
        return None
    chance = 1 - 2 ** (1 - v.n)  # N task vectors with independent random signs
    ranked = sorted((g for g in v.blocks if _rate(g.get("sign_conflict")) is not None),
                    key=lambda g: -_rate(g["sign_conflict"]))[:3]
    where = ", ".join(f"{g['name']} ({_pct(_rate(g['sign_conflict']))})" for g in ranked)
    verdict = ("about what unrelated task vectors give" if v.conflict >= 0.8 * chance
               else "well below that: the fine-tunes mostly push the same way")
    text = (f"Sign conflicts: {_pct(v.conflict)} of the entries that ≥ 2 fine-tunes changed differ in sign; "
            f"{v.n} task vectors with random signs would give {_pct(chance)}, so this is {verdict}."
            + (f" Highest in {where}." if where else ""))
    return _finding("sign_conflict", text, v.conflict)


def _trimmed(v: _View) -> dict | None:
    if v.trim_rate is None or v.n < 2:
        return None
    density = ", ".join(_pct(d) for d in v.densities)
    high = v.trim_rate >= THRESHOLDS["trim_conflict"]
    text = (f"After TIES' trim to the largest {density} of each task vector, {_pct(v.trim_rate)} of the kept mass "
            "is against the elected sign: " + ("TIES' election has real conflicts to settle."
                                              if high else "the kept entries hardly collide."))
    return _finding("trimmed_conflict", text, v.trim_rate, "warn" if high else "info")


def _similarity(v: _View) -> dict | None:
    cos = v.whole.get("cosine_similarity")
    if not cos or v.n < 2:
        return None
    pairs = [(cos[i][j], i, j) for i in range(v.n) for j in range(i + 1, v.n) if cos[i][j] is not None]
    if not pairs:
        return None
    hi, lo = max(pairs), min(pairs)
    if hi[0] >= THRESHOLDS["duplicate_cos"]:
        text = (f"{v.label(hi[1])} and {v.label(hi[2])} are near duplicates (cos {_g(hi[0])}): together they count "
                "twice in any sum or average; drop one or halve their weights.")
        return _finding("similarity", text, hi[0], "warn")
    if lo[0] <= THRESHOLDS["opposed_cos"]:
        text = (f"{v.label(lo[1])} and {v.label(lo[2])} pull in opposite directions (cos {_g(lo[0])}): a merge "
                "trades one for the other.")
        return _finding("similarity", text, lo[0], "warn")
    median = statistics.median(c for c, _, _ in pairs)
    kind = "mostly unrelated" if abs(median) < 0.3 else "similar"
    if len(pairs) == 1:
        text = f"The two task vectors are {kind.replace('mostly ', '')}: cosine {_g(median)}."
    else:
        text = (f"Task vectors are {kind}: pairwise cosine from {_g(lo[0])} to {_g(hi[0])} (median {_g(median)}); "
                f"the most alike are {v.label(hi[1])} and {v.label(hi[2])}.")
    return _finding("similarity", text, median)


def _norms(v: _View) -> dict | None:
    if v.dominant is None:
        return None
    i, ratio = v.dominant
    low = min(range(v.n), key=lambda k: v.norms[k])
    if ratio >= THRESHOLDS["dominant_ratio"]:
        text = (f"{v.label(i)} dominates: its task vector is {_g(ratio)}× the median norm (‖τ‖ {_g(v.norms[i])}); "
                "a plain sum or average is pulled toward it.")
        return _finding("dominance", text, ratio, "warn")
    text = (f"No model dominates: ‖τ_i‖ from {_g(v.norms[low])} ({v.label(low)}) to {_g(v.norms[i])} "
            f"({v.label(i)}), the largest {_g(ratio)}× the median.")
    return _finding("dominance", text, ratio)


def _nan(v: _View) -> dict | None:
    alphas = _clean(v.whole.get("nan_coefficients"))
    if len(alphas) < 2:
        return None
    spread = (max(alphas) - min(alphas)) * len(alphas)  # relative to the uniform 1/N
    on = "θ_i" if v.meta.get("nan_on", "weights") == "weights" else "τ_i"
    if spread < THRESHOLDS["nan_spread"]:
        text = (f"NAN coefficients (∝ 1/‖{on}‖) range {_g(min(alphas))}–{_g(max(alphas))}, within {_pct(spread)} "
                f"of 1/{len(alphas)}: turning NAN on would barely change this merge.")
    else:
        text = (f"NAN coefficients (∝ 1/‖{on}‖) range {_g(min(alphas))}–{_g(max(alphas))} ({_pct(spread)} of "
                f"1/{len(alphas)} apart): NAN would reweight the models.")
    return _finding("nan", text, spread)


def _emr(v: _View) -> dict | None:
    emr = v.whole.get("emr") or {}
    density = [_rate(r) for r in emr.get("mask_density") or []]
    error = _clean((emr.get("reconstruction_error") or {}).get("masked_rescaled"))
    if len(density) < 2 or None in density or not error:  # one fine-tune: EMR would give it back, nothing to say
        return None
    text = (f"EMR would keep {_pct(min(density))}–{_pct(max(density))} of each task's entries (mask density) and "
            f"rebuild each fine-tune at {_g(min(error))}–{_g(max(error))} × ‖τ_i‖ from it")
    distance = _clean(v.whole.get("merged_distance"))
    if distance and v.meta.get("method") not in ("emr", "emr_rescale"):
        text += f", against {_g(min(distance))}–{_g(max(distance))} for this {v.meta.get('method')} merge"
    return _finding("emr", text + " (one model per task, rebuilt with emr-extract).", statistics.median(error))


def _outlier_groups(v: _View) -> dict | None:
    if v.rel_step is None or v.rel_step <= 0:
        return None
    worst = None
    for g in v.groups:
        rel = _clean(g.get("relative_task_vector_norm"))
        if g.get("kind") in ("head", "embeddings") and rel:
            ratio = statistics.median(rel) / v.rel_step
            if ratio >= THRESHOLDS["head_ratio"] and (worst is None or ratio > worst[0]):
                worst = (ratio, g["name"], statistics.median(rel))
    if worst is None:
        return None
    ratio, name, rel = worst
    text = (f"The {name} moved {_g(ratio)}× more than the blocks (‖τ‖/‖θ_base‖ {_g(rel)} against {_g(v.rel_step)}): "
            "task-specific weights, which a merge blends; keep each task's own (EMR's `skip`, or merge the body "
            "only).")
    return _finding("outlier_group", text, ratio, "warn")


def _spectral(v: _View) -> dict | None:
    if v.overlap is None or v.n < 2:
        return None
    high = v.overlap >= THRESHOLDS["subspace_overlap"]
    how = "" if v.spectral_method in (None, "exact") else f" ({v.spectral_method}, approximate)"
    text = (f"The tasks' top singular subspaces (5 % of each matrix's directions) overlap by {_pct(v.overlap)} on "
            f"average{how}; random subspaces would give about 5 %"
            + (f", and the sum's spectrum has flatness {_g(v.flatness)} (1 = isotropic)" if v.flatness is not None
               else "")
            + (": the tasks compete for the same directions, which TSV-M decorrelates and Iso-C flattens."
               if high else ": each task mostly has directions of its own."))
    return _finding("subspace_overlap", text, v.overlap, "warn" if high else "info")


def _warnings(stats: dict, report: dict | None) -> list[dict]:
    notes = list((stats.get("meta") or {}).get("notes") or [])
    notes += [n for n in (report or {}).get("notes") or [] if n not in notes]
    notes = [n for n in notes if not n.startswith(ONE_ARCHITECTURE)]  # describes, warns of nothing
    out = [_finding("note", f"Note: {n}", None, "warn") for n in notes][:2]
    names = {t.get("name") for t in stats.get("tensors") or []}
    if any("embed_tokens" in n for n in names) and not any(n and "lm_head" in n for n in names):
        out.append(_finding("tied", "Tied embeddings (no lm_head): the output head is the embedding matrix, so "
                                    "merging the embeddings merges the head too.", None, "warn"))
    return out


# --- the recommendation --------------------------------------------------------------------------------------------

def _recommend(v: _View) -> dict:
    t = THRESHOLDS
    if v.n <= 1:
        return _rec(v, "slerp", {"t": 0.5}, {}, "one fine-tune: slerp from the base halfway toward it (t = 0.5); "
                                                "move t toward 1 to keep more of the fine-tune.", "one model")
    if v.dominant is not None and v.dominant[1] >= t["dominant_ratio"]:
        i, ratio = v.dominant
        return _rec(v, "task_arithmetic", {"lambda": 1.0, "coefficients": "nan", "nan_on": "task_vector"},
                    {"weight": 1.0},
                    f"{v.label(i)}'s task vector is {_g(ratio)}× the median (≥ {_g(t['dominant_ratio'])}×): NAN "
                    "weights each task vector by 1/‖τ_i‖, so the others are not drowned out.", "dominant model")
    if v.rel_step is not None and v.rel_step >= t["big_step"]:
        if v.overlap is not None and v.overlap >= t["subspace_overlap"] and v.sum_step:
            lam = float(f"{min(1.0, t['sum_budget'] / v.sum_step):.2g}")
            return _rec(v, "iso_c", {"lambda": lam}, {},
                        f"the blocks moved {_pct(v.rel_step)} per fine-tune (≥ {_pct(t['big_step'])}) and the tasks' "
                        f"top singular subspaces overlap by {_pct(v.overlap)} (≥ {_pct(t['subspace_overlap'])}): "
                        "Iso-C flattens the summed spectrum so no shared direction drowns the others; λ = "
                        f"{_g(lam)} keeps the sum within {_pct(t['sum_budget'])} of the base's norm.",
                        "big steps, overlapping subspaces")
        return _rec(v, "linear", {}, {"weight": 1.0},
                    f"the blocks moved {_pct(v.rel_step)} per fine-tune (≥ {_pct(t['big_step'])}): sums of task "
                    "vectors overshoot at that size, and the weight average stays closest to every model.",
                    "big steps")
    if v.n == 2:
        return _rec(v, "nuslerp", {}, {"weight": 1.0},
                    "two fine-tunes: interpolate along the arc between their task vectors (t = 0.5), which keeps "
                    "their size where an average shrinks it.", "two models")
    if v.trim_rate is not None and v.trim_rate >= t["trim_conflict"]:
        density = v.densities[0] if v.meta.get("trim", {}).get("density_from") == "config" else TIES_DENSITY
        return _rec(v, "ties", {"lambda": 1.0}, {"weight": 1.0, "density": density},
                    f"{_pct(v.trim_rate)} of the trimmed mass disagrees with the elected sign (≥ "
                    f"{_pct(t['trim_conflict'])}): TIES drops the small entries and settles each sign by election.",
                    "conflicts")
    lam = 1.0
    if v.sum_step and v.sum_step > t["sum_budget"]:
        lam = float(f"{t['sum_budget'] / v.sum_step:.2g}")
    reason = (f"the trimmed task vectors hardly collide ({_pct(v.trim_rate or 0)} against the elected sign): adding "
              "them keeps each task's change")
    if lam < 1:
        reason += f"; λ = {_g(lam)} keeps the sum within {_pct(t['sum_budget'])} of the base's norm"
    return _rec(v, "task_arithmetic", {"lambda": lam}, {"weight": 1.0}, reason + ".", "little interference")


def _rec(v: _View, method: str, params: dict, model_params: dict, reason: str, rule: str) -> dict:
    shown = ", ".join(f"{k} {_g(x) if isinstance(x, float) else x}" for k, x in {**params, **model_params}.items()
                      if not (k == "weight" and x == 1.0))
    return {"method": method, "parameters": params, "model_parameters": model_params, "reason": reason,
            "rule": rule, "summary": method + (f" ({shown})" if shown else ""),
            "config": _config(v, method, params, model_params)}


def _config(v: _View, method: str, params: dict, model_params: dict) -> dict:
    """The analyzed config with the recommended method: same base, models (first one only for slerp), dtype and
    other keys; the method's parameters replaced."""
    try:
        data = yaml.safe_load(v.stats.get("config_yaml") or "") or {}
    except yaml.YAMLError:
        data = {}
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    refs = v.models or [m.get("model") for m in data.get("models") or [] if isinstance(m, dict)]
    if method == "slerp":
        refs = refs[:1]
    out: dict[str, Any] = {"merge_method": method}
    if data.get("base_model") or v.meta.get("base_model"):
        out["base_model"] = data.get("base_model") or v.meta.get("base_model")
    out["models"] = [{"model": ref, "parameters": dict(model_params)} if model_params else {"model": ref}
                     for ref in refs]
    if params:
        out["parameters"] = dict(params)
    for key, value in data.items():
        if key not in ("merge_method", "base_model", "models", "parameters", "slices"):
            out[key] = value
    return out


def _alternative(v: _View) -> str | None:
    emr = v.whole.get("emr") or {}
    error = _clean((emr.get("reconstruction_error") or {}).get("masked_rescaled"))
    distance = _clean(v.whole.get("merged_distance"))
    if v.n < 2 or not error or not distance or v.meta.get("method") in ("emr", "emr_rescale"):
        return None
    if statistics.median(error) <= 0.6 * statistics.median(distance):
        return (f"if one model per task is acceptable, EMR (`emr`) rebuilds each task at a median "
                f"{_g(statistics.median(error))} × ‖τ_i‖ from its fine-tune, against {_g(statistics.median(distance))}"
                f" for this {v.meta.get('method')} merge; each task's model comes from `emr-extract`.")
    return None
