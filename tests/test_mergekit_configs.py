"""mergekit's own test and example configs (``mergekit_configs``), run through mergekit 0.1.5 and through us.

Every case gets one outcome, and the test holds each to its expected one (with why):

- ``agree``: the same tensors within 1e-5 (relative to each tensor's largest entry), the same output vocabulary
  and chat template rendering where the config sets them;
- ``precision``: bfloat16/float16 configs of the task-vector, spherical and element-wise methods (slerp, nuslerp,
  multislerp, karcher, nearswap, ram): mergekit does each step of the
  arithmetic in that dtype, we round the inputs to it as mergekit does, merge in float32 and round once; the
  tensors agree to the dtype's precision (3e-2 of each tensor's largest entry) and exactly in float32;
- ``differ``: results that differ for a stated reason (our own seeded draws; TIES', SCE's and Arcee Fusion's
  selections on low-precision ties, each agreeing in float32; mergekit dropping a Llava's language model);
- ``refused``: we refuse with one line, for a stated reason (none now: every method of mergekit 0.1.5 runs);
  ``both refuse``: mergekit refuses too.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from mergekit_configs import build_models, cases
from mergekit_ref import load_output, mergekit_batch, write_config
from real_models import one_torch_thread

from merging.architectures import runtime_names
from merging.config import load_config
from merging.engine import run_merge
from merging.errors import MergeError

assert one_torch_thread  # a fixture: imported for pytest to find

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(900)]

VLM_DROPPED = "mergekit drops the Llava language model (its inferred names miss the checkpoint's)"
PRECISION_TIES = "TIES' top-k on bfloat16/float16 task vectors: magnitudes tie and the two selections differ"
PRECISION_SELECT = ("a selection on bfloat16 values (SCE's top-k variance, Arcee Fusion's quartile fence): ties flip "
                    "entries; the same config in float32 agrees (*_float32)")
RANDOM = "random method: our own seeded draws (README: deliberate difference)"
EXPECTED: dict[str, tuple[str, str]] = {
    **{c: ("agree", "") for c in (
        "granite_copy", "granite_linear", "granite_slerp", "gpt2_copy", "gpt2_stack", "linear", "slerp",
        "tokenizer_base", "tokenizer_union", "tokenizer_model", "tokenizer_slerp_union", "tokenizer_force_token",
        "tokenizer_model_token_id", "tokenizer_pad_to_multiple_of", "chat_template_chatml",
        "chat_template_literal_jinja", "example_linear", "example_orcamini_platy_44layer")},
    **{c: ("precision", "") for c in (
        "nuslerp_base_col_tensor", "nuslerp_base_col_flat", "nuslerp_base_row_tensor", "nuslerp_base_row_flat",
        "nuslerp_zero_sum", "task_arithmetic", "breadcrumbs", "model_stock", "model_stock_filter_wise",
        "example_bio_merge", "example_gradient_slerp", "multislerp", "karcher", "nearswap", "ram", "ramplus_tl",
        "nuslerp_nobase_col_tensor", "nuslerp_nobase_col_flat", "nuslerp_nobase_row_tensor",
        "nuslerp_nobase_row_flat")},
    **{c: ("agree", "float32 rerun") for c in ("sce_float32", "arcee_fusion_float32")},
    "passthrough_scale": ("agree", ""),
    **{c: ("differ", PRECISION_SELECT) for c in ("sce", "arcee_fusion", "example_arcee_fusion")},
    "ties": ("differ", PRECISION_TIES), "example_ties": ("differ", PRECISION_TIES),
    "dare_ties": ("differ", RANDOM), "della": ("differ", RANDOM),
    **{c: ("differ", VLM_DROPPED) for c in (
        "vlm_linear", "vlm_slerp", "vlm_nuslerp_base_col_tensor", "vlm_nuslerp_base_col_flat",
        "vlm_nuslerp_base_row_tensor", "vlm_nuslerp_base_row_flat", "vlm_nuslerp_zero_sum", "vlm_task_arithmetic",
        "vlm_breadcrumbs", "vlm_ties", "vlm_dare_ties", "vlm_model_stock", "vlm_model_stock_filter_wise",
        "vlm_nuslerp_nobase_col_tensor", "vlm_nuslerp_nobase_col_flat", "vlm_nuslerp_nobase_row_tensor",
        "vlm_nuslerp_nobase_row_flat")},
    "della_invalid_epsilon": ("both refuse", "epsilon outside (0, 1 − density)"),
    "tokenizer_legacy": ("both refuse", "vocabularies of 64 and 66 rows without a tokenizer_source"),
}
REFUSAL_TEXT: dict[str, str] = {}  # reason -> the words of our refusal
CHAT = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]


@pytest.fixture(scope="module")
def results(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("mergekit-configs")
    models = build_models(root / "models")
    all_cases = cases(models)
    # through YAML, as a user's file (safe_dump's aliases too)
    paths = {name: write_config(root / f"{name}.yml", cfg) for name, (_, cfg) in all_cases.items()}
    ours = {}
    with mergekit_batch([(name, str(path), str(root / f"mk_{name}"), []) for name, path in paths.items()],
                        flags=("--no-write-model-card", "--quiet")) as mergekit_failed:
        for name, path in paths.items():
            try:
                run_merge(load_config(str(path)), root / f"ours_{name}", device="cpu")
                ours[name] = None
            except MergeError as exc:
                ours[name] = str(exc)
        failed = mergekit_failed()
    return {name: outcome(name, cfg, ours[name], failed.get(name), root) for name, (_, cfg) in all_cases.items()}


def outcome(name: str, cfg: dict, ours_error: str | None, mk_error: str | None, root) -> tuple[str, str]:
    """(outcome, detail) of one case."""
    if ours_error and mk_error:
        return "both refuse", ours_error
    if ours_error:
        assert "\n" not in ours_error
        return "refused", ours_error
    if mk_error:
        return "mergekit fails", mk_error.strip().splitlines()[-1]
    ours_dir, mk_dir = root / f"ours_{name}", root / f"mk_{name}"
    ours, theirs = load_output(ours_dir), load_output(mk_dir)
    if set(ours) != set(theirs):
        renamed = runtime_names(list(ours), json.loads((ours_dir / "config.json").read_text()))
        missing = [n for n in ours if n not in theirs and not any(renamed.get(r) == n for r in theirs)]
        return "differ", f"mergekit writes {len(theirs)} of our {len(ours)} tensors, not {missing[:2]}"
    worst = max((_relative(ours[n], theirs[n]), n) for n in theirs)
    if worst[0] > 1e-5:
        kind = "precision" if worst[0] <= 3e-2 and cfg.get("dtype") in ("bfloat16", "float16") else "differ"
        return kind, f"{worst[1]} by {worst[0]:.2e}"
    if cfg.get("tokenizer_source") or cfg.get("tokenizer") or cfg.get("chat_template"):
        from transformers import AutoTokenizer

        a, b = AutoTokenizer.from_pretrained(str(ours_dir)), AutoTokenizer.from_pretrained(str(mk_dir))
        if a.get_vocab() != b.get_vocab():
            return "differ", "output vocabularies differ"
        if cfg.get("chat_template") and a.apply_chat_template(CHAT, tokenize=False) != \
                b.apply_chat_template(CHAT, tokenize=False):
            return "differ", "chat templates render differently"
    return "agree", f"worst {worst[0]:.1e}"


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) / max(float(b.double().abs().max()), 1e-6)


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_mergekit_config(results, case):
    got, detail = results[case]
    want, why = EXPECTED[case]
    assert got == want, f"{case}: {got} ({detail}); expected {want} ({why})"
    if want == "refused" and why in REFUSAL_TEXT:
        assert REFUSAL_TEXT[why] in detail, detail
    if why == VLM_DROPPED:
        assert "language_model" in detail, detail


def test_every_case_has_an_expectation_and_the_counts(results, capsys):
    assert set(results) == set(EXPECTED)
    counts = Counter(kind for kind, _ in results.values())
    with capsys.disabled():
        print(f"\nmergekit's test and example configs: {len(results)} run; " +
              ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    assert counts["agree"] + counts["precision"] >= 41 and not counts["refused"]
