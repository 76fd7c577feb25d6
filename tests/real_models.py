"""Real transformers checkpoints for tests: tiny models of each family, fine-tuned for a few steps, saved with
``save_pretrained`` together with the tokenizer or processor files such a repo ships.

Every model is random-initialised from a small config (hidden 32, 2 layers), then each fine-tune takes a few SGD
steps on random tokens (or pixels) with its own seed, so the task vectors are real gradients rather than noise.
Building one family (a base and two fine-tunes) takes well under a second after transformers is imported.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

VOCAB = 64
CORPUS = ["the quick brown fox jumps over the lazy dog", "merging models is fun and sometimes hard",
          "a small model learns a few words"] * 40


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread while a module's tests run: tiny models train and run several times faster so (on a
    shared 2-core machine, intra-op threads mostly wait for each other). Import it into a test module."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@dataclass(frozen=True)
class Arch:
    name: str
    build: Callable[[], torch.nn.Module]  # a random-initialised model (seeded by the caller)
    cls: str  # the transformers class
    inputs: str  # "tokens", "seq2seq", "pixels" or "classify"
    tokenizer: str | None  # which tokenizer files the repo ships (see write_tokenizer)


def _arch(name: str, config: Callable, cls: str, inputs: str, tokenizer: str | None) -> Arch:
    def build() -> torch.nn.Module:
        import transformers

        return getattr(transformers, cls)(config(transformers))

    return Arch(name, build, cls, inputs, tokenizer)


def _decoder(cfg_cls: str, **extra) -> Callable:
    return lambda t: getattr(t, cfg_cls)(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)


ARCHS: dict[str, Arch] = {a.name: a for a in [
    _arch("llama", _decoder("LlamaConfig"), "LlamaForCausalLM", "tokens", "bpe"),
    _arch("qwen2_tied", _decoder("Qwen2Config", tie_word_embeddings=True), "Qwen2ForCausalLM", "tokens", "bpe_chat"),
    _arch("mistral", _decoder("MistralConfig"), "MistralForCausalLM", "tokens", "bpe"),
    _arch("gemma", _decoder("GemmaConfig", head_dim=16), "GemmaForCausalLM", "tokens", "bpe"),
    _arch("phi", lambda t: t.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=1,
                                      eos_token_id=2), "PhiForCausalLM", "tokens", "bpe"),
    _arch("gpt2", lambda t: t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                        bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1), "GPT2LMHeadModel", "tokens",
          "gpt2"),
    _arch("bert_cls", lambda t: t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                            num_labels=3), "BertForSequenceClassification", "classify", "wordpiece"),
    _arch("vit_cls", lambda t: t.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=16, patch_size=4, num_labels=3),
          "ViTForImageClassification", "pixels", "image"),
    _arch("t5", lambda t: t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                    num_decoder_layers=2, num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                    eos_token_id=1), "T5ForConditionalGeneration", "seq2seq", "sentencepiece"),
    _arch("t5_v1_1", lambda t: t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                                         num_decoder_layers=2, num_heads=2, feed_forward_proj="gated-gelu",
                                         decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
          "T5ForConditionalGeneration", "seq2seq", "sentencepiece"),
    _arch("bart", lambda t: t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                                        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1,
                                        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                                        forced_eos_token_id=2), "BartForConditionalGeneration", "seq2seq", "gpt2"),
    # saved per expert (transformers 5 writes the original layout); it holds them fused at runtime
    _arch("mixtral_moe", _decoder("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
          "MixtralForCausalLM", "tokens", "bpe"),
]}


def example_inputs(arch: Arch, seed: int = 0, batch: int = 2) -> dict[str, torch.Tensor]:
    """A batch the model accepts (with labels, so that ``model(**batch).loss`` trains it)."""
    g = torch.Generator().manual_seed(seed)
    if arch.inputs == "pixels":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=g),
                "labels": torch.randint(0, 3, (batch,), generator=g)}
    ids = torch.randint(3, VOCAB, (batch, 12), generator=g)
    if arch.inputs == "classify":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (batch,), generator=g)}
    if arch.inputs == "seq2seq":
        return {"input_ids": ids, "labels": torch.randint(3, VOCAB, (batch, 6), generator=g)}
    return {"input_ids": ids, "labels": ids}


def train(model: torch.nn.Module, arch: Arch, seed: int, steps: int = 3, lr: float = 0.5) -> torch.nn.Module:
    """A few SGD steps on random data: a real (if tiny) fine-tune. (Adam's first steps move every entry by ±lr,
    so magnitudes would tie everywhere and top-k selections would depend on tie-breaking.)"""
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        loss = model(**example_inputs(arch, seed * 100 + step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def outputs(model: torch.nn.Module, arch: Arch, seed: int = 7) -> torch.Tensor:
    """The logits the model gives on a fixed batch (decoder inputs included for seq2seq)."""
    batch = {k: v for k, v in example_inputs(arch, seed).items() if k != "labels"}
    if arch.inputs == "seq2seq":
        batch["decoder_input_ids"] = example_inputs(arch, seed)["labels"]
    with torch.no_grad():
        return model(**batch).logits


def build_family(root: Path, arch_name: str, fine_tunes: int = 2, steps: int = 3, seed: int = 0,
                 tokenizer: bool = True) -> tuple[Path, list[Path]]:
    """``root/base`` and ``root/ft<k>`` for one architecture, each with its tokenizer or processor files."""
    arch = ARCHS[arch_name]
    root = Path(root)
    torch.manual_seed(seed)
    model = arch.build().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    base = root / "base"
    model.save_pretrained(base)
    if tokenizer and arch.tokenizer:
        write_tokenizer(base, arch.tokenizer)
    tunes = []
    for k in range(fine_tunes):
        model.load_state_dict(state)
        torch.manual_seed(seed * 1000 + k + 1)
        train(model, arch, seed * 1000 + k + 1, steps)
        folder = root / f"ft{k}"
        model.save_pretrained(folder)
        if tokenizer and arch.tokenizer:
            write_tokenizer(folder, arch.tokenizer)
        tunes.append(folder)
    return base, tunes


def load(folder: Path, arch_name: str) -> torch.nn.Module:
    import transformers

    return getattr(transformers, ARCHS[arch_name].cls).from_pretrained(str(folder)).eval()


# --- tokenizer and processor files, written as the Hub's repos of each family ship them -------------------------

def write_tokenizer(folder: Path, kind: str) -> None:
    """The files a repo of this family ships: ``bpe`` (tokenizer.json + tokenizer_config.json), ``bpe_chat``
    (the same with chat_template.jinja and special_tokens_map.json), ``gpt2`` (vocab.json + merges.txt),
    ``wordpiece`` (vocab.txt), ``sentencepiece`` (spiece.model only, as T5 repos), ``image``
    (preprocessor_config.json)."""
    folder = Path(folder)
    if kind in ("bpe", "bpe_chat"):
        tok = bpe_tokenizer(VOCAB)
        tok.save_pretrained(str(folder))
        if kind == "bpe_chat":
            (folder / "chat_template.jinja").write_text(
                "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
            (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    elif kind == "gpt2":
        letters = sorted(set("".join(CORPUS)) - {" "})
        vocab = {c: i for i, c in enumerate(letters)}
        for piece in ("Ġ", "Ġt", "th", "Ġth", "he", "Ġthe"):
            vocab[piece] = len(vocab)
        vocab["<|endoftext|>"] = len(vocab)
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\nĠ t\nt h\nĠ th\nh e\nĠth e\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    elif kind == "wordpiece":
        words = sorted(set(" ".join(CORPUS).split()))
        (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words,
                                                     "##s"]) + "\n")
        (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer",
                                                                  "do_lower_case": True}))
    elif kind == "sentencepiece":
        (folder / "spiece.model").write_bytes(sentencepiece_model())
        (folder / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "T5Tokenizer", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
            "extra_ids": 0}))
    elif kind == "image":
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": 16, "width": 16},
            "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    else:
        raise ValueError(kind)


_SPM: list[bytes] = []


def sentencepiece_model() -> bytes:
    """A 30-piece unigram SentencePiece model trained on the tiny corpus (cached: training takes ~0.1 s)."""
    if not _SPM:
        import sentencepiece as spm

        out = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=30,
                                       model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
        _SPM.append(out.getvalue())
    return _SPM[0]


def bpe_tokenizer(vocab_size: int, added: tuple[str, ...] = ()):
    """A fast tokenizer with ``vocab_size`` BPE pieces (``<unk> <s> </s>`` then ``_tok_N``) and ``added`` tokens."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = ["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)]
    spec = {"version": "1.0", "model": {"type": "BPE", "vocab": {p: i for i, p in enumerate(pieces[:vocab_size])},
                                        "merges": []}, "added_tokens": []}
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(spec)),
                                  bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if added:
        tok.add_tokens(list(added))
    return tok
