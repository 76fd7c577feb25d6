"""The README stays true: its methods table is the registry's, and its two commands are the ones CI runs."""

from pathlib import Path

from merging.methods.docs import UPDATE_COMMAND, methods_table_markdown

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_methods_section_is_the_registry_table():
    start = README.index("<!-- methods-table:start -->") + len("<!-- methods-table:start -->")
    section = README[start:README.index("<!-- methods-table:end -->")]
    methods, params = methods_table_markdown().strip().split("\n\n", 1)
    hint = f"the README's methods table is not the registry's: run `{UPDATE_COMMAND}`"
    assert methods in section, hint
    assert params in section, hint


def test_the_two_commands_are_the_ones_ci_and_users_run():
    assert "pip install torch==2.13.0 && pip install -r requirements.txt && python app.py" in README
    assert "bash tests/run.sh" in README
    assert "tests/run.sh" in (ROOT / ".ci" / "run").read_text()
    assert (ROOT / "requirements.txt").read_text().splitlines()[0] == "torch==2.13.0"


def test_space_front_matter_pins_gradio_and_the_app_file():
    import gradio

    front = README.split("---")[1]
    assert "sdk: gradio" in front and f"sdk_version: {gradio.__version__}" in front and "app_file: app.py" in front
    assert "hf_oauth: true" in front


def test_analysis_json_schema_is_the_one_the_code_renders():
    from merging.analysis import JSON_SCHEMA_DOC

    assert JSON_SCHEMA_DOC in README, "the README's analysis JSON schema is not merging.analysis.JSON_SCHEMA_DOC"
