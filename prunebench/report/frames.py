"""Records as pandas frames: which cells exist, their labels, scores and timings.

Shared by every table and plot of `prunebench report`. Rows are (method, budget) pairs grouped
by budget ("Unpruned (576 tokens)", "Retain 192 tokens (-66.7%)", ...); columns are tasks on
their paper metric and native scale (fractions shown x100; MME is perception alone, ~1500,
never summed with cognition).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from prunebench.budget import Budget, BudgetError
from prunebench.errors import UserError
from prunebench.report import stats
from prunebench.results import Record
from prunebench.tasks import GENERATED

BASELINE = ("none", "all")  # (method, budget) of the unpruned reference run
FLOOR = "floor"  # the budget of an in-LLM method's floor control (prunebench.budget)


class ReportError(UserError, ValueError):
    """The store or the request cannot produce a report; the message says why."""


@dataclass(frozen=True)
class TaskInfo:
    display: str
    metric: str  # lmms-eval metric reported, without the ",none" filter suffix


# In the column order of the papers' tables (REFERENCE.md section 3); unknown tasks follow by name.
TASKS: dict[str, TaskInfo] = {
    "gqa": TaskInfo("GQA", "exact_match"),
    "mmbench_en_dev_static": TaskInfo("MMB", "gpt_eval_score"),
    "mme": TaskInfo("MME-P", "mme_perception_score"),
    "pope": TaskInfo("POPE", "pope_f1_score"),
    "scienceqa_img": TaskInfo("SQA-IMG", "exact_match"),
    "vqav2_val": TaskInfo("VQAv2", "exact_match"),
    "textvqa_val": TaskInfo("TextVQA", "exact_match"),
    "seedbench": TaskInfo("SEED-I", "seed_image"),
    "mmmu_val": TaskInfo("MMMU", "mmmu_acc"),
}


METHOD_NAMES = {
    "none": "Vanilla",
    "random": "Random",
    "fastv": "FastV",
    "sparsevlm": "SparseVLM",
    "visionzip": "VisionZip",
    "dart": "DART",
    "divprune": "DivPrune",
    "pyramiddrop": "PyramidDrop",
    "autoselect": "AutoSelect",
    "gumbel": "Gumbel AE",
    "cdpruner": "CDPruner",
    "vispruner": "VisPruner",
    "pool": "Pool",
}


def task_name(task: str) -> str:
    return TASKS[task].display if task in TASKS else task


def method_name(spec: str) -> str:
    """'fastv:layer=3' -> 'FastV (layer=3)'; unknown methods keep their name."""
    name, _, options = spec.partition(":")
    display = METHOD_NAMES.get(name, name)
    return f"{display} ({options})" if options else display


def one_model(records: Iterable[Record], kinds: tuple[str, ...]) -> list[Record]:
    chosen = [r for r in records if r.kind in kinds]
    models = sorted({r.key.model for r in chosen})
    if len(models) > 1:
        raise ReportError(f"a table covers one model; these records hold {', '.join(models)}")
    return chosen


def budget_order(budget: str) -> tuple[int, float]:
    try:
        parsed = Budget.parse(budget)
    except BudgetError as err:
        raise ReportError(f"record budget {budget!r}: {err}") from None
    if parsed.is_all:
        return (0, 0.0)
    if parsed.floor:
        return (3, 0.0)
    return (1, -parsed.tokens) if parsed.tokens is not None else (2, -parsed.fraction)


def cell_index(records: list[Record]) -> dict[tuple[str, str, str], Record]:
    """(method, budget, task) -> record; two sample limits or two task data files for one cell are ambiguous."""
    cells: dict[tuple[str, str, str], Record] = {}
    for rec in records:
        cell = (rec.key.method, rec.key.budget, rec.key.task)
        if cell in cells:
            limits = sorted({_limit_name(r.key.limit) for r in (cells[cell], rec)})
            if len(limits) == 1:
                raise ReportError(
                    f"{rec.key.model}: {rec.key.task} / {rec.key.method} @ {rec.key.budget} has records on several "
                    f"task data files ({', '.join(sorted(str(r.key.setting or 'the task own') for r in (cells[cell], rec)))}); "
                    "report each from its own --results store"
                )
            raise ReportError(
                f"{rec.key.model}: {rec.key.task} / {rec.key.method} @ {rec.key.budget} has records for "
                f"several sample limits ({', '.join(limits)}); choose one with --limit"
            )
        cells[cell] = rec
    return cells


def _limit_name(limit: int | None) -> str:
    return "full" if limit is None else str(limit)


def paper_metric(task: str) -> str | None:
    """The metric papers report for ``task`` (a generated task inherits its lmms-eval base task's)."""
    base = GENERATED[task].base if task in GENERATED else task
    return TASKS[base].metric if base in TASKS else None


def primary_metrics(records: list[Record]) -> dict[str, str]:
    """task -> the one metric its column shows.

    The papers' metric when every record of the task has it (lmms-eval lists POPE's accuracy first,
    papers report its F1), else the records' own primary metric, which must then agree.
    """
    by_task: dict[str, list[Record]] = {}
    for rec in records:
        by_task.setdefault(rec.key.task, []).append(rec)
    chosen = {}
    for task, recs in by_task.items():
        paper = paper_metric(task)
        if paper is not None and all(paper in r.metrics for r in recs):
            chosen[task] = paper
            continue
        own = {r.primary_metric or paper for r in recs}
        if None in own:
            raise ReportError(f"{task}: a record names no primary metric and the task has no default")
        if len(own) > 1:
            raise ReportError(f"task {task!r} is reported on several primary metrics ({', '.join(sorted(own))})")
        chosen[task] = own.pop()
    return chosen


def task_order(tasks: Iterable[str]) -> list[str]:
    known = list(TASKS)
    return sorted(set(tasks), key=lambda t: (known.index(t) if t in known else len(known), t))


def display_score(rec: Record, metric: str) -> float:
    """The record's score as the tables show it: fractions x100, other scales as they are."""
    if metric not in rec.metrics:
        raise ReportError(f"record {rec.key} has no {metric!r} (it has: {', '.join(rec.metrics) or 'none'})")
    value = float(rec.metrics[metric])
    if stats.metric_info(metric).fraction:
        if value > 1.0 + 1e-9:
            raise ReportError(f"record {rec.key}: {metric} = {value} but lmms-eval reports it as a fraction in [0, 1]")
        return 100.0 * value
    return value


def display_factor(metric: str) -> float:
    return 100.0 if stats.metric_info(metric).fraction else 1.0


def group_k(budget: str, n_original: float | None) -> float | None:
    """The visual tokens a budget group stands for: K, or the fraction of the original count;
    None for the unpruned and floor groups, and a fraction without an original count."""
    parsed = Budget.parse(budget)
    if parsed.is_all or parsed.floor:
        return None
    if parsed.tokens is not None:
        return float(parsed.tokens)
    return parsed.fraction * n_original if n_original else None


def _tokens(rec: Record) -> float:
    """Visual tokens the LLM saw, layer-averaged when the engine counted them."""
    vt = rec.visual_tokens
    for name in ("equivalent", "mean_kept", "nominal", "original"):
        if vt.get(name) is not None:
            return float(vt[name])
    return math.nan


def original_tokens(records: list[Record]) -> float | None:
    base = [r for r in records if (r.key.method, r.key.budget) == BASELINE] or records
    values = [float(r.visual_tokens["original"]) for r in base if r.visual_tokens.get("original") is not None]
    return sum(values) / len(values) if values else None


def group_label(budget: str, n_original: float | None) -> str:
    """'all' -> 'Unpruned (576 tokens)', '192' -> 'Retain 192 tokens (-66.7%)',
    '25%' -> 'Retain 25% of tokens (-75.0%)'."""
    parsed = Budget.parse(budget)
    if parsed.is_all:
        return f"Unpruned ({n_original:.0f} tokens)" if n_original else "Unpruned"
    if parsed.floor:
        return "Floor control (1 token after each in-LLM stage)"
    if parsed.tokens is not None:
        cut = f" (-{100 * (1 - parsed.tokens / n_original):.1f}%)" if n_original else ""
        return f"Retain {parsed.tokens} tokens{cut}"
    return f"Retain {parsed.fraction * 100:g}% of tokens (-{100 * (1 - parsed.fraction):.1f}%)"


def table_rows(records: list[Record]) -> list[tuple[str, str]]:
    """(method, budget) rows: budget groups in table order, the baseline first, then first appearance."""
    seen: dict[tuple[str, str], None] = {}
    for rec in records:
        seen.setdefault((rec.key.method, rec.key.budget), None)
    order = list(seen)
    return sorted(order, key=lambda mb: (budget_order(mb[1]), mb != BASELINE, order.index(mb)))


def row_index(rows: list[tuple[str, str]], n_original: float | None, names: list[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_tuples([(group_label(b, n_original), method_name(m)) for m, b in rows], names=names)


def score_frame(records: Iterable[Record]) -> pd.DataFrame:
    """One row per eval record of one model: score (display scale) and retention vs the unpruned run."""
    evals = one_model(records, ("eval",))
    cells = cell_index(evals)
    metrics = primary_metrics(evals)
    rows = []
    for (method, budget, task), rec in cells.items():
        score = display_score(rec, metrics[task])
        base = cells.get((*BASELINE, task))
        base_score = display_score(base, metrics[task]) if base is not None else math.nan
        retention = 100.0 * score / base_score if base_score != 0.0 and not math.isnan(base_score) else math.nan
        rows.append(
            {
                "method": method,
                "budget": budget,
                "task": task,
                "metric": metrics[task],
                "score": score,
                "baseline": base_score,
                "retention": retention,
                "tokens": _tokens(rec),
                "tflops": float(rec.timing.get("tflops", math.nan)),
                "stage": rec.stage,
                "n": rec.n_samples,
            }
        )
    columns = ["method", "budget", "task", "metric", "score", "baseline", "retention", "tokens", "tflops", "stage", "n"]
    return pd.DataFrame(rows, columns=columns)


TIMINGS = {"vision": "Vision (ms)", "pruner": "Pruner (ms)", "prefill": "Prefill (ms)", "ttft": "TTFT (ms)"}


def _device(rec: Record) -> str:
    """The timing context: device and dtype, plus batch and prompt length for profile records (runs
    with different settings are never averaged together, and speedups stay within one setting)."""
    prov = rec.provenance
    parts = [str(prov.get("device") or "unknown device")] + ([str(prov["dtype"])] if prov.get("dtype") else [])
    if rec.kind == "profile":
        parts += [f"{label} {prov[k]}" for k, label in (("batch_size", "batch"), ("prompt_tokens", "prompt")) if k in prov]
    return ", ".join(parts)


def timing_frame(records: Iterable[Record]) -> pd.DataFrame:
    """Per (method, budget, source, device): sample-weighted mean timings, TFLOPs and tokens.

    Profile records are used where a (method, budget) has any; otherwise the timings eval records carry.
    """
    recs = one_model(records, ("eval", "profile"))
    profiled = {(r.key.method, r.key.budget) for r in recs if r.kind == "profile"}
    groups: dict[tuple[str, str, str, str], list[Record]] = {}
    for rec in recs:
        mb = (rec.key.method, rec.key.budget)
        if (rec.kind == "profile") != (mb in profiled) and mb != BASELINE:
            continue
        groups.setdefault((*mb, rec.kind, _device(rec)), []).append(rec)
    rows = []
    for (method, budget, source, device), group in groups.items():
        weights = [max(r.n_samples, 1) for r in group]
        row = {"method": method, "budget": budget, "source": source, "device": device}
        for name in (*TIMINGS, "tflops"):
            row[name] = _weighted([r.timing.get(name) for r in group], weights)
        row["tokens"] = _weighted([_tokens(r) for r in group], weights)
        row["records"] = len(group)
        rows.append(row)
    columns = ["method", "budget", "source", "device", *TIMINGS, "tflops", "tokens", "records"]
    frame = pd.DataFrame(rows, columns=columns)
    # the baseline is kept for every (source, device) a timed method uses, and only for those
    is_base = (frame["method"] == BASELINE[0]) & (frame["budget"] == BASELINE[1])
    used = set(zip(frame.loc[~is_base, "source"], frame.loc[~is_base, "device"]))
    if used:
        frame = frame[
            ~is_base | pd.Series([sd in used for sd in zip(frame["source"], frame["device"])], index=frame.index)
        ]
        frame = frame.reset_index(drop=True)
    base = frame[(frame["method"] == BASELINE[0]) & (frame["budget"] == BASELINE[1])].set_index(["source", "device"])
    for name in ("prefill", "ttft"):  # speedups only against the baseline timed the same way on the same device
        ref = [
            base[name].get((s, d), math.nan) if (s, d) in base.index else math.nan
            for s, d in zip(frame["source"], frame["device"])
        ]
        frame[f"{name}_speedup"] = np.asarray(ref, dtype=float) / frame[name].astype(float)
    return frame


def _weighted(values: list[Any], weights: list[int]) -> float:
    pairs = [(float(v), w) for v, w in zip(values, weights) if v is not None and not math.isnan(float(v))]
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs else math.nan
