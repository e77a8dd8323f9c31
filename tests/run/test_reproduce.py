"""`prunebench reproduce`: the recipes, their plan offline, the fail-fast checks, and a resumable run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from prunebench.commands.main import main as cli
from prunebench.report.reference import load_registry, target_for
from prunebench.results import Record, RecordKey, ResultStore
from prunebench.run import reproduce, taskspec
from prunebench.run.reproduce import RECIPES, Recipe, check_needs, make_plan, measured_estimate, require

LLAVA = RECIPES["llava-1.5-7b"]


def test_list_shows_the_recipes(capsys):
    assert cli(["reproduce", "--list"]) == 0
    out = capsys.readouterr().out
    assert "llava-1.5-7b" in out and "qwen2-vl-7b" in out


def test_bad_input_is_one_clear_line(capsys):
    assert cli(["reproduce", "llava-1.6"]) == 2
    assert "unknown recipe 'llava-1.6'; valid choices: llava-1.5-7b, qwen2-vl-7b" in capsys.readouterr().err
    assert cli(["reproduce", "llava-1.5-7b", "--tasks", "vqav2", "--dry-run"]) == 2
    assert "--tasks 'vqav2': recipe llava-1.5-7b runs gqa, mmbench_en_dev_static" in capsys.readouterr().err


def _offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_dry_run_offline_and_missing_weights_fail_before_lmms_eval(tmp_path):
    """Both run in a fresh process without weights, data or network, and never import lmms-eval."""
    script = (
        "import sys; from prunebench.commands.main import main\n"
        f"dry = main(['reproduce', 'llava-1.5-7b', '--dry-run', '--results', {str(tmp_path / 'r')!r}])\n"
        "print('@@', dry, flush=True)\n"
        f"run = main(['reproduce', 'llava-1.5-7b', '--results', {str(tmp_path / 'r')!r}])\n"
        "print('@@', run, 'lmms_eval' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], env=_offline_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert "@@ 0" in done.stdout and "@@ 2 False" in done.stdout, done.stderr[-2000:]
    plan = done.stdout
    assert "model: llava-hf/llava-1.5-7b-hf (7.06 B parameters, about 14.1 GB in 16-bit); in the local cache: no" in plan
    assert "cells: 8 tasks x 15 (method, budget) = 120" in plan
    assert "  gqa                      lmms-lab-encoder/GQA" in plan and "missing" in plan
    assert ("prunebench run --methods fastv,sparsevlm,dart,visionzip --budgets 192,128,64 --model "
            "llava-hf/llava-1.5-7b-hf --tasks gqa,mmbench_en_dev_static,mme,pope,scienceqa_img,textvqa_val,mmmu_val,"
            "seedbench --batch-size 1 --dtype float16") in plan
    assert "GPU hours: a lower bound" in plan and "pyramiddrop at 128 and 64" in plan
    error = done.stderr
    assert "the weights of llava-hf/llava-1.5-7b-hf (about 14.1 GB): `hf download llava-hf/llava-1.5-7b-hf`" in error
    assert "the hub is offline" in error and "`hf download --repo-type dataset lmms-lab-encoder/MME`" in error


def _fake_hub_cache(root: Path, model: str, datasets: list[str]) -> None:
    """The local Hugging Face cache layout the hub client reads: refs/main and a snapshot."""
    folder = root / f"models--{model.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("abc123")
    snapshot = folder / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "model-00001-of-00003.safetensors").write_bytes(b"")
    for dataset in datasets:
        (root / f"datasets--{dataset.replace('/', '--')}").mkdir()


def test_needs_reads_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    plan = make_plan(LLAVA, "gqa,mme", None, "results")
    _fake_hub_cache(tmp_path, LLAVA.model, ["lmms-lab-encoder/GQA"])
    needs = check_needs(plan)
    assert needs.model_cached and needs.missing_datasets == ("lmms-lab-encoder/MME",) and needs.hub == "offline"
    with pytest.raises(reproduce.RecipeError, match=r"hub is offline: dataset lmms-lab-encoder/MME: `hf download") as err:
        require(plan, needs, 14.1)
    assert "weights" not in str(err.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(taskspec, "hub_reachable", lambda endpoint: True)
    require(plan, check_needs(plan), 14.1)  # the model is here and lmms-eval can fetch MME


def test_recipe_datasets_are_lmms_eval_s():
    for recipe in RECIPES.values():
        for task in recipe.tasks:
            assert reproduce.task_plan(task).dataset == taskspec.base_config(task)["dataset_path"], task


def test_every_recipe_cell_has_published_numbers_and_every_published_cell_is_run_or_explained():
    registry = load_registry()
    for recipe in RECIPES.values():
        plan = make_plan(recipe, None, None, "results")
        published = [r for r in registry if r.model == recipe.model and not isinstance(target_for(r), str)]
        compared_tasks = {target_for(r).task for r in published}
        assert set(recipe.tasks) <= compared_tasks, recipe.name
        cells = {(spec.partition(":")[0], budget) for spec, budget in plan.cells()}
        printed = {(r.method, "all" if r.method == "none" else r.budget) for r in published}
        assert cells <= printed, recipe.name
        not_run = " ".join(recipe.not_run)
        for method, budget in printed - cells:
            assert method in not_run and (method == "autoselect" or budget in not_run), (recipe.name, method, budget)


def _profile(store: ResultStore, method: str, budget: str, ttft: float, device="NVIDIA H100 80GB HBM3") -> None:
    store.write(Record(key=RecordKey("random:llava-1.5-7b", method, budget, "profile", setting=device), kind="profile",
                       timing={"ttft": ttft, "decode_per_token": 10.0},
                       provenance={"device": device, "device_type": "cuda", "dtype": "bfloat16"}))


def test_estimate_from_gpu_profile_records(tmp_path):
    store = ResultStore(tmp_path)
    plan = make_plan(LLAVA, "mme", None, str(tmp_path))  # 2374 questions
    assert measured_estimate(plan, store) is None
    _profile(store, "fastv", "64", 30.0)
    assert measured_estimate(plan, store) is None  # no unpruned record: nothing to stand in for the rest
    _profile(store, "none", "all", 60.0)
    estimate = measured_estimate(plan, store)
    # 15 cells: fastv @ 64 at 30 + 2 x 10 ms, the other 14 at the unpruned 60 + 2 x 10 ms
    assert estimate.gpu_hours == pytest.approx(2374 * (50 + 14 * 80) / 1e3 / 3600)
    assert "2 of 15 cells timed" in estimate.how and "NVIDIA H100" in estimate.how


def test_roofline_estimate_counts_every_cell():
    engine = reproduce.meta_engine(LLAVA)
    plan = make_plan(LLAVA, "mme", 10, "results")
    one = reproduce.roofline_estimate(plan, engine, peaks=(1e12, 1e12))
    plan_two = make_plan(LLAVA, "mme,pope", 10, "results")
    assert reproduce.roofline_estimate(plan_two, engine, peaks=(1e12, 1e12)).gpu_hours == pytest.approx(2 * one.gpu_hours)
    # per layer: FastV keeps 576 tokens before its layer 2, K after
    assert reproduce._visual_per_layer("fastv", "64", 576, 32) == [576, 576] + [64] * 30
    assert reproduce._visual_per_layer("random", "64", 576, 32) == [64] * 32
    assert reproduce._visual_per_layer("none", "all", 576, 32) == [576] * 32


def test_reproduce_runs_resumes_and_compares(tmp_path, monkeypatch, capsys):
    """A recipe on the tiny random model and a generated task: `prunebench run` does the work, and a
    second call finds every cell finished."""
    tiny = Recipe(name="tiny", model="random:tiny-llava", preset="llava-1.5-7b", description="smoke",
                  tasks=("synth-pope",), runs=(("random", "64"),), not_run=(), dtype="float32")
    monkeypatch.setitem(RECIPES, "tiny", tiny)
    argv = ["reproduce", "tiny", "--results", str(tmp_path), "--limit", "4"]
    assert cli(argv) == 0
    out = capsys.readouterr()
    assert "prunebench run --methods random --budgets 64 --model random:tiny-llava" in out.out
    assert "no published numbers for random:tiny-llava" in out.out
    assert "prunebench report --results" in out.out and "--limit 4 --reference" in out.out
    records = list(ResultStore(tmp_path).records())
    assert sorted((r.key.method, r.key.budget, r.key.limit) for r in records) == [("none", "all", 4), ("random", "64", 4)]
    assert all(json.dumps(r.provenance["dtype"]) == '"float32"' and r.provenance["batch_size"] == 1 for r in records)
    written = {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/*/*.json")}
    assert cli(argv) == 0  # every cell is finished: nothing is computed or written again
    assert {path: path.stat().st_mtime_ns for path in tmp_path.glob("*/*/*.json")} == written
