"""mergekit configs as people write them: anchors and aliases, misspelt keys, slices with their own parameters and
bases, slerp written with slices, ignored parameters, modules, tokenizer and chat template keys. Fast: llama-shaped
safetensors folders only."""

from __future__ import annotations

import time

import pytest
import yaml
from checkpoints import write_family

from merging import ConfigError, SourceError, parse_config
from merging.engine import plan_merge
from merging.sources import split_lora_ref


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A base and two fine-tunes with 4 layers."""
    return write_family(tmp_path_factory.mktemp("deep"), n_models=2, layers=4)


def test_what_safe_dump_writes_for_repeated_blocks_parses():
    block = {"sources": [{"model": "m", "layer_range": [0, 2]}]}
    text = yaml.safe_dump({"merge_method": "passthrough", "slices": [block, block]})
    assert "&id001" in text and "*id001" in text
    assert len(parse_config(text).slices) == 2


def test_hand_written_anchors_and_merge_keys():
    cfg = parse_config("""
merge_method: ties
base_model: b
models:
  - model: m1
    parameters: &common {weight: 1.0, density: 0.5}
  - model: m2
    parameters:
      <<: *common
      density: 0.7
""")
    assert cfg.models[1].parameters == {"weight": 1.0, "density": 0.7}


@pytest.mark.parametrize("levels", [9, 30])
def test_an_alias_bomb_is_refused_in_milliseconds(levels):
    text = "a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, levels))
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="YAML aliases expand to more than"):
        parse_config(text)
    assert time.perf_counter() - started < 0.5


def test_an_alias_inside_its_own_block_is_refused():
    with pytest.raises(ConfigError, match="refers to the block that contains it"):
        parse_config("merge_method: linear\nmodels: &m [{model: a}, *m]\n")


@pytest.mark.parametrize("text, hint", [
    ("merge_method: linear\nmodels: [{model: m}]\ndtypes: float16\n", "unknown key `dtypes` (did you mean `dtype`?)"),
    ("merge_method: linear\nmodels: [{model: m, paramters: {weight: 1}}]\n", "did you mean `parameters`?"),
    ("merge_method: linear\nslices: [{sources: [{model: m, layer_rnge: [0, 2]}]}]\n", "did you mean `layer_range`?"),
    ("merge_method: linear\nmodels: [{model: m}]\ntokenizer: {sourse: union}\n", "did you mean `source`?"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: m, parameters: {densty: 0.5}}]\n",
     "unknown parameter `densty` for 'ties' (did you mean `density`?"),
    ("merge_method: linear\nmodels: [{model: m}]\nmerge_methd: linear\n", "did you mean `merge_method`?"),
    ("merge_method: linear\nmodels: [{model: m}]\nfrobnicate: 1\n", "unknown key `frobnicate`"),
])
def test_unknown_keys_stay_errors_and_suggest(text, hint):
    with pytest.raises(ConfigError) as err:
        parse_config(text)
    assert hint in str(err.value)


def test_slerp_and_nuslerp_written_with_slices_count_the_base():
    slerp = parse_config("""
slices:
  - sources:
      - {model: a, layer_range: [0, 4]}
      - {model: b, layer_range: [0, 4]}
merge_method: slerp
base_model: a
parameters: {t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {value: 0.5}]}
""")
    assert slerp.merge_method == "slerp"
    parse_config("merge_method: nuslerp\nbase_model: a\nslices: [{sources: [{model: a, layer_range: [0, 2]}, "
                 "{model: b, layer_range: [0, 2]}, {model: c, layer_range: [0, 2]}]}]\n")
    with pytest.raises(ConfigError, match="exactly 1 model besides the base, got 2"):
        parse_config("merge_method: slerp\nbase_model: a\nslices: [{sources: [{model: a, layer_range: [0, 2]}, "
                     "{model: b, layer_range: [0, 2]}, {model: c, layer_range: [0, 2]}]}]\nparameters: {t: 0.5}\n")


@pytest.mark.parametrize("method", ["slerp", "ties", "task_arithmetic"])
def test_a_slice_base_no_source_uses_is_refused_by_name(method):
    with pytest.raises(ConfigError, match=r"slices\[0\]: the base_model 'c' is not among the slice's sources"):
        parse_config(f"merge_method: {method}\nbase_model: c\nslices: [{{sources: [{{model: a, layer_range: [0, 2]}}, "
                     "{model: b, layer_range: [0, 2]}]}]\nparameters: {t: 0.5}\n" if method == "slerp" else
                     f"merge_method: {method}\nbase_model: c\nslices: [{{sources: [{{model: a, layer_range: [0, 2]}}, "
                     "{model: b, layer_range: [0, 2]}]}]\n")


def test_weight_on_slerp_and_model_stock_is_accepted_and_reported(deep):
    base, (a, b) = deep
    plan = plan_merge(parse_config(f"merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {base}}}, "
                                   f"{{model: {a}, parameters: {{weight: 0.4}}}}]\nparameters: {{t: 0.5}}\n"))
    assert any("`weight` is ignored by slerp" in n for n in plan.report.notes)
    plan = plan_merge(parse_config(f"merge_method: model_stock\nbase_model: {base}\nmodels: "
                                   f"[{{model: {a}, parameters: {{weight: 1}}}}, {{model: {b}}}]\n"))
    assert any("`weight` is ignored by model_stock" in n for n in plan.report.notes)


def test_slice_parameters_bases_and_filters_on_input_names(deep):
    """A source's filters match the name it is read under (its layer 3 lands in output layer 0); a slice's own
    parameters sit between its sources' and the config's; each slice may name its own base."""
    base, (a, b) = deep
    plan = plan_merge(parse_config(f"""
merge_method: task_arithmetic
base_model: {base}
parameters: {{lambda: 0.5}}
slices:
  - sources:
      - {{model: {base}, layer_range: [3, 4]}}
      - {{model: {a}, layer_range: [3, 4], parameters: {{weight: [{{filter: layers.3., value: 2.0}}, {{value: 0.0}}]}}}}
  - base_model: {a}
    parameters: {{lambda: 0.25}}
    sources:
      - {{model: {a}, layer_range: [0, 1]}}
      - {{model: {b}, layer_range: [0, 1]}}
"""))
    by_name = {t.name: t for t in plan.tasks}
    first = by_name["model.layers.0.mlp.up_proj.weight"]
    assert first.inputs[0].name == "model.layers.3.mlp.up_proj.weight" and first.params["weight"] == [2.0]
    assert first.params["lambda"] == 0.5
    second = by_name["model.layers.1.mlp.up_proj.weight"]
    assert second.base.model == str(a) and [r.model for r in second.inputs] == [str(b)]
    assert second.params["lambda"] == 0.25
    assert plan.out_config["num_hidden_layers"] == 2


def test_modules_default_plans_like_models_with_module_parameters(deep):
    base, (a, b) = deep
    plain = plan_merge(parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{lambda: 0.3}}\n"
                                    f"models: [{{model: {a}}}, {{model: {b}}}]\n"))
    modular = plan_merge(parse_config(f"merge_method: task_arithmetic\nbase_model: {base}\nmodules:\n  default:\n"
                                      f"    models: [{{model: {a}}}, {{model: {b}}}]\n    parameters: {{lambda: 0.3}}\n"))
    assert [(t.name, t.params) for t in plain.tasks] == [(t.name, t.params) for t in modular.tasks]


def test_tokenizer_and_chat_template_keys():
    cfg = parse_config("merge_method: linear\nmodels: [{model: m}]\nchat_template: chatml\n"
                       "tokenizer: {source: union, pad_to_multiple_of: 8, tokens: {'<x>': {source: m, force: true}, "
                       "'<y>': {source: {kind: model_token, model: m, token_id: 3}}, '<z>': {source: {kind: zero}}}}\n")
    assert cfg.vocabulary_source == "union" and cfg.tokenizer.tokens["<x>"].force
    assert parse_config("merge_method: linear\nmodels: [{model: m}]\ntokenizer_source: base\n").vocabulary_source == "base"
    for text, message in [
        ("tokenizer_source: base\ntokenizer: {source: union}\n", "not both"),
        ("chat_template: llama3\n", "not a chat template we ship"),
        ("tokenizer: {tokens: {'<x>': {source: {kind: model_token, model: m}}}}\n", "one of `token_id` / `token`"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config("merge_method: linear\nmodels: [{model: m}]\n" + text)


def test_model_plus_lora_references():
    assert split_lora_ref("org/model@v1+org/lora") == ("org/model@v1", "org/lora")
    assert split_lora_ref("org/model") is None
    with pytest.raises(SourceError, match="exactly one model and one adapter"):
        split_lora_ref("a+b+c")
