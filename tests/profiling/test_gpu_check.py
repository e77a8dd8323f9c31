"""scripts/gpu_check.sh: its CPU path on the tiny random models writes the report a GPU run writes.

Timings here are whatever the CPU gives: the tests check the layout, the checks' logic and the
correctness columns (same kept set, same picks), never a time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_check
from prunebench.results import Record, RecordKey, ResultStore

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    argv = ["--smoke", "--budgets", "576,64", "--repeats", "1", "--out", str(out / "reports"),
            "--results", str(out / "results"), "--selectors", str(out / "selectors")]
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), *argv], cwd=out, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (out / "reports").iterdir()
    return done, folder, out / "results", argv


def test_report_layout(run):
    done, folder, _, argv = run
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "profile-random-tiny-llava.md", "profile-random-tiny-qwen2.5-vl.md", "summary.json"]
    readme = (folder / "README.md").read_text()
    assert f"- command: `scripts/gpu_check.sh {' '.join(argv)}`" in readme
    assert "driver none (CPU)" in readme and "torch " in readme and "CPU smoke run" in readme
    for section in ("## Targets", "## random:tiny-llava", "### FastV: engine vs the eager-attention way",
                    "### DivPrune: vectorised vs loops", "### AutoSelect's scorer alone", "## random:tiny-qwen2.5-vl",
                    "### Not measured"):
        assert section in readme
    assert "visionzip @ 576, 64: SignalUnavailableError" in readme  # Qwen's tower has no CLS token
    assert "# prunebench profile: random:tiny-llava" in (folder / "profile-random-tiny-llava.md").read_text()


def test_every_target_is_printed_as_pass_or_miss(run):
    done, folder, _, _ = run
    summary = json.loads((folder / "summary.json").read_text())
    lines = [line for line in done.stdout.splitlines() if line.startswith(("pass ", "miss "))]
    assert len(lines) == len(summary["targets"]) and all(isinstance(t["passed"], bool) for t in summary["targets"])
    names = {(t["name"], t["model"]) for t in summary["targets"]}
    for model in ("random:tiny-llava", "random:tiny-qwen2.5-vl"):
        assert ("K=64 prefill roofline fraction", model) in names
        for method in ("random", "fastv", "dart", "divprune", "sparsevlm", "pyramiddrop"):
            assert (f"{method} pruner ms", model) in names
    assert ("AutoSelect scorer ms", "random:tiny-llava") in names
    assert ("FastV engine / eager", "random:tiny-llava") in names
    assert ("autoselect pruner ms", "random:tiny-llava") in names  # a random checkpoint of the selector's shape
    assert summary["environment"]["device_type"] == "cpu" and summary["mode"]["name"] == "smoke"


def test_the_comparisons_agree_with_their_references(run):
    _, folder, _, _ = run
    (llava, qwen) = json.loads((folder / "summary.json").read_text())["models"]
    assert [f["k"] for f in llava["fastv"]] == [64] and llava["fastv"][0]["same_kept"] and llava["fastv"][0]["same_logits"]
    assert all(d["same_picks"] for d in llava["divprune"] + qwen["divprune"])
    assert qwen["fastv"] == [] and any("eager reference path is LLaVA-1.5's" in s for s in qwen["skipped"])
    cells = {(c["method"].partition(":")[0], c["budget"]) for c in llava["cells"]}
    assert {("none", "all"), ("random", "576"), ("random", "64"), ("sparsevlm", "64"), ("gumbel", "64")} <= cells


def test_profile_records_go_to_the_store(run):
    _, _, results, _ = run
    records = [r for r in ResultStore(results).records() if r.kind == "profile"]
    assert {r.key.model for r in records} == {"random:tiny-llava", "random:tiny-qwen2.5-vl"}
    assert all(r.provenance["command"].startswith("scripts/gpu_check.sh --smoke") for r in records)


def _record(method: str, budget: str, **timing) -> Record:
    return Record(key=RecordKey("random:llava-1.5-7b", method, budget, "profile"), kind="profile", timing=timing)


def test_targets_pass_and_miss():
    result = gpu_check.ModelResult("random:llava-1.5-7b", records=[
        _record("none", "all", pruner=0.0, roofline_fraction=0.9),
        _record("random", "64", pruner=0.05, roofline_fraction=0.72),
        _record("sparsevlm", "192", pruner=0.8), _record("sparsevlm", "64", pruner=1.4),
    ], fastv=[{"k": 192, "ratio": 0.5}, {"k": 64, "ratio": 0.75}], scorer={"k": 64, "median": 0.31})
    mode = gpu_check.Mode("gpu", ("llava-1.5-7b",), "bfloat16", 3, 20, 2, "cuda")
    checks = {t.name: t for t in gpu_check.targets([result], 7.5, mode)}
    assert checks["K=64 prefill roofline fraction"].passed  # 0.72 >= 0.7
    assert not checks["AutoSelect scorer ms"].passed  # 0.31 > 0.3
    assert checks["random pruner ms"].passed and not checks["sparsevlm pruner ms"].passed  # its worst budget: 1.4
    assert checks["FastV engine / eager"].value == 0.75 and not checks["FastV engine / eager"].passed
    assert checks["wall time min"].passed
    assert checks["sparsevlm pruner ms"].line() == "miss  sparsevlm pruner ms [random:llava-1.5-7b]: 1.4 (<= 1) (worst budget)"
    assert not gpu_check.Target("x", "m", None, 1.0, True).passed


def test_gpu_mode_defaults(monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    args = argparse.Namespace(smoke=False, models=None, dtype=None, warmup=None, repeats=None)
    mode = gpu_check.choose_mode(args)
    assert mode.name == "gpu" and mode.dtype == "bfloat16" and mode.repeats >= 20 and mode.device == "cuda"
    assert "llava-1.5-7b" in mode.models and "qwen2.5-vl-7b" in mode.models
    assert not set(gpu_check.COVERED) & set(mode.models)
