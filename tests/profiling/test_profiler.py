"""The profiler on CPU: well-formed statistics, the pruner kept out of prefill, records, presets."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import support.methods  # noqa: F401  (registers the test methods)
import torch
from support.tables import squeeze, table_row

import prunebench.engine.timing
from prunebench.budget import Budget, BudgetError
from prunebench.commands import main as cli
from prunebench.engine.generate import PruningEngine
from prunebench.engine.method import PRE_LLM, Method, Selection, Stage, create_method
from prunebench.profiling import presets, profiler
from prunebench.profiling.flops import (
    DecoderGeometry,
    kv_cache_bytes,
    prefill_flops,
    roofline_ms,
    visual_tokens_per_image,
)
from prunebench.profiling.presets import (
    build_random_model,
    check_engine_support,
    preset_config,
    resolve_preset,
)
from prunebench.profiling.profiler import (
    STAGES,
    DevicePeaks,
    ProfileSettings,
    measure_peaks,
    plan_cells,
    profile_cells,
    synthetic_batch,
    timed_pass,
)
from prunebench.results import ResultStore

CPU = torch.device("cpu")
PEAKS = DevicePeaks(flops_per_s=1e11, bytes_per_s=1e10)  # fixed, so the roofline maths is checkable
SETTINGS = ProfileSettings(batch_size=2, prompt_tokens=12, warmup=1, repeats=2, decode_tokens=2)


@pytest.fixture(scope="module")
def setup(tiny):
    model, _ = tiny
    engine = PruningEngine(model)
    inputs = synthetic_batch(model.config, SETTINGS.batch_size, SETTINGS.prompt_tokens, CPU, torch.float32)
    return engine, inputs


def test_synthetic_batch_holds_one_image_block_per_prompt(tiny):
    model, _ = tiny
    inputs = synthetic_batch(model.config, 3, 40, CPU, torch.float32)
    image = inputs["input_ids"] == model.config.image_token_id
    assert inputs["input_ids"].shape == (3, 40 + 576)
    assert image.sum(-1).tolist() == [576] * 3
    assert image[:, 35:35 + 576].all()  # after the system-prompt-sized prefix, contiguous
    assert inputs["attention_mask"].all()
    assert inputs["pixel_values"].shape == (3, 3, 336, 336)


@pytest.mark.parametrize("spec,budget", [("none", "all"), ("random", "64"), ("test-twostage:layers=1/3", "96")])
def test_cpu_profile_record_is_well_formed(setup, spec, budget):
    engine, inputs = setup
    method, budget = create_method(spec), Budget.parse(budget)
    (record,) = profile_cells(engine, inputs, [(method, budget)], SETTINGS, PEAKS, "random:tiny-llava")
    t = record.timing
    assert record.kind == "profile" and record.key.task == "profile"
    assert (record.key.model, record.key.method, record.key.budget) == ("random:tiny-llava", method.spec(), str(budget))
    for stage in STAGES:
        assert all(math.isfinite(t[k]) and t[k] >= 0 for k in (stage, f"{stage}_min", f"{stage}_max"))
        assert t[f"{stage}_min"] <= t[stage] <= t[f"{stage}_max"]
    if method.stage == "none":
        assert t["pruner"] == t["pruner_max"] == 0.0  # no pruner span at all
    else:
        assert t["pruner_min"] > 0

    # the analytic figures are those of the tokens the engine reported per layer
    g = DecoderGeometry.from_config(engine.model.config)
    kept = 576 if budget.is_all else budget.resolve(576)
    layers = {"none": [576] * 4, "random": [kept] * 4, "test-twostage": [576, kept, kept, kept // 2]}[method.name]
    tokens = [[n + SETTINGS.prompt_tokens for n in layers]] * SETTINGS.batch_size
    weights = sum(p.numel() * 4 for m in (engine.adapter.layers, engine.adapter.decoder.norm, engine.adapter.lm_head)
                  for p in m.parameters())
    batch = SETTINGS.batch_size  # records hold per-sample figures: the batch's / its size
    assert t["tflops"] == pytest.approx(prefill_flops(g, tokens) / 1e12 / batch)
    assert t["kv_cache_bytes"] == kv_cache_bytes(g, tokens, 4) / batch
    bound = roofline_ms(prefill_flops(g, tokens), weights + kv_cache_bytes(g, tokens, 4), 1e11, 1e10)
    assert t["prefill_bound_ms"] == pytest.approx(bound / batch)
    assert t["roofline_fraction"] == pytest.approx(t["prefill_bound_ms"] / t["prefill"])
    assert t["prefill_tflops_per_s"] == pytest.approx(t["tflops"] / (t["prefill"] / 1e3))
    assert t["tflops_vision"] > 0 and t["tflops_decode_per_token"] > 0 and t["decode_roofline_fraction"] > 0
    assert t["peak_memory_bytes"] > 0
    assert record.visual_tokens == {"nominal": budget.tokens if not budget.is_all else None, "mean_kept": float(layers[-1]),
                                    "equivalent": sum(layers) / 4, "original": 576.0}
    p = record.provenance
    assert (p["device_type"], p["timer"], p["dtype"], p["batch_size"], p["repeats"]) == ("cpu", "time.perf_counter", "float32", 2, 2)
    assert p["device"] and "4nd^2 + 2n^2d + 3ndm" in p["flops_formula"]


def test_every_stage_sits_inside_ttft(setup):
    engine, inputs = setup
    for spec, budget in [("none", "all"), ("test-twostage:layers=1/3", "96")]:
        times, _ = timed_pass(engine, inputs, create_method(spec), Budget.parse(budget), decode_tokens=2)
        assert times["vision"] + times["pruner"] + times["prefill"] <= times["ttft"] + 1e-9


# -- the pruner never leaks into prefill -----------------------------------------------------
class VirtualTime:
    """Stands in for the ``time`` module of prunebench.engine.timing: every reading advances one whole
    second, and ``sleep`` advances it without work. Whole seconds keep every difference exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@dataclass(kw_only=True)
class Sleepy(Method):
    """Keeps the first K tokens after sleeping ``seconds`` of virtual time at each stage; logs ``tag``."""

    name: ClassVar[str] = "test-sleepy"
    stage: ClassVar[str] = "llm"
    layers: tuple[int, ...] = (2,)  # -1: pre-LLM
    seconds: float = 0.0
    tag: str = ""
    clock: ClassVar[VirtualTime | None] = None
    calls: ClassVar[list[str]] = []

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        keep = budget.resolve(n_visual)
        return [Stage(PRE_LLM if layer < 0 else layer, keep) for layer in self.layers]

    def select(self, ctx) -> Selection:
        if self.seconds:
            Sleepy.clock.sleep(self.seconds)
        Sleepy.calls.append(self.tag)
        return Selection(keep=[torch.arange(k) for k in ctx.keep])


@pytest.mark.parametrize("layers", [(-1,), (2,), (1, 3)])
def test_pruner_time_is_excluded_from_prefill(setup, monkeypatch, layers):
    """A method that sleeps 1000 s per stage makes `pruner` (and TTFT) longer by exactly that,
    and changes neither `prefill`, `vision` nor decode: the spans are disjoint by construction."""
    engine, inputs = setup
    Sleepy.clock = VirtualTime()
    monkeypatch.setattr(prunebench.engine.timing, "time", Sleepy.clock)
    settings = ProfileSettings(batch_size=2, prompt_tokens=12, warmup=0, repeats=2, decode_tokens=2)
    cells = [(Sleepy(layers=layers, seconds=s), Budget.parse(64)) for s in (0.0, 1000.0)]
    quiet, slow = (record.timing for record in profile_cells(engine, inputs, cells, settings, PEAKS, "tiny"))
    slept_ms = 1000.0 * 1000.0 * len(layers) / settings.batch_size  # per sample
    assert slow["pruner"] - quiet["pruner"] == slept_ms
    assert slow["ttft"] - quiet["ttft"] == slept_ms
    for stage in ("prefill", "vision", "decode_per_token"):
        assert slow[stage] == quiet[stage]
    assert quiet["prefill"] > 0


def test_timed_passes_are_interleaved_across_cells(setup):
    """Warm-ups first, then repeat r runs every cell once: drifting device speed hits all alike."""
    engine, inputs = setup
    Sleepy.calls = []
    cells = [(Sleepy(layers=(-1,), tag=tag), Budget.parse(64)) for tag in "ab"]
    settings = ProfileSettings(batch_size=2, prompt_tokens=12, warmup=1, repeats=2, decode_tokens=1)
    records = profile_cells(engine, inputs, cells, settings, PEAKS, "tiny")
    assert Sleepy.calls == ["a", "b", "a", "b", "a", "b"]
    assert [r.n_samples for r in records] == [4, 4]
    assert "decode_per_token" not in records[0].timing  # one generated token: prefill only


# -- the device ----------------------------------------------------------------------------------
def test_measured_peaks_are_positive_rates():
    peaks = measure_peaks(CPU, torch.float32, matmul_size=128, copy_bytes=1 << 20, repeats=2)
    assert 0 < peaks.flops_per_s < math.inf and 0 < peaks.bytes_per_s < math.inf


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="RSS high-water mark needs Linux /proc")
def test_cpu_peak_memory_sees_a_large_allocation():
    """In a fresh process: the suite's own earlier peak must not hide the allocation."""
    import subprocess
    import sys

    code = (
        "import numpy as np, torch\n"
        "from prunebench.profiling.profiler import peak_memory_bytes, reset_peak_memory\n"
        "cpu = torch.device('cpu')\n"
        "reset_peak_memory(cpu)\n"
        "before = peak_memory_bytes(cpu)\n"
        "block = np.ones(128 * 2**20 // 8)  # 128 MiB of fresh, touched pages\n"
        "del block\n"
        "print(peak_memory_bytes(cpu) - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout.split()[-1]) >= 120 * 2**20


# -- planning and the command line ---------------------------------------------------------------
def test_plan_puts_the_baseline_first_and_checks_budgets():
    methods = [create_method("none"), create_method("random"), create_method("random:seed=3")]
    cells = plan_cells(methods, [Budget.parse("192"), Budget.parse("25%")], 576, 32)
    assert [(m.spec(), str(b)) for m, b in cells] == [
        ("none", "all"), ("random", "192"), ("random", "25%"), ("random:seed=3", "192"), ("random:seed=3", "25%")]
    with pytest.raises(BudgetError, match="K=600 exceeds the 576"):
        plan_cells(methods, [Budget.parse("600")], 576, 32)


@pytest.fixture
def small_peaks(monkeypatch):
    real = profiler.measure_peaks
    monkeypatch.setattr(profiler, "measure_peaks", lambda device, dtype: real(device, dtype, 128, 1 << 20, 2))


def test_cli_writes_profile_records_and_a_table(tmp_path, small_peaks, capsys):
    table = tmp_path / "reports" / "profile.md"
    argv = ["profile", "--model", "random:tiny-llava", "--methods", "none,random", "--budgets", "64,128",
            "--repeats", "2", "--warmup", "0", "--decode-tokens", "2", "--prompt-tokens", "8",
            "--results", str(tmp_path / "results"), "--markdown", str(table)]
    assert cli.main(argv) == 0
    records = {(r.key.method, r.key.budget): r for r in ResultStore(tmp_path / "results").records()}
    assert set(records) == {("none", "all"), ("random", "64"), ("random", "128")}
    assert all(r.kind == "profile" and r.key.task == "profile" for r in records.values())
    provenance = records["random", "64"].provenance
    assert provenance["command"].startswith("prunebench profile --model random:tiny-llava") and provenance["random_weights"]
    text = table.read_text()
    assert "# prunebench profile: random:tiny-llava" in text and "measured peaks" in text
    assert table_row("all", "none", "576") in squeeze(text) and table_row("64", "random", "64") in squeeze(text)
    baseline = next(line for line in squeeze(text).splitlines() if line.startswith(table_row("all", "none")))
    assert baseline.split("|")[9:11] == ["1.00", "1.00"]  # the baseline's own speedups (prefill x, TTFT x)
    assert table_row("128", "random", "128") in squeeze(capsys.readouterr().out)


@pytest.mark.parametrize("argv,message", [
    # dynamic backbones: the budget is checked against the visual tokens of the --image-size image
    (["--model", "random:tiny-qwen2-vl", "--image-size", "672x672", "--budgets", "577"], "K=577 exceeds the 576 visual tokens"),
    (["--model", "random:tiny-llava-next", "--image-size", "112x112", "--budgets", "89"], "K=89 exceeds the 88 visual tokens"),
    (["--model", "random:nosuch"], "valid choices: random:tiny-llava, random:mid-llava, .*random:tiny-qwen2-vl, .*llava-1.5-7b"),
    (["--model", "random:tiny-llava", "--budgets", "600"], "K=600 exceeds the 576 visual tokens"),
    (["--model", "random:tiny-llava", "--methods", "nosuch"], "unknown method 'nosuch'"),
])
def test_cli_refuses_clearly(tmp_path, capsys, argv, message):
    assert cli.main(["profile", *argv, "--results", str(tmp_path)]) == 2
    assert not list(tmp_path.glob("*/*/*.json"))
    err = capsys.readouterr().err
    assert err.startswith("prunebench profile:") and re.search(message, err), err


# -- presets ---------------------------------------------------------------------------------------
def test_llava_15_preset_has_the_real_geometry_without_allocating_it():
    config = preset_config("llava-1.5-7b")
    g = DecoderGeometry.from_config(config)
    assert (g.layers, g.hidden, g.mlp, g.heads, g.kv_heads, g.vocab) == (32, 4096, 11008, 32, 32, 32064)
    assert visual_tokens_per_image(config) == 576
    vision = config.vision_config
    assert (vision.num_hidden_layers, vision.hidden_size, vision.image_size, vision.patch_size) == (24, 1024, 336, 14)
    model = build_random_model("llava-1.5-7b", device="meta")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(7.06e9, rel=0.002)
    assert len(PruningEngine(model).adapter.layers) == 32
    check_engine_support("llava-1.5-7b")  # the engine can run it


@pytest.mark.parametrize("name,cls,layers,hidden,kv_heads,params", [
    ("llava-next-7b", "LlavaNextForConditionalGeneration", 32, 4096, 32, 7.06e9),
    ("qwen2-vl-7b", "Qwen2VLForConditionalGeneration", 28, 3584, 4, 8.29e9),
    ("qwen2.5-vl-7b", "Qwen2_5_VLForConditionalGeneration", 28, 3584, 4, 8.29e9),
])
def test_other_presets_ship_their_geometry_and_can_be_profiled(name, cls, layers, hidden, kv_heads, params):
    g = DecoderGeometry.from_config(preset_config(name))
    assert (g.layers, g.hidden, g.kv_heads) == (layers, hidden, kv_heads)
    model = build_random_model(name, device="meta")
    assert type(model).__name__ == cls
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.002)
    assert PruningEngine(model).adapter.num_layers == layers
    check_engine_support(name)  # an adapter and a FLOPs model: no refusal (tests/profiling/test_flops_backbones.py runs them)


def test_preset_names_and_hub_ids_resolve():
    assert resolve_preset("llava-1.5-7b") == resolve_preset("random:llava-1.5-7b") == "llava-1.5-7b"
    assert resolve_preset("llava-hf/llava-1.5-7b-hf") == "llava-1.5-7b"
    assert resolve_preset("Qwen/Qwen2-VL-7B-Instruct") == "qwen2-vl-7b"
    assert resolve_preset("someone/else") is None
    assert preset_config("llava-next-7b").image_grid_pinpoints[0] == [336, 672]


def test_random_preset_path_runs_in_bf16_on_cpu(monkeypatch):
    """The path a GPU run of `--model llava-1.5-7b` takes (shipped config -> random weights built
    on the device -> bf16 profile), on a narrowed copy of the preset so it fits a test."""
    real = presets.preset_config

    def narrow(name):
        config = real(name)
        config.text_config.update({"num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
                                   "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 32})
        config.vision_config.update({"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
                                     "num_attention_heads": 2})
        return config

    monkeypatch.setattr(presets, "preset_config", narrow)
    model, name, random = profiler.load_profile_model("llava-hf/llava-1.5-7b-hf", True, CPU, "bfloat16")
    assert (name, random, model.dtype) == ("random:llava-1.5-7b", True, torch.bfloat16)
    weights = model.model.language_model.layers[0].mlp.up_proj.weight
    assert weights.float().std() > 0 and torch.isfinite(weights.float()).all()  # initialised, not empty
    engine = PruningEngine(model)
    inputs = synthetic_batch(model.config, 1, 8, CPU, model.dtype)
    settings = ProfileSettings(batch_size=1, prompt_tokens=8, warmup=0, repeats=1, decode_tokens=2)
    (record,) = profile_cells(engine, inputs, [(create_method("random"), Budget.parse(64))], settings, PEAKS, name)
    assert record.provenance["dtype"] == "bfloat16"
    g = DecoderGeometry.from_config(model.config)
    assert record.timing["kv_cache_bytes"] == kv_cache_bytes(g, [[64 + 8] * 2], 2)  # bf16: 2 bytes per element
