"""The output vocabulary (``tokenizer_source`` / ``tokenizer:``), built as mergekit builds it.

- ``base``: the base's tokenizer, without tokens its embedding has no row for (ids >= config ``vocab_size``);
- a model reference: that model's tokenizer;
- ``union``: the base's tokenizer plus every token another model has and the base lacks (in config order: a
  model's vocabulary, then its added tokens, each with its flags), added after the base's ids.

Every model's embedding and output head are then seen in the output vocabulary (``PermutedVocab``): a token's row
is the model's own row for it. A token some model lacks gets, in every model: the one model's row that has it;
else the base's; else the mean of the rows that have it; zeros when no model has it. ``tokenizer.tokens`` sets a
token's source (a model, a model's token by id or text, or zeros) and ``force`` uses it even where a model has the
token. ``pad_to_multiple_of`` pads the vocabulary with the mean embedding. The merge then runs on these views, so
the added tokens' rows come out of the method like any other row.

Tokenizers are read from ``tokenizer.json`` (the fast-tokenizer file every transformers 5 tokenizer saves), plus
``tokenizer_config.json``'s ``added_tokens_decoder``; a union needs the base's ``tokenizer.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .architectures import tied_partner
from .config import MergeConfig, TokenEmbedding, TokenSource
from .errors import ConfigError, SourceError
from .limits import MAX_VOCAB
from .safetensors_io import DTYPES
from .sources import CheckpointSource, TensorSpec, open_source, read_json_file
from .sources.base import SourceView, frozen_specs

_VOCAB_MODULES = ("embed_tokens", "wte", "word_embeddings", "lm_head", "embed_in", "embed_out", "shared",
                  "predictions.decoder")


@dataclass
class ModelVocab:
    tokens: dict[str, int]  # get_vocab(): the model's pieces and added tokens
    added: dict[str, dict]  # added tokens' flags, by content
    rows: int  # rows its embedding has (config vocab_size, else the vocabulary's size)
    tokenizer: dict | None  # tokenizer.json


@dataclass
class Vocabulary:
    tokens: dict[str, int]
    size: int  # rows of the output embedding (padded)
    files: dict[str, bytes] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    side_source: str | None = None


def apply(config: MergeConfig, sources: dict[str, CheckpointSource], reference: str) -> Vocabulary | None:
    """Build the output vocabulary and replace each model's source by its view in it (in ``sources``)."""
    choice = config.vocabulary_source
    if choice is None:
        return None
    refs = config.model_refs()
    base = config.base_model or reference
    vocabs: dict[str, ModelVocab] = {}
    notes = []
    for ref in refs:
        vocab = read_vocab(sources[ref])
        if vocab is None and ref != base:
            notes.append(f"tokenizer: {ref} has no tokenizer.json; its vocabulary is taken to be the base's")
            continue
        if vocab is None:
            raise ConfigError(f"{base}: tokenizer_source {choice!r} needs the base's tokenizer.json (a fast tokenizer)")
        vocabs[ref] = vocab
    for ref in refs:
        vocabs.setdefault(ref, vocabs[base])
    flags: dict[str, dict] = {}
    for ref in refs:  # the flags of an added token, from the first model that has it (the base first)
        for content, entry in vocabs[ref].added.items():
            flags.setdefault(content, entry)
    forced = config.tokenizer.tokens if config.tokenizer and config.tokenizer.tokens else {}
    out = Vocabulary({}, 0, notes=notes)
    base_vocab = vocabs[base]
    if choice in ("base", "union"):
        out.tokens = _stripped(base_vocab) if choice == "base" else _union(base_vocab, [vocabs[r] for r in refs
                                                                                         if r != base])
        out.side_source = base
        if choice == "union" or out.tokens != base_vocab.tokens or set(forced) - set(out.tokens):
            out.files = tokenizer_files(sources[base], base_vocab, _with_forced(out.tokens, forced), flags)
            out.side_source = None
    else:
        source = sources.get(choice)
        opened = source is None
        source = source or open_source(choice)
        try:
            vocab = read_vocab(source)
            if vocab is None:
                raise ConfigError(f"{choice}: tokenizer_source needs its tokenizer.json")
            out.tokens = dict(vocab.tokens)
            out.side_source = choice
            if set(forced) - set(out.tokens):
                out.files = tokenizer_files(source, vocab, _with_forced(out.tokens, forced), flags)
        finally:
            if opened:
                source.close()
    out.tokens = _with_forced(out.tokens, forced)
    n = len(out.tokens)
    pad = config.tokenizer.pad_to_multiple_of if config.tokenizer else None
    out.size = -(-n // pad) * pad if pad else n
    perms = {ref: [v.tokens.get(tok, -1) if v.tokens.get(tok, -1) < v.rows else -1 for tok in _by_id(out.tokens)]
             for ref, v in vocabs.items()}
    if not forced and all(p == list(range(out.size)) and vocabs[r].rows == out.size for r, p in perms.items()):
        return out  # every model already has this vocabulary, row for row
    shared = _Rows(sources, refs, perms, vocabs, base if config.base_model else None, forced, out)
    for ref in refs:
        sources[ref] = PermutedVocab(sources[ref], ref, shared)
    added = n - len(base_vocab.tokens)
    out.notes.append(f"tokenizer: {choice} vocabulary of {n} tokens" + (f" ({added:+d} against the base)" if added
                                                                          else "")
                     + (f", padded to {out.size} rows" if out.size != n else ""))
    return out


def read_vocab(source: CheckpointSource) -> ModelVocab | None:
    tok = read_json_file(source, "tokenizer.json")
    if tok is None or not isinstance(tok.get("model"), dict):
        return None
    model = tok["model"]
    vocab = model.get("vocab")
    where = f"{source.label}: tokenizer.json"
    if isinstance(vocab, dict):
        tokens = {str(k): _token_id(v, f"{where}: the vocabulary's id of {str(k)[:40]!r}") for k, v in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        if not all(isinstance(e, list | tuple) and e and isinstance(e[0], str) for e in vocab):
            raise SourceError(f"{where}: a {model.get('type')} vocabulary entry is not a [piece, score] pair")
        tokens = {entry[0]: i for i, entry in enumerate(vocab)}
    else:
        raise SourceError(f"{source.label}: tokenizer.json has a {model.get('type')} model without a vocabulary")
    added = {}
    entries = tok.get("added_tokens") or []
    if not isinstance(entries, list):
        raise SourceError(f"{where}: `added_tokens` is not a list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str):
            raise SourceError(f"{where}: added_tokens[{i}] is not an object with a `content` string")
        tokens[entry["content"]] = _token_id(entry.get("id"), f"{where}: added_tokens[{i}].id")
        added[entry["content"]] = dict(entry)
    cfg = read_json_file(source, "config.json") or {}
    rows = cfg.get("vocab_size") if isinstance(cfg.get("vocab_size"), int) else None
    if rows is None and isinstance(cfg.get("text_config"), dict):
        rows = cfg["text_config"].get("vocab_size")
    return ModelVocab(tokens, added, rows or len(tokens), tok)


def _token_id(value, where: str) -> int:
    """A token id as tokenizer.json writes it: a non-negative integer (a huge one would size the vocabulary)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < MAX_VOCAB:
        raise SourceError(f"{where} is {str(value)[:40]!r}, not a token id (an integer from 0 to {MAX_VOCAB - 1:,})")
    return value


def _with_forced(tokens: dict[str, int], forced: dict) -> dict[str, int]:
    """mergekit adds the tokens a `tokens:` entry names when the vocabulary lacks them."""
    out = dict(tokens)
    for token in forced:
        if token not in out:
            out[token] = len(out)
    return out


def _by_id(tokens: dict[str, int]) -> list[str]:
    return [t for t, _ in sorted(tokens.items(), key=lambda kv: kv[1])]


def _stripped(vocab: ModelVocab) -> dict[str, int]:
    return {t: i for t, i in vocab.tokens.items() if i < vocab.rows}


def _union(base: ModelVocab, others: list[ModelVocab]) -> dict[str, int]:
    """mergekit's union: the base's tokens, then the others' pieces it lacks, then every added token it lacks."""
    out = _stripped(base)
    pieces: dict[str, None] = {}
    added: dict[str, None] = {}
    for v in [base, *others]:
        for tok, idx in sorted(v.tokens.items(), key=lambda kv: kv[1]):
            if idx < v.rows:
                (added if tok in v.added else pieces)[tok] = None
    for tok in [*pieces, *added]:
        if tok not in out:
            out[tok] = len(out)
    return out


def tokenizer_files(base: CheckpointSource, vocab: ModelVocab, tokens: dict[str, int], flags: dict[str, dict]
                    ) -> dict[str, bytes]:
    """The base's tokenizer.json and tokenizer_config.json for the vocabulary ``tokens``: entries beyond the
    base's rows dropped, new tokens added as added tokens (their flags from the model they came from)."""
    tok = json.loads(json.dumps(vocab.tokenizer))
    model = tok["model"]
    if isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t in tokens and tokens[t] == i}
    keep = {str(e["content"]) for e in tok.get("added_tokens") or [] if tokens.get(str(e["content"])) == e["id"]}
    tok["added_tokens"] = [e for e in tok.get("added_tokens") or [] if str(e["content"]) in keep]
    known = set(model["vocab"]) if isinstance(model.get("vocab"), dict) else {e[0] for e in model.get("vocab", [])}
    known |= keep
    for token, idx in sorted(tokens.items(), key=lambda kv: kv[1]):
        if token not in known:
            tok["added_tokens"].append({"id": idx, "content": token, "single_word": False, "lstrip": False,
                                        "rstrip": False, "normalized": True, "special": False,
                                        **{k: v for k, v in flags.get(token, {}).items()
                                           if k not in ("id", "content")}})
    files = {"tokenizer.json": json.dumps(tok, ensure_ascii=False, indent=2).encode()}
    cfg = read_json_file(base, "tokenizer_config.json")
    if cfg is not None:
        cfg["added_tokens_decoder"] = {str(e["id"]): {k: e[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                        "single_word", "special") if k in e}
                                       for e in tok["added_tokens"]}
        files["tokenizer_config.json"] = json.dumps(cfg, ensure_ascii=False, indent=2).encode()
    return files


class _Rows:
    """What every model's view shares: the permutations and the rows of tokens some model lacks."""

    def __init__(self, sources, refs, perms, vocabs, base, forced: dict[str, TokenEmbedding], out: Vocabulary):
        self.sources = dict(sources)  # the models as stored (the views are not there yet)
        self.refs, self.perms, self.vocabs, self.base, self.forced, self.out = refs, perms, vocabs, base, forced, out
        self._defaults: dict[str, dict[int, torch.Tensor]] = {}

    def tensor(self, ref: str, name: str) -> torch.Tensor:
        specs = self.sources[ref].specs()
        own = name if name in specs else tied_partner(name, specs)
        return self.sources[ref].read(own).float()

    def defaults(self, name: str) -> dict[int, torch.Tensor]:
        """Rows of the output vocabulary that not every model has (or that a `tokens:` entry forces)."""
        if name in self._defaults:
            return self._defaults[name]
        tokens = _by_id(self.out.tokens)
        models = [r for r in self.refs if name in self.sources[r].specs()
                  or tied_partner(name, self.sources[r].specs())]
        cache: dict[str, torch.Tensor] = {}

        def rows_of(ref: str) -> torch.Tensor:
            if ref not in cache:
                cache[ref] = self.tensor(ref, name)
            return cache[ref]

        out: dict[int, torch.Tensor] = {}
        for i, token in enumerate(tokens):
            cfg = self.forced.get(token)
            having = [r for r in models if self.perms[r][i] >= 0]
            if len(having) == len(models) and not (cfg and cfg.force):
                continue
            if cfg is not None and cfg.source is not None:
                out[i] = self._configured(cfg.source, token, i, rows_of, name)
            elif len(having) == 1:
                out[i] = rows_of(having[0])[self.perms[having[0]][i]]
            elif not having:
                out[i] = torch.zeros_like(rows_of(models[0])[0])
            elif self.base in having:
                out[i] = rows_of(self.base)[self.perms[self.base][i]]
            else:
                out[i] = sum(rows_of(r)[self.perms[r][i]] for r in having) / len(having)
        self._defaults[name] = out
        return out

    def _configured(self, source: str | TokenSource, token: str, i: int, rows_of, name: str) -> torch.Tensor:
        if isinstance(source, TokenSource) and source.kind == "zero":
            return torch.zeros_like(rows_of(self.refs[0])[0])
        model = source.model if isinstance(source, TokenSource) else source
        if model not in self.perms:
            raise ConfigError(f"config: tokenizer.tokens.{token}: {model!r} is not one of the merged models")
        if isinstance(source, TokenSource):
            row = source.token_id if source.token_id is not None else self.vocabs[model].tokens.get(source.token, -1)
        else:
            row = self.perms[model][i]
        table = rows_of(model)
        if not 0 <= row < table.shape[0]:
            raise ConfigError(f"config: tokenizer.tokens.{token}: {model} has no such token for {name}")
        return table[row]


class PermutedVocab(SourceView):
    """A model whose embedding and output head are seen in the output vocabulary (rows permuted and filled)."""

    def __init__(self, source: CheckpointSource, ref: str, rows: _Rows) -> None:
        super().__init__(source)
        self._ref, self._rows = ref, rows
        vocab_rows = rows.vocabs[ref].rows
        specs = {}
        self._vocab_names = set()
        for name, spec in source.specs().items():
            module = name.rsplit(".", 1)[0]
            if spec.shape and spec.shape[0] == vocab_rows and spec.is_float and module.endswith(_VOCAB_MODULES):
                self._vocab_names.add(name)
                spec = TensorSpec(spec.dtype, (rows.out.size, *spec.shape[1:]))
            specs[name] = spec
        self._specs = frozen_specs(specs)
        self._cache: tuple[str, torch.Tensor] | None = None

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self._vocab_names:
            return self._src.read(name, rows)
        if self._cache is None or self._cache[0] != name:
            self._cache = (name, self._permuted(name))
        whole = self._cache[1]
        return whole if rows is None else whole[rows[0]:rows[1]]

    def _permuted(self, name: str) -> torch.Tensor:
        own = self._src.read(name)
        perm = self._rows.perms[self._ref]
        defaults = self._rows.defaults(name)
        n = len(perm)
        out = torch.zeros((self._rows.out.size, *own.shape[1:]), dtype=torch.float32)
        forced = {i for i, tok in enumerate(_by_id(self._rows.out.tokens))
                  if (cfg := self._rows.forced.get(tok)) is not None and cfg.force}
        for i, j in enumerate(perm):
            if j >= 0 and i not in forced:
                out[i] = own[j].float()
            elif i in defaults:
                out[i] = defaults[i]
        if out.shape[0] > n:
            out[n:] = out[:n].mean(dim=0)
        return out.to(DTYPES[self._specs[name].dtype])

