"""``python -m merging evaluate`` on real checkpoints built here (tests/lm_family.py: a BPE tokenizer trained with
`tokenizers`, Llama- and GPT-2-shaped models trained a few steps, fine-tunes trained on prose and on code): the
figures equal a direct transformers computation, a broken merge (task arithmetic, λ = 8) is flagged and a TIES
merge is not, classifiers' agreement, seq2seq targets, the zoo through the same command, sizes and tokenizers,
the memory refusal, cancel, and one-line errors."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
from lm_family import family, merge, noisy_family, train_tokenizer

from merging.__main__ import main
from merging.errors import Cancelled, MergeError, SourceError
from merging.evaluate.run import evaluate

pytestmark = pytest.mark.slow
FEW = 1200  # tokens of the held text scored in most tests: 19 windows of 128


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    fam = family(tmp_path_factory, "llama")
    out = tmp_path_factory.mktemp("llama-merges")
    return fam, merge(fam, out / "ties"), merge(fam, out / "broken", "task_arithmetic", 8.0)


def direct_causal(folder, ids: torch.Tensor, window: int, stride: int) -> tuple[float, int, torch.Tensor]:
    """Perplexity from transformers' own loss (labels, -100 for context-only positions), window by window as the
    perplexity guide of the transformers docs describes it, and the top-1 choices at the scored positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count, prev_end, preds = 0.0, 0, 0, []
    for begin in range(0, len(ids), stride):
        end = min(begin + window, len(ids))
        new = end - prev_end
        x = ids[begin:end][None]
        labels = x.clone()
        labels[:, :-new] = -100
        with torch.no_grad():
            out = model(input_ids=x, labels=labels)
        n = int((labels[:, 1:] != -100).sum())
        total += float(out.loss) * n
        count += n
        preds.append(out.logits[0, -n - 1:-1].argmax(-1))
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total / count), count, torch.cat(preds)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_perplexity_agreement_and_continuations_equal_transformers(arch, tmp_path_factory, llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = llama[0] if arch == "llama" else family(tmp_path_factory, "gpt2")
    merged = llama[1] if arch == "llama" else merge(fam, tmp_path_factory.mktemp("gpt2-merge") / "ties")
    report = evaluate(merged, max_tokens=FEW, new_tokens=12)
    assert report["kind"] == "causal_lm" and report["text"]["window"] == 128 and report["text"]["stride"] == 64
    tok = AutoTokenizer.from_pretrained(merged)
    ids = torch.tensor(tok(report_text(report))["input_ids"][:FEW])
    assert report["text"]["tokens"] == len(ids)
    rows = {r["label"]: r for r in report["rows"]}
    assert [r["role"] for r in report["rows"]] == ["base", "input", "input", "merged"]
    direct = {label: direct_causal(r["ref"], ids, 128, 64) for label, r in rows.items()}
    for label, (ppl, count, _) in direct.items():
        assert rows[label]["scored"] == count == len(ids) - 1
        assert abs(rows[label]["perplexity"] - ppl) <= 1e-4 * ppl, (label, rows[label]["perplexity"], ppl)
    for label, (_, _, preds) in direct.items():
        assert rows[label]["agreement"] == pytest.approx(float((preds == direct["merged"][2]).double().mean()))
    # the greedy continuations are transformers' own greedy decoding
    model = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    first = report["continuations"][0]
    x = tok(first["prompt"], return_tensors="pt")["input_ids"]
    made = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, num_beams=1, max_new_tokens=12)
    assert first["outputs"]["merged"] == tok.decode(made[0, x.shape[1]:], skip_special_tokens=True)
    assert set(first["outputs"]) == set(rows)


def report_text(report: dict) -> str:
    from merging.evaluate.inputs import builtin_text

    return builtin_text()[0]


def test_the_cli_flags_a_broken_merge_and_passes_a_good_one(llama, tmp_path, capsys):
    _, ties, broken = llama
    assert main(["evaluate", str(ties), "--max-tokens", str(FEW), "--json", str(tmp_path / "ties.json")]) == 0
    good = capsys.readouterr().out
    assert "verdict: OK" in good and "| merged | merged |" in good and "windows of 128 moving by 64" in good
    saved = json.loads((tmp_path / "ties.json").read_text())
    assert saved["verdict"]["status"] == "ok" and len(saved["rows"]) == 4
    from merging.evaluate.charts import evaluation_chart

    figure = evaluation_chart(saved)
    worst = max(r["perplexity"] for r in saved["rows"][:-1])
    assert list(figure.data[0].y) == [r["perplexity"] for r in saved["rows"]]
    assert figure.layout.shapes[0].y0 == pytest.approx(2 * worst)  # the broken-merge limit, dashed

    assert main(["evaluate", str(broken), "--max-tokens", str(FEW), "--strict"]) == 3
    bad = capsys.readouterr().out
    line = next(x for x in bad.splitlines() if x.startswith("verdict:"))
    assert line.startswith("verdict: BROKEN: perplexity") and "the worst input's" in line and "limit 2×" in line


def test_explicit_compare_and_a_changed_tokenizer(llama, tmp_path):
    fam, ties, _ = llama
    odd = tmp_path / "odd-tokenizer"
    shutil.copytree(ties, odd)
    for f in odd.glob("tokenizer*"):
        f.unlink()
    train_tokenizer("a tokenizer trained on other text: " * 40 + "entirely different words here.", odd)
    report = evaluate(odd, [str(fam.base), str(fam.tunes[0])], max_tokens=300, new_tokens=2)
    assert [r["label"] for r in report["rows"]] == ["llama-base", "llama-ft0", "merged"]
    diff = report["tokenizer"]["difference"]
    assert re.match(r"merged's tokenizer differs from the base's at token \d+ \(character \d+: '.*'\): \d+ '.*' vs "
                    r"\d+ '.*'; \d+ vs 6876 tokens; vocabularies of \d+ vs 500$", diff), diff
    assert report["verdict"]["status"] in ("warning", "broken")
    assert any(f["text"] == diff for f in report["verdict"]["findings"])


def test_inputs_come_from_the_hub_cache_and_are_never_downloaded(llama, tmp_path, monkeypatch):
    """An input named by merge_config.yml as a Hub repo is read from the Hub cache; one not cached is a row that
    says so (explicitly asked for, an error); a public server does not read the cache at all."""
    import huggingface_hub.constants

    fam, ties, _ = llama
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-base" / "snapshots" / ("ab" * 20)
    shutil.copytree(fam.base, snapshot)
    (cache / "models--acme--tiny-base" / "refs").mkdir()
    (cache / "models--acme--tiny-base" / "refs" / "main").write_text("ab" * 20)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    merged = tmp_path / "merged"
    shutil.copytree(ties, merged)
    (merged / "merge_config.yml").write_text(f"merge_method: ties\nbase_model: acme/tiny-base\nmodels:\n"
                                             f"  - model: someone/never-cached\n  - model: {fam.tunes[0]}\n")
    report = evaluate(merged, max_tokens=200, new_tokens=2)
    rows = {r["label"]: r for r in report["rows"]}
    assert rows["tiny-base"]["perplexity"] > 0 and rows["tiny-base"]["role"] == "base"
    assert rows["never-cached"]["skipped"].startswith("not in the Hub cache, and evaluate never downloads")
    assert "perplexity" not in rows["never-cached"]
    public = evaluate(merged, max_tokens=200, new_tokens=2, hub_cache=False)
    assert public["rows"][0]["skipped"] == "a Hub model: this server checks against local folders only"
    assert any(f["text"].startswith("never-cached not compared") for f in report["verdict"]["findings"])


def test_a_frankenmerge_that_grows_the_model_says_so(llama, tmp_path):
    from merging.config import parse_config
    from merging.engine import run_merge

    fam = llama[0]
    config = parse_config(f"merge_method: passthrough\nslices:\n  - sources: [{{model: {fam.base}, layer_range: [0, 2]}}]\n"
                          f"  - sources: [{{model: {fam.tunes[0]}, layer_range: [1, 2]}}]\n")
    run_merge(config, tmp_path / "grown")
    report = evaluate(tmp_path / "grown", max_tokens=200, new_tokens=2)
    merged = report["rows"][-1]
    assert merged["parameters"] > max(r["parameters"] for r in report["rows"][:-1])
    assert any("more than its largest input" in f["text"] for f in report["verdict"]["findings"])


def test_classifier_agreement_figures(tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from merging.evaluate.inputs import builtin_text, sentences

    def make(vocab):
        return LlamaForSequenceClassification(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, num_labels=3, pad_token_id=0))

    text = builtin_text()[0]
    base, tunes = noisy_family(tmp_path / "cls", make, text, scale=0.05)
    from merging.config import parse_config
    from merging.engine import run_merge

    models = "".join(f"  - model: {t}\n" for t in tunes)
    run_merge(parse_config(f"merge_method: linear\nbase_model: {base}\nmodels:\n{models}"), tmp_path / "soup")
    report = evaluate(tmp_path / "soup")
    assert report["kind"] == "sequence_classifier" and report["text"]["inputs"] == len(sentences(text, limit=64))
    tok = AutoTokenizer.from_pretrained(tmp_path / "soup")
    preds = {}
    for row in report["rows"]:
        model = AutoModelForSequenceClassification.from_pretrained(row["ref"]).eval()
        with torch.no_grad():
            preds[row["label"]] = torch.tensor([int(model(**tok(s, return_tensors="pt")).logits.argmax())
                                                for s in sentences(text, limit=64)])
    for row in report["rows"]:
        assert row["agreement"] == pytest.approx(float((preds[row["label"]] == preds["merged"]).double().mean()))
        assert sum(row["classes"].values()) == len(preds["merged"])
    assert report["pairwise"]["base · ft0"] == pytest.approx(float((preds["base"] == preds["ft0"]).double().mean()))
    assert report["verdict"]["status"] == "ok", report["verdict"]
    from merging.evaluate.charts import evaluation_chart

    assert list(evaluation_chart(report).data[0].y) == [r["agreement"] for r in report["rows"]]

    # a head that no longer separates anything: one class for every input, while the inputs predict several
    from safetensors.torch import load_file, save_file

    shutil.copytree(tmp_path / "soup", tmp_path / "flat")
    weights = load_file(tmp_path / "flat" / "model.safetensors")
    weights["score.weight"] = torch.zeros_like(weights["score.weight"])
    save_file(weights, tmp_path / "flat" / "model.safetensors", metadata={"format": "pt"})
    flat = evaluate(tmp_path / "flat", [str(base), *map(str, tunes)])
    assert all(len(r["classes"]) > 1 for r in flat["rows"][:-1]) and len(flat["rows"][-1]["classes"]) == 1
    assert flat["verdict"]["status"] == "broken" and "for every input" in flat["verdict"]["line"]


def test_seq2seq_target_perplexity_equals_transformers(tmp_path):
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    def make(vocab):
        return T5ForConditionalGeneration(T5Config(vocab_size=vocab, d_model=32, d_ff=64, d_kv=8, num_layers=2,
                                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                   eos_token_id=0))

    from merging.evaluate.inputs import builtin_text

    base, tunes = noisy_family(tmp_path / "t5", make, builtin_text()[0], n=1)
    report = evaluate(tunes[0], [str(base)], max_tokens=300, new_tokens=4)
    assert report["kind"] == "seq2seq" and report["text"]["target_tokens"] <= 300
    from merging.evaluate.inputs import merged_candidate
    from merging.evaluate.run import _pairs
    from merging.evaluate.shared import tokenizers

    tok = tokenizers([merged_candidate(tunes[0])], "seq2seq")[0]
    pairs = _pairs(tok, builtin_text()[0], 300)
    for row in report["rows"]:
        model = AutoModelForSeq2SeqLM.from_pretrained(row["ref"]).eval()
        total = count = 0
        with torch.no_grad():
            for s, t in pairs:
                total += float(model(input_ids=torch.tensor([s]), labels=torch.tensor([t])).loss) * len(t)
                count += len(t)
        assert row["scored"] == count
        assert abs(row["perplexity"] - math.exp(total / count)) <= 1e-4 * math.exp(total / count)


def test_the_zoo_through_the_same_command(tmp_path, capsys):
    from merging.config import parse_config
    from merging.engine import run_merge
    from merging.zoo.eval import evaluate_checkpoint

    run_merge(parse_config("merge_method: task_arithmetic\nbase_model: assets/zoo/base\nmodels:\n"
                           "  - model: assets/zoo/digits\n  - model: assets/zoo/parity\nparameters: {lambda: 8.0}\n"),
              tmp_path / "zoo8")
    assert main(["evaluate", str(tmp_path / "zoo8"), "--json", str(tmp_path / "r.json")]) == 0
    out = capsys.readouterr().out
    assert "(demo zoo model)" in out and "verdict: BROKEN: chance-corrected accuracy" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"][-1]["accuracy"] == pytest.approx(evaluate_checkpoint(tmp_path / "zoo8"))
    from merging.evaluate.charts import evaluation_chart

    bars = evaluation_chart(report).data[0]
    assert list(bars.x) == ["base", "digits", "parity", "merged"] and bars.y[-1] == report["rows"][-1]["average"]


def test_too_big_for_memory_is_refused_before_any_weight_is_read(llama, monkeypatch):
    from merging.evaluate import loading

    monkeypatch.setenv("MERGESCOPE_MEMORY_LIMIT", "50MB")
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(MergeError) as err:
        evaluate(llama[1], max_tokens=200)
    text = str(err.value)
    assert text.startswith("not enough memory: checking the merged model (") and "float32" in text
    assert "needs about" in text and "only 50 MB is available ($MERGESCOPE_MEMORY_LIMIT)" in text


def test_cancel_stops_within_a_window_and_the_panel_reports_it(llama, tmp_path):
    seen = []
    with pytest.raises(Cancelled):
        evaluate(llama[1], max_tokens=FEW, progress=lambda f, text: seen.append(text), cancel=lambda: len(seen) >= 5)
    assert len(seen) == 5 and "window" in seen[-1]

    from components.common import AppSettings
    from components.eval_panel import check_in_session
    from components.sessions import SessionStore

    session = SessionStore(root=tmp_path / "sessions").get("one")
    folder = session.folder / "merge-1"
    shutil.copytree(llama[1], folder)
    with pytest.raises(Cancelled):
        check_in_session(folder, session, AppSettings(), progress=lambda f, t: session.cancel.set())
    with pytest.raises(MergeError, match="Merge first"):
        check_in_session(llama[1], session, AppSettings())  # not this session's folder


def test_a_check_past_its_budget_or_cancelled_writes_nothing_and_the_next_run_recovers(llama, tmp_path, capsys):
    """--time-budget stops the check as a cancel does (one line, exit 2, no --json file), and so does a cancel in
    the middle of a model; the next run, with time enough, writes its report."""
    out = tmp_path / "report.json"
    args = ["evaluate", str(llama[1]), "--max-tokens", "300", "--new-tokens", "2", "--json", str(out)]
    assert main([*args, "--time-budget", "0.000001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the check stopped after its time budget of 1e-06 s") and err.count("\n") == 1, err
    assert not out.exists()
    seen = []
    with pytest.raises(Cancelled):
        evaluate(llama[1], max_tokens=300, new_tokens=2, progress=lambda f, text: seen.append(text),
                 cancel=lambda: any("loading" in t for t in seen[1:]))  # after the first model, mid-check
    assert main([*args, "--time-budget", "600"]) == 0 and json.loads(out.read_text())["verdict"]["status"]


def test_bad_input_is_one_line(llama, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    weird = tmp_path / "weird"
    weird.mkdir()
    (weird / "config.json").write_text(json.dumps({"model_type": "nonesuch", "architectures": ["NoneSuch"]}))
    shutil.copy(llama[1] / "model.safetensors", weird / "model.safetensors")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cases = [
        ([str(weird)], "model type 'nonesuch' is not one transformers"),
        ([str(tmp_path / "missing")], "no such folder"),
        ([str(llama[1]), "--compare", "someone/not-cached"], "--compare someone/not-cached: not in the Hub cache"),
        ([str(llama[1]), "--text", str(tmp_path / "nope.txt")], "--text"),
        ([str(llama[1]), "--window", "500"], "longer than the model's context (128 positions)"),
        ([str(llama[1]), "--window", "64", "--stride", "65"], "a stride no longer than the window"),
    ]
    for args, expected in cases:
        assert main(["evaluate", *args]) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err, (args, err)
    with pytest.raises(SourceError, match="EMR merge"):
        (weird / "emr.json").write_text("{}")
        evaluate(weird)
