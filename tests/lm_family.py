"""Small real language models for the evaluation tests: a byte-level BPE tokenizer trained with `tokenizers` on
the built-in held text, Llama- and GPT-2-shaped causal LMs built from configs, a base trained briefly on all of it
and two fine-tunes trained a few more steps on different parts (prose, code). Built once per test process."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "eval"
VOCAB = 500
CONTEXT = 128


@dataclass(frozen=True)
class Family:
    arch: str
    base: Path
    tunes: list[Path]
    seconds: float


def train_tokenizer(text: str, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    fast.save_pretrained(folder)
    return fast


def make_model(arch: str, vocab: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                          tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=vocab, n_embd=48, n_layer=2, n_head=4, n_positions=CONTEXT, bos_token_id=0,
                     eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def train(model, ids: torch.Tensor, steps: int, seed: int, lr: float = 3e-3, batch: int = 8, length: int = 64):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=g)
        x = torch.stack([ids[s:s + length] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def build_family(root: Path, arch: str = "llama", base_steps: int = 60, tune_steps: int = 40) -> Family:
    started = time.monotonic()
    prose = (ASSETS / "prose.txt").read_text()
    code = (ASSETS / "code.txt").read_text()
    root = Path(root)
    base_dir = root / f"{arch}-base"
    tok = train_tokenizer(prose + "\n\n" + code, base_dir)
    enc = lambda text: torch.tensor(tok(text)["input_ids"])  # noqa: E731
    torch.set_num_threads(1)
    model = train(make_model(arch, len(tok), 0), enc(prose + "\n\n" + code), base_steps, seed=1)
    model.save_pretrained(base_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tunes = []
    for k, text in enumerate((prose, code)):
        model.load_state_dict(state)
        train(model, enc(text), tune_steps, seed=10 + k)
        folder = root / f"{arch}-ft{k}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        tunes.append(folder)
    return Family(arch, base_dir, tunes, time.monotonic() - started)


_BUILT: dict[str, Family] = {}


def family(tmp_path_factory, arch: str = "llama") -> Family:
    """The family of ``arch``, built once per test process (module fixtures of several files share it)."""
    if arch not in _BUILT:
        _BUILT[arch] = build_family(tmp_path_factory.mktemp(f"lm-{arch}"), arch)
    return _BUILT[arch]


def merge_yaml(fam: Family, method: str = "ties", lam: float = 1.0) -> str:
    """A merge config of the family: TIES (density 0.5) or task arithmetic, with ``lam`` as λ."""
    params = "{weight: 1.0, density: 0.5}" if method == "ties" else "{weight: 1.0}"
    models = "".join(f"  - model: {t}\n    parameters: {params}\n" for t in fam.tunes)
    return f"merge_method: {method}\nbase_model: {fam.base}\nmodels:\n{models}parameters: {{lambda: {lam}}}\n"


def merge(fam: Family, out: Path, method: str = "ties", lam: float = 1.0) -> Path:
    from merging.config import parse_config
    from merging.engine import run_merge

    run_merge(parse_config(merge_yaml(fam, method, lam)), out)
    return out


def noisy_family(root: Path, make, tokenizer_text: str, n: int = 2, scale: float = 0.02) -> tuple[Path, list[Path]]:
    """A randomly initialized model (``make(vocab)``) and ``n`` copies with seeded noise on every weight, each
    saved with the tokenizer: for kinds whose checks need no training (classifiers, seq2seq)."""
    root = Path(root)
    base_dir = root / "base"
    tok = train_tokenizer(tokenizer_text, base_dir)
    torch.manual_seed(0)
    model = make(len(tok)).eval()
    model.save_pretrained(base_dir)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tunes = []
    for k in range(n):
        g = torch.Generator().manual_seed(100 + k)
        model.load_state_dict({name: v + torch.randn(v.shape, generator=g) * scale if v.is_floating_point() else v
                               for name, v in state.items()})
        folder = root / f"ft{k}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        tunes.append(folder)
    return base_dir, tunes
