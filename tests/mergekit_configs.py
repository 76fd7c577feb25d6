"""mergekit's own test and example configs, rebuilt here on local checkpoints (nothing to download).

Each case names where it comes from in mergekit's repository (``tests/test_basic_merges.py``,
``tests/test_tokenizer.py``, ``tests/test_chat_template.py``, ``examples/*.yml``) and is written as a dict with
the same keys and values, the Hub models of the examples replaced by tiny local ones of the same family and depth;
two more (``*_float32``) rerun bfloat16 cases in float32.
mergekit's ``gpt2_like`` (GPT-2 small, 124M) is scaled down to hidden 32, keeping its 12 layers.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# models: name -> (builder, kwargs); built by build_models
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16, num_hidden_layers=2)


def build_models(root: Path) -> dict[str, str]:
    """Every checkpoint the cases use, as mergekit's tests build them (random weights from small configs)."""
    import transformers as T

    root = Path(root)
    out = {}

    def save(name, model, seed):
        out[name] = str(root / name)
        model.save_pretrained(out[name])

    for i, name in enumerate(("model_a", "model_b", "model_c")):
        torch.manual_seed(i)
        save(name, T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)), i)
    for i, name in enumerate(("granite_a", "granite_b")):
        torch.manual_seed(10 + i)
        save(name, T.GraniteForCausalLM(T.GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                         num_attention_heads=2, num_key_value_heads=2,
                                                         num_hidden_layers=2)), i)
    torch.manual_seed(20)
    save("gpt2_like", T.GPT2LMHeadModel(T.GPT2Config(n_ctx=64, n_embd=32, n_head=2, n_layer=12, n_positions=64,
                                                     vocab_size=64)), 0)
    for i, name in enumerate(("vlm_a", "vlm_b", "vlm_c")):
        torch.manual_seed(30 + i)
        vision = T.CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                                    hidden_size=64, intermediate_size=128)
        text = T.LlamaConfig(**LLAMA)
        save(name, T.LlavaForConditionalGeneration(T.LlavaConfig(vision_config=vision, text_config=text,
                                                                image_seq_length=16)), i)
    # tests/test_tokenizer.py: a base with 64 tokens, one with two ChatML tokens (66 rows), one padded with
    # four unused added tokens (64 rows)
    for name, vocab, added in (("model_base", 64, ()), ("model_chatml", 66, ("<|im_start|>", "<|im_end|>")),
                               ("model_padded", 64, ("<UNUSED_0>", "<UNUSED_1>", "<UNUSED_2>", "<UNUSED_3>"))):
        torch.manual_seed(40 + vocab + len(added))
        save(name, T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA, "vocab_size": vocab})), 0)
        _tokenizer(64, added).save_pretrained(out[name])
    # examples/: tiny stand-ins of the Hub models they name (a base and its fine-tunes share the base's weights)
    for family, names, layers in (("mistral", ("mistral_base", "mistral_instruct", "biomistral"), 2),
                                  ("llama13b", ("llama2_13b", "orca_mini", "platypus2", "wizardlm", "wizardmath"),
                                   40)):
        torch.manual_seed(50 + layers)
        cls, cfg = ((T.MistralForCausalLM, T.MistralConfig) if family == "mistral"
                    else (T.LlamaForCausalLM, T.LlamaConfig))
        base = cls(cfg(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                       num_key_value_heads=2, num_hidden_layers=layers))
        state = {k: v.clone() for k, v in base.state_dict().items()}
        for j, name in enumerate(names):
            g = torch.Generator().manual_seed(j)
            base.load_state_dict({k: v + (0.02 * torch.randn(v.shape, generator=g) if j else 0)
                                  for k, v in state.items()})
            save(name, base, j)
    return out


def _tokenizer(vocab_size: int, added):
    import tokenizers
    from transformers import LlamaTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    spec = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(pieces, range(vocab_size))), "merges": []},
            "added_tokens": []}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tokenizer.json"
        tokenizers.Tokenizer.from_str(json.dumps(spec)).save(str(path))
        tok = LlamaTokenizerFast(tokenizer_file=str(path))
    tok.add_tokens(list(added))
    return tok


def two_models(a, b, method, base=None, params=None, dtype="bfloat16", wa=0.6, wb=0.4) -> dict:
    """mergekit's TestBasicMerges.two_model_config."""
    cfg = {"merge_method": method, "models": [{"model": a, "parameters": {"weight": wa}},
                                               {"model": b, "parameters": {"weight": wb}}], "dtype": dtype}
    if base:
        cfg["base_model"] = base
    if params:
        cfg["parameters"] = params
    return cfg


def tokenizer_config(models, base, method="linear", source=None, t=None, tokenizer=None) -> dict:
    """mergekit's TestTokenizerMerges.make_config."""
    cfg = {"merge_method": method, "base_model": base, "dtype": "float32",
           "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models],
           "parameters": {"t": t} if t is not None else {}}
    if source:
        cfg["tokenizer_source"] = source
    if tokenizer:
        cfg["tokenizer"] = tokenizer
    return cfg


def cases(m: dict[str, str]) -> dict[str, tuple[str, dict]]:
    """{case: (where in mergekit's repository, config)}."""
    a, b, c = m["model_a"], m["model_b"], m["model_c"]
    va, vb, vc = m["vlm_a"], m["vlm_b"], m["vlm_c"]
    basic = "tests/test_basic_merges.py::TestBasicMerges"
    out: dict[str, tuple[str, dict]] = {
        "granite_copy": ("tests/test_basic_merges.py::TestGraniteMerges::test_granite_copy",
                         {"merge_method": "passthrough", "models": [{"model": m["granite_a"]}], "dtype": "bfloat16"}),
        "granite_linear": ("tests/test_basic_merges.py::TestGraniteMerges::test_granite_linear_merge",
                           two_models(m["granite_a"], m["granite_b"], "linear")),
        "granite_slerp": ("tests/test_basic_merges.py::TestGraniteMerges::test_granite_slerp",
                          {"merge_method": "slerp", "base_model": m["granite_a"], "parameters": {"t": 0.5},
                           "models": [{"model": m["granite_a"]}, {"model": m["granite_b"]}], "dtype": "bfloat16"}),
        "gpt2_copy": (f"{basic}::test_gpt2_copy",
                      {"merge_method": "passthrough", "models": [{"model": m["gpt2_like"]}], "dtype": "bfloat16"}),
        "gpt2_stack": (f"{basic}::test_gpt2_stack",  # `[slice] * 2`: safe_dump writes it as an anchor and an alias
                       {"merge_method": "passthrough", "dtype": "bfloat16",
                        "slices": [{"sources": [{"model": m["gpt2_like"], "layer_range": [0, 12]}]}] * 2}),
        "passthrough_scale": (f"{basic}::test_passthrough_scale",
                              {"merge_method": "passthrough", "models": [{"model": a, "parameters": {
                                  "scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]}),
    }
    for prefix, (x, y, z) in (("", (a, b, c)), ("vlm_", (va, vb, vc))):
        where = f"{basic}::test_{{}}{'_VLM' if prefix else ''}_merge"
        out[f"{prefix}linear"] = (where.format("linear"), two_models(x, y, "linear"))
        out[f"{prefix}slerp"] = (where.format("slerp"), {**two_models(x, y, "slerp", base=x),
                                                         "parameters": {"t": 0.35}})
        for base in (None, z):
            for row_wise in (False, True):
                for flatten in (False, True):
                    name = f"{prefix}nuslerp_{'base' if base else 'nobase'}_{'row' if row_wise else 'col'}" \
                           f"_{'flat' if flatten else 'tensor'}"
                    out[name] = (f"{basic}::test_nuslerp{'_VLM' if prefix else ''}_merges",
                                 two_models(x, y, "nuslerp", base=base,
                                            params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}))
        out[f"{prefix}nuslerp_zero_sum"] = (f"{basic}::test_nuslerp{'_VLM' if prefix else ''}_merges",
                                            two_models(x, y, "nuslerp", base=z, wa=-0.5, wb=0.5,
                                                       params={"nuslerp_row_wise": False, "nuslerp_flatten": False}))
        out[f"{prefix}task_arithmetic"] = (where.format("task_arithmetic"), two_models(x, y, "task_arithmetic", z))
        out[f"{prefix}breadcrumbs"] = (where.format("breadcrumbs"), two_models(x, y, "breadcrumbs", z))
        out[f"{prefix}ties"] = (where.format("ties"), two_models(x, y, "ties", z, {"density": 0.3}))
        out[f"{prefix}dare_ties"] = (where.format("dare_ties"), two_models(x, y, "dare_ties", z, {"density": 0.66}))
        out[f"{prefix}model_stock"] = (where.format("model_stock"), two_models(y, z, "model_stock", x))
        out[f"{prefix}model_stock_filter_wise"] = (where.format("model_stock_filterwise"),
                                                   two_models(y, z, "model_stock", x, {"filter_wise": True}))
    for name, params in (("sce", {"select_topk": 0.5}), ("ram", None), ("ramplus_tl", {"r": 0.05, "alpha": 1.0}),
                         ("multislerp", None), ("karcher", {"max_iter": 5, "tol": 1e-5})):
        out[name] = (f"{basic}::test_{name}_merge", two_models(a, b, name, c, params))
    out["arcee_fusion"] = (f"{basic}::test_arcee_fusion_merge", two_models(a, b, "arcee_fusion", a))
    out["nearswap"] = (f"{basic}::test_nearswap_merge", two_models(a, b, "nearswap", a, {"t": 0.0001}))
    out["della"] = (f"{basic}::test_della_merge", two_models(a, b, "della", c, {"density": 0.66, "epsilon": 0.05,
                                                                                "lambda": 0.5}))
    out["della_invalid_epsilon"] = (f"{basic}::test_della_invalid_epsilon",
                                    two_models(a, b, "della", c, {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}))
    # tests/test_tokenizer.py
    tb, tc, tp = m["model_base"], m["model_chatml"], m["model_padded"]
    tok = "tests/test_tokenizer.py::TestTokenizerMerges"
    out["tokenizer_legacy"] = (f"{tok}::test_legacy_mode", tokenizer_config([tb, tp, tc], tb))
    out["tokenizer_base"] = (f"{tok}::test_source_base", tokenizer_config([tb, tp, tc], tb, source="base"))
    out["tokenizer_union"] = (f"{tok}::test_source_union", tokenizer_config([tb, tp, tc], tb, source="union"))
    out["tokenizer_model"] = (f"{tok}::test_source_model", tokenizer_config([tb, tp, tc], tb, source=tc))
    out["tokenizer_slerp_union"] = (f"{tok}::test_slerp_union",
                                    tokenizer_config([tb, tc], tb, "slerp", source="union", t=0.5))
    out["tokenizer_force_token"] = (f"{tok}::test_force_token", tokenizer_config([tb, tc], tb, tokenizer={
        "source": "union", "tokens": {"_tok_10": {"source": tc, "force": True},
                                      "_tok_11": {"source": tb, "force": True}}}))
    out["tokenizer_model_token_id"] = (f"{tok}::test_model_token_id", tokenizer_config([tb, tc], tb, tokenizer={
        "source": "base", "tokens": {
            "_tok_20": {"source": {"kind": "model_token", "model": tc, "token_id": 64}, "force": True},
            "_tok_21": {"source": {"kind": "model_token", "model": tb, "token": "<s>"}, "force": True}}}))
    out["tokenizer_pad_to_multiple_of"] = (f"{tok}::test_pad_to_multiple_of", tokenizer_config(
        [tc], tc, tokenizer={"source": "base", "pad_to_multiple_of": 16}))
    # tests/test_chat_template.py
    chat = "tests/test_chat_template.py::TestChatTemplate"
    for name, template in (("chatml", "chatml"), ("literal_jinja", "{{messages[0]['content']}}")):
        out[f"chat_template_{name}"] = (f"{chat}::test_template_{name}", {
            "merge_method": "linear", "base_model": tb, "dtype": "bfloat16", "chat_template": template,
            "models": [{"model": tb, "parameters": {"weight": 0.5}}, {"model": b, "parameters": {"weight": 0.5}}]})
    # examples/
    out["example_arcee_fusion"] = ("examples/arcee_fusion.yml", {
        "models": [{"model": a}, {"model": b}], "merge_method": "arcee_fusion", "base_model": a, "dtype": "bfloat16"})
    out["example_bio_merge"] = ("examples/bio-merge.yml", {
        "models": [{"model": m["mistral_instruct"], "parameters": {"density": 0.5, "weight": 0.5}},
                   {"model": m["biomistral"], "parameters": {"density": 0.5, "weight": 0.5}}],
        "merge_method": "ties", "base_model": m["mistral_base"],
        "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float16"})
    out["example_gradient_slerp"] = ("examples/gradient-slerp.yml", {
        "slices": [{"sources": [{"model": m["orca_mini"], "layer_range": [0, 40]},
                                {"model": m["platypus2"], "layer_range": [0, 40]}]}],
        "merge_method": "slerp", "base_model": m["orca_mini"],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float16"})
    out["example_linear"] = ("examples/linear.yml", {
        "models": [{"model": m["orca_mini"], "parameters": {"weight": 1.0}},
                   {"model": m["wizardlm"], "parameters": {"weight": 0.3}},
                   {"model": m["platypus2"], "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "dtype": "float16"})
    out["example_orcamini_platy_44layer"] = ("examples/orcamini-platy-44layer.yml", {
        "slices": [{"sources": [{"model": m["orca_mini"], "layer_range": [0, 24]}]},
                   {"sources": [{"model": m["platypus2"], "layer_range": [20, 40]}]}],
        "merge_method": "passthrough", "dtype": "float16"})
    out["example_ties"] = ("examples/ties.yml", {
        "models": [{"model": m["orca_mini"], "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
                   {"model": m["platypus2"], "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
                   {"model": m["wizardmath"], "parameters": {"density": 0.33, "weight": [
                       {"filter": "mlp", "value": 0.5}, {"value": 0}]}}],
        "merge_method": "ties", "base_model": m["llama2_13b"],
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"})
    # not mergekit's: its bfloat16 sce and arcee_fusion cases again in float32, where bfloat16's ties cannot flip
    # a selection (the two differ in bfloat16 for that reason alone)
    for name in ("sce", "arcee_fusion"):
        where, cfg = out[name]
        out[f"{name}_float32"] = (f"{where} (in float32)", {**cfg, "dtype": "float32"})
    return out
