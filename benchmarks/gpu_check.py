"""The first GPU run: ``scripts/gpu_check.sh`` (``python -m benchmarks.gpu_check``).

With no download (random weights in the real geometries), in bfloat16 with CUDA events:

1. every profiler preset of a family the engine runs (LLaVA-1.5-7B, Qwen2.5-VL-7B, and any preset
   added since; ``COVERED`` lists the two left out), every registered method at 576/192/128/64
   through ``prunebench profile``'s timer: warm-up, >= 20 interleaved timed passes, medians and
   ranges, FLOPs, KV cache, roofline;
2. FastV on the engine vs the official eager-attention way (benchmarks.method_overhead; LLaVA);
3. DivPrune vectorised vs the two loops it replaces;
4. AutoSelect's scorer alone (the paper's width 1024, depth 2, 16 heads; random weights), as the
   method runs it: float32 scores and a top-K on the vision features;
5. the achieved roofline fraction of the K=64 prefill (``random`` at 64: the LLM sees 64 visual tokens).

It writes ``<out>/<device>/`` (README.md with the device, driver, torch and the exact command, the
targets as pass / miss, every table; summary.json; the profiler's report per model) and the profile
records into ``--results``, where ``prunebench reproduce --dry-run`` finds them for its GPU-hours
estimate. Learned selectors are timed with random checkpoints of their paper shape (LLaVA only:
prunebench trains them for LLaVA-1.5-style models). A method a backbone refuses is listed with its
error, not timed.

Without CUDA (or with ``--smoke``) the same runs on the tiny random models with few repeats: the CPU
path CI runs, with the same report layout. Its timings say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

from benchmarks.method_overhead import (
    FASTV_NOTE,
    FASTV_TARGET,
    Bench,
    compare_fastv,
    markdown_table,
    projected_features,
    time_divprune,
)
from prunebench.budget import Budget
from prunebench.engine.generate import PruningEngine
from prunebench.engine.method import Method, available_methods, create_method
from prunebench.engine.timing import StageClock
from prunebench.errors import UserError
from prunebench.profiling.presets import preset_names
from prunebench.profiling.profiler import (
    DTYPES,
    ProfileSettings,
    device_name,
    load_profile_model,
    measure_peaks,
    profile_cells,
    profile_table,
    report_header,
    synthetic_batch,
    timed_pass,
)
from prunebench.report.tables import render
from prunebench.results import Record, ResultStore, slug
from prunebench.training.selectors import build_selector, save_selector

# what a GPU run should reach: printed as pass / miss, never asserted by tests
ROOFLINE_TARGET = 0.7  # K=64 prefill: achieved fraction of its roofline bound, at least
SCORER_TARGET_MS = 0.3  # AutoSelect's scorer alone, at most
PRUNER_TARGET_MS = 1.0  # every method's pruner at every budget, at most
WALL_TARGET_MIN = 8.0  # the whole script on one H100

BUDGETS = (576, 192, 128, 64)
SMOKE_MODELS = ("random:tiny-llava", "random:tiny-qwen2.5-vl")
# presets left out of the default set: another preset already times their decoder and tower
COVERED = {
    "qwen2-vl-7b": "Qwen2.5-VL-7B's predecessor (the same decoder; a tower without window attention)",
    "llava-next-7b": "LLaVA-1.5-7B's decoder and tower on 2928 visual tokens (`prunebench profile --model llava-next-7b`)",
}
# in-LLM stages that fit the tiny models' 4 decoder layers (as `prunebench run` uses on builtin:tiny-llava)
SHALLOW_OPTIONS = {"sparsevlm": "layers=0/1/2", "pyramiddrop": "layers=0/1/2"}
LEARNED = ("autoselect", "gumbel")
SCORER_SHAPE = {"width": 1024, "depth": 2, "heads": 16}  # AutoSelect's scorer as the paper describes it
# random selector checkpoints, kept out of the repository and the results store (their paths are in record keys)
SELECTOR_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prunebench" / "gpu-check-selectors"


@dataclass(frozen=True)
class Mode:
    name: str  # "gpu" or "smoke"
    models: tuple[str, ...]
    dtype: str
    warmup: int
    repeats: int
    decode_tokens: int
    device: str


def gpu_models() -> tuple[str, ...]:
    return tuple(p for p in preset_names() if p not in COVERED)


def choose_mode(args: argparse.Namespace) -> Mode:
    cuda = torch.cuda.is_available() and not args.smoke
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else (
        gpu_models() if cuda else SMOKE_MODELS)
    def given(value: int | None, default: int) -> int:
        return default if value is None else value

    if cuda:
        return Mode("gpu", models, args.dtype or "bfloat16", given(args.warmup, 3), given(args.repeats, 20), 2, "cuda")
    return Mode("smoke", models, args.dtype or "float32", given(args.warmup, 0), given(args.repeats, 2), 2, "cpu")


# -- environment --------------------------------------------------------------------------------


def environment(device: torch.device, command: str) -> dict[str, str]:
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
        "driver": _driver() if device.type == "cuda" else "none (CPU)",
        "prunebench_commit": _git("rev-parse", "HEAD"),
        "command": command,
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
    }


def _driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"unknown ({type(err).__name__})"
    return out.stdout.strip().splitlines()[0]


def _git(*argv: str) -> str:
    try:
        out = subprocess.run(["git", *argv], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


# -- methods ------------------------------------------------------------------------------------


def method_specs(engine: PruningEngine, selectors: Path) -> tuple[list[str], list[str]]:
    """(specs to time, "name: why not" for the registered methods that cannot be), every registered
    method but the baseline and test doubles; learned selectors get random checkpoints of their shape."""
    specs, refused = [], []
    shallow = engine.adapter.num_layers < 8
    for name in available_methods():
        if name == "none" or name.startswith("test-"):
            continue
        if name in LEARNED:
            if engine.model.config.model_type != "llava":
                refused.append(f"{name}: prunebench trains selectors for LLaVA-1.5-style models only")
                continue
            specs.append(f"{name}:ckpt={random_selector(engine, name, selectors)}")
            continue
        specs.append(f"{name}:{SHALLOW_OPTIONS[name]}" if shallow and name in SHALLOW_OPTIONS else name)
    return specs, refused


def random_selector(engine: PruningEngine, kind: str, root: Path) -> Path:
    """A checkpoint of ``kind`` with random weights for this model's vision features (made once per
    feature shape under ``root``)."""
    width, n_tokens = vision_shape(engine)
    directory = root / f"{kind}-{width}x{n_tokens}"
    if not (directory / "config.json").is_file():
        torch.manual_seed(0)
        config = {"vision_width": width}
        if kind == "autoselect":
            config |= scorer_shape(width)
        else:
            config["n_tokens"] = n_tokens
        save_selector(directory, build_selector(kind, **config), {"model": "random weights (gpu_check)"})
    return directory


def scorer_shape(vision_width: int) -> dict[str, int]:
    """The paper's scorer at LLaVA scale; at toy widths, the width of the features."""
    return dict(SCORER_SHAPE) if vision_width >= SCORER_SHAPE["width"] else {}


@torch.inference_mode()
def vision_shape(engine: PruningEngine) -> tuple[int, int]:
    config = engine.model.config
    inputs = synthetic_batch(config, 1, 8, engine.device, engine.model.dtype)
    vision = engine.encode_images(inputs["pixel_values"], image_inputs=engine.adapter.image_inputs(inputs)).vision
    return vision.features.shape[-1], vision.features.shape[1]


def plan_cells(engine: PruningEngine, inputs: dict, specs: list[str], budgets: tuple[int, ...],
               decode_tokens: int) -> tuple[list[tuple[Method, Budget]], list[str]]:
    """The cells that run here, each tried once (an untimed pass), and "spec @ K: why" for the others."""
    n_visual = int((inputs["input_ids"][0] == engine.adapter.image_token_id).sum())
    cells: list[tuple[Method, Budget]] = [(create_method("none"), Budget.all())]
    skipped: dict[tuple[str, str], list[int]] = {}  # (spec, error) -> the budgets it refused
    for spec in specs:
        try:
            method = create_method(spec)
        except UserError as err:
            skipped.setdefault((spec, str(err)), [])
            continue
        for k in budgets:
            budget = Budget.parse(k)
            try:
                method.schedule(n_visual, budget, engine.adapter.num_layers)
                timed_pass(engine, inputs, method, budget, decode_tokens)
            except (UserError, NotImplementedError, ValueError, RuntimeError) as err:
                skipped.setdefault((method.spec(), f"{type(err).__name__}: {err}"), []).append(k)
                continue
            cells.append((method, budget))
    return cells, [f"{spec}{' @ ' + ', '.join(map(str, ks)) if ks else ''}: {why}" for (spec, why), ks in skipped.items()]


# -- measurements ---------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def show(s: dict[str, float], decimals: int = 3) -> str:
    return f"{s['median']:.{decimals}f} [{s['min']:.{decimals}f}, {s['max']:.{decimals}f}]"


@torch.inference_mode()
def time_scorer(engine: PruningEngine, inputs: dict, k: int, warmup: int, repeats: int) -> dict[str, float]:
    """AutoSelect's scorer alone: logits on the vision features and the top-K, as the method runs it."""
    vision = engine.encode_images(inputs["pixel_values"], image_inputs=engine.adapter.image_inputs(inputs)).vision
    features = vision.features
    torch.manual_seed(0)
    module = build_selector("autoselect", vision_width=features.shape[-1], **scorer_shape(features.shape[-1]))
    module = module.to(features.device).eval()
    runs = []
    for i in range(warmup + repeats):
        clock = StageClock(engine.device)
        with clock("scorer"):
            module.scores(features).topk(k, dim=-1)
        if i >= warmup:
            runs.append(clock.summary()["scorer"])
    return spread(runs)


@dataclass
class Target:
    name: str
    model: str
    value: float | None
    limit: float
    at_most: bool
    detail: str = ""

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        shown = "not measured" if self.value is None else f"{self.value:.4g}"
        return f"{'pass' if self.passed else 'miss'}  {self.name} [{self.model}]: {shown} ({'<=' if self.at_most else '>='} {self.limit:g}){' ' + self.detail if self.detail else ''}"


@dataclass
class ModelResult:
    model: str
    records: list[Record] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    fastv: list[dict] = field(default_factory=list)
    divprune: list[dict] = field(default_factory=list)
    scorer: dict | None = None
    report: str = ""  # the profiler's Markdown report
    seconds: float = 0.0


def check_model(model_name: str, mode: Mode, budgets: tuple[int, ...], store: ResultStore, selectors: Path,
                command: str, log) -> ModelResult:
    start = time.perf_counter()
    device = torch.device(mode.device)
    model, name, _ = load_profile_model(model_name, True, device, mode.dtype)
    engine = PruningEngine(model)
    settings = ProfileSettings(warmup=mode.warmup, repeats=mode.repeats, decode_tokens=mode.decode_tokens)
    inputs = synthetic_batch(model.config, 1, settings.prompt_tokens, device, model.dtype, image_size=settings.image_size)
    result = ModelResult(name)
    specs, refused = method_specs(engine, selectors)
    result.skipped += refused
    cells, skipped = plan_cells(engine, inputs, specs, budgets, settings.decode_tokens)
    result.skipped += skipped
    peaks = measure_peaks(device, model.dtype)
    log(f"{name}: {len(cells)} cells x ({settings.warmup} warm-up + {settings.repeats} timed passes)")
    result.records = profile_cells(engine, inputs, cells, settings, peaks, name)
    for record in result.records:
        record.provenance |= {"command": command, "random_weights": True}
        store.write(record)
    result.report = report_header(result.records, name, command) + "\n" + render(profile_table(result.records), "md") + "\n"

    bench = Bench(engine, inputs, mode.repeats, mode.warmup)
    n_visual = int(result.records[0].visual_tokens["original"])
    pruned = [k for k in budgets if k < n_visual]
    if model.config.model_type == "llava" and "fastv" in available_methods():
        log(f"{name}: FastV, engine vs eager")
        for k in pruned:
            pair = compare_fastv(bench, "fastv", k)
            ours, eager = spread(pair.ours), spread(pair.eager)
            result.fastv.append({"k": k, "ours_ms": ours, "eager_ms": eager, "ratio": ours["median"] / eager["median"],
                                 "same_kept": pair.same_kept, "same_logits": pair.same_logits})
    else:
        result.skipped.append("FastV engine vs eager: the eager reference path is LLaVA-1.5's (one image, 1-D positions)")
    log(f"{name}: DivPrune vectorised vs loops")
    features = projected_features(bench)
    for k in pruned:
        runs, same = time_divprune(bench, features, k)
        result.divprune.append({"k": k, **{f"{n}_ms": spread(v) for n, v in runs.items()}, "same_picks": same})
    if "cdpruner" in available_methods():
        result.skipped.append("CDPruner vectorised vs loop: no loop reference in benchmarks/ yet")
    if model.config.model_type == "llava":
        result.scorer = {"k": 64, **time_scorer(engine, inputs, 64, mode.warmup, mode.repeats)}
    del bench, engine, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result.seconds = time.perf_counter() - start
    return result


def targets(results: list[ModelResult], wall_minutes: float, mode: Mode) -> list[Target]:
    out = []
    for r in results:
        k64 = next((rec for rec in r.records if rec.key.method == "random" and rec.key.budget == "64"), None)
        out.append(Target("K=64 prefill roofline fraction", r.model,
                          None if k64 is None else k64.timing["roofline_fraction"], ROOFLINE_TARGET, False,
                          "(random @ 64: bound / measured prefill)"))
        if r.scorer is not None:
            out.append(Target("AutoSelect scorer ms", r.model, r.scorer["median"], SCORER_TARGET_MS, True, "(K=64)"))
        by_method: dict[str, list[float]] = {}
        for rec in r.records:
            if rec.key.method != "none":
                by_method.setdefault(rec.key.method.partition(":")[0], []).append(rec.timing["pruner"])
        for method, values in sorted(by_method.items()):
            out.append(Target(f"{method} pruner ms", r.model, max(values), PRUNER_TARGET_MS, True, "(worst budget)"))
        if r.fastv:
            worst = max(r.fastv, key=lambda f: f["ratio"])
            out.append(Target("FastV engine / eager", r.model, worst["ratio"], FASTV_TARGET, True, f"(worst K={worst['k']})"))
    if mode.name == "gpu":
        out.append(Target("wall time min", "all", wall_minutes, WALL_TARGET_MIN, True))
    return out


# -- the report -------------------------------------------------------------------------------------


def write_report(out: Path, env: dict, mode: Mode, results: list[ModelResult], checks: list[Target],
                 wall_minutes: float) -> Path:
    folder = out / slug(env["device"]).lower()
    folder.mkdir(parents=True, exist_ok=True)
    for r in results:
        (folder / f"profile-{slug(r.model)}.md").write_text(r.report)
    smoke = ("\n**CPU smoke run**: tiny random models, few repeats; these numbers say nothing about a GPU "
             "(they check that the script and its report work).\n" if mode.name == "smoke" else "")
    lines = [
        f"# GPU check: {env['device']}",
        smoke,
        f"- command: `{env['command']}`",
        f"- device: {env['device']}; driver {env['driver']}; CUDA {env['cuda']}; torch {env['torch']}; "
        f"transformers {env['transformers']}; Python {env['python']}",
        f"- prunebench commit {env['prunebench_commit']}; {env['date']}; wall time {wall_minutes:.1f} min",
        f"- models (random weights): {', '.join(r.model for r in results)}; {mode.dtype}; {mode.warmup} warm-up + "
        f"{mode.repeats} timed passes per cell; timer: {'CUDA events' if mode.device == 'cuda' else 'perf_counter'}",
        "",
        "## Targets",
        "",
        markdown_table(["result", "target", "model", "measured", "limit"],
                       [["pass" if t.passed else "miss", t.name + (f" {t.detail}" if t.detail else ""), t.model,
                         "not measured" if t.value is None else f"{t.value:.4g}",
                         f"{'<=' if t.at_most else '>='} {t.limit:g}"] for t in checks]),
    ]
    for r in results:
        lines += ["", f"## {r.model} ({r.seconds / 60:.1f} min)", "",
                  f"Every cell: `profile-{slug(r.model)}.md` (the profiler's report). Times: median [min, max] ms.", ""]
        if r.fastv:
            lines += ["### FastV: engine vs the eager-attention way", "", markdown_table(
                ["K", "engine ms", "eager ms", "ratio", "same kept set", "same logits"],
                [[str(f["k"]), show(f["ours_ms"], 2), show(f["eager_ms"], 2), f"{f['ratio']:.2f}",
                  "yes" if f["same_kept"] else "NO", "yes" if f["same_logits"] else "NO"] for f in r.fastv]),
                "", FASTV_NOTE, ""]
        if r.divprune:
            lines += ["### DivPrune: vectorised vs loops", "", markdown_table(
                ["K", "vectorised ms", "official-shape loop ms", "plain Python loop ms", "same picks"],
                [[str(d["k"]), show(d["vectorised_ms"]), show(d["official_ms"]), show(d["python_ms"], 1),
                  "yes" if d["same_picks"] else "NO"] for d in r.divprune]), ""]
        if r.scorer is not None:
            lines += ["### AutoSelect's scorer alone", "",
                      f"{show(r.scorer)} ms for the logits and top-{r.scorer['k']} of one image's vision features "
                      "(float32, as the method runs it; random weights of the paper's shape)", ""]
        if r.skipped:
            lines += ["### Not measured", ""] + [f"- {why}" for why in r.skipped] + [""]
    (folder / "README.md").write_text("\n".join(lines) + "\n")
    summary = {
        "environment": env,
        "mode": mode.__dict__,
        "wall_minutes": wall_minutes,
        "targets": [{**t.__dict__, "passed": t.passed} for t in checks],
        "models": [{"model": r.model, "seconds": r.seconds, "fastv": r.fastv, "divprune": r.divprune,
                    "scorer": r.scorer, "skipped": r.skipped,
                    "cells": [{"method": rec.key.method, "budget": rec.key.budget, "timing": rec.timing,
                               "visual_tokens": rec.visual_tokens} for rec in r.records]} for r in results],
    }
    (folder / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return folder


# -- command line ---------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="the CPU path: tiny random models, few repeats")
    parser.add_argument("--models", default=None,
                        help=f"comma list (default on CUDA: {', '.join(gpu_models())}; otherwise {', '.join(SMOKE_MODELS)})")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="visual tokens kept (default %(default)s)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--warmup", type=int, default=None, help="untimed passes per cell after the first try (default: 3 on CUDA, 0 on CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed passes per cell (default: 20 on CUDA, 2 on CPU)")
    parser.add_argument("--out", default="reports/gpu", help="report folder; a subfolder per device (default %(default)s)")
    parser.add_argument("--results", default="results", help="results store for the profile records (default %(default)s)")
    parser.add_argument("--selectors", default=str(SELECTOR_CACHE),
                        help="where the random selector checkpoints are kept between runs (default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=os.environ.get("GPU_CHECK_ENTRY", "python -m benchmarks.gpu_check"),
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    command = " ".join([os.environ.get("GPU_CHECK_ENTRY", "python -m benchmarks.gpu_check"), *map(shlex.quote, argv)])
    try:
        budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        parser.error(f"--budgets {args.budgets!r}: give token counts, e.g. 576,192,128,64")
    if (args.repeats is not None and args.repeats < 1) or (args.warmup is not None and args.warmup < 0):
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    mode = choose_mode(args)
    if mode.device == "cpu":
        torch.set_num_threads(1)  # toy widths on a shared CPU: one thread is fastest and steadiest
    if mode.name == "gpu" and mode.repeats < 20:
        print(f"note: {mode.repeats} timed passes; the GPU check asks for at least 20", file=sys.stderr)
    store = ResultStore(args.results)
    store.check_writable()
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{(time.perf_counter() - start) / 60:5.1f} min] {message}", file=sys.stderr, flush=True)

    env = environment(torch.device(mode.device), command)
    log(f"{env['device']} ({mode.name}): {', '.join(mode.models)}")
    results = [check_model(m, mode, budgets, store, Path(args.selectors), command, log) for m in mode.models]
    wall = (time.perf_counter() - start) / 60
    checks = targets(results, wall, mode)
    folder = write_report(Path(args.out), env, mode, results, checks, wall)
    for check in checks:
        print(check.line())
    print(f"report: {folder}/README.md ({wall:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
