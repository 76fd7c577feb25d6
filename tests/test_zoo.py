"""The demo zoo: deterministic builds, fine-tunes that learned their tasks, Fisher / RegMean / Re-Basin against
direct computations, evolutionary search on validation only, and the paper's table on the committed zoo."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from merging.__main__ import main  # noqa: E402
from merging.zoo.data import TASKS, split_indices  # noqa: E402
from merging.zoo.eval import Zoo, evaluate_checkpoint, evaluate_state  # noqa: E402
from merging.zoo.fisher import diagonal_fisher, fisher_average  # noqa: E402
from merging.zoo.rebasin import barrier_curve, permute_state, weight_matching  # noqa: E402
from merging.zoo.regmean import gram_matrices, regmean_weight  # noqa: E402
from merging.zoo.train import DEFAULT_ZOO_DIR, Steps, build  # noqa: E402

needs_zoo = pytest.mark.skipif(not (DEFAULT_ZOO_DIR / "base" / "model.safetensors").is_file(),
                               reason="the committed zoo (assets/zoo) is missing: run `python -m merging zoo build`")


@pytest.fixture(scope="module")
def zoo() -> Zoo:
    return Zoo()


@pytest.fixture
def splits_read(monkeypatch) -> list[str]:
    """The split of every ``Zoo.data`` call the test makes, in order."""
    seen: list[str] = []
    original = Zoo.data

    def spy(self, task, split):
        seen.append(split)
        return original(self, task, split)

    monkeypatch.setattr(Zoo, "data", spy)
    return seen


def test_splits_are_disjoint_and_cover_the_data():
    parts = split_indices(0)
    together = np.concatenate(list(parts.values()))
    assert len(together) == len(set(together.tolist())) == 1797
    assert [len(parts[s]) for s in ("train", "val", "test")] == [1078, 270, 449]


def test_build_is_deterministic_to_the_byte(tmp_path):
    steps = Steps().scaled(0.02)
    kwargs = dict(steps=steps, tasks=["digits", "noisy"], mlps=("mlp_a",))
    first = build(tmp_path / "a", **kwargs)
    second = build(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["base/config.json", "base/model.safetensors", "digits/config.json",
                                       "digits/model.safetensors", "mlp_a/config.json", "mlp_a/model.safetensors",
                                       "noisy/config.json", "noisy/model.safetensors"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert first["bytes"] == second["bytes"]
    # A different seed gives different weights.
    third = build(tmp_path / "c", seed=1, **kwargs)
    assert third["bytes"] == first["bytes"]
    weights = "digits/model.safetensors"
    assert (tmp_path / "c" / weights).read_bytes() != (tmp_path / "a" / weights).read_bytes()


@needs_zoo
def test_each_fine_tune_beats_the_base_on_its_own_task(zoo):
    base = evaluate_state(zoo, zoo.state("base"), split="test")
    assert set(zoo.tasks) == set(TASKS)
    for task in zoo.tasks:
        tuned = evaluate_checkpoint(zoo.root / task, zoo, [task], "test")[task]
        assert tuned >= base[task] + 0.05, (task, base[task], tuned)
        assert tuned >= 0.7, (task, tuned)


def test_fisher_equals_the_closed_form_of_softmax_regression():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x = torch.randn(20, 5)
    fisher = diagonal_fisher(model, x, num_classes=3, batch=7)
    with torch.no_grad():
        p = torch.softmax(model(x), dim=1)  # (N, C)
    # ∂ log p_c / ∂ logit_k = δ_ck − p_k; the logit's gradient w.r.t. W[k, j] is x_j, w.r.t. b[k] is 1.
    grad_logits = torch.eye(3)[None] - p[:, None, :]  # (N, c, k)
    expected_w = (p[:, :, None, None] * (grad_logits[..., None] * x[:, None, None, :]) ** 2).sum(1).mean(0)
    expected_b = (p[:, :, None] * grad_logits ** 2).sum(1).mean(0)
    torch.testing.assert_close(fisher["weight"], expected_w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(fisher["bias"], expected_b, rtol=1e-5, atol=1e-7)

    other = nn.Linear(5, 3)
    states = [dict(model.state_dict()), dict(other.state_dict())]
    f2 = diagonal_fisher(other, x + 1, num_classes=3)
    merged = fisher_average(states, [fisher, f2], epsilon=0.0)
    f_a, f_b = fisher["weight"], f2["weight"]
    expected = (f_a * states[0]["weight"] + f_b * states[1]["weight"]) / (f_a + f_b)
    torch.testing.assert_close(merged["weight"], expected)
    # Where no model has any Fisher mass, ε makes it the plain average.
    zero = {k: torch.zeros_like(v) for k, v in fisher.items()}
    plain = fisher_average(states, [zero, zero])
    torch.testing.assert_close(plain["bias"], (states[0]["bias"] + states[1]["bias"]) / 2)


def test_regmean_equals_least_squares_on_every_models_inputs():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    inputs = [torch.randn(30, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen,
                                                                                     dtype=torch.float64)
              for _ in range(3)]
    grams = [x.T @ x for x in inputs]
    # α = 1: argmin_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖², solved directly on the stacked system.
    direct = torch.linalg.lstsq(torch.cat(inputs), torch.cat([x @ w.T for x, w in zip(inputs, weights)])).solution.T
    torch.testing.assert_close(regmean_weight(weights, grams, alpha=1.0), direct)
    # α < 1 shrinks the off-diagonal Gram entries: the same as ridge rows √((1−α)/α · G_i[j,j]) pulling W to W_i.
    alpha = 0.7
    rows_x, rows_y = list(inputs), [x @ w.T for x, w in zip(inputs, weights)]
    for g, w in zip(grams, weights):
        ridge = torch.diag(torch.sqrt((1 - alpha) / alpha * torch.diagonal(g)))
        rows_x.append(ridge)
        rows_y.append(ridge @ w.T)
    direct = torch.linalg.lstsq(torch.cat(rows_x), torch.cat(rows_y)).solution.T
    torch.testing.assert_close(regmean_weight(weights, grams, alpha=alpha), direct)

    # The Gram hooks see each linear layer's own input.
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    x = torch.randn(9, 6)
    found = gram_matrices(net, x, skip_prefix="nothing.")
    hidden = torch.relu(net[0](x)).double()
    torch.testing.assert_close(found["0.weight"], x.double().T @ x.double())
    torch.testing.assert_close(found["2.weight"], hidden.T @ hidden)


@needs_zoo
def test_weight_matching_recovers_a_known_permutation_exactly(zoo):
    a = zoo.state("mlp_a")
    rng = np.random.default_rng(3)
    hidden = [a["layers.0.weight"].shape[0], a["layers.1.weight"].shape[0]]
    scrambled = permute_state(a, [rng.permutation(n) for n in hidden])
    assert not torch.equal(scrambled["layers.0.weight"], a["layers.0.weight"])
    found = weight_matching(a, scrambled, seed=0)
    realigned = permute_state(scrambled, found)
    for name in a:
        assert torch.equal(realigned[name], a[name]), name


@needs_zoo
def test_rebasin_and_repair_lower_the_barrier_between_independent_mlps(zoo):
    curve = barrier_curve(zoo, points=5)
    b = curve["barrier"]
    assert curve["naive"][0] == curve["rebasin"][0] == curve["rebasin_repair"][0]
    assert b["rebasin"] < b["naive"]
    assert b["rebasin_repair"] <= b["rebasin"] + 0.01
    assert curve["matched_units"] > 0.5  # independent inits: most units had to move


@needs_zoo
def test_evolutionary_search_improves_validation_accuracy_without_reading_test(zoo, tmp_path, monkeypatch,
                                                                            splits_read):
    from merging.zoo import evolve as ev

    seen = splits_read
    result = ev.evolve(zoo, budget=9, popsize=4, seed=0)
    assert result.evaluations == 9
    assert result.best_score > result.start_score
    assert set(seen) == {"val"}
    monkeypatch.undo()  # the rerun below may read any split

    # The saved YAML is an ordinary config: the CLI reruns it and gets the same validation score.
    path = ev.save_config(result.config, tmp_path / "evolved.yml", zoo)
    assert main(["merge", str(path), str(tmp_path / "merged")]) == 0
    rerun = evaluate_checkpoint(tmp_path / "merged", zoo, split="val")
    assert sum(rerun.values()) / len(rerun) == pytest.approx(result.best_score, abs=1e-6)


def _without_timings(table: dict) -> dict:
    return {**{k: v for k, v in table.items() if k != "seconds"},
            "rows": [{k: v for k, v in r.items() if k != "seconds"} for r in table["rows"]]}


@needs_zoo
def test_table_command_runs_on_the_committed_zoo_and_equals_the_committed_table(tmp_path, capsys):
    """One run of `zoo table`: every row merges, each paper number has its source, and the committed
    table.json, table.md and both READMEs' tables are what it computes."""
    from merging.zoo.rows import PAPER_VIT_B32
    from merging.zoo.table import protocols_markdown

    out_json, out_md = tmp_path / "table.json", tmp_path / "table.md"
    assert main(["zoo", "table", "--json", str(out_json), "--markdown", str(out_md)]) == 0
    printed = capsys.readouterr().out
    table = json.loads(out_json.read_text())
    rows = {r["key"]: r for r in table["rows"]}
    assert table["tasks"] == list(TASKS)
    assert rows["individual"]["normalized"] == pytest.approx(1.0)
    for key in ("weight_averaging", "task_arithmetic", "fisher", "regmean", "tsv_m", "iso_c", "iso_cts", "cart",
                "pcb", "consensus", "lines_ta", "ties_official", "dare_paper"):
        assert rows[key]["status"] == "ok", key
        assert rows[key]["average"] < rows["individual"]["average"]
    for row in table["rows"]:
        assert row["status"] == "ok", (row["key"], row["status"])
        assert row["protocol"], row["key"]
        paper = PAPER_VIT_B32.get(row["key"])
        assert (row["paper_vit_b32_average"], row["paper_source"]) == (paper or (None, None))
    assert rows["pretrained"]["paper_vit_b32_average"] is None  # the EMR paper's table has no such row
    assert "| Individual fine-tunes |" in printed and out_md.read_text() in printed
    root = DEFAULT_ZOO_DIR
    assert _without_timings(table) == _without_timings(json.loads((root / "table.json").read_text())), \
        "assets/zoo/table.json is stale: python -m merging zoo table --json assets/zoo/table.json --markdown ..."
    assert out_md.read_text() == (root / "table.md").read_text(), "assets/zoo/table.md is stale"
    for readme in (root.parent.parent / "README.md", root / "README.md"):
        text = readme.read_text()
        assert out_md.read_text() in text and protocols_markdown(table) in text, f"{readme}: the zoo table is stale"


@needs_zoo
def test_tuning_reads_only_the_validation_split(zoo, splits_read):
    from merging.zoo import tune

    seen = splits_read
    searches = {"iso_c": ("iso_c", {}, {"lambda": (0.2, 1.0)}), "consensus": ("consensus", {"k": 2}, {"lambda": (0.2,)})}
    found = tune.tune(zoo, searches=searches)
    assert set(seen) == {"val"}
    assert found["iso_c"]["parameters"]["lambda"] in (0.2, 1.0) and found["iso_c"]["candidates"] == 2
    assert len(found["consensus"]["model_parameters"]) == len(zoo.tasks)
    # the committed choices are what a full search finds for this row (its grid is small enough to rerun here)
    committed = tune.read_tuned(zoo)["iso_c"]
    again = tune.tune(zoo, ["iso_c"])["iso_c"]
    assert again["parameters"] == committed["parameters"]
    assert again["val_average"] == pytest.approx(committed["val_average"], abs=1e-9)


@needs_zoo
def test_learn_view_functions_agree_with_the_library(zoo, capsys):
    from merging.zoo import learn
    from merging.zoo.merges import is_registered
    from merging.zoo.table import emr_scores

    at_zero = learn.lambda_sweep(0.0, zoo)
    assert at_zero["accuracy"] == pytest.approx(evaluate_state(zoo, zoo.state("base")))
    emr = learn.emr_steps(zoo)
    steps = {s["step"]: s["average"] for s in emr["steps"]}
    assert steps["elect"] < steps["elect+mask"] < steps["elect+mask+rescale"]
    assert all(0.3 < d < 0.9 for d in emr["mask_density"].values())
    if is_registered("emr"):  # the step-by-step formulas and the registered method give the same models
        scores, _ = emr_scores(zoo, zoo.tasks)
        assert sum(scores.values()) / len(scores) == pytest.approx(steps["elect+mask+rescale"], abs=1e-6)

    assert main(["zoo", "eval", str(zoo.root / "parity"), "--task", "parity"]) == 0
    individual = evaluate_state(zoo, zoo.state("parity"), ["parity"])["parity"]
    assert f"{100 * individual:6.2f}" in capsys.readouterr().out
