"""`prunebench run`: methods x budgets x tasks through lmms-eval, one record per cell, resumable.

Every input is checked before any cell runs: the command line, task names, every --task-data
file (read as its task reads it, prunebench.run.taskdata), the results folders, the model, every
(method, budget) schedule against its depth and visual tokens, the methods it can serve, and the
questions against its positions. A record's key digests the contents behind its cell
(prunebench.run.inputs), so a changed input is a new record. The unpruned baseline runs once per
(model, task) and is reused by every method. A finished cell is never recomputed unless
``--force``; a cell another live run is computing is skipped, naming its lock. A failing cell
stops the run with its error: nothing turns into an empty answer, and the records already
written stay.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean

import torch

from prunebench.budget import Budget, BudgetError
from prunebench.engine.method import Method, MethodError, check_stages, create_method, parse_method_list
from prunebench.errors import UserError
from prunebench.models.loading import DTYPES
from prunebench.results import Record, RecordKey, ResultStore, cell_fields, cpu_name, provenance
from prunebench.run import distributed, inputs, taskspec
from prunebench.run.console import LOG_NAME, RunProgress, lmms_eval_output
from prunebench.run.taskdata import TaskData, check_task_data

# the trained tiny LLaVA shipped in prunebench/models/assets (README "Status" gives its accuracy)
DEFAULT_MODEL = "builtin:tiny-llava"
# on the default model: every method, and why it runs with these options (`prunebench list` shows them)
BUILTIN_DEFAULTS = {
    "none": "the unpruned baseline",
    "random": "the chance level of selection at each budget",
    "fastv": "the paper's layer 2: pruned after 2 of the 4 layers, so K = 64 costs ~320 layer-averaged tokens "
             "(Tokens (eq.) and the floor row say what that measures)",
    "sparsevlm:layers=0/1/2": "the paper's scoring layers 2/6/15 do not fit 4 layers; scoring at 0/1/2 prunes before "
                              "1/2/3, each ranked by the question tokens; its published schedules are nominal",
    "pyramiddrop:layers=1/2/3": "the paper's 8/16/24 of 32 at the same relative depth: every stage ranks hidden states "
                                "a layer has mixed (a stage at layer 0 ranks raw input embeddings and falls below "
                                "random); layer 0 sees all 576 tokens, so budgets under 145 are out of reach (-)",
    "dart": "the paper's layer 2, as FastV",
    "visionzip": "the paper's settings (pre-LLM)",
    "divprune": "the paper's settings (pre-LLM)",
    "vispruner": "the official code's default split (half important by CLS attention, half diverse; pre-LLM)",
    "cdpruner:text=llm": "the built-in model has no CLIP text tower: relevance from its LLM's embeddings of the "
                         "question, as OpenVINO's port for models without one (text=clip is the official path)",
    "pool": "average pooling of the projected 24x24 grid to the largest grid of at most K cells (sides <= 2:1)",
    "autoselect": "the checkpoint shipped for this model and budget (trained at that K, dropping tokens as inference "
                  "does)",
    "gumbel": "the checkpoint shipped for this model",
}
BUILTIN_METHODS = ",".join(BUILTIN_DEFAULTS)
# on any other model: every training-free method at its paper's settings (learned ones need ckpt=)
TRAINING_FREE_METHODS = "none,random,fastv,sparsevlm,pyramiddrop,dart,visionzip,divprune"


def default_methods(model: str) -> str:
    return BUILTIN_METHODS if model == DEFAULT_MODEL else TRAINING_FREE_METHODS


def default_batch_size(model: str) -> int:
    """16 on the built-in model (its samples are tiny; answers do not depend on the batch, see
    tests/engine/test_batching.py); 1 elsewhere, so that timings are per-request latencies."""
    return 16 if model == DEFAULT_MODEL else 1


DEFAULT_TASKS = "synth-gqa,synth-textvqa,synth-pope"
DEFAULT_BUDGETS = "192,128,64"


@dataclass
class RunSettings:
    """Everything `prunebench run` needs; the command line fills it (prunebench.commands.run)."""

    model: str = DEFAULT_MODEL
    revision: str | None = None  # hub branch, tag or commit of the model (records: model@revision)
    trust_remote_code: bool = False  # let the checkpoint run its own code
    methods: str | None = None  # comma list of method specs; None: default_methods(model)
    tasks: str = DEFAULT_TASKS
    budgets: str = DEFAULT_BUDGETS
    limit: int | None = None
    batch_size: int | None = None  # None: default_batch_size(model)
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    results: str = "results"
    task_data: list[str] = field(default_factory=list)  # TASK=PATH items
    max_new_tokens: int | None = None
    force: bool = False
    floor: bool = True  # add each in-LLM method's floor control (budget "floor")
    vision_cache_mb: int | None = None  # None: 0 on GPU, 2048 on CPU
    verbose: bool = False  # lmms-eval's output on the terminal, a line per finished cell
    argv: list[str] = field(default_factory=list)  # the command line, recorded in provenance


@dataclass(frozen=True)
class Cell:
    method: Method
    budget: Budget
    task: str

    @property
    def label(self) -> str:
        return f"{self.method.spec()} @ {self.budget} on {self.task}"


def plan(methods: list[Method], budgets: list[Budget], tasks: list[str], floor: bool = False,
         unreachable: dict[tuple[str, str], str] | None = None) -> list[Cell]:
    """Task by task (the run's cache keeps one task's images): its unpruned baseline, then each
    pruning method at each budget it can reach (``unreachable``: (spec, budget) -> why not), then
    with ``floor`` each in-LLM method's floor control."""
    baseline = create_method("none")
    unreachable = unreachable or {}
    cells = []
    for task in tasks:
        cells.append(Cell(baseline, Budget.all(), task))
        for method in methods:
            if method.stage != "none":
                cells += [Cell(method, budget, task) for budget in budgets
                          if (method.spec(), str(budget)) not in unreachable]
        if floor:
            cells += [Cell(method, Budget.floor_control(), task) for method in methods if method.stage == "llm"]
    return cells


@dataclass(frozen=True)
class ModelFacts:
    """What the schedules and prompts are checked against before any work."""

    name: str
    num_layers: int
    n_visual: int  # visual tokens of one image (the most one image gives when ``varies``)
    varies: bool  # the count depends on the image (LLaVA-NeXT, Qwen-VL, ...)


def check_schedules(methods: list[Method], budgets: list[Budget], model: ModelFacts,
                    floor: bool = False) -> dict[tuple[str, str], str]:
    """Check every (method, budget) on this model before any cell runs (a method's other needs, a
    signal or a checkpoint's width, are probed by ``servable_methods``); returns the pairs whose
    budget the method's schedule cannot meet here ((spec, budget) -> the reason): they are not run,
    and the report shows them as "–" with the reason. Refused: any other schedule error, a method
    that meets none of the budgets, a budget no method meets, and a floor control that cannot run.

    ``model.varies``: the visual tokens depend on the image (LLaVA-NeXT, Qwen-VL) and ``n_visual``
    is the most one image can give; a budget is checked against that image, so the layer checks
    hold for every image and a K no image can meet fails here. An image with fewer tokens than an
    absolute K fails when it is reached, naming the sample (prunebench.run.lmms_bridge); records
    already written stay.
    """
    tokens = f"up to {model.n_visual} visual tokens per image" if model.varies else f"{model.n_visual} visual tokens"

    def context(method: Method, budget: Budget, err: Exception) -> str:
        return f"{method.spec()} at budget {budget} on {model.name} ({tokens}, {model.num_layers} decoder layers): {err}"

    failed: dict[tuple[int, Budget], BudgetError] = {}
    for i, method in enumerate(methods):
        for budget in [*budgets, *([Budget.floor_control()] if floor and method.stage == "llm" else [])]:
            try:
                check_stages(method, method.stages(model.n_visual, budget, model.num_layers), model.n_visual,
                             model.num_layers)
            except MethodError as err:
                raise MethodError(context(method, budget, err)) from None
            except BudgetError as err:
                if budget.floor:
                    raise BudgetError(context(method, budget, err)) from None
                failed[(i, budget)] = err
    pruning = [i for i, m in enumerate(methods) if m.stage != "none"]
    refused = [(i, budgets[0]) for i in pruning if budgets and all((i, b) in failed for b in budgets)]
    refused += [(pruning[0], b) for b in budgets if pruning and all((i, b) in failed for i in pruning)]
    if refused:
        i, budget = refused[0]
        raise BudgetError(context(methods[i], budget, failed[(i, budget)]))
    return {(methods[i].spec(), str(budget)): f"{err} ({tokens}, {model.num_layers} decoder layers)"
            for (i, budget), err in failed.items()}


def check_prompts(data: TaskData, processor, model: ModelFacts, max_positions: int | None) -> None:
    """Every question of a --task-data file the run evaluates fits the model's positions, image
    tokens included (where the count varies per image, the bridge checks each batch instead)."""
    if max_positions is None or model.varies:
        return
    from prunebench.run.lmms_bridge import build_prompt, check_prompt_length

    tokenizer = processor.tokenizer
    for row, text in data.questions:
        length = len(tokenizer(build_prompt(processor, text))["input_ids"]) - 1 + model.n_visual
        check_prompt_length(length, max_positions, f"--task-data {data.task}={data.path} row {row}")


def _model_facts(name: str, engine, processor) -> ModelFacts:
    from prunebench.profiling.flops import max_image_tokens

    config = engine.model.config
    n_visual = max_image_tokens(config, getattr(processor, "image_processor", None))
    return ModelFacts(name, engine.adapter.num_layers, n_visual, config.model_type != "llava")


def _listed(flag: str, text: str, parse) -> list:
    """A comma list of a flag: no empty item, no item twice."""
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or not all(items):
        raise UserError(f"{flag} {text!r}: give a comma-separated list with no empty item")
    values = [parse(item) for item in items]
    twice = sorted({str(v) for v in values if values.count(v) > 1})
    if twice:
        raise UserError(f"{flag} {text!r}: {', '.join(twice)} given twice")
    return values


@dataclass
class Inputs:
    """A run's inputs, all checked: what `run` computes from."""

    methods: list[Method]
    budgets: list[Budget]
    tasks: list[str]
    task_data: dict[str, TaskData]
    device: str
    store: ResultStore


def check_inputs(args: RunSettings, world: distributed.World) -> Inputs:
    """Everything that can be checked without the model: the command line, the task names and
    every --task-data file (opened and read as the task reads it), the results folder."""
    listed = default_methods(args.model) if args.methods is None else args.methods
    methods = [create_method(spec) for spec in parse_method_list(listed)]
    specs = [m.spec() for m in methods]
    if twice := sorted({spec for spec in specs if specs.count(spec) > 1}):
        raise MethodError(f"--methods: {', '.join(twice)} given twice")
    budgets = _listed("--budgets", args.budgets, Budget.parse)
    tasks = _listed("--tasks", args.tasks, taskspec.canonical)
    paths = taskspec.parse_task_data(args.task_data, tasks)
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: give a positive number of samples")
    if args.batch_size is None:
        args.batch_size = default_batch_size(args.model)
    if args.batch_size <= 0:
        raise UserError(f"--batch-size {args.batch_size}: must be positive")
    if args.max_new_tokens is not None and args.max_new_tokens <= 0:
        raise UserError(f"--max-new-tokens {args.max_new_tokens}: must be positive")
    if args.vision_cache_mb is not None and args.vision_cache_mb < 0:
        raise UserError(f"--vision-cache-mb {args.vision_cache_mb}: give 0 (off) or a positive size in MB")
    if not args.results.strip():
        raise UserError("--results '': give a results folder (default: results)")
    if args.dtype != "auto" and args.dtype not in DTYPES:
        raise UserError(f"--dtype {args.dtype}: unknown; valid choices: auto, {', '.join(DTYPES)}")
    device = _device(args.device, world)
    store = ResultStore(args.results)
    store.check_writable()
    taskspec.check_known(tasks)
    for task in tasks:
        taskspec.check_data_reachable(task, paths.get(task))
    task_data = {task: check_task_data(task, path, args.limit) for task, path in paths.items()}
    return Inputs(methods, budgets, tasks, task_data, device, store)


def run(args: RunSettings) -> list[Record]:
    """Check every input, then run every cell; returns the records of this run's cells (cached or
    computed)."""
    from rich.console import Console
    from rich.markup import escape

    world = distributed.current()
    # the real stderr, bound now: lmms-eval's output is redirected to a log while cells run
    console = Console(file=sys.stderr, quiet=not world.main)
    # our own progress display replaces the datasets / lmms-eval / transformers bars
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("LOGURU_LEVEL", "WARNING")  # lmms-eval's task indexing logs at DEBUG
    if not args.verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" of a local model (downloads keep theirs)
    # 1. everything that can be checked without the model
    checked = check_inputs(args, world)
    store, device = checked.store, checked.device
    distributed.init(world, device)

    # 2. the model (a missing checkpoint fails here, within seconds), and what depends on it
    from prunebench.engine.generate import PruningEngine
    from prunebench.models.loading import cpu_dtype, load_model
    from prunebench.run.servable import servable_methods

    dtype = args.dtype if args.dtype != "auto" else ("float16" if device.startswith("cuda") else cpu_dtype())
    model, processor = load_model(args.model, device=device, dtype=dtype, revision=args.revision,
                                  trust_remote_code=args.trust_remote_code)
    engine = PruningEngine(model, processor.tokenizer)
    facts = _model_facts(args.model, engine, processor)
    unreachable = check_schedules(checked.methods, checked.budgets, facts, args.floor)
    methods = servable_methods(checked.methods, engine, processor, args.model, listed=args.methods is not None,
                               note=console.print)
    for data in checked.task_data.values():
        check_prompts(data, processor, facts, engine.adapter.max_positions)

    # 3. the cells, keyed by their inputs' contents; the stored ones must be readable
    cells = plan(methods, checked.budgets, checked.tasks, args.floor, unreachable)
    keys, cell_inputs = _keys(cells, args, processor, checked.task_data)
    store.check_writable(keys)
    stored = {} if args.force else {key: store.load(key) for key in keys if store.has(key)}
    _check_stored_dtypes(store, stored, dtype)
    if args.vision_cache_mb is None:
        args.vision_cache_mb = 0 if device.startswith("cuda") else 2048
    provenance = _provenance(args, device, dtype)
    finished = []
    from prunebench.run.lmms_bridge import RunCache

    cache = RunCache(args.vision_cache_mb << 20)
    chosen = " (the default here; --dtype to change)" if args.dtype == "auto" else ""
    console.print(f"{args.model} on {device} in {dtype}{chosen}: {len(cells)} cell{'s' * (len(cells) != 1)}, "
                  f"results in {escape(str(store.root))}"
                  + ("" if args.verbose else f" (lmms-eval's log: {escape(str(store.root / LOG_NAME))})"))
    if world.main:
        finished += _record_unreachable(store, unreachable, methods, checked.tasks, args, processor,
                                        checked.task_data, provenance, console)
    with RunProgress(console, len(cells), args.verbose) as progress:
        for cell, key, described in zip(cells, keys, cell_inputs):
            cache.start_task(cell.task)
            progress.start_cell(cell.label)
            try:
                action = distributed.broadcast(_decide(store, key, args.force, cell, progress) if world.main else None,
                                               world)
                if action == "cached":
                    finished.append(stored[key] if key in stored else store.load(key))  # or finished meanwhile
                    progress.finish_cell(cell.label, "cached")
                    continue
                if action == "busy":
                    progress.finish_cell(cell.label, "skipped")
                    continue
                spec = taskspec.task_spec(cell.task, _data_path(checked.task_data, cell.task),
                                          Path(store.root) / ".task-data")
                with lmms_eval_output(store.root, args.verbose), \
                        store.heartbeat(key) if world.main else contextlib.nullcontext():
                    record, samples = evaluate_cell(cell, key, spec, engine, processor, args,
                                                    {**provenance, "inputs": described}, progress, world, cache)
                if world.main:
                    store.write(record, samples)
            finally:  # the lock, if this run took it: SIGTERM and Ctrl-C land here too
                if world.main:
                    store.release(key)
            if world.main:
                finished.append(record)
                progress.finish_cell(cell.label, f"{record.primary_metric} = {record.score:.4g}")
    if world.main and finished:
        from prunebench.report.build import print_summary

        print_summary(finished, store, Console())
    distributed.finish(world)
    return finished


def _data_path(task_data: dict[str, TaskData], task: str) -> str | None:
    return str(task_data[task].path) if task in task_data else None


def _keys(cells: list[Cell], args: RunSettings, processor, task_data: dict[str, TaskData]):
    """Each cell's record key, its ``inputs`` a digest of the contents behind the cell
    (prunebench.run.inputs), and those contents as the record's provenance describes them."""
    shared = {"model": inputs.model_digest(args.model, args.revision), "prompt": inputs.prompt_digest(processor),
              "decoding": {"max_new_tokens": args.max_new_tokens, "seed": args.seed}}
    model_name = args.model + (f"@{args.revision}" if args.revision else "")  # another revision, other records
    method_parts = {cell.method.spec(): inputs.method_digest(cell.method) for cell in cells}
    keys, described = [], []
    for cell in cells:
        data = task_data.get(cell.task)
        parts = {**shared, "task": data.sha256 if data else None, "method": method_parts[cell.method.spec()]}
        keys.append(RecordKey(model_name, cell.method.spec(), str(cell.budget), cell.task, args.limit,
                              inputs=inputs.key_digest(parts)))
        described.append({**parts, **({"task_data": data.describe()} if data else {})})
    return keys, described


def _record_unreachable(store: ResultStore, unreachable: dict[tuple[str, str], str], methods: list[Method],
                        tasks: list[str], args: RunSettings, processor, task_data: dict[str, TaskData],
                        provenance: dict, console) -> list[Record]:
    """An "unreachable" record per task for each (method, budget) not run, with the reason, so
    that the report shows the cell as "–" and says why."""
    from rich.markup import escape

    by_spec = {m.spec(): m for m in methods}  # a method dropped as not servable has no cells at all
    pairs = [(spec, budget) for spec, budget in unreachable if spec in by_spec]
    cells = [Cell(by_spec[spec], Budget.parse(budget), task) for spec, budget in pairs for task in tasks]
    keys, _ = _keys(cells, args, processor, task_data)
    for spec, budget in pairs:
        console.print(f"[yellow]not run[/] {escape(spec)} @ {budget}: {escape(unreachable[spec, budget])}")
    written = []
    for cell, key in zip(cells, keys):
        record = Record(key=key, kind="unreachable",
                        **{k: v for k, v in cell_fields(cell.method, cell.budget, 0, 0, 0).items() if k != "visual_tokens"},
                        provenance={**provenance, "reason": unreachable[cell.method.spec(), str(cell.budget)]})
        store.write(record)
        written.append(record)
    return written


def _check_stored_dtypes(store: ResultStore, stored: dict[RecordKey, Record], dtype: str) -> None:
    """Refuse, before computing anything, to reuse cells stored in another precision: one table
    would mix them (the default precision depends on the device)."""
    for key, record in stored.items():
        if (other := record.provenance.get("dtype", dtype)) != dtype:
            raise UserError(
                f"{store.record_path(key)} was computed in {other} and this run uses {dtype}: pass --dtype {other} "
                f"to reuse the stored cells, --force to recompute them in {dtype}, or another --results directory")


def _decide(store: ResultStore, key: RecordKey, force: bool, cell: Cell, progress: RunProgress) -> str:
    """"cached" (a record exists), "busy" (another live run holds the cell) or "run" (claimed),
    saying so when a lock is taken over or held elsewhere."""
    from rich.markup import escape

    if store.has(key) and not force:
        return "cached"
    claim = store.claim(key, force)
    if claim.notice:
        progress.notice(f"[yellow]{escape(claim.notice)}[/]")
    if claim.acquired:
        return "run"
    holder = claim.holder.describe() if claim.holder else "another run"
    progress.notice(f"[yellow]skipped[/] {escape(cell.label)}: {escape(holder)} is computing it "
                    f"(lock {escape(str(claim.lock))}; --force recomputes it anyway)")
    return "busy"


def evaluate_cell(cell: Cell, key: RecordKey, spec, engine, processor, args, provenance: dict,
                  progress: RunProgress | None, world: distributed.World, cache=None):
    """Run one cell through lmms-eval; returns its record and per-sample rows (None off rank 0)."""
    from lmms_eval import evaluator

    from prunebench.run.lmms_bridge import PrunedVLM, RunCache

    cache = cache or RunCache()
    reused_before = cache.hits
    lm = PrunedVLM(engine, processor, None if cell.method.stage == "none" else cell.method, cell.budget,
                   batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                   on_progress=progress.advance_samples if progress else None,
                   on_requests=progress.set_samples if progress else None, cache=cache)
    torch.manual_seed(args.seed)
    # lmms-eval's "Postprocessing" bar passes disable= itself, so TQDM_DISABLE cannot hide it
    show_bar = evaluator.tqdm
    evaluator.tqdm = lambda *a, **kw: show_bar(*a, **{**kw, "disable": True})
    try:
        out = evaluator.simple_evaluate(
            model=lm, tasks=[spec], limit=args.limit, log_samples=True, task_manager=taskspec.manager_for([cell.task]),
            verbosity="ERROR", random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
            fewshot_random_seed=args.seed, bootstrap_iters=0,
            # score answers on docs without their images, as lmms-eval's own CLI does by default
            # (decoding every image again cost ~0.6 s a cell on the built-in tasks)
            cli_args=argparse.Namespace(process_with_media=False),
            # plain torch.distributed collectives: lmms-eval's accelerate path fails to gather 0-d counts
            distributed_executor_backend="torchrun",
        )
    finally:
        evaluator.tqdm = show_bar
    all_stats = {k: v for part in distributed.gather(lm.stats, world) for k, v in part.items()}
    if not world.main:
        return None, None
    (result_name,) = out["results"].keys()
    metrics = {k.split(",")[0]: v for k, v in out["results"][result_name].items()
               if "," in k and "_stderr" not in k and isinstance(v, (int, float))}
    metric_list = out["configs"][result_name].get("metric_list") or [{}]
    primary = metric_list[0].get("metric") or next(iter(metrics))
    logged = sorted(out["samples"][result_name], key=lambda s: s["doc_id"])  # ranks interleave under DP
    samples = [_sample(s, all_stats.get((result_name, s["doc_id"]))) for s in logged]
    stats = [all_stats[k] for k in sorted(all_stats)]
    record = Record(
        key=key,
        metrics=metrics,
        primary_metric=primary,
        n_samples=len(samples),
        **cell_fields(cell.method, cell.budget, kept=mean(s.visual_tokens[-1] for s in stats),
                      equivalent=mean(mean(s.visual_tokens) for s in stats), original=mean(s.n_visual for s in stats)),
        timing=_timing(stats) | _prefill_tflops(engine, stats),
        # batches whose vision output (and its measured time) came from an earlier cell of the run
        provenance={**provenance, "lmms_eval_task": result_name, "vision_reused_batches": cache.hits - reused_before},
    )
    return record, samples


def _sample(logged: dict, stats) -> dict:
    scores = {}
    for name, value in logged.items():
        if isinstance(value, dict) and isinstance(value.get("score"), (int, float)):
            scores[name] = value["score"]
        elif isinstance(value, (int, float)) and name not in ("doc_id",):
            scores[name] = value
    output = logged.get("filtered_resps") or logged.get("resps")
    while isinstance(output, list) and output:
        output = output[0]
    row = {
        "doc_id": logged["doc_id"],
        "output": output,
        "target": logged.get("target"),
        "scores": scores,
        "visual_tokens": None if stats is None else stats.visual_tokens,
    }
    # MME scores image pairs within categories: the report's intervals resample by them
    for name in ("category", "question_id"):
        value = (logged.get("doc") or {}).get(name)
        if isinstance(value, (str, int)):
            row[name] = value
    return row


def _timing(stats) -> dict[str, float]:
    def avg(name: str) -> float:
        return mean(s.timing.get(name, 0.0) for s in stats)

    vision, pruner, prefill = avg("vision"), avg("pruner"), avg("prefill")
    decode_steps = [max(s.new_tokens - 1, 1) for s in stats]
    return {
        "vision": vision,
        "pruner": pruner,
        "prefill": prefill,
        "ttft": vision + pruner + prefill,
        "decode_per_token": mean(s.timing.get("decode", 0.0) / n for s, n in zip(stats, decode_steps)),
    }


DEVICES = "auto, cpu, cuda, cuda:N, mps"


def _prefill_tflops(engine, stats) -> dict[str, float]:
    """Mean per-sample LLM prefill TFLOPs at the tokens each layer saw (prunebench.profiling.flops),
    as `prunebench profile` counts them; nothing for a decoder the FLOPs model does not cover."""
    from prunebench.profiling.flops import DecoderGeometry, prefill_flops

    try:
        geometry = DecoderGeometry.from_config(engine.model.config)
    except NotImplementedError:
        return {}
    flops = [prefill_flops(geometry, [[s.prompt_tokens - s.n_visual + v for v in s.visual_tokens]]) for s in stats]
    return {"tflops": mean(flops) / 1e12}


def _device(name: str, world: distributed.World) -> str:
    if name == "auto":
        return f"cuda:{world.local_rank}" if torch.cuda.is_available() else "cpu"
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (colon and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"--device {name!r}: unknown device; valid: {DEVICES}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    return name


def _provenance(args, device: str, dtype: str) -> dict:
    return provenance(
        device=torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        dtype=dtype,
        command=shlex.join(["prunebench", *(args.argv or sys.argv[1:])]),
        seed=args.seed,
        batch_size=args.batch_size,
        vision_cache_mb=args.vision_cache_mb,
        world_size=distributed.current().size,
    )
