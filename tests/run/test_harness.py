"""`prunebench run` end to end on the tiny random LLaVA, through a real lmms-eval task on local data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.models import make_images

from prunebench.commands.main import main
from prunebench.results import ResultStore

pytest.importorskip("lmms_eval")


@pytest.fixture(scope="module")
def pope_file(tmp_path_factory) -> Path:
    """A POPE-format parquet of six generated images (lmms-eval's `pope` runs on it unchanged)."""
    from prunebench.tasks.synthetic import task_dataset

    path = tmp_path_factory.mktemp("data") / "pope.parquet"
    task_dataset("synth-pope", 6, seed=5).to_parquet(str(path))
    return path


def run_args(results: Path, pope: Path, *extra: str, budgets: str = "64", dtype: str = "float32") -> list[str]:
    """float32 unless told: subprocesses default to bfloat16 on CPUs with bf16 units."""
    return ["run", "--tasks", "pope", "--task-data", f"pope={pope}", "--methods", "none,random", "--budgets", budgets,
            "--limit", "3", "--max-new-tokens", "3", "--results", str(results), *(["--dtype", dtype] if dtype else []),
            *extra]


def records(results: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(results.glob("*/*/*.json"))}


def test_run_writes_a_record_per_cell_with_metrics_and_provenance(tmp_path, pope_file, capsys):
    assert main(run_args(tmp_path, pope_file)) == 0
    store = ResultStore(tmp_path)
    recs = {(r.key.method, r.key.budget): r for r in store.records()}
    assert set(recs) == {("none", "all"), ("random", "64")}
    for rec in recs.values():
        assert rec.key.task == "pope" and rec.key.limit == 3 and rec.n_samples == 3
        assert rec.primary_metric == "pope_accuracy" and 0.0 <= rec.score <= 1.0
        assert {"pope_accuracy", "pope_f1_score"} <= set(rec.metrics)
        assert rec.provenance["versions"]["lmms_eval"] and rec.provenance["dtype"] == "float32"
        assert rec.provenance["seed"] == 0 and "run" in rec.provenance["command"]
        assert set(rec.timing) == {"vision", "pruner", "prefill", "ttft", "decode_per_token", "tflops"}
        samples = store.samples(rec.key)
        assert [s["doc_id"] for s in samples] == [0, 1, 2]
        assert all("pope_accuracy" in s["scores"] and isinstance(s["output"], str) for s in samples)
    assert recs[("none", "all")].visual_tokens == {"nominal": None, "mean_kept": 576, "equivalent": 576, "original": 576}
    assert recs[("random", "64")].visual_tokens == {"nominal": 64, "mean_kept": 64, "equivalent": 64, "original": 576}
    assert recs[("random", "64")].timing["pruner"] > 0 and recs[("none", "all")].timing["pruner"] == 0
    assert "Random" in capsys.readouterr().out  # the final table names the method


def test_floor_controls_and_unreachable_cells(tmp_path, pope_file, capsys):
    """In-LLM methods get their floor control; a budget a method's schedule cannot meet on this
    4-layer model is not run but recorded with the reason, and the table shows both."""
    args = run_args(tmp_path, pope_file, budgets="192,64")
    args[args.index("--methods") + 1] = "none,random,fastv,pyramiddrop:layers=1/2/3"
    assert main(args) == 0
    store = ResultStore(tmp_path)
    recs = {(r.key.method, r.key.budget): r for r in store.records()}
    assert set(recs) == {("none", "all"), ("random", "192"), ("random", "64"), ("fastv", "192"), ("fastv", "64"),
                         ("fastv", "floor"), ("pyramiddrop:layers=1/2/3", "192"), ("pyramiddrop:layers=1/2/3", "floor"),
                         ("pyramiddrop:layers=1/2/3", "64")}
    # layers before the first stage see all 576 visual tokens, then one survives: (2 x 576 + 2) / 4, (576 + 3) / 4
    assert recs[("fastv", "floor")].visual_tokens["equivalent"] == 288.5
    assert recs[("pyramiddrop:layers=1/2/3", "floor")].visual_tokens["equivalent"] == 144.75
    unreachable = recs[("pyramiddrop:layers=1/2/3", "64")]
    assert unreachable.kind == "unreachable" and not store.samples(unreachable.key)
    assert "budget K=64 is below 144.8" in unreachable.provenance["reason"]
    # prefill FLOPs at the tokens each layer saw
    flops = {mb: r.timing["tflops"] for mb, r in recs.items() if r.kind == "eval"}
    assert flops[("fastv", "floor")] < flops[("fastv", "64")] < flops[("fastv", "192")] < flops[("none", "all")]
    assert flops[("random", "64")] < flops[("fastv", "floor")]
    out = capsys.readouterr()
    assert "not run pyramiddrop:layers=1/2/3 @ 64" in out.err.replace("\n", " ")
    assert "Floor" in out.out and "Tokens (eq.)" in out.out
    assert main([*run_args(tmp_path / "nofloor", pope_file), "--no-floor", "--methods", "none,fastv"]) == 0
    assert {r.key.budget for r in ResultStore(tmp_path / "nofloor").records()} == {"all", "64"}


def test_generated_task_on_a_redrawn_set_is_its_own_record(tmp_path, capsys):
    redrawn = tmp_path / "pope-7.parquet"
    assert main(["draw-task", "synth-pope", "--seed", "7", "--size", "4", "--out", str(redrawn)]) == 0
    assert main(["draw-task", "synth-pope", "--seed", "7", "--size", "4", "--out", str(tmp_path / "x.csv")]) == 2
    assert "write a .parquet file" in capsys.readouterr().err
    base = ["run", "--tasks", "synth-pope", "--methods", "none", "--limit", "2", "--max-new-tokens", "2",
            "--results", str(tmp_path / "store"), "--dtype", "float32", "--model", "random:tiny-llava"]
    assert main([*base, "--task-data", f"synth-pope={redrawn}"]) == 0
    assert main(base) == 0
    recs = list(ResultStore(tmp_path / "store").records())
    assert len(recs) == 2 and {r.key.task for r in recs} == {"synth-pope"}
    assert len({r.key.inputs for r in recs}) == 2  # the file's digest is part of the key
    questions = {r.key.inputs: [s["target"] for s in ResultStore(tmp_path / "store").samples(r.key)] for r in recs}
    assert len(questions) == 2  # the re-drawn set is other questions on other images


def test_rerun_skips_finished_cells_and_force_recomputes(tmp_path, pope_file):
    assert main(run_args(tmp_path, pope_file)) == 0
    before = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.json")}
    assert main(run_args(tmp_path, pope_file)) == 0
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.json")} == before
    assert main(run_args(tmp_path, pope_file, "--force")) == 0
    after = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*/*/*.json")}
    assert all(after[p] > before[p] for p in before)


@pytest.mark.parametrize("units,expected", [(False, "float32"), (True, "bfloat16")])
def test_cpu_runs_default_to_bfloat16_only_where_the_cpu_has_bf16_units(tmp_path, pope_file, monkeypatch, capsys, units,
                                                                        expected):
    from prunebench.models.loading import cpu_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: units, raising=False)
    assert cpu_dtype() == expected
    assert main(run_args(tmp_path, pope_file, dtype=None)) == 0
    assert f"on cpu in {expected} (the default here" in capsys.readouterr().err
    recs = list(ResultStore(tmp_path).records())
    assert len(recs) == 2 and {r.provenance["dtype"] for r in recs} == {expected}


def test_cells_stored_in_another_precision_are_refused_not_mixed(tmp_path, pope_file, capsys, monkeypatch):
    assert main(run_args(tmp_path, pope_file, budgets="128")) == 0  # float32: baseline and random@128
    stored = {p: p.read_bytes() for p in tmp_path.glob("*/*/*.json")}
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert main(run_args(tmp_path, pope_file, budgets="128,64", dtype=None)) == 2  # auto: bfloat16 here
    err = capsys.readouterr().err
    assert "computed in float32 and this run uses bfloat16" in err and "--dtype float32" in err and "--force" in err
    assert {p: p.read_bytes() for p in tmp_path.glob("*/*/*.json")} == stored  # nothing computed, nothing lost
    assert main(run_args(tmp_path, pope_file, budgets="128,64")) == 0  # the stored precision: reused, random@64 added
    assert len(records(tmp_path)) == 3 and all(p.read_bytes() == b for p, b in stored.items())
    assert main(run_args(tmp_path, pope_file, "--force", budgets="128,64", dtype=None)) == 0
    assert {r.provenance["dtype"] for r in ResultStore(tmp_path).records()} == {"bfloat16"}


def test_killed_run_resumes_without_losing_or_recomputing(tmp_path, pope_file):
    args = run_args(tmp_path, pope_file, budgets="128,64")  # three cells: baseline, random@128, random@64
    proc = subprocess.Popen([sys.executable, "-m", "prunebench", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(tmp_path.glob("*/*/*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = {p: p.read_bytes() for p in tmp_path.glob("*/*/*.json")}
    assert 1 <= len(first) < 3, "the run should be killed after its first record"
    assert not list(tmp_path.glob("*/*/.*.tmp")), "no half-written file is left behind"
    assert main(args) == 0
    final = records(tmp_path)
    assert len(final) == 3
    for path, data in first.items():
        assert path.read_bytes() == data  # finished records untouched
    assert not list(tmp_path.glob("*/*/*.lock"))


def test_data_parallel_run_matches_a_single_process(tmp_path, pope_file):
    """Two gloo ranks (as `accelerate launch` / torchrun start them) shard the samples; the record
    and every per-sample answer equal a single-process run."""
    args = run_args(tmp_path / "dp", pope_file)
    args[args.index("--limit") + 1] = "4"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # --standalone: a free rendezvous port, so parallel test runs do not collide
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "prunebench", *args], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single_args = list(args)
    single_args[single_args.index("--results") + 1] = str(tmp_path / "single")
    assert main(single_args) == 0
    parallel, alone = ResultStore(tmp_path / "dp"), ResultStore(tmp_path / "single")
    recs = {r.key: r for r in parallel.records()}
    assert len(recs) == 2
    for rec in alone.records():
        other = recs[rec.key]
        assert other.provenance["world_size"] == 2 and other.n_samples == rec.n_samples == 4
        assert other.metrics == rec.metrics and other.visual_tokens == rec.visual_tokens
        assert [(s["doc_id"], s["output"]) for s in parallel.samples(rec.key)] == \
               [(s["doc_id"], s["output"]) for s in alone.samples(rec.key)]


def test_batched_run_gives_the_answers_of_batch_one(tmp_path, pope_file):
    """--batch-size 3 (left padded through lmms-eval) = --batch-size 1, sample by sample."""
    outputs = {}
    for size in ("1", "3"):
        args = run_args(tmp_path / size, pope_file, "--batch-size", size)
        args[args.index("--limit") + 1] = "6"
        assert main(args) == 0
        store = ResultStore(tmp_path / size)
        outputs[size] = {(r.key.method, r.key.budget): [(s["doc_id"], s["output"]) for s in store.samples(r.key)]
                         for r in store.records()}
    assert outputs["1"] == outputs["3"] and len(outputs["1"]) == 2


def test_cells_reuse_the_vision_output_and_give_the_answers_of_a_run_without(tmp_path, pope_file):
    """The run cache (a task's processed batches and vision output, kept for its later cells)
    changes no answer; later cells say they reused it and carry the vision time measured once."""
    runs = {}
    for mb in ("0", "64"):
        args = run_args(tmp_path / mb, pope_file, "--vision-cache-mb", mb, "--batch-size", "2", budgets="64,128")
        args[args.index("--methods") + 1] = "none,random,visionzip,fastv"
        assert main(args) == 0
        runs[mb] = {(r.key.method, r.key.budget): r for r in ResultStore(tmp_path / mb).records()}
    assert len(runs["0"]) == 8 and runs["0"].keys() == runs["64"].keys()  # 7 + FastV's floor control
    for key, record in runs["64"].items():
        store = ResultStore(tmp_path / "64")
        without = ResultStore(tmp_path / "0")
        assert [s["output"] for s in store.samples(record.key)] == [s["output"] for s in without.samples(record.key)]
        assert record.metrics == runs["0"][key].metrics
        assert record.provenance["vision_cache_mb"] == 64 and runs["0"][key].provenance["vision_reused_batches"] == 0
        # 3 samples in batches of 2: the baseline encodes both batches, every later cell reuses them
        assert record.provenance["vision_reused_batches"] == (0 if key == ("none", "all") else 2)
        assert record.timing["vision"] > 0
    vision_ms = {round(r.timing["vision"], 9) for key, r in runs["64"].items()}
    assert len(vision_ms) == 1  # every cell reports the time the baseline measured
    from prunebench.report.speed import speed_table

    said = [any(n.startswith("Vision: a run encodes") for n in speed_table(list(runs[mb].values())).notes) for mb in runs]
    assert said == [False, True]  # the speed table says when vision times were reused


def test_the_run_cache_keeps_one_task_within_its_size():
    import torch

    from prunebench.engine.adapters import VisionOutput
    from prunebench.engine.generate import EncodedImages
    from prunebench.run.lmms_bridge import Batch, RunCache

    def batch() -> Batch:  # 4 KiB of embeds + 4 KiB of one hidden state (features are a view of it)
        hidden = torch.zeros(1, 1024)
        images = EncodedImages(VisionOutput([1024], hidden[:, 1:], (hidden,)), torch.zeros(1, 1024))
        return Batch({"input_ids": torch.zeros(1, 256, dtype=torch.int64)}, images, 1.0)

    cache = RunCache(max_bytes=2 * (8192 + 2048))
    cache.start_task("a")
    for i in range(3):
        cache.put(("a", i), batch())
    assert cache.get(("a", 0)) and cache.get(("a", 1)) and cache.get(("a", 2)) is None  # full: the first ones stay
    cache.start_task("a")
    assert cache.get(("a", 0)) and cache.hits == 3
    cache.start_task("b")
    assert cache.get(("a", 0)) is None


def test_loglikelihood_requests_score_the_continuation_on_the_engine(tiny, engine):
    """lmms-eval's loglikelihood path: the summed log-probability of the continuation after the
    pruned prompt, and whether greedy decoding would produce it."""
    from lmms_eval.api.instance import Instance

    from prunebench.budget import Budget
    from prunebench.engine.method import create_method
    from prunebench.run.lmms_bridge import PrunedVLM

    _, processor = tiny
    image = make_images(1)[0]
    lm = PrunedVLM(engine, processor, create_method("random"), Budget.parse(64))
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    request = Instance(request_type="loglikelihood", idx=0, metadata={"task": "t", "doc_id": 0, "repeats": 1},
                       arguments=("is there a red circle ?", "yes", lambda doc: [doc["image"]], 0, "t", "test"))
    ((total, greedy),) = lm.loglikelihood([request])
    inputs = processor(images=[image], text=[lm._prompt("is there a red circle ?")], return_tensors="pt")
    target = processor.tokenizer("yes", add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    logprobs, expected_greedy, _ = engine.score_continuation(
        inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"], target,
        method=create_method("random"), budget=64)
    assert total == pytest.approx(float(logprobs.sum()), abs=1e-5) and greedy == expected_greedy
    assert lm.stats[("t", 0)].visual_tokens == [64] * 4


def test_llava_prompts_tokenized_once_equal_the_processors_batch(tiny, engine):
    """The bridge's LLaVA path (each expanded prompt tokenized once, shared across cells) gives
    exactly what LlavaProcessor returns for the batch: left padding, mask, pixels."""
    import torch
    from PIL import Image

    from prunebench.budget import Budget
    from prunebench.run.lmms_bridge import PrunedVLM, RunCache

    _, processor = tiny
    cache = RunCache()
    shared = cache.prompt_ids
    lm = PrunedVLM(engine, processor, None, Budget.all(), cache=cache)
    prompts = [lm._prompt(f"<image>\n{q}") for q in ("What is it?", "Is there a red circle in the image?", "Count.")]
    images = [Image.new("RGB", (40 + 20 * i, 50), (30 * i, 90, 200)) for i in range(3)]
    processor.tokenizer.padding_side = "left"
    expected = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    for _ in range(2):  # the second time from the shared cache
        got = lm._encode(prompts, images)
        for name in ("input_ids", "attention_mask", "pixel_values"):
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)
    assert len(shared) == 3 and all(text.count("<image>") == 576 for text in shared)
