"""The Hugging Face Hub: find checkpoints, check a merge before downloading anything, stream from it, push to it.

- Model references: a config may name ``org/name`` or ``org/name@revision`` (a branch, tag or commit); a local
  path wins when it exists. ``parse_ref`` validates them strictly before any request is made.
- Tokens: an explicit argument (the app's OAuth login), else ``HF_TOKEN``, else huggingface_hub's stored login
  (``resolve_token``). A token is sent only as an ``Authorization`` header to the Hub; it never appears in a log,
  an error message, a model card, a config or any file we write (``push_merge`` checks the folder before upload).
- Endpoint: the ``endpoint`` argument, else ``MERGESCOPE_HF_ENDPOINT``, else ``HF_ENDPOINT``, read at call time
  (huggingface_hub reads ``HF_ENDPOINT`` only once, at import).
- Search: ``search_models`` (free text) and ``fine_tunes_of`` (the Hub's ``base_model`` relations), sorted by
  downloads, with parameter counts and whether safetensors weights exist.
- Pre-flight: ``preflight`` opens every input by its safetensors headers only (a few KB per file), runs the
  engine's plan and compatibility check, and estimates the bytes a merge reads, the disk and peak memory it
  needs, and its time.
- Streaming: ``hub_resolver`` gives ``run_merge``/``open_sources`` a way to open repo ids, by HTTP range requests
  (merging/sources/hub.py) or, with ``cache=True``, from the huggingface_hub cache.
- Push: ``push_merge`` creates the repo (``exist_ok``) and uploads the finished folder with its model card.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .config import MergeConfig, parse_config
from .errors import MergeError, SourceError
from .sources import CheckpointSource, open_sources

DEFAULT_ENDPOINT_ENV = "MERGESCOPE_HF_ENDPOINT"
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_NAME}/)?{_NAME}")
_REVISION = re.compile(r"[A-Za-z0-9._-]+(?:/[A-Za-z0-9._-]+)*")
MAX_REPO_ID = 96  # the Hub's limit
MAX_REVISION = 200
SEARCH_FIELDS = ["downloads", "likes", "safetensors", "siblings", "pipeline_tag", "gated", "private", "tags"]
RELATIONS = ("finetune", "adapter", "merge", "quantized")


# ----------------------------------------------------------------------------------------------------------------
# References, tokens, endpoint
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str = "main"

    def __str__(self) -> str:
        return self.repo_id if self.revision == "main" else f"{self.repo_id}@{self.revision}"


def parse_ref(ref: str) -> HubRef:
    """``org/name`` or ``org/name@revision`` → HubRef; anything else raises a one-line SourceError.

    Strict on purpose: a reference goes into URLs and cache paths, so ``..``, empty parts, spaces, control
    characters, URL syntax and over-long names are refused before any request is made.
    """
    shown = ref if len(ref) <= 80 else ref[:77] + "..."
    if not isinstance(ref, str) or not ref.strip():
        raise SourceError("empty model reference: give a local path or a Hub repo id like org/name[@revision]")

    def bad(why: str) -> SourceError:
        return SourceError(f"{shown!r}: no such local file or folder, and not a Hub repo id "
                           f"(org/name or org/name@revision): {why}")

    repo_id, sep, revision = ref.partition("@")
    if sep and not revision:
        raise bad("the revision after '@' is empty")
    if "@" in revision:
        raise bad("more than one '@'")
    if len(repo_id) > MAX_REPO_ID:
        raise bad(f"the repo id is longer than {MAX_REPO_ID} characters")
    if ".." in repo_id or "--" in repo_id:
        raise bad("'..' and '--' are not allowed in a repo id")
    if repo_id.count("/") > 1:
        raise bad("a repo id has at most one '/'")
    if not _REPO_ID.fullmatch(repo_id):
        raise bad("a repo id uses letters, digits, '-', '_' and '.', and starts and ends with a letter or digit")
    if repo_id.endswith(".git"):
        raise bad("a repo id cannot end with '.git'")
    if sep:
        if len(revision) > MAX_REVISION:
            raise bad(f"the revision is longer than {MAX_REVISION} characters")
        if ".." in revision or not _REVISION.fullmatch(revision) or revision.startswith(("-", ".")) \
                or revision.endswith((".", ".lock")):
            raise bad("a revision is a branch, tag or commit made of letters, digits, '-', '_', '.' and '/'")
    return HubRef(repo_id, revision if sep else "main")


def resolve_token(token: str | None = None) -> str | None:
    """The token to use: the one given, else HF_TOKEN, else huggingface_hub's stored login; None if none."""
    if token and token.strip():
        return token.strip()
    env = os.environ.get("HF_TOKEN", "").strip()
    if env:
        return env
    try:
        from huggingface_hub import get_token

        return get_token() or None
    except Exception:  # a broken token file or a failed OIDC exchange means "not logged in" here
        return None


def resolve_endpoint(endpoint: str | None = None) -> str:
    """The Hub's base URL: the argument, else MERGESCOPE_HF_ENDPOINT, else HF_ENDPOINT, else huggingface.co."""
    from huggingface_hub import constants

    url = endpoint or os.environ.get(DEFAULT_ENDPOINT_ENV) or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    url = url.strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/@]+(?:/[^\s@]*)?", url):
        raise MergeError(f"Hub endpoint {url!r} is not an http(s) URL")
    return url


def scrub(text: str, token: str | None) -> str:
    """``text`` with the token (if any) masked: for messages built from a library's error text."""
    return text.replace(token, "***") if token else text


# ----------------------------------------------------------------------------------------------------------------
# Search
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class HubModel:
    """One search result."""

    repo_id: str
    downloads: int
    likes: int
    parameters: int | None  # from the Hub's safetensors metadata; None when unknown
    has_safetensors: bool
    pipeline_tag: str | None = None
    gated: bool = False
    private: bool = False
    base_models: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _hub_model(info) -> HubModel:
    siblings = [s.rfilename for s in (info.siblings or [])]
    tags = info.tags or []
    bases = [t.split(":", 1)[1] for t in tags if t.startswith("base_model:") and t.count(":") == 1]
    return HubModel(
        repo_id=info.id, downloads=info.downloads or 0, likes=info.likes or 0,
        parameters=info.safetensors.total if info.safetensors else None,
        has_safetensors=bool(info.safetensors) or any(f.endswith(".safetensors") for f in siblings),
        pipeline_tag=info.pipeline_tag, gated=bool(info.gated), private=bool(info.private), base_models=bases)


def _list(what: str, token: str | None, endpoint: str | None, **kwargs) -> list[HubModel]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .sources.hub import httpx

    tok = resolve_token(token)
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=tok or False, library_name="mergescope")
    try:
        models = [_hub_model(m) for m in api.list_models(sort="downloads", expand=SEARCH_FIELDS, **kwargs)]
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        raise MergeError(f"{what}: the Hub answered HTTP {status}") from None
    except httpx.TransportError as exc:
        raise MergeError(f"{what}: cannot reach the Hub ({exc.__class__.__name__})") from None
    # The Hub sorts already; sorting again keeps the contract if a mirror does not.
    return sorted(models, key=lambda m: m.downloads, reverse=True)


def search_models(text: str, limit: int = 20, *, token: str | None = None,
                  endpoint: str | None = None) -> list[HubModel]:
    """Models whose id contains ``text``, most downloaded first, with parameter count and safetensors flag."""
    if not 1 <= limit <= 1000:
        raise MergeError(f"search limit {limit} must be between 1 and 1000")
    return _list(f"search {text!r}", token, endpoint, search=text.strip() or None, limit=limit)


def fine_tunes_of(base_repo: str, limit: int = 20, *, relation: str | None = "finetune", token: str | None = None,
                  endpoint: str | None = None) -> list[HubModel]:
    """Models whose card names ``base_repo`` as ``base_model`` (the Hub's model tree), most downloaded first.

    ``relation`` narrows the kind of child: ``finetune`` (full weights, mergeable as they are), ``adapter``
    (LoRA), ``merge`` or ``quantized``; None lists them all.
    """
    ref = parse_ref(base_repo)
    if relation is not None and relation not in RELATIONS:
        raise MergeError(f"relation {relation!r}: use one of {', '.join(RELATIONS)} or None")
    if not 1 <= limit <= 1000:
        raise MergeError(f"search limit {limit} must be between 1 and 1000")
    tag = f"base_model:{relation}:{ref.repo_id}" if relation else f"base_model:{ref.repo_id}"
    return _list(f"fine-tunes of {ref.repo_id}", token, endpoint, filter=tag, limit=limit)


# ----------------------------------------------------------------------------------------------------------------
# Opening repo ids: the resolver that run_merge / open_sources call
# ----------------------------------------------------------------------------------------------------------------
def hub_resolver(token: str | None = None, cache: bool = False, *, endpoint: str | None = None,
                 cache_dir: str | None = None, retries: int = 5,
                 backoff_s: float = 0.5) -> Callable[..., CheckpointSource]:
    """A callable ``(ref, allow_pickle=False, base=None) -> CheckpointSource`` for references that are Hub repos.

    The token and endpoint are resolved when a reference is opened. ``cache=False`` streams tensors with range
    requests and writes nothing to disk; ``cache=True`` downloads the weights, config and tokenizer files into the
    huggingface_hub cache (``cache_dir`` or its default) and reads them from there.
    """
    def resolve(ref: str, allow_pickle: bool = False, base: CheckpointSource | None = None) -> CheckpointSource:
        hub_ref = parse_ref(ref)
        try:  # imported here: local merges work without huggingface_hub installed
            from .sources.hub import open_hub
        except ImportError:
            raise SourceError(f"{ref}: reading from the Hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
        return open_hub(hub_ref.repo_id, hub_ref.revision, label=ref, token=resolve_token(token),
                        endpoint=resolve_endpoint(endpoint), allow_pickle=allow_pickle, base=base, cache=cache,
                        cache_dir=cache_dir, retries=retries, backoff_s=backoff_s)

    return resolve


# ----------------------------------------------------------------------------------------------------------------
# Pre-flight
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ModelSummary:
    ref: str
    location: str  # "hub" or "local"
    commit: str | None
    files: dict[str, int]  # weight file -> size in bytes (Hub inputs)
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape), from the headers
    parameters: int
    bytes: int


@dataclass
class Preflight:
    """What a merge would do and cost, learned from headers alone."""

    method: str
    models: list[ModelSummary]
    compatible: bool
    report: dict
    report_text: str
    tensors_out: int
    bytes_to_read: int  # tensor bytes the merge reads, every pass included
    bytes_to_read_by_model: dict[str, int]
    bytes_from_hub: int
    output_bytes: int
    disk_needed: int
    peak_memory: int
    est_seconds: float
    header_bytes: int  # network bytes this pre-flight used (headers, config)
    assumptions: str

    def to_dict(self) -> dict:
        d = asdict(self)
        for m in d["models"]:
            m["tensors"] = {n: {"dtype": dt, "shape": list(sh)} for n, (dt, sh) in m["tensors"].items()}
        return d

    def text(self) -> str:
        gb = 1e9
        lines = [f"method {self.method}: {self.tensors_out} output tensors, "
                 + ("compatible" if self.compatible else f"INCOMPATIBLE: {self.report_text}")]
        for m in self.models:
            lines.append(f"  {m.ref} ({m.location}{', commit ' + m.commit[:10] if m.commit else ''}): "
                         f"{len(m.tensors)} tensors, {m.parameters / 1e6:.1f} M parameters, {m.bytes / gb:.3f} GB")
        lines.append(f"reads {self.bytes_to_read / gb:.3f} GB ({self.bytes_from_hub / gb:.3f} GB from the Hub); "
                     f"writes {self.output_bytes / gb:.3f} GB; disk needed {self.disk_needed / gb:.3f} GB; "
                     f"peak memory about {self.peak_memory / gb:.3f} GB; about {self.est_seconds:.0f} s")
        lines.append(f"({self.assumptions})")
        return "\n".join(lines)


def preflight(config: MergeConfig | str, token: str | None = None, *, endpoint: str | None = None,
              cache: bool = False, allow_pickle: bool = False, resolver: Callable | None = None,
              network_bytes_per_s: float = 100e6, disk_read_bytes_per_s: float = 1e9,
              disk_write_bytes_per_s: float = 500e6, elements_per_s: float = 300e6) -> Preflight:
    """Check a merge and estimate its cost without downloading weights: only safetensors headers are read.

    The plan and compatibility report are the engine's own (``build_plan``) on header-only sources. Estimates:
      bytes read   = Σ over tasks of the stored bytes of every input it reads (twice for tensors in a reduction pass)
      disk         = output tensors + side files (+ the Hub inputs themselves when ``cache=True``)
      peak memory  ≈ 2 × the largest task's stored inputs (current + prefetched)
                     + its float32 working set (inputs, base, result, one temporary) + 3 output tensors in flight
      time         ≈ max(network + disk reads, compute) + writes, with the rates given as arguments.
    """
    from .methods.registry import get_method
    from .plan import build_plan
    from .sources.hub import HubCheckpoint

    if isinstance(config, str):
        config = parse_config(config)
    resolver = resolver or hub_resolver(token, cache=False, endpoint=endpoint)
    sources = open_sources(config.model_refs(), config.base_model, allow_pickle=allow_pickle, resolver=resolver)
    try:
        plan = build_plan(config, sources)
        method = get_method(config.merge_method)
        reduce_pass = (method.reduce is not None and (method.reduce_needed is None or method.reduce_needed(plan))
                       and not method.reduce_after_merge)
        by_model: dict[str, int] = {ref: 0 for ref in sources}
        specs = {ref: src.specs() for ref, src in sources.items()}
        peak_stored = peak_f32 = peak_out = 0
        elements = 0
        for task in plan.tasks:
            refs = ([task.base] if task.base else []) + list(task.inputs)
            passes = 2 if reduce_pass and not task.copy else 1
            stored = 0
            for r in refs:
                spec = specs[r.model].get(r.name)
                if spec is not None:
                    by_model[r.model] += spec.nbytes * passes
                    stored += spec.nbytes
            numel = task.spec.numel
            peak_stored = max(peak_stored, stored)
            peak_out = max(peak_out, task.spec.nbytes)
            if not task.copy:
                peak_f32 = max(peak_f32, numel * 4 * (len(refs) + 2))
                elements += numel * len(refs) * passes
        hub_refs = {ref for ref, src in sources.items() if isinstance(src, HubCheckpoint)}
        from_hub = sum(n for ref, n in by_model.items() if ref in hub_refs)
        total_read = sum(by_model.values())
        output = plan.total_bytes_out
        ref_src = sources[plan.reference]
        side = sum(getattr(ref_src, "side_sizes", {}).values()) or _local_side_bytes(ref_src)
        hub_files = sum(sum(src.weight_files().values()) for ref, src in sources.items() if ref in hub_refs)
        disk = output + side + (hub_files if cache else 0)
        peak = 2 * peak_stored + peak_f32 + 3 * peak_out
        read_s = from_hub / network_bytes_per_s + (total_read - from_hub) / disk_read_bytes_per_s
        est = max(read_s, elements / elements_per_s) + output / disk_write_bytes_per_s
        models = [_summary(ref, src) for ref, src in sources.items()]
        header_bytes = sum(src.network_bytes() for src in sources.values() if isinstance(src, HubCheckpoint))
        return Preflight(
            method=method.name, models=models, compatible=plan.report.ok, report=plan.report.to_dict(),
            report_text=plan.report.text(), tensors_out=len(plan.tasks), bytes_to_read=total_read,
            bytes_to_read_by_model=by_model, bytes_from_hub=from_hub, output_bytes=output, disk_needed=disk,
            peak_memory=peak, est_seconds=est, header_bytes=header_bytes,
            assumptions=(f"network {network_bytes_per_s / 1e6:.0f} MB/s, disk read {disk_read_bytes_per_s / 1e6:.0f}"
                         f" MB/s, write {disk_write_bytes_per_s / 1e6:.0f} MB/s, {elements_per_s / 1e6:.0f} M "
                         "input elements/s of compute; reads overlap compute"))
    finally:
        for src in sources.values():
            src.close()


def _summary(ref: str, src: CheckpointSource) -> ModelSummary:
    from .sources.hub import HubCheckpoint

    specs = src.specs()
    hub = isinstance(src, HubCheckpoint)
    return ModelSummary(ref=ref, location="hub" if hub else "local", commit=src.commit if hub else None,
                        files=src.weight_files() if hub else {},
                        tensors={n: (s.dtype, s.shape) for n, s in specs.items()},
                        parameters=sum(s.numel for s in specs.values() if s.is_float),
                        bytes=sum(s.nbytes for s in specs.values()))


def _local_side_bytes(src: CheckpointSource) -> int:
    path = Path(getattr(src, "label", ""))
    if not path.is_dir():
        return 0
    return sum((path / name).stat().st_size for name in src.file_names() if (path / name).is_file())


# ----------------------------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------------------------
def push_merge(folder: str | os.PathLike, repo_id: str, token: str | None = None, private: bool = False, *,
               endpoint: str | None = None, commit_message: str = "Upload merged model (Mergescope)") -> str:
    """Create ``repo_id`` (kept if it exists) and upload the finished merge folder; returns the repo URL.

    Before uploading, the model card's ``base_model`` is normalized to Hub repo ids (revisions dropped, local
    paths left out: the Hub links only repos), and every file is checked for the token: a folder that holds it
    is refused, so a token can never be published by accident.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .sources.hub import httpx

    ref = parse_ref(repo_id)
    if ref.revision != "main":
        raise MergeError(f"{repo_id!r}: push to a repo id without '@revision'")
    tok = resolve_token(token)
    if not tok:
        raise MergeError(f"{ref.repo_id}: pushing needs a token with write access: log in (`hf auth login`), "
                         "set HF_TOKEN, or pass a token")
    root = Path(folder)
    if not root.is_dir():
        raise MergeError(f"{root}: no such folder to push")
    if not any(root.glob("*.safetensors")):
        raise MergeError(f"{root}: holds no .safetensors files; push a finished merge folder")
    card = root / "README.md"
    if not card.is_file():
        raise MergeError(f"{root}: has no README.md model card; push a folder written by a merge")
    fixed = hub_model_card(card.read_text(encoding="utf-8"))
    if fixed != card.read_text(encoding="utf-8"):
        card.write_text(fixed, encoding="utf-8")
    _refuse_secrets(root, [tok, os.environ.get("HF_TOKEN", "").strip()])
    api = HfApi(endpoint=resolve_endpoint(endpoint), token=tok, library_name="mergescope")
    try:
        url = api.create_repo(ref.repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=getattr(url, "repo_id", None) or ref.repo_id, folder_path=str(root),
                          commit_message=commit_message, ignore_patterns=[".*", "**/.*"])
    except HfHubHTTPError as exc:
        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        hint = ": the token needs write access to that namespace" if status in (401, 403) else ""
        raise MergeError(f"{ref.repo_id}: push failed, the Hub answered HTTP {status}{hint}") from None
    except httpx.TransportError as exc:
        raise MergeError(f"{ref.repo_id}: push failed, cannot reach the Hub ({exc.__class__.__name__})") from None
    return str(url)


def hub_model_card(text: str) -> str:
    """The card with ``base_model`` as Hub repo ids (``org/name@rev`` → ``org/name``; local paths dropped)."""
    if not text.startswith("---\n"):
        return text
    end = text.find("\n---", 4)
    if end < 0:
        return text
    try:
        front = yaml.safe_load(text[4:end]) or {}
    except yaml.YAMLError:
        return text
    bases = front.get("base_model") if isinstance(front, dict) else None
    if bases is None:
        return text
    repo_ids = []
    for b in [bases] if isinstance(bases, str) else list(bases):
        try:
            repo_ids.append(parse_ref(str(b)).repo_id)
        except SourceError:
            continue  # a local path: listed in the card's body, not a Hub link
    repo_ids = list(dict.fromkeys(repo_ids))
    if repo_ids == ([bases] if isinstance(bases, str) else bases):
        return text
    if repo_ids:
        front["base_model"] = repo_ids
    else:
        front.pop("base_model")
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + text[end + 1:]


def _refuse_secrets(root: Path, secrets: list[str]) -> None:
    from .safetensors_io import read_local_header

    secrets = [s for s in secrets if s and len(s) >= 8]
    if not secrets:
        return
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".safetensors":
            _, meta = read_local_header(path)  # only the header and metadata can hold text
            data = repr(meta).encode()
        elif path.stat().st_size <= 256 * 1024 * 1024:
            data = path.read_bytes()
        else:
            continue
        if any(s.encode() in data for s in secrets):
            raise MergeError(f"{path.relative_to(root)}: contains the Hub token; refusing to upload it")
