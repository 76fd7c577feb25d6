"""The tensor layout of a llama-shaped checkpoint (transformers' LlamaForCausalLM names), for models we make
ourselves: the benchmark's, the app's fallback demo models and the tests' fixtures."""

from __future__ import annotations


def llama_config(hidden: int, intermediate: int, layers: int, vocab: int, heads: int, dtype: str = "float32",
                 max_positions: int = 2048) -> dict:
    """A config.json that transformers (and mergekit) read as a LlamaForCausalLM."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": max_positions,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": dtype, "hidden_act": "silu",
    }


def llama_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor name and shape of ``cfg``'s model, in file order (embeddings, each block, norm, head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [(f"{p}self_attn.{x}_proj.weight", (h, h)) for x in "qkvo"]
        out += [(f"{p}mlp.gate_proj.weight", (i, h)), (f"{p}mlp.up_proj.weight", (i, h)),
                (f"{p}mlp.down_proj.weight", (h, i)), (f"{p}input_layernorm.weight", (h,)),
                (f"{p}post_attention_layernorm.weight", (h,))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
