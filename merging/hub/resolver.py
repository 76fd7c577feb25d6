"""Opening repo ids: the resolver that ``run_merge`` and ``open_sources`` call for references that are not local."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import SourceError
from ..sources import CheckpointSource
from .refs import parse_ref, resolve_endpoint, resolve_token


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
            from ..sources.hub import open_hub
        except ImportError:
            raise SourceError(f"{ref}: reading from the Hub needs huggingface_hub "
                              "(pip install huggingface_hub)") from None
        return open_hub(hub_ref.repo_id, hub_ref.revision, label=ref, token=resolve_token(token),
                        endpoint=resolve_endpoint(endpoint), allow_pickle=allow_pickle, base=base, cache=cache,
                        cache_dir=cache_dir, retries=retries, backoff_s=backoff_s)

    return resolve
