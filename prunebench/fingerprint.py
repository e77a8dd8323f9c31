"""Content digests of the files behind a result (task data, checkpoints, model directories): a
record is keyed by what it was computed from, not by the path it was read from.

Files are hashed (sha256 of their bytes) up to ``HASHED_BYTES``; a larger file (a 7B model's weight
shard) is identified by name, size and modification time, since a retrain or a download rewrites
it and hashing 14 GB on every run would take minutes. Task data is always hashed (``whole=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HASHED_BYTES = 256 << 20
_CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, whole: bool = False) -> str:
    """sha256 of the file's bytes, or of (name, size, mtime) for a file over HASHED_BYTES."""
    path = Path(path)
    stat = path.stat()
    if stat.st_size > HASHED_BYTES and not whole:
        return text_digest(f"stat:{path.name}:{stat.st_size}:{stat.st_mtime_ns}")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def files_digest(paths: Iterable[str | os.PathLike], root: str | os.PathLike) -> str:
    """One digest of several files, each named relative to ``root`` (a renamed file changes it)."""
    return combine({str(Path(p).relative_to(root)): file_digest(p) for p in sorted(map(Path, paths))})


def directory_digest(directory: str | os.PathLike) -> str:
    """The files directly in ``directory`` (a model folder is flat; hidden files are skipped)."""
    directory = Path(directory)
    return files_digest([p for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")], directory)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def combine(parts: dict[str, Any]) -> str:
    """One digest of named parts (strings, numbers, None, nested dicts)."""
    return text_digest(json.dumps(parts, sort_keys=True, default=str))
