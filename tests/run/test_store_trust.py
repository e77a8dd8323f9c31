"""The store never serves a stale record, its locks recover, and nothing is written outside it.

- a record is keyed by the contents behind it: changed task-data rows or a checkpoint retrained
  in place compute a new record (the old one stays; the report shows one set of inputs and says
  so), and the unchanged run resumes with nothing recomputed;
- a lock whose run has ended (SIGTERM, a dead or reused pid, no heartbeat) is taken over with a
  one-line notice; a live one elsewhere is named with its path and owner; --force recomputes;
- an unreadable record is named in one line (run), skipped with a warning (report);
- names like `..` never leave the results folder or the report's --out folder.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prunebench.commands.main import main
from prunebench.results import LockOwner, RecordKey, ResultStore, inside, slug

pytest.importorskip("lmms_eval")


def pope(path: Path, seed: int, n: int = 4) -> Path:
    from prunebench.tasks.synthetic import task_dataset

    task_dataset("synth-pope", n, seed=seed).to_parquet(str(path))
    return path


def run_args(results: Path, data: Path, *extra: str, methods: str = "none,random") -> list[str]:
    return ["run", "--tasks", "pope", "--task-data", f"pope={data}", "--methods", methods, "--budgets", "64", "--limit",
            "3", "--max-new-tokens", "2", "--dtype", "float32", "--results", str(results), *extra]


def stamps(results: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in results.glob("*/*/*.json")}


def recomputed(before: dict[Path, int], after: dict[Path, int]) -> tuple[int, int]:
    """(records written anew, records left as they were) between two ``stamps``."""
    new = [p for p in after if p not in before or after[p] != before[p]]
    return len(new), sum(after.get(p) == t for p, t in before.items())


# -- records keyed by contents ------------------------------------------------------------------
def test_changed_task_data_is_a_new_record_and_the_report_shows_one_set(tmp_path, capsys):
    data, results = pope(tmp_path / "pope.parquet", seed=5), tmp_path / "r"
    assert main(run_args(results, data)) == 0
    first = stamps(results)
    assert len(first) == 2

    assert main(run_args(results, data)) == 0  # unchanged: resumes, nothing recomputed
    assert recomputed(first, stamps(results)) == (0, 2)

    pope(data, seed=6)  # other rows, same path
    assert main(run_args(results, data)) == 0
    assert recomputed(first, stamps(results)) == (2, 2)  # two new records, the old ones stay
    store = ResultStore(results)
    records = list(store.records())
    shas = {r.provenance["inputs"]["task_data"]["sha256"] for r in records}
    assert len(records) == 4 and len(shas) == 2
    assert len({r.key.inputs for r in records}) == 2  # one digest per contents, shared by its cells

    both = stamps(results)
    other = pope(tmp_path / "other.parquet", seed=5)  # the first rows again, under another name
    assert main(run_args(results, other)) == 0
    assert recomputed(both, stamps(results)) == (0, 4)  # the same contents: the first records serve

    from prunebench.report.build import load_records

    shown, notes = load_records(store, None, None)
    (kept,) = shown.values()
    newest = max(records, key=lambda r: r.provenance["created"])
    assert len(kept) == 2 and {r.provenance["inputs"]["task"] for r in kept} == {newest.provenance["inputs"]["task"]}
    (note,) = notes
    assert "2 record(s) computed from other inputs" in note and "sha256" in note
    capsys.readouterr()
    assert main(["report", "--results", str(results)]) == 0
    assert "computed from other inputs" in capsys.readouterr().err


def test_a_checkpoint_retrained_in_place_recomputes_its_cell_only(tmp_path):
    import torch

    from prunebench.training.selectors import build_selector, save_selector

    data, ckpt, results = pope(tmp_path / "pope.parquet", seed=5), tmp_path / "ckpt", tmp_path / "r"
    torch.manual_seed(0)
    save_selector(ckpt, build_selector("autoselect", vision_width=64))
    args = run_args(results, data, methods=f"none,autoselect:ckpt={ckpt}")
    assert main(args) == 0
    first = stamps(results)
    assert main(args) == 0 and recomputed(first, stamps(results)) == (0, 2)
    torch.manual_seed(1)
    save_selector(ckpt, build_selector("autoselect", vision_width=64))  # "retrained": other weights
    assert main(args) == 0
    assert recomputed(first, stamps(results)) == (1, 2)  # the selector's cell is new; the baseline is reused


def test_max_new_tokens_is_part_of_the_key(tmp_path):
    data, results = pope(tmp_path / "pope.parquet", seed=5), tmp_path / "r"
    args = run_args(results, data, methods="none")
    assert main(args) == 0
    args[args.index("--max-new-tokens") + 1] = "3"
    assert main(args) == 0
    assert len(stamps(results)) == 2


# -- locks ------------------------------------------------------------------------------------
def lock_payload(host: str, pid: int, started: str | None = None) -> str:
    return json.dumps({"host": host, "pid": pid, "started": started, "since": "2026-01-01T00:00:00+0000"})


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


KEY = RecordKey("m", "none", "all", "t", 2, inputs="0123456789abcdef")


@pytest.mark.parametrize("payload,why", [
    (lambda: lock_payload(socket.gethostname(), dead_pid()), "has ended"),
    (lambda: lock_payload(socket.gethostname(), 1, "not-its-start-time"), "the pid now names another process"),
    (lambda: "host:123 written by something else", "it is not a prunebench lock"),
])
def test_a_stale_lock_is_taken_over_with_a_notice(tmp_path, payload, why):
    store = ResultStore(tmp_path)
    lock = store.lock_path(KEY)
    lock.parent.mkdir(parents=True)
    lock.write_text(payload())
    claim = store.claim(KEY)
    assert claim.acquired and why in claim.notice and str(lock) in claim.notice
    assert LockOwner.parse(lock.read_text()) == LockOwner.current()
    store.release(KEY)
    assert not lock.exists()


def test_a_lock_elsewhere_is_respected_until_its_heartbeat_stops(tmp_path):
    from prunebench import results

    store = ResultStore(tmp_path)
    lock = store.lock_path(KEY)
    lock.parent.mkdir(parents=True)
    lock.write_text(lock_payload("another-host", 4242))
    claim = store.claim(KEY)
    assert not claim.acquired and claim.holder.host == "another-host" and claim.lock == lock
    store.release(KEY)  # not ours: stays
    assert lock.exists()
    old = time.time() - results.STALE_AFTER_S - 5
    os.utime(lock, (old, old))
    claim = store.claim(KEY)
    assert claim.acquired and "no heartbeat for" in claim.notice


def test_force_takes_over_a_live_lock_saying_so(tmp_path):
    store = ResultStore(tmp_path)
    lock = store.lock_path(KEY)
    lock.parent.mkdir(parents=True)
    lock.write_text(lock_payload("another-host", 4242))
    claim = store.claim(KEY, force=True)
    assert claim.acquired and claim.notice.startswith("--force: took over the lock") and "pid 4242 on another-host" in claim.notice


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path, monkeypatch):
    from prunebench import results

    monkeypatch.setattr(results, "HEARTBEAT_S", 0.05)
    store = ResultStore(tmp_path)
    assert store.claim(KEY).acquired
    lock = store.lock_path(KEY)
    old = time.time() - 1000
    os.utime(lock, (old, old))
    with store.heartbeat(KEY):
        deadline = time.time() + 10
        while lock.stat().st_mtime < old + 500 and time.time() < deadline:
            time.sleep(0.02)
    assert lock.stat().st_mtime > time.time() - 10


def test_a_run_names_a_lock_held_elsewhere_and_force_recomputes_over_it(tmp_path, capsys):
    data = pope(tmp_path / "pope.parquet", seed=5)
    args = run_args(tmp_path / "r", data, methods="none")
    assert main(args) == 0
    store = ResultStore(tmp_path / "r")
    (record,) = store.records()
    record_path = store.record_path(record.key)
    record_path.unlink()
    store.lock_path(record.key).write_text(lock_payload("another-host", 4242))
    capsys.readouterr()
    assert main(args) == 0  # another live run computes it: this one skips it
    err = capsys.readouterr().err
    assert "skipped" in err and "pid 4242 on another-host" in err and str(store.lock_path(record.key)) in err.replace("\n", "")
    assert not record_path.exists()
    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    assert "--force: took over the lock" in err and record_path.exists() and not store.lock_path(record.key).exists()


def test_a_sigterm_run_releases_its_lock_and_the_next_run_computes_the_cell(tmp_path):
    data = pope(tmp_path / "pope.parquet", seed=5)
    args = run_args(tmp_path / "r", data)
    args[args.index("--budgets") + 1] = "128,64"  # three cells
    proc = subprocess.Popen([sys.executable, "-m", "prunebench", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "r").glob("*/*/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "terminated (SIGTERM); finished results are kept"
    first = {p: p.read_bytes() for p in (tmp_path / "r").glob("*/*/*.json")}
    assert 1 <= len(first) < 3
    assert not list((tmp_path / "r").glob("*/*/*.lock"))  # released, not left for the next run to wait on
    assert main(args) == 0
    assert len(list((tmp_path / "r").glob("*/*/*.json"))) == 3
    assert all(p.read_bytes() == b for p, b in first.items())


# -- unreadable records -----------------------------------------------------------------------
def test_an_unreadable_record_is_named_by_run_and_skipped_by_report(tmp_path, capsys):
    data = pope(tmp_path / "pope.parquet", seed=5)
    args = run_args(tmp_path / "r", data)
    assert main(args) == 0
    store = ResultStore(tmp_path / "r")
    broken = store.record_path(next(r.key for r in store.records() if r.key.method == "random"))
    broken.write_text(broken.read_text()[:40])
    capsys.readouterr()
    assert main(args) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"{broken} is not a readable record" in line and "--force" in line

    assert main(["report", "--results", str(tmp_path / "r")]) == 0  # the other record is still reported
    captured = capsys.readouterr()
    assert f"warning: skipped: {broken} is not a readable record" in captured.err.replace("\n", "")
    assert "accuracy and retention" in captured.out

    assert main([*args, "--force"]) == 0  # recomputed over it
    assert len(list(store.records())) == 2
    capsys.readouterr()

    samples = store.samples_path(next(r.key for r in store.records() if r.key.method == "random"))
    samples.write_text(samples.read_text() + "{not json\n")
    assert main(["report", "--results", str(tmp_path / "r"), "--no-plots", "--stats", "--bootstrap", "10"]) == 2
    (line,) = [text for text in capsys.readouterr().err.splitlines() if text.strip()]
    assert f"{samples} line 4 is not valid JSON" in line


# -- paths ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["..", ".", "", "/", "../../etc", ".hidden", "a/../../b", "..\\..", "~", "%"])
def test_a_slug_is_one_plain_name(name):
    out = slug(name)
    assert out not in (".", "..") and not out.startswith(".") and "/" not in out and "\\" not in out and out


def test_hostile_names_stay_inside_the_store(tmp_path):
    store = ResultStore(tmp_path / "r")
    key = RecordKey("../..", "../x", "..", "..", None)
    assert store.record_path(key).resolve().is_relative_to((tmp_path / "r").resolve())
    with pytest.raises(Exception, match="not inside"):
        inside(tmp_path / "r", "../escape.json")


def test_a_model_named_dotdot_writes_inside_results_and_report_out(tmp_path, monkeypatch, capsys):
    """`--model ..` (a model folder one level up): records and report files stay in their folders."""
    from prunebench.models.tiny import build_tiny_llava

    model, processor = build_tiny_llava(seed=0)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "model" / "cwd")
    results, out = tmp_path / "results", tmp_path / "out"
    assert main(["run", "--model", "..", "--tasks", "synth-pope", "--methods", "none", "--limit", "2", "--max-new-tokens",
                 "2", "--dtype", "float32", "--results", str(results)]) == 0
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "model")]
    assert written and all(p.is_relative_to(results) for p in written), written
    assert [p.relative_to(results).parts[0] for p in results.glob("*/*/*.json")] == ["_.."]
    assert main(["report", "--results", str(results), "--out", str(out), "--no-plots", "--bootstrap", "10"]) == 0
    assert [p.name for p in out.iterdir()] == ["_.."]
    assert not [p for p in (tmp_path / "model").rglob("*") if p.suffix in (".json", ".md", ".csv") and "cwd" in p.parts]
