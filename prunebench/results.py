"""The results store: one JSON record per (model, method + options, budget, task, limit, inputs).

Layout::

    results/<model>/<task>/<method-slug>__<budget>__<limit>__<hash>.json    the record
    results/<model>/<task>/<method-slug>__<budget>__<limit>__<hash>.jsonl   one line per sample
    results/<model>/<task>/<method-slug>__<budget>__<limit>__<hash>.lock    while a run computes it

``inputs`` is a digest of the contents behind the cell (model files, prompt format, task data,
checkpoints, decoding settings): a changed input is a new record, never a stale one. Records are
written atomically (temp file + rename), so a killed run never leaves half a record, and a finished
record is never recomputed unless asked (resume). A lock file per record keeps two runs sharing a
store from computing the same record twice; a lock whose run has ended (same host, dead or reused
pid) or whose heartbeat has stopped is taken over.
"""

from __future__ import annotations

import hashlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prunebench.errors import UserError

if TYPE_CHECKING:
    from prunebench.budget import Budget

SCHEMA_VERSION = 1


class StoreError(UserError, OSError):
    pass


class RecordError(StoreError):
    """A record or samples file that cannot be read (truncated, edited, another schema): named."""


@dataclass(frozen=True)
class RecordKey:
    model: str
    method: str  # canonical method spec, e.g. "fastv:layer=3" ("none" for the baseline)
    budget: str  # "all", "64", "25%"
    task: str
    limit: int | None = None  # samples evaluated; None = the whole task
    setting: str | None = None  # what else makes a cell distinct (a profile's dtype, batch, prompt length)
    inputs: str | None = None  # digest of the contents behind the cell (prunebench.run.inputs); None: none

    def stem(self) -> str:
        fields = asdict(self)
        if fields["inputs"] is None:  # keys without inputs (profile records) hash their other fields only
            del fields["inputs"]
        digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:8]
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

    def check_writable(self, keys: list[RecordKey] = ()) -> None:
        """Fail before any work if the store, or the folder of any of ``keys``, cannot be written.
        Creates nothing: a folder that does not exist yet is checked through its nearest parent."""
        for folder in dict.fromkeys([self.root, *(self.root / key.folder() for key in keys)]):
            check_writable_folder(folder, "results directory")

    def record_path(self, key: RecordKey) -> Path:
        return inside(self.root, key.folder() / f"{key.stem()}.json")

    def samples_path(self, key: RecordKey) -> Path:
        return self.record_path(key).with_suffix(".jsonl")

    def lock_path(self, key: RecordKey) -> Path:
        return self.record_path(key).with_suffix(".lock")

    def has(self, key: RecordKey) -> bool:
        return self.record_path(key).exists()

    def load(self, key: RecordKey) -> Record:
        return read_record(self.record_path(key))

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
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise RecordError(f"{path} line {number} is not valid JSON ({err.msg}); delete the file and its "
                                      f"record {path.with_suffix('.json').name}, or rerun the cell with --force") from None
        return rows

    def records(self) -> Iterator[Record]:
        """Every record; the first unreadable file raises RecordError naming it (``scan`` skips them)."""
        for path in self._record_paths():
            yield read_record(path)

    def scan(self) -> tuple[list[Record], list[RecordError]]:
        """Every readable record, and one error per record file that cannot be read."""
        records, bad = [], []
        for path in self._record_paths():
            try:
                records.append(read_record(path))
            except RecordError as err:
                bad.append(err)
        return records, bad

    def _record_paths(self) -> list[Path]:
        return sorted(self.root.glob("*/*/*.json"))

    # -- claiming a cell so two runs sharing a store do not compute it twice ------------------
    def claim(self, key: RecordKey, force: bool = False) -> Claim:
        """Take the lock for ``key``. A stale lock (its run ended on this host, its pid now names
        another process, or no heartbeat for STALE_AFTER_S) is taken over, as is a live one with
        ``force``; otherwise the claim fails and names the holder."""
        lock = self.lock_path(key)
        lock.parent.mkdir(parents=True, exist_ok=True)
        notice, holder = None, None
        for _ in range(3):
            if _create_lock(lock, LockOwner.current()):
                return Claim(True, lock, holder, notice)
            try:
                raw, age = lock.read_text(), time.time() - lock.stat().st_mtime
            except FileNotFoundError:  # released meanwhile
                continue
            holder = LockOwner.parse(raw)
            why = _stale_reason(holder, age)
            if why is None and not force:
                return Claim(False, lock, holder)
            notice = (f"took over the lock {lock} ({why})" if why else
                      f"--force: took over the lock {lock} held by {holder.describe()}, a live run")
            try:
                if lock.read_text() == raw:  # not replaced meanwhile by a run taking it over first
                    lock.unlink()
            except FileNotFoundError:
                pass
        return Claim(False, lock, holder)

    def release(self, key: RecordKey) -> None:
        """Remove the lock for ``key`` if this process holds it (another may have taken it over).
        A signal arriving meanwhile (SIGTERM, Ctrl-C) does not leave it behind."""
        try:
            self._release(key)
        except BaseException:
            self._release(key)
            raise

    def _release(self, key: RecordKey) -> None:
        lock = self.lock_path(key)
        try:
            if LockOwner.parse(lock.read_text()) == LockOwner.current():
                lock.unlink()
        except FileNotFoundError:
            pass

    @contextmanager
    def heartbeat(self, key: RecordKey) -> Iterator[None]:
        """Touch the lock of ``key`` every HEARTBEAT_S while the block runs, so that runs on other
        hosts see it is alive (they take over a lock untouched for STALE_AFTER_S)."""
        lock, stop = self.lock_path(key), threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT_S):
                try:
                    os.utime(lock)
                except OSError:
                    return

        thread = threading.Thread(target=beat, name="prunebench-lock-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


# -- locks ------------------------------------------------------------------------------------
HEARTBEAT_S = 30.0  # a run holding a lock touches it this often
STALE_AFTER_S = 600.0  # a lock untouched this long is stale, whichever host holds it


@dataclass(frozen=True)
class LockOwner:
    """Who holds a lock: host, pid and that process's start time (a reused pid has another)."""

    host: str
    pid: int
    started: str | None  # Linux: /proc/PID/stat start time in clock ticks since boot; None elsewhere
    since: str = field(default="", compare=False)  # when the lock was taken

    @classmethod
    def current(cls) -> LockOwner:
        return cls(socket.gethostname(), os.getpid(), _process_start(os.getpid()),
                   time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    @classmethod
    def parse(cls, text: str) -> LockOwner | None:
        try:
            data = json.loads(text)
            return cls(str(data["host"]), int(data["pid"]), data.get("started"), str(data.get("since", "")))
        except (ValueError, TypeError, KeyError):
            return None

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}" + (f" since {self.since}" if self.since else "")


@dataclass
class Claim:
    """The outcome of ``ResultStore.claim``: whether this run holds the cell's lock now."""

    acquired: bool
    lock: Path
    holder: LockOwner | None = None  # the run holding it (not acquired), or whose lock was taken over
    notice: str | None = None  # one line saying a lock was taken over


def _create_lock(lock: Path, owner: LockOwner) -> bool:
    """Create ``lock`` holding ``owner``, atomically and complete (written aside, then linked):
    False if it exists."""
    fd, tmp = tempfile.mkstemp(dir=lock.parent, prefix=f".{lock.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": owner.host, "pid": owner.pid, "started": owner.started, "since": owner.since}, handle)
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def _stale_reason(holder: LockOwner | None, age: float) -> str | None:
    """Why a lock is stale, or None if its run may be alive."""
    if holder is None:
        return "it is not a prunebench lock"
    if age > STALE_AFTER_S:
        return f"{holder.describe()}, no heartbeat for {age:.0f} s"
    if holder.host != socket.gethostname():
        return None
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return f"{holder.describe()} has ended"
    except PermissionError:  # alive, another user's
        pass
    started = _process_start(holder.pid)
    if holder.started and started and started != holder.started:
        return f"{holder.describe()} has ended; the pid now names another process"
    return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # fields after the command name start at field 3


# -- paths ------------------------------------------------------------------------------------
def inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """``root / relative``, refused unless it stays inside ``root`` (slugs make that so; this
    guards every path the store and the report write)."""
    root = Path(root)
    path = root / relative
    base, full = os.path.normpath(os.path.abspath(root)), os.path.normpath(os.path.abspath(path))
    if os.path.commonpath([base, full]) != base or full == base:
        raise StoreError(f"refusing to write {str(path)!r}: it is not inside {str(root)!r}")
    return path


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Refuse a folder that cannot be created or written, creating nothing: every existing part of
    the path must be a folder, and the deepest existing one must take a new file."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StoreError(f"{what} {str(folder)!r} is not writable: {str(existing)!r} is a file, not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".probe-"):
            pass
    except OSError as err:
        raise StoreError(f"{what} {str(folder)!r} is not writable: {err.strerror} ({str(existing)!r})") from None


def read_record(path: Path) -> Record:
    try:
        return Record.from_json(json.loads(path.read_text()))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as err:
        reason = str(err) or type(err).__name__
        raise RecordError(f"{path} is not a readable record ({reason}); delete it, or rerun its cell with --force") from None


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
    """A file or folder name for ``text``: never empty, ``.``, ``..``, hidden, or holding a separator."""
    name = re.sub(r"[^A-Za-z0-9._=-]+", "-", text.replace("/", "__").replace("%", "pct")).strip("-") or "x"
    return f"_{name}" if name.startswith(".") else name


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
        "created": datetime.datetime.now().astimezone().isoformat(timespec="microseconds"),  # orders records
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
