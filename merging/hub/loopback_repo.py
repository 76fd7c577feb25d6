"""The loopback Hub's repos (merging.hub.loopback): folders on disk served as revisions, and what the Hub's API says
about their files."""

from __future__ import annotations

import functools
import hashlib
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass
class FakeRepo:
    repo_id: str
    revisions: dict[str, Path]  # revision name -> folder
    downloads: int = 0
    likes: int = 0
    tags: list[str] = field(default_factory=list)
    base_models: list[str] = field(default_factory=list)
    relation: str = "finetune"
    gated_token: str | None = None  # files need this token (model info stays public, as on the Hub)
    private_token: str | None = None  # everything needs this token
    pipeline_tag: str = "text-generation"

    def sha(self, revision: str) -> str:
        return hashlib.sha1(f"{self.repo_id}@{revision}".encode()).hexdigest()

    def folder(self, revision: str) -> tuple[str, Path] | None:
        """(commit sha, folder) for a branch name or a commit sha."""
        if revision in self.revisions:
            return self.sha(revision), self.revisions[revision]
        for name, folder in self.revisions.items():
            if self.sha(name) == revision:
                return revision, folder
        return None

    def all_tags(self) -> list[str]:
        tags = list(self.tags) + ["transformers", "safetensors", self.pipeline_tag]
        for base in self.base_models:
            tags += [f"base_model:{base}", f"base_model:{self.relation}:{base}"]
        return list(dict.fromkeys(tags))


def file_names(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def blob_oid(path: Path) -> str:
    return _digest(path, "git")


def sha256_of(path: Path) -> str:
    return _digest(path, "sha256")


@functools.lru_cache(maxsize=1024)
def _cached_digest(path: Path, kind: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha1(b"blob %d\0" % size) if kind == "git" else hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _digest(path: Path, kind: str) -> str:
    """A file's git blob id or sha256, computed once per version of the file (the ETag of every request for it:
    hashing a 200 MB shard per range request would cost more than serving it)."""
    st = path.stat()
    return _cached_digest(Path(path), kind, st.st_size, st.st_mtime_ns)


def safetensors_parameters(folder: Path) -> dict[str, int]:
    counts: Counter = Counter()
    for name in file_names(folder):
        if not name.endswith(".safetensors"):
            continue
        with open(folder / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for key, entry in header.items():
            if key != "__metadata__":
                numel = 1
                for d in entry["shape"]:
                    numel *= d
                counts[entry["dtype"]] += numel
    return dict(counts)
