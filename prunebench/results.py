"""The results store: one JSON record per (model, method + options, budget, task, limit).

Layout::

    results/<model>/<task>/<method-slug>__<budget>__<limit>__<hash>.json    the record
    results/<model>/<task>/<method-slug>__<budget>__<limit>__<hash>.jsonl   one line per sample

Records are written atomically (temp file + rename), so a killed run never leaves half a record,
and a finished record is never recomputed unless asked (resume). A lock file per record keeps two
runs sharing a store from computing the same record twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import importlib.metadata
import platform
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench.errors import UserError

if TYPE_CHECKING:
    from prunebench.budget import Budget

SCHEMA_VERSION = 1


class StoreError(UserError, OSError):
    pass


@dataclass(frozen=True)
class RecordKey:
    model: str
    method: str  # canonical method spec, e.g. "fastv:layer=3" ("none" for the baseline)
    budget: str  # "all", "64", "25%"
    task: str
    limit: int | None = None  # samples evaluated; None = the whole task
    setting: str | None = None  # what else makes a cell distinct (a profile's dtype, batch, prompt length)

    def stem(self) -> str:
        digest = hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        limit = "full" if self.limit is None else f"n{self.limit}"
        return f"{slug(self.method)}__{slug(self.budget)}__{limit}__{digest}"

    def folder(self) -> Path:
        return Path(slug(self.model)) / slug(self.task)


@dataclass
class Record:
    """One evaluated (or profiled) cell of the benchmark."""

    key: RecordKey
    kind: str = "eval"  # "eval" (a task's metrics) or "profile" (timings only)
    metrics: dict[str, float] = field(default_factory=dict)  # lmms-eval metric -> value (native scale)
    primary_metric: str | None = None
    n_samples: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)  # every option, defaults included
    stage: str = "none"  # "pre", "llm" or "none"
    position_policy: str = "reindex"
    # visual-token accounting: nominal K, mean kept after the last stage, layer-averaged, original N
    visual_tokens: dict[str, float] = field(default_factory=dict)
    # mean per-sample milliseconds per stage: vision, pruner, prefill, ttft, decode_per_token
    timing: dict[str, float] = field(default_factory=dict)
    # git commit, package versions, device, dtype, seed, batch size, command line, host, time
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    @property
    def score(self) -> float | None:
        return None if self.primary_metric is None else self.metrics.get(self.primary_metric)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Record:
        data = dict(data)
        if data.get("schema") != SCHEMA_VERSION:
            raise ValueError(f"record schema {data.get('schema')!r} is not {SCHEMA_VERSION}")
        data["key"] = RecordKey(**data["key"])
        return cls(**data)


class ResultStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def check_writable(self) -> None:
        """Fail before any work if the store cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".probe-"):
                pass
        except OSError as err:
            raise StoreError(f"results directory {str(self.root)!r} is not writable: {err.strerror}") from None

    def record_path(self, key: RecordKey) -> Path:
        return self.root / key.folder() / f"{key.stem()}.json"

    def samples_path(self, key: RecordKey) -> Path:
        return self.record_path(key).with_suffix(".jsonl")

    def has(self, key: RecordKey) -> bool:
        return self.record_path(key).exists()

    def load(self, key: RecordKey) -> Record:
        return Record.from_json(json.loads(self.record_path(key).read_text()))

    def write(self, record: Record, samples: list[dict[str, Any]] | None = None) -> Path:
        """Write the samples, then the record (the record's presence marks the cell finished)."""
        path = self.record_path(record.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if samples is not None:
            _atomic_write(self.samples_path(record.key), "".join(json.dumps(s, default=_plain) + "\n" for s in samples))
        _atomic_write(path, json.dumps(record.to_json(), indent=2, default=_plain) + "\n")
        return path

    def samples(self, key: RecordKey) -> list[dict[str, Any]]:
        path = self.samples_path(key)
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def records(self) -> Iterator[Record]:
        for path in sorted(self.root.glob("*/*/*.json")):
            yield Record.from_json(json.loads(path.read_text()))

    # -- claiming a cell so two runs sharing a store do not compute it twice ------------------
    def claim(self, key: RecordKey) -> bool:
        """Take the lock for ``key``; False if another live run holds it. Stale locks are taken over."""
        lock = self.record_path(key).with_suffix(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        owner = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if not _stale(lock):
                    return False
                lock.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(owner)
            return True
        return False

    def release(self, key: RecordKey) -> None:
        self.record_path(key).with_suffix(".lock").unlink(missing_ok=True)


def _stale(lock: Path) -> bool:
    """A lock is stale when its owner ran on this host and is no longer alive."""
    try:
        host, pid = lock.read_text().rsplit(":", 1)
    except (OSError, ValueError):
        return True
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        return False
    return False


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", text.replace("/", "__").replace("%", "pct")).strip("-") or "x"


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and arrays (lmms-eval hands back numpy floats)."""
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


# ---------------------------------------------------------------------------------------------
# what a record says about its cell: one builder for `prunebench run` and `prunebench profile`


def cell_fields(method, budget: Budget, kept: float, equivalent: float, original: float) -> dict[str, Any]:
    """The Record fields describing what ran: the method's options (defaults included), its stage
    and position policy, and the visual tokens (nominal K, mean kept after the last stage,
    layer-averaged as the engine counts them, the image's original count)."""
    return {
        "method_options": {f.name: getattr(method, f.name) for f in method.options()},
        "stage": method.stage,
        "position_policy": method.positions,
        "visual_tokens": {
            "nominal": budget.tokens if budget.tokens and budget.tokens > 0 else None,
            "mean_kept": kept,
            "equivalent": equivalent,
            "original": original,
        },
    }


PACKAGES = ("prunebench", "torch", "transformers", "lmms_eval")


def provenance(*, device: str, dtype: str, command: str, **extra: Any) -> dict[str, Any]:
    """Where and how a record was made, the same keys for every kind of record: git commit,
    package versions, device, dtype, command line, host, creation time, plus ``extra``."""
    return {
        "git_commit": _git_commit(),
        "versions": {package: _version(package) for package in PACKAGES},
        "device": device,
        "dtype": dtype,
        "command": command,
        "host": socket.gethostname(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **extra,
    }


def cpu_name() -> str:
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
