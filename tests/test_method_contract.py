"""The method contract: a method in a new file is found everywhere; presets and cross-parameter rules are part of
the method, checked when the config is validated; ``python -m merging methods`` lists and documents them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_methods_cli import minimal_config

from merging.config import parse_config
from merging.errors import ConfigError
from merging.methods import REGISTRY
from merging.methods.docs import TABLE_END, TABLE_START, methods_table_markdown, with_methods_section

ROOT = Path(__file__).resolve().parent.parent

PLUGIN = '''"""Sign flip: the base minus the mean task vector (a test method that lives in its own file)."""

from .registry import MergeMethod, Param, Preset, register


def sign_flip(base, models, params, ctx):
    """θ = θ_base − λ · mean_i τ_i."""
    return base - params["lambda"] * sum(m - base for m in models) / len(models)


register(MergeMethod(
    name="sign_flip", fn=sign_flip, summary="subtracts the mean task vector from the base",
    paper="a test fixture, no paper", params=(Param("lambda", float, 1.0, "how far to go"),),
    presets=(Preset("paper", "λ = 0.5", {"lambda": 0.5}),), elementwise=True,
))
'''


@pytest.fixture(scope="module")
def checkout_with_plugin(tmp_path_factory):
    """A copy of the repository with one more method file under merging/methods/."""
    root = tmp_path_factory.mktemp("checkout")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("merging", "components", "tests"):
        shutil.copytree(ROOT / part, root / part, ignore=ignore)
    for name in ("README.md", "pytest.ini", "pyproject.toml"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, root / name)
    (root / "merging" / "methods" / "sign_flip.py").write_text(PLUGIN)
    return root


def _run_all(root: Path, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Each command's ``python ARGS`` in the checkout, all at once (each pays the imports; together they take both
    cores), in order of the commands."""
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    procs = [subprocess.Popen([sys.executable, *args], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args in commands]
    done = []
    try:
        for args, proc in zip(commands, procs):
            stdout, stderr = proc.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


@pytest.mark.slow
def test_a_method_in_a_new_file_is_listed_merges_shows_in_the_form_and_is_tested(checkout_with_plugin, family,
                                                                                 tmp_path):
    root = checkout_with_plugin
    base, tunes = family
    config = tmp_path / "flip.yml"
    config.write_text(yaml.safe_dump({"merge_method": "sign_flip", "base_model": str(base),
                                      "models": [{"model": str(t)} for t in tunes], "parameters": {"lambda": 0.5}}))
    readme = root / "README.md"
    listed, merged, form, collected, updated = _run_all(
        root, ("-m", "merging", "methods"), ("-m", "merging", "merge", str(config), str(tmp_path / "out")),
        ("-c", "from components.method_form import presets_for; from merging.methods import REGISTRY; "
               "print(sorted(REGISTRY)); print(list(presets_for(REGISTRY['sign_flip'])))"),
        ("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_methods_cli.py",
         "tests/test_method_contract.py"),
        ("-m", "merging", "methods", "--update-readme", str(readme)))
    assert listed.returncode == 0, listed.stderr
    assert "sign_flip" in listed.stdout and "subtracts the mean task vector" in listed.stdout

    assert merged.returncode == 0, merged.stderr
    from checkpoints import load_folder

    out, b, ts = load_folder(tmp_path / "out"), load_folder(base), [load_folder(t) for t in tunes]
    name = "model.layers.0.mlp.up_proj.weight"
    expected = b[name] - 0.5 * sum(t[name] - b[name] for t in ts) / len(ts)
    assert (out[name] - expected).abs().max() < 1e-6

    assert form.returncode == 0, form.stderr
    assert "'sign_flip'" in form.stdout and "paper: λ = 0.5" in form.stdout

    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "test_every_method_merges_through_the_cli[sign_flip]" in collected.stdout
    assert "test_every_preset_is_a_valid_config[sign_flip-paper]" in collected.stdout

    assert updated.returncode == 0, updated.stderr
    assert "| `sign_flip` | subtracts the mean task vector from the base |" in readme.read_text()


PRESETS = [(m.name, p.name) for m in REGISTRY.values() for p in m.presets]


@pytest.mark.parametrize("method, preset", PRESETS, ids=[f"{m}-{p}" for m, p in PRESETS])
def test_every_preset_is_a_valid_config(method, preset, family):
    """A preset, applied as the app applies it (per-model values under every model, the rest globally), validates."""
    m = REGISTRY[method]
    base, tunes = family
    config = minimal_config(m, base, tunes)
    for key, value in m.preset(preset).values.items():
        if m.param(key).per_model:
            for entry in config["models"]:
                entry.setdefault("parameters", {})[key] = value
        else:
            config.setdefault("parameters", {})[key] = value
    parsed = parse_config(yaml.safe_dump(config))
    assert parsed.merge_method == method


def test_della_cross_parameter_rule_is_checked_when_the_config_is_validated(family):
    base, tunes = family
    text = (f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {tunes[0]}\n"
            "    parameters: {density: 0.1, epsilon: 0.2}\n")
    with pytest.raises(ConfigError, match=r"density ± epsilon < 1, got density 0.1, epsilon 0.2"):
        parse_config(text)


def test_della_rule_sees_per_layer_anchors_and_filters(family):
    base, tunes = family
    anchors = (f"merge_method: della_linear\nbase_model: {base}\nmodels:\n  - model: {tunes[0]}\n"
               "    parameters: {density: [0.5, 0.08], epsilon: 0.1}\n")
    with pytest.raises(ConfigError, match="density 0.08, epsilon 0.1"):
        parse_config(anchors)  # only the last layer breaks the rule
    filters = (f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {tunes[0]}\nparameters:\n"
               "  density: 0.5\n  epsilon: [{filter: mlp, value: 0.6}, {value: 0.1}]\n")
    with pytest.raises(ConfigError, match="density 0.5, epsilon 0.6"):
        parse_config(filters)
    fine = filters.replace("0.6", "0.3")
    assert parse_config(fine).merge_method == "della"


def test_methods_command_lists_every_method_and_prints_the_readme_tables(capsys):
    from merging.__main__ import main

    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    for name, method in REGISTRY.items():
        assert f"{name} " in listing and method.paper in listing
    assert main(["methods", "--markdown"]) == 0
    assert capsys.readouterr().out == methods_table_markdown()


def test_update_readme_rewrites_only_the_methods_section(tmp_path, capsys):
    from merging.__main__ import main

    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nbefore\n{TABLE_START}\nstale table\n{TABLE_END}\nafter\n")
    assert main(["methods", "--update-readme", str(readme)]) == 0
    text = readme.read_text()
    assert text == with_methods_section(text)
    assert text.startswith("# Title\n\nbefore\n") and text.endswith(f"{TABLE_END}\nafter\n")
    assert "stale table" not in text and "| `ties` |" in text
    readme.write_text("no markers here\n")
    assert main(["methods", "--update-readme", str(readme)]) == 2
    assert "no <!-- methods-table:start -->" in capsys.readouterr().err
