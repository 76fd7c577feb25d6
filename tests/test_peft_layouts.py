"""Every LoRA layout PEFT 0.21 saves, on real transformers models, reads exactly as ``merge_and_unload()`` leaves
the model: the tensors bit for bit, and a merge through the engine within 1e-6.

Each case trains a real adapter for two steps with PEFT (so B and the DoRA magnitudes move from their initial
values), saves it the default way, and saves ``merge_and_unload()``'s model with ``save_pretrained`` (checkpoint
names, as transformers 5 writes them), which is the reference.
"""

from __future__ import annotations

import json

import pytest
import torch
from real_models import ARCHS, load, one_torch_thread, outputs, train
from safetensors.torch import load_file

from merging import parse_config, run_merge
from merging.sources import open_sources

assert one_torch_thread  # a fixture: imported for pytest to find

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread"), pytest.mark.timeout(600)]

# (case, architecture, LoraConfig keyword arguments)
CASES = [
    ("default", "llama", dict(target_modules=["q_proj", "v_proj", "down_proj"], lora_alpha=4)),
    ("rslora_rank_alpha_patterns", "llama", dict(target_modules=["q_proj", "v_proj"], use_rslora=True,
                                                 rank_pattern={"v_proj": 3}, alpha_pattern={"q_proj": 7})),
    ("embedding_base_layer", "llama", dict(target_modules=["embed_tokens", "q_proj"])),
    ("dora_linear_and_embedding", "llama", dict(target_modules=["embed_tokens", "q_proj", "down_proj"],
                                                use_dora=True)),
    ("modules_to_save", "llama", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("trainable_tokens", "llama", dict(target_modules=["q_proj"], trainable_token_indices=[1, 3])),
    ("layers_to_transform", "llama", dict(target_modules=["q_proj"], layers_to_transform=[1])),
    ("lora_bias", "qwen2_tied", dict(target_modules=["q_proj"], lora_bias=True)),
    ("bias_all", "qwen2_tied", dict(target_modules=["q_proj"], bias="all")),
    ("bias_lora_only", "qwen2_tied", dict(target_modules=["q_proj"], bias="lora_only")),
    ("tied_lm_head", "qwen2_tied", dict(target_modules=["q_proj", "lm_head"])),
    ("tied_trainable_tokens", "qwen2_tied", dict(target_modules=["q_proj"], trainable_token_indices=[5, 7])),
    ("tied_dora_embedding", "qwen2_tied", dict(target_modules=["embed_tokens", "k_proj"], use_dora=True)),
    ("mistral_all_linear_dora", "mistral", dict(target_modules="all-linear", use_dora=True)),
    ("gemma_all_linear", "gemma", dict(target_modules="all-linear", r=4)),
    ("phi_bias_lora_only", "phi", dict(target_modules=["q_proj", "dense", "fc1"], bias="lora_only")),
    ("gpt2_conv1d", "gpt2", dict(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)),
    ("gpt2_conv1d_dora", "gpt2", dict(target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, use_dora=True)),
    ("gpt2_tied_wte", "gpt2", dict(target_modules=["wte", "c_attn"], fan_in_fan_out=True)),
    ("bert_classifier", "bert_cls", dict(target_modules=["query", "value", "dense"], task_type="SEQ_CLS")),
    ("bert_dora_bias_all", "bert_cls", dict(target_modules=["query", "value"], task_type="SEQ_CLS", use_dora=True,
                                            bias="all")),
    ("vit_runtime_names_conv", "vit_cls", dict(target_modules=["q_proj", "v_proj", "o_proj", "projection", "fc1",
                                                               "fc2"], modules_to_save=["classifier"])),
    ("vit_runtime_names_dora", "vit_cls", dict(target_modules=["q_proj", "projection", "fc2"], use_dora=True,
                                               modules_to_save=["classifier"])),
    ("t5", "t5", dict(target_modules=["q", "v", "wi", "wo"], task_type="SEQ_2_SEQ_LM")),
    ("t5_shared_embedding", "t5_v1_1", dict(target_modules=["q", "shared", "wi_0"], task_type="SEQ_2_SEQ_LM")),
    ("bart", "bart", dict(target_modules=["q_proj", "v_proj", "fc1"], task_type="SEQ_2_SEQ_LM")),
]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, one_torch_thread):
    """{case: (base folder, adapter folder, merge_and_unload's folder)}; bases shared per architecture."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    built = {}
    for case, arch_name, kwargs in CASES:
        arch = ARCHS[arch_name]
        base = root / f"base_{arch_name}"
        if not base.exists():
            torch.manual_seed(0)
            arch.build().save_pretrained(base)
        torch.manual_seed(0)
        model = arch.build()
        peft_model = get_peft_model(model, LoraConfig(**{"r": 2, **kwargs}))
        train(peft_model, arch, seed=len(built) + 1, steps=2, lr=0.1)
        adapter = root / case
        peft_model.save_pretrained(adapter)
        merged = root / f"{case}_merged"
        peft_model.merge_and_unload().save_pretrained(merged)
        built[case] = (base, adapter, merged)
    return built


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_adapter_reads_as_merge_and_unload(adapters, case):
    base, adapter, merged = adapters[case]
    expected = load_file(str(merged / "model.safetensors"))
    sources = open_sources([str(adapter)], str(base))
    try:
        src = sources[str(adapter)]
        assert set(expected) <= set(src.specs()), sorted(set(expected) - set(src.specs()))
        moved = 0
        for name, tensor in expected.items():
            ours = src.read(name)
            assert ours.dtype == tensor.dtype and ours.shape == tensor.shape, name
            assert torch.equal(ours, tensor), f"{name}: differs by {(ours - tensor).abs().max():.2e}"
            moved += not torch.equal(tensor, sources[str(base)].read(name)) if name in sources[str(base)].specs() \
                else 1
            if tensor.dim() and tensor.shape[0] > 3:  # bands read the same bytes as the whole tensor
                assert torch.equal(torch.cat([src.read(name, (0, 3)), src.read(name, (3, tensor.shape[0]))]), tensor)
        assert moved, "the adapter changed nothing: a vacuous case"
    finally:
        for s in sources.values():
            s.close()


@pytest.mark.parametrize("case", ["default", "dora_linear_and_embedding", "vit_runtime_names_conv", "t5",
                                  "gpt2_conv1d_dora", "tied_lm_head"])
def test_adapter_merged_through_the_engine_loads_like_merge_and_unload(adapters, case, tmp_path):
    base, adapter, merged = adapters[case]
    arch_name = next(a for c, a, _ in CASES if c == case)
    cfg = parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {adapter}}}]\n")
    run_merge(cfg, tmp_path / "out", device="cpu")
    ours, expected = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert set(ours) == set(expected)
    for name in expected:
        scale = float(expected[name].abs().max()) or 1.0
        assert float((ours[name] - expected[name]).abs().max()) <= 1e-6 * max(scale, 1.0), name
    arch = ARCHS[arch_name]
    assert torch.allclose(outputs(load(tmp_path / "out", arch_name), arch), outputs(load(merged, arch_name), arch),
                          atol=1e-5)


def test_model_plus_lora_reference_applies_the_adapter_to_that_model(adapters, tmp_path):
    """mergekit's `model+lora`: the adapter on the model before the `+`, not on the config's base."""
    base, adapter, merged = adapters["default"]
    cfg = parse_config(f"merge_method: linear\nmodels:\n  - model: {base}+{adapter}\n    parameters: {{weight: 1.0}}\n")
    run_merge(cfg, tmp_path / "out", device="cpu")
    ours, expected = load_file(str(tmp_path / "out" / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    assert all(torch.equal(ours[n], expected[n]) for n in expected)


def test_adapter_for_another_base_is_reported(adapters, tmp_path):
    base, adapter, _ = adapters["default"]
    other = tmp_path / "adapter"
    other.mkdir()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/some-other-model"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    (other / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    result = run_merge(parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {other}}}]\n"),
                       tmp_path / "out", device="cpu")
    assert any("acme/some-other-model" in n and str(base) in n for n in result.notes), result.notes
    assert "acme/some-other-model" in (tmp_path / "out" / "README.md").read_text()


def test_vit_runtime_names_map_without_transformers_rules(adapters, monkeypatch):
    """The built-in ViT-family renames give the same mapping as transformers' own rules."""
    from merging import architectures

    base, adapter, merged = adapters["vit_runtime_names_conv"]
    monkeypatch.setattr(architectures, "_transformers_renamer", lambda config: None)
    expected = load_file(str(merged / "model.safetensors"))
    sources = open_sources([str(adapter)], str(base))
    try:
        assert all(torch.equal(sources[str(adapter)].read(n), t) for n, t in expected.items())
    finally:
        for s in sources.values():
            s.close()


def test_unmergeable_adapters_are_refused_by_name(adapters, tmp_path):
    from merging.errors import SourceError

    base, adapter, _ = adapters["default"]
    for key, value, what in [("layer_replication", [[0, 1]], "layer replication"),
                             ("peft_type", "IA3", "PEFT type 'IA3'")]:
        broken = tmp_path / key
        broken.mkdir()
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg[key] = value
        (broken / "adapter_config.json").write_text(json.dumps(cfg))
        (broken / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
        with pytest.raises(SourceError, match=what):
            open_sources([str(broken)], str(base))


