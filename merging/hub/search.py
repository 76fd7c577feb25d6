"""Finding checkpoints on the Hub: free-text search and the fine-tunes (adapters, merges ...) of a base."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import MergeError
from .refs import RELATIONS, SEARCH_FIELDS, parse_ref, resolve_endpoint, resolve_token


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

    from ..sources.hub import httpx

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
