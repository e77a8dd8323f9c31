"""The papers' protocols as recipes for `prunebench reproduce NAME`.

A recipe fixes what the pruning papers fixed for one model: the checkpoint, the lmms-eval tasks on
their full splits, the methods at the settings and budgets the papers print, batch 1 and the
papers' precision. It runs as a few `prunebench run` invocations into one results store, so it
resumes as `run` does (finished cells are kept), and ends with the parity table
(prunebench.report.reference). What the papers print that a recipe does not run is listed with the
reason.

The plan (``--dry-run``) needs neither weights nor lmms-eval: the datasets each task reads are
written here (a test checks them against lmms-eval's task configs), the model's size comes from its
profiler preset built on the meta device, and the GPU time from a roofline lower bound and, when
the store holds GPU profile records of that preset, from their measured times.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from prunebench.budget import Budget
from prunebench.engine.method import create_method, parse_method_list
from prunebench.errors import UserError
from prunebench.results import Record, ResultStore
from prunebench.run import taskspec


class RecipeError(UserError, ValueError):
    """An unknown recipe, a task it does not run, or inputs it needs and this machine lacks."""


@dataclass(frozen=True)
class TaskPlan:
    task: str  # lmms-eval task, full split
    dataset: str | None  # the hub dataset lmms-eval 0.7.3 reads for it (None: prunebench's generated tasks)
    questions: int  # size of the split (approximate where the dataset card rounds it): for the estimate


TASK_PLANS = {plan.task: plan for plan in (
    TaskPlan("gqa", "lmms-lab-encoder/GQA", 12578),  # testdev-balanced, as LLaVA's script
    TaskPlan("mmbench_en_dev_static", "lmms-lab-encoder/MMBench", 4329),
    TaskPlan("mme", "lmms-lab-encoder/MME", 2374),
    TaskPlan("pope", "lmms-lab-encoder/POPE", 9000),  # adversarial, popular, random: 3000 each
    TaskPlan("scienceqa_img", "lmms-lab-encoder/ScienceQA", 2017),
    TaskPlan("textvqa_val", "lmms-lab-encoder/textvqa", 5000),
    TaskPlan("mmmu_val", "lmms-lab-encoder/MMMU", 900),
    TaskPlan("seedbench", "lmms-lab-encoder/SEED-Bench", 18000),  # about 18k rows (dataset card)
)}


@dataclass(frozen=True)
class Recipe:
    name: str
    model: str  # the checkpoint the registry's rows name
    preset: str  # prunebench/profiling/presets: the same geometry with random weights
    description: str
    tasks: tuple[str, ...]
    runs: tuple[tuple[str, str], ...]  # (methods, budgets) of each `prunebench run`
    not_run: tuple[str, ...]  # what the papers print that this recipe does not run, and why
    dtype: str = "float16"
    batch_size: int = 1  # the papers evaluate one request at a time (and batching changes LLaVA's answers)
    image_size: tuple[int, int] = (672, 672)  # the estimate's image on dynamic-resolution models


RECIPES = {recipe.name: recipe for recipe in (
    Recipe(
        name="llava-1.5-7b",
        model="llava-hf/llava-1.5-7b-hf",
        preset="llava-1.5-7b",
        description="LLaVA-1.5-7B at 576/192/128/64 visual tokens, as VisionZip, SparseVLM, DART and PyramidDrop print it",
        tasks=("gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "textvqa_val", "mmmu_val", "seedbench"),
        runs=(
            ("fastv,sparsevlm,dart,visionzip", "192,128,64"),
            ("pyramiddrop", "192"),
            ("pyramiddrop:ratios=0.5/0.25/0.125", "all"),  # PyramidDrop's own inference-only setting
        ),
        not_run=(
            "pyramiddrop at 128 and 64: its stages at layers 8/16/24 cannot average below 145 tokens, and the papers "
            "printing PDrop there (SparseVLM, DART) do not state the stages they moved",
            "autoselect: no checkpoint for LLaVA-1.5-7B is published; train one (`prunebench train autoselect`), "
            "run it into the same store (`prunebench run --methods autoselect:ckpt=DIR --budgets 192,128,64`) and "
            "`prunebench report --reference` compares it",
            "VQAv2 and VizWiz: the papers score test-dev on the benchmarks' servers; MM-Vet and LLaVA-Bench need a GPT "
            "judge; MMB-CN, OCRBench, ChartQA and DocVQA are not mapped to lmms-eval tasks yet",
        ),
    ),
    Recipe(
        name="qwen2-vl-7b",
        model="Qwen/Qwen2-VL-7B-Instruct",
        preset="qwen2-vl-7b",
        description="Qwen2-VL-7B keeping 33.3/22.2/11.1 % of the visual tokens, as DART prints it",
        tasks=("gqa", "mmbench_en_dev_static", "mme", "pope", "scienceqa_img", "textvqa_val"),
        runs=(("fastv,dart", "33.3%,22.2%,11.1%"),),
        not_run=("MMB-CN: not mapped to an lmms-eval task yet",),
        dtype="bfloat16",  # the checkpoint's own precision
    ),
)}


def task_plan(task: str) -> TaskPlan:
    if task in taskspec.GENERATED:
        return TaskPlan(task, None, taskspec.GENERATED[task].size)
    return TASK_PLANS[task]


def get_recipe(name: str | None) -> Recipe:
    if name not in RECIPES:
        given = f"unknown recipe {name!r}" if name else "no recipe named"
        raise RecipeError(f"{given}; valid choices: {', '.join(RECIPES)} (`prunebench reproduce --list`)")
    return RECIPES[name]


@dataclass(frozen=True)
class Plan:
    """One recipe on a chosen subset of its tasks, a sample limit and a store."""

    recipe: Recipe
    tasks: tuple[str, ...]
    limit: int | None
    results: str

    def run_commands(self) -> list[list[str]]:
        """The `prunebench run` argument lists, in order."""
        r = self.recipe
        common = ["--model", r.model, "--tasks", ",".join(self.tasks), "--batch-size", str(r.batch_size),
                  "--dtype", r.dtype, "--results", self.results]
        if self.limit is not None:
            common += ["--limit", str(self.limit)]
        return [["run", "--methods", methods, "--budgets", budgets, *common] for methods, budgets in r.runs]

    def cells(self) -> list[tuple[str, str]]:
        """(method spec, budget) per task: the unpruned run first, each once."""
        cells = [("none", "all")]
        for methods, budgets in self.recipe.runs:
            for spec in parse_method_list(methods):
                cells += [(create_method(spec).spec(), str(Budget.parse(b))) for b in budgets.split(",")]
        return list(dict.fromkeys(cells))

    def questions(self, task: str) -> int:
        size = task_plan(task).questions
        return size if self.limit is None else min(size, self.limit)


def make_plan(recipe: Recipe, tasks: str | None, limit: int | None, results: str) -> Plan:
    chosen = tuple(recipe.tasks)
    if tasks:
        chosen = tuple(taskspec.canonical(t) for t in tasks.split(",") if t.strip())
        extra = [t for t in chosen if t not in recipe.tasks]
        if extra or not chosen:
            raise RecipeError(f"--tasks {tasks!r}: recipe {recipe.name} runs {', '.join(recipe.tasks)}")
    if limit is not None and limit <= 0:
        raise RecipeError(f"--limit {limit}: give a positive number of samples")
    return Plan(recipe, chosen, limit, results)


# -- what this machine needs --------------------------------------------------------------------


def model_in_cache(model: str) -> bool:
    """The checkpoint's config and weights are in the local Hugging Face cache (a built-in model or a
    local directory needs nothing)."""
    from huggingface_hub import try_to_load_from_cache

    if model.startswith(("builtin:", "random:")) or Path(model).is_dir():
        return True

    config = try_to_load_from_cache(model, "config.json")
    return isinstance(config, str) and any(Path(config).parent.glob("*.safetensors"))


@dataclass(frozen=True)
class Needs:
    model_cached: bool
    missing_datasets: tuple[str, ...]
    hub: str  # "reachable", "offline" or "unreachable"


def check_needs(plan: Plan) -> Needs:
    datasets = dict.fromkeys(d for t in plan.tasks if (d := task_plan(t).dataset))
    missing = tuple(d for d in datasets if not taskspec.dataset_in_cache(d))
    return Needs(model_in_cache(plan.recipe.model), missing, taskspec.hub_status() if missing else "not needed")


def require(plan: Plan, needs: Needs, size_gb: float) -> None:
    """Fail before any work when the weights are missing, or datasets are missing and cannot be
    downloaded, naming each and the command that fetches it."""
    from huggingface_hub import constants

    problems = []
    if not needs.model_cached:
        problems.append(f"the weights of {plan.recipe.model} (about {size_gb:.1f} GB): `hf download {plan.recipe.model}`")
    if needs.missing_datasets and needs.hub != "reachable":
        problems += [f"dataset {d}: `hf download --repo-type dataset {d}`" for d in needs.missing_datasets]
    if problems:
        hub = "" if needs.hub in ("reachable", "not needed") else f"; the hub is {needs.hub}"
        raise RecipeError(
            f"recipe {plan.recipe.name} needs, in the local Hugging Face cache ({constants.HF_HUB_CACHE}; HF_HOME="
            f"{os.environ.get('HF_HOME', constants.HF_HOME)}){hub}: " + "; ".join(problems)
            + f". `prunebench reproduce {plan.recipe.name} --dry-run` prints the whole plan"
        )


# -- how long it takes ------------------------------------------------------------------------------

# NVIDIA H100 SXM datasheet: dense bf16/fp16 tensor-core peak, HBM3 bandwidth
H100_PEAKS = (989e12, 3.35e12)
DECODE_STEPS = 2  # short answers: the first token comes from the prefill, then a word and EOS
PROMPT_TOKENS = 64  # text tokens around the image, as `prunebench profile` uses


@dataclass(frozen=True)
class Estimate:
    gpu_hours: float
    how: str


def meta_engine(recipe: Recipe):
    """The engine on the recipe's geometry built on the meta device: shapes, no weights."""
    import torch

    from prunebench.engine.generate import PruningEngine
    from prunebench.profiling.presets import build_random_model

    return PruningEngine(build_random_model(recipe.preset, device="meta", dtype=getattr(torch, recipe.dtype)))


def parameters(engine) -> int:
    return sum(p.numel() for p in engine.model.parameters())


def roofline_estimate(plan: Plan, engine, peaks: tuple[float, float] = H100_PEAKS, where: str = "H100 SXM datasheet peaks") -> Estimate:
    """A lower bound: every question's prefill and decode steps at the device's FLOP/s or bandwidth."""
    from prunebench.profiling.flops import (
        DecoderGeometry,
        decode_flops_per_step,
        image_tokens,
        prefill_flops,
        roofline_ms,
        vision_flops,
    )
    from prunebench.profiling.profiler import decoder_weight_bytes

    config = engine.model.config
    height, width = plan.recipe.image_size
    n_visual = image_tokens(config, height, width)
    geometry = DecoderGeometry.from_config(config)
    all_weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    decoder_weights = decoder_weight_bytes(engine)
    seconds = 0.0
    for spec, budget in plan.cells():
        tokens = [PROMPT_TOKENS + n for n in _visual_per_layer(spec, budget, n_visual, engine.adapter.num_layers)]
        flops = prefill_flops(geometry, [tokens]) + vision_flops(config, 1, height, width)
        ms = roofline_ms(flops, all_weights, *peaks)
        ms += DECODE_STEPS * roofline_ms(decode_flops_per_step(geometry, [tokens], 1), decoder_weights, *peaks)
        seconds += ms / 1e3 * sum(plan.questions(t) for t in plan.tasks)
    return Estimate(seconds / 3600, f"a lower bound: each question's prefill and {DECODE_STEPS} decode steps at "
                                    f"{where} ({peaks[0] / 1e12:.0f} TFLOP/s, {peaks[1] / 1e12:.2f} TB/s)")


def _visual_per_layer(spec: str, budget: str, n_visual: int, num_layers: int) -> list[int]:
    """Visual tokens entering each decoder layer under the method's schedule."""
    counts, current = [], n_visual
    stages = [] if spec == "none" else create_method(spec).schedule(n_visual, Budget.parse(budget), num_layers)
    for layer in range(num_layers):
        for stage in stages:
            if (stage.layer or 0) == layer:
                current = stage.keep
        counts.append(current)
    return counts


def measured_estimate(plan: Plan, store: ResultStore) -> Estimate | None:
    """From GPU profile records of the recipe's preset in ``store`` (scripts/gpu_check.sh or
    `prunebench profile --model PRESET` write them): per question the cell's TTFT plus decode steps;
    a cell with no record of its own counts at the unpruned run's time (pruning only shortens it).
    None without an unpruned GPU record."""
    if not store.root.is_dir():
        return None
    name = f"random:{plan.recipe.preset}"
    found: dict[str, dict[tuple[str, str], Record]] = {}
    for record in store.records():
        if record.kind == "profile" and record.key.model == name and record.provenance.get("device_type") == "cuda":
            found.setdefault(record.provenance["device"], {})[(record.key.method, record.key.budget)] = record
    usable = {device: cells for device, cells in found.items() if ("none", "all") in cells}
    if not usable:
        return None
    device, cells = max(usable.items(), key=lambda item: sum(cell in item[1] for cell in plan.cells()))
    questions = sum(plan.questions(t) for t in plan.tasks)
    seconds, timed = 0.0, 0
    for cell in plan.cells():
        timing = cells.get(cell, cells[("none", "all")]).timing
        timed += cell in cells
        seconds += (timing["ttft"] + DECODE_STEPS * timing.get("decode_per_token", 0.0)) / 1e3 * questions
    return Estimate(seconds / 3600, f"profile records of {name} on {device}: TTFT + {DECODE_STEPS} decode steps per "
                                    f"question, {timed} of {len(plan.cells())} cells timed (the others at the unpruned "
                                    "time); model time only")


def describe(plan: Plan, n_parameters: int, needs: Needs, estimates: list[Estimate]) -> str:
    """The dry-run text: cells, downloads, commands, what is not run, and the time."""
    r = plan.recipe
    size_gb = n_parameters * 2 / 1e9
    cells = plan.cells()
    questions = sum(plan.questions(t) for t in plan.tasks)
    limit = "full splits" if plan.limit is None else f"the first {plan.limit} samples of each task"
    lines = [
        f"recipe {r.name}: {r.description}",
        f"model: {r.model} ({n_parameters / 1e9:.2f} B parameters, about {size_gb:.1f} GB in 16-bit); "
        f"in the local cache: {'yes' if needs.model_cached else 'no'}",
        f"protocol: lmms-eval tasks on {limit}, batch {r.batch_size}, {r.dtype}",
        "tasks (dataset, questions):",
    ]
    for task in plan.tasks:
        dataset = task_plan(task).dataset
        cached = "" if dataset is None else "  missing" if dataset in needs.missing_datasets else "  cached"
        lines.append(f"  {task:<24} {dataset or 'generated by prunebench':<32} {plan.questions(task):>6}{cached}")
    lines.append(f"cells: {len(plan.tasks)} tasks x {len(cells)} (method, budget) = {len(plan.tasks) * len(cells)}, "
                 f"{questions * len(cells):,} questions:")
    lines += [f"  {spec} @ {budget}" for spec, budget in cells]
    lines.append("commands (each resumable; run again to continue):")
    lines += ["  prunebench " + shlex.join(argv) for argv in plan.run_commands()]
    lines.append(f"  prunebench report --results {plan.results} --model {r.model} --reference")
    lines.append("not run:")
    lines += [f"  - {why}" for why in r.not_run]
    lines.append("GPU time:")
    lines += [f"  {e.gpu_hours:.1f} GPU hours: {e.how}" for e in estimates]
    if len(estimates) == 1:
        lines.append(f"  (a measured estimate needs GPU profile records of random:{r.preset} in {plan.results}: "
                     f"`scripts/gpu_check.sh --models {r.preset}` writes them)")
    if needs.missing_datasets:
        lines.append(f"downloads: {', '.join(needs.missing_datasets)} (lmms-eval fetches them on first use; the hub is "
                     f"{needs.hub})")
    return "\n".join(lines)


