"""The method form's state without Gradio or a browser (components/form_state.py): field names both ways, config ->
form -> config round trips in mergekit format, what survives a form edit (slices, tokenizer_source, per-layer
lists, filters, unknown keys, models beyond the form's rows), presets, notes, and the method-dependent view."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from components.form_state import (
    DEFAULTS_PRESET,
    DTYPE_AS_BASE,
    MAX_MODEL_ROWS,
    NAN_PARAMS,
    FormState,
    ModelRow,
    apply_preset,
    config_from_form,
    dump_yaml,
    first_empty_row,
    form_from_config,
    form_view,
    global_form_params,
    model_field,
    per_model_params,
    presets_for,
    safe_mapping,
)
from merging.config import parse_config
from merging.methods import REGISTRY


def blank_state(method: str = "ties", rows: int = MAX_MODEL_ROWS) -> FormState:
    """What the form holds before anything is chosen: every field at its schema default, every row empty."""
    defaults = {name: p.default for name, p in per_model_params().items()}
    global_params = {m.name: {p.name: ", ".join(p.default) if p.type is list else p.default
                              for p in global_form_params(m)} for m in REGISTRY.values() if global_form_params(m)}
    return FormState(method=method, models=[ModelRow("", dict(defaults)) for _ in range(rows)],
                     global_params=global_params, nan={"coefficients": False, "nan_scope": "tensor", "nan_on": "weights"})


def shown(config: dict, current: FormState | None = None) -> tuple[FormState, list[str]]:
    return form_from_config(config, current or blank_state())


TIES = {
    "merge_method": "ties", "base_model": "org/base",
    "models": [{"model": "org/math", "parameters": {"weight": 0.7, "density": 0.2}},
               {"model": "org/code", "parameters": {"weight": 0.3, "density": 0.5}}],
    "parameters": {"lambda": 0.9},
}


def test_the_state_module_does_not_import_gradio():
    tree = ast.parse(Path(__file__).parent.parent.joinpath("components", "form_state.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "gradio" not in imported


def test_field_names_round_trip_with_any_number_of_rows():
    for rows in (0, 1, 3, MAX_MODEL_ROWS + 2):
        state = blank_state("dare_ties", rows)
        if rows:
            state.models[0] = ModelRow("org/a", {"weight": 0.4, "density": 0.3})
        state.nan["coefficients"] = True
        state.seed, state.out_dtype, state.allow_vocab_mismatch = 3, "bfloat16", True
        fields = state.to_fields()
        assert fields["method"] == "dare_ties" and fields["parameters.dare_ties.lambda"] == 1.0
        assert FormState.from_fields(fields) == state
    assert model_field(2, "density") in blank_state(rows=3).to_fields()


def test_reading_fields_trims_references_and_fills_blanks():
    state = FormState.from_fields({"method": "ties", "base": "  org/base ", "seed": None, "out_dtype": None,
                                   model_field(1, "model"): " org/b ", model_field(1, "weight"): 0.5})
    assert state.base == "org/base" and state.seed == 0 and state.out_dtype == DTYPE_AS_BASE
    assert [row.model for row in state.models] == ["", "org/b"]  # a row with no field read is an empty row
    assert state.models[1].params == {"weight": 0.5}


def test_a_config_round_trips_through_the_form():
    state, notes = shown(TIES)
    assert notes == []
    assert state.method == "ties" and state.base == "org/base"
    assert [row.model for row in state.models[:3]] == ["org/math", "org/code", ""]
    assert state.models[0].params["density"] == 0.2 and state.global_params["ties"]["lambda"] == 0.9
    assert config_from_form(state, TIES) == TIES
    assert config_from_form(state) == TIES  # nothing here needed the YAML underneath
    parse_config(dump_yaml(config_from_form(state, TIES)))


def test_keys_the_form_cannot_show_survive_a_form_edit():
    current = dict(TIES, slices=[{"sources": [{"model": "org/math", "layer_range": [0, 4]}]}],
                   tokenizer_source="base", dtype="float16", future_option={"x": 1})
    state, notes = shown(current)
    assert any("slices" in n for n in notes)
    state.global_params["ties"]["lambda"] = 0.5
    state.models[1].params["weight"] = 0.4
    out = config_from_form(state, current)
    assert out["parameters"]["lambda"] == 0.5 and out["models"][1]["parameters"]["weight"] == 0.4
    for key in ("slices", "tokenizer_source", "dtype", "future_option"):
        assert out[key] == current[key]
    assert list(out)[-1] == "future_option"  # unknown keys come after the ones the form writes


def test_per_layer_values_are_kept_while_the_form_shows_the_default():
    current = {"merge_method": "ties", "base_model": "org/base",
               "models": [{"model": "org/math", "parameters": {"weight": 1.0, "density": [0.2, 0.6]}}],
               "parameters": {"lambda": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}
    state, notes = shown(current)
    assert any("models[0].density" in n for n in notes) and any("`lambda`" in n for n in notes)
    assert state.models[0].params["density"] == 1.0  # the number field shows the default in its place
    assert config_from_form(state, current) == current
    state.models[0].params["density"] = 0.3  # a value typed in the form replaces the list
    out = config_from_form(state, current)
    assert out["models"][0]["parameters"]["density"] == 0.3
    assert out["parameters"]["lambda"] == current["parameters"]["lambda"]


def test_models_beyond_the_forms_rows_stay_in_the_config():
    many = dict(TIES, models=[{"model": f"org/m{i}", "parameters": {"weight": 1.0, "density": 1.0}}
                              for i in range(MAX_MODEL_ROWS + 2)])
    state, notes = shown(many)
    assert len(state.models) == MAX_MODEL_ROWS and state.models[-1].model == f"org/m{MAX_MODEL_ROWS - 1}"
    assert any(f"the form shows the first {MAX_MODEL_ROWS}" in n for n in notes)
    assert config_from_form(state, many)["models"] == many["models"]


def test_rows_grow_with_the_config_up_to_the_capacity():
    state, _ = form_from_config(TIES, blank_state(rows=1), capacity=4)
    assert [row.model for row in state.models] == ["org/math", "org/code"]
    state, notes = form_from_config(dict(TIES, models=TIES["models"] * 3), blank_state(rows=1), capacity=4)
    assert len(state.models) == 4 and any("6 models" in n for n in notes)


def test_rows_without_an_entry_are_emptied_and_other_methods_keep_their_values():
    current = blank_state()
    current.models[4] = ModelRow("org/old", {"weight": 0.1, "density": 0.1, "epsilon": 0.3})
    current.global_params["della"]["lambda"] = 0.7
    state, _ = shown(TIES, current)
    assert state.models[4].model == "" and state.models[4].params["density"] == 1.0
    assert state.models[4].params["epsilon"] == 0.3  # not a ties parameter: the hidden field keeps its value
    assert state.global_params["della"]["lambda"] == 0.7


def test_an_unknown_method_keeps_the_forms_method():
    state, _ = shown(dict(TIES, merge_method="nope"), blank_state("linear"))
    assert state.method == "linear"
    state, _ = shown({"merge_method": ["not", "a", "name"]}, blank_state("slerp"))
    assert state.method == "slerp"


def test_defaults_stay_out_of_the_config_unless_the_yaml_has_them():
    state, _ = shown(TIES)
    assert "normalize" not in config_from_form(state, TIES)["parameters"]
    written = dict(TIES, parameters={"lambda": 0.9, "normalize": True})
    assert config_from_form(state, written)["parameters"] == {"lambda": 0.9, "normalize": True}


def test_the_nan_switch_and_its_options():
    state, _ = shown(dict(TIES, parameters={"coefficients": "nan", "nan_scope": "model"}))
    assert state.nan["coefficients"] is True and state.nan["nan_scope"] == "model"
    assert config_from_form(state)["parameters"] == {"coefficients": "nan", "nan_scope": "model"}
    state.nan["coefficients"] = False
    state.nan["nan_scope"] = "tensor"  # back at its default: without NAN the option means nothing
    assert "parameters" not in config_from_form(state)
    assert set(NAN_PARAMS) >= set(state.nan)


def test_advanced_options_both_ways():
    config = dict(TIES, out_dtype="bfloat16", seed=7, allow_vocab_mismatch=True)
    state, _ = shown(config)
    assert (state.out_dtype, state.seed, state.allow_vocab_mismatch) == ("bfloat16", 7, True)
    assert config_from_form(state, config) == config
    state, _ = shown(dict(TIES, dtype="float16"))
    assert state.out_dtype == "float16"  # shown from `dtype` when there is no out_dtype
    state, _ = shown(dict(TIES, out_dtype="int3", seed="seven"))
    assert (state.out_dtype, state.seed) == (DTYPE_AS_BASE, 0)


def test_a_list_parameter_is_one_comma_separated_line():
    config = {"merge_method": "emr", "base_model": "org/base", "models": [{"model": "org/a"}],
              "parameters": {"skip": ["head.", "classifier."]}}
    state, _ = shown(config)
    assert state.global_params["emr"]["skip"] == "head., classifier."
    state.global_params["emr"]["skip"] = "head. , pooler.,"
    assert config_from_form(state, config)["parameters"]["skip"] == ["head.", "pooler."]


def test_presets_from_the_registry():
    ties = REGISTRY["ties"]
    labels = list(presets_for(ties))
    assert labels[0] == DEFAULTS_PRESET and labels[1:] == [f"{p.name}: {p.label}" for p in ties.presets]
    state, _ = shown(TIES)
    preset = ties.preset("paper").values
    applied = apply_preset(state, labels[1])
    assert all(row.params["density"] == preset["density"] for row in applied.models)  # per-model: every row
    assert applied.global_params["ties"]["lambda"] == preset["lambda"]
    assert state.models[0].params["density"] == 0.2  # the state it came from is unchanged
    out = config_from_form(applied, TIES)
    assert [m["parameters"]["density"] for m in out["models"]] == [preset["density"]] * 2
    parse_config(dump_yaml(out))

    defaults = apply_preset(state, DEFAULTS_PRESET)
    assert defaults.global_params["ties"]["lambda"] == 1.0 and defaults.models[0].params["weight"] == 1.0
    assert apply_preset(state, "no such preset") is None and apply_preset(state, None) is None


@pytest.mark.parametrize("method", sorted(REGISTRY))
def test_every_preset_of_every_method_makes_a_valid_config(method):
    m = REGISTRY[method]
    models = [{"model": f"org/m{i}"} for i in range(max(m.min_models, 1))]
    config = {"merge_method": method, "models": models} | ({} if m.base == "none" else {"base_model": "org/base"})
    state, _ = shown(config, blank_state(method))
    for label in presets_for(m):
        applied = apply_preset(state, label)
        if applied is not None:
            assert parse_config(dump_yaml(config_from_form(applied, config))).merge_method == method


def test_the_view_follows_the_method():
    state, _ = shown(TIES)
    view = form_view(state)
    assert view.method == "ties" and "**ties**" in view.summary and view.nan_visible
    assert view.base_label == "Base model" and view.preset_choices == tuple(presets_for(REGISTRY["ties"]))
    assert view.model_fields["density"].visible and not view.model_fields["epsilon"].visible
    assert view.model_fields["weight"].label == "weight"
    assert view.rows_visible[:4] == (True, True, True, False)  # the filled rows and the first empty one

    state.nan["coefficients"] = True
    assert form_view(state).model_fields["weight"].label == "weight (NAN replaces it)"

    slerp, _ = shown({"merge_method": "slerp", "base_model": "org/base", "models": [{"model": "org/a"}]})
    view = form_view(slerp)
    assert not view.nan_visible and not view.model_fields["weight"].visible
    assert view.rows_visible[:2] == (True, False)  # at most one model: no empty row after it
    passthrough, _ = shown({"merge_method": "passthrough", "models": [{"model": "org/a"}]})
    assert form_view(passthrough).base_label.startswith("Base model (optional")
    assert len(form_view(blank_state(rows=3)).rows_visible) == 3


def test_helpers():
    assert first_empty_row(["org/a", " ", "org/c"]) == 1 and first_empty_row(["org/a"]) is None
    assert first_empty_row([None, "x"]) == 0
    assert safe_mapping("merge_method: [unclosed") == {} and safe_mapping("- a list") == {}
    assert safe_mapping(None) == {} and safe_mapping("a: 1") == {"a": 1}
    assert yaml.safe_load(dump_yaml(TIES)) == TIES
