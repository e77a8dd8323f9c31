"""`prunebench report`: paper-style accuracy-retention and speed tables, statistics and plots.

Tables (prunebench.report.tables) are pandas frames of numbers, one per model, rows grouped by budget
("Unpruned (576 tokens)", "Retain 192 tokens (-66.7%)", ...).

- accuracy: each task on its primary metric and native scale (fractions shown x100; MME is
  perception alone, ~1500, never summed with cognition), "Avg." = mean over tasks of
  100 * score / unpruned score, "Agree." = mean over tasks of the share of answers identical to
  the unpruned model's on the same samples; the best per budget group in bold.
- speed: vision / pruner / prefill / TTFT ms, speedups vs the unpruned run measured the same way
  on the same device, TFLOPs, layer-averaged visual tokens; profile records win over the
  timings that eval records carry.
- stats: per cell a 95 % bootstrap interval, agreement, and a paired test against the unpruned
  run (see prunebench.report.stats); ``--compare A B`` pairs two methods.
- categories: per cell the score on each category of the samples (question kinds, POPE's
  splits, MME's subtasks), when the per-sample files carry one.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console

from prunebench.report import stats
from prunebench.engine.budget import Budget, BudgetError
from prunebench.errors import UserError
from prunebench.results import Record, ResultStore, slug
from prunebench.report.tables import FORMATS, Column, Table, print_table, render

BASELINE = ("none", "all")  # (method, budget) of the unpruned reference run


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
}


def task_name(task: str) -> str:
    return TASKS[task].display if task in TASKS else task


def method_name(spec: str) -> str:
    """'fastv:layer=3' -> 'FastV (layer=3)'; unknown methods keep their name."""
    name, _, options = spec.partition(":")
    display = METHOD_NAMES.get(name, name)
    return f"{display} ({options})" if options else display


# ---------------------------------------------------------------------------------------------
# selecting and indexing records


def _one_model(records: Iterable[Record], kinds: tuple[str, ...]) -> list[Record]:
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
    return (1, -parsed.tokens) if parsed.tokens is not None else (2, -parsed.fraction)


def _index(records: list[Record]) -> dict[tuple[str, str, str], Record]:
    """(method, budget, task) -> record; two sample limits for one cell are ambiguous."""
    cells: dict[tuple[str, str, str], Record] = {}
    for rec in records:
        cell = (rec.key.method, rec.key.budget, rec.key.task)
        if cell in cells:
            limits = sorted({_limit_name(r.key.limit) for r in (cells[cell], rec)})
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
    from prunebench.run.taskspec import GENERATED

    base = GENERATED[task].base if task in GENERATED else task
    return TASKS[base].metric if base in TASKS else None


def _primary_metrics(records: list[Record]) -> dict[str, str]:
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


def _task_order(tasks: Iterable[str]) -> list[str]:
    known = list(TASKS)
    return sorted(set(tasks), key=lambda t: (known.index(t) if t in known else len(known), t))


def _display_score(rec: Record, metric: str) -> float:
    """The record's score as the tables show it: fractions x100, other scales as they are."""
    if metric not in rec.metrics:
        raise ReportError(f"record {rec.key} has no {metric!r} (it has: {', '.join(rec.metrics) or 'none'})")
    value = float(rec.metrics[metric])
    if stats.metric_info(metric).fraction:
        if value > 1.0 + 1e-9:
            raise ReportError(f"record {rec.key}: {metric} = {value} but lmms-eval reports it as a fraction in [0, 1]")
        return 100.0 * value
    return value


def _display_factor(metric: str) -> float:
    return 100.0 if stats.metric_info(metric).fraction else 1.0


def _tokens(rec: Record) -> float:
    """Visual tokens the LLM saw, layer-averaged when the engine counted them."""
    vt = rec.visual_tokens
    for name in ("equivalent", "mean_kept", "nominal", "original"):
        if vt.get(name) is not None:
            return float(vt[name])
    return math.nan


def _original_tokens(records: list[Record]) -> float | None:
    base = [r for r in records if (r.key.method, r.key.budget) == BASELINE] or records
    values = [float(r.visual_tokens["original"]) for r in base if r.visual_tokens.get("original") is not None]
    return sum(values) / len(values) if values else None


def group_label(budget: str, n_original: float | None) -> str:
    """'all' -> 'Unpruned (576 tokens)', '192' -> 'Retain 192 tokens (-66.7%)',
    '25%' -> 'Retain 25% of tokens (-75.0%)'."""
    parsed = Budget.parse(budget)
    if parsed.is_all:
        return f"Unpruned ({n_original:.0f} tokens)" if n_original else "Unpruned"
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


def _row_index(rows: list[tuple[str, str]], n_original: float | None, names: list[str]) -> pd.MultiIndex:
    return pd.MultiIndex.from_tuples([(group_label(b, n_original), method_name(m)) for m, b in rows], names=names)


# ---------------------------------------------------------------------------------------------
# accuracy


def score_frame(records: Iterable[Record]) -> pd.DataFrame:
    """One row per eval record of one model: score (display scale) and retention vs the unpruned run."""
    evals = _one_model(records, ("eval",))
    cells = _index(evals)
    metrics = _primary_metrics(evals)
    rows = []
    for (method, budget, task), rec in cells.items():
        score = _display_score(rec, metrics[task])
        base = cells.get((*BASELINE, task))
        base_score = _display_score(base, metrics[task]) if base is not None else math.nan
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
                "n": rec.n_samples,
            }
        )
    columns = ["method", "budget", "task", "metric", "score", "baseline", "retention", "tokens", "n"]
    return pd.DataFrame(rows, columns=columns)


def accuracy_table(records: Iterable[Record], agreement: pd.DataFrame | None = None, title: str | None = None) -> Table:
    """The paper table for one model: tasks, "Avg." retention %, and "Agree." % when ``agreement``
    (an :func:`agreement_frame`) is given."""
    evals = _one_model(records, ("eval",))
    if not evals:
        raise ReportError("no eval records to tabulate")
    scores = score_frame(evals)
    tasks = _task_order(scores["task"])
    rows = table_rows(evals)
    index = _row_index(rows, _original_tokens(evals), ["Budget", "Method"])
    summary = ["Avg."] + (["Agree."] if agreement is not None else [])
    columns = [task_name(t) for t in tasks] + summary
    frame = pd.DataFrame(math.nan, index=index, columns=columns)
    marks = pd.DataFrame("", index=index, columns=columns)
    for cell in scores.itertuples():
        frame.iat[rows.index((cell.method, cell.budget)), tasks.index(cell.task)] = cell.score
    # each summary column: the mean over the row's tasks, marked when some task has no value
    per_task = {"Avg.": scores[["method", "budget", "task", "retention"]].rename(columns={"retention": "value"})}
    if agreement is not None:
        per_task["Agree."] = agreement.assign(value=100.0 * agreement["agreement"])
    for col, values in per_task.items():
        values = values.dropna(subset=["value"])
        for (method, budget), group in values.groupby(["method", "budget"], sort=False):
            i = rows.index((method, budget))
            frame.at[index[i], col] = group["value"].mean()
            if group["task"].nunique() < len(tasks):
                marks.at[index[i], col] = "†"
    notes = []
    if (marks != "").any().any():
        notes.append("† mean over the tasks of the row that have a value; the others are not counted")
    if BASELINE not in rows:
        notes.append("no unpruned (method 'none', budget 'all') records: retention cannot be computed")
    zero = sorted(scores.loc[scores["baseline"] == 0.0, "task"].unique())
    if zero:
        notes.append(f"the unpruned score is 0 on {', '.join(zero)}: no retention there")
    metric = scores.groupby("task")["metric"].first()
    if any(metric[t].startswith("mme_") for t in tasks):
        notes.append(
            "MME-P is lmms-eval's perception score alone (max 2000), not the perception + cognition sum "
            "of the original LLaVA scripts"
        )
    notes.append(
        "metrics: "
        + ", ".join(f"{task_name(t)} {metric[t]}" for t in tasks)
        + "; Avg. = mean over tasks of 100 x score / unpruned score"
    )
    if agreement is not None:
        notes.append(
            "Agree. = mean over tasks of the share of answers identical to the unpruned model's on the same samples"
        )
        if frame["Agree."].isna().any():
            notes.append("Agree. is – where no per-sample answers are shared with the unpruned run")
    spec = {task_name(t): Column("number", _score_decimals(scores, t)) for t in tasks}
    spec.update({col: Column("percent", 1) for col in summary})
    model = evals[0].key.model
    table = Table("accuracy", title or f"{model}: accuracy and retention", frame, spec, marks=marks, notes=notes)
    table.bold = best_in_group(table, skip_groups={index[rows.index(BASELINE)][0]} if BASELINE in rows else set())
    return table


def _score_decimals(scores: pd.DataFrame, task: str) -> int:
    """One decimal, as papers print; an unknown metric that looks like a fraction keeps three."""
    cells = scores[scores["task"] == task]
    metric = cells["metric"].iloc[0]
    if metric not in stats.METRICS and (cells["score"].abs() <= 1.0).all():
        return 3
    return 1


def best_in_group(table: Table, skip_groups: set[str]) -> pd.DataFrame:
    """True where a number is the highest of its budget group, compared as printed (ties all bold).

    Only groups with two or more unmarked values in a column get a bold cell there.
    """
    bold = pd.DataFrame(False, index=table.frame.index, columns=table.frame.columns)
    groups = table.frame.index.get_level_values(0)
    for col in table.frame.columns:
        spec = table.columns[col]
        if spec.kind == "text":
            continue
        for group in dict.fromkeys(groups):
            if group in skip_groups:
                continue
            rows = np.flatnonzero(groups == group)
            values = table.frame[col].iloc[rows].round(spec.decimals)
            eligible = values.notna().to_numpy(copy=True)
            if table.marks is not None:
                eligible &= (table.marks[col].iloc[rows] == "").to_numpy()
            if eligible.sum() < 2:
                continue
            best = values[eligible].max()
            for r, ok, v in zip(rows, eligible, values):
                bold.iat[r, table.frame.columns.get_loc(col)] = bool(ok and v == best)
    return bold


# ---------------------------------------------------------------------------------------------
# agreement and statistics (need the per-sample files)


class _Samples:
    """Per-sample lists and units per record, read once."""

    def __init__(self, store: ResultStore):
        self.store = store
        self._cache: dict[Any, list[dict[str, Any]]] = {}

    def of(self, rec: Record) -> list[dict[str, Any]]:
        if rec.key not in self._cache:
            self._cache[rec.key] = self.store.samples(rec.key)
        return self._cache[rec.key]

    def units(self, rec: Record, metric: str) -> stats.Units:
        samples = self.of(rec)
        where = f"{rec.key.task} / {rec.key.method} @ {rec.key.budget}"
        if not samples:
            raise stats.StatsError(f"{where}: no per-sample file ({self.store.samples_path(rec.key)})")
        return stats.units_from_samples(samples, metric, where)


def agreement_frame(records: Iterable[Record], store: ResultStore) -> pd.DataFrame:
    """Per eval record: samples shared with the unpruned run and how many answers are unchanged."""
    evals = _one_model(records, ("eval",))
    cells = _index(evals)
    samples = _Samples(store)
    rows = []
    for (method, budget, task), rec in cells.items():
        base = cells.get((*BASELINE, task))
        shared, same = stats.agreement(samples.of(rec), samples.of(base)) if base is not None else (0, 0)
        rows.append(
            {
                "method": method,
                "budget": budget,
                "task": task,
                "shared": shared,
                "agreement": same / shared if shared else math.nan,
            }
        )
    return pd.DataFrame(rows, columns=["method", "budget", "task", "shared", "agreement"])


def _category_metric(metric: str, samples: list[dict[str, Any]]) -> str:
    """The metric a category's score is rebuilt on: the task's own, except POPE's F1, which is not
    defined on a category of one answer (a question kind: all "yes" or all "no"): its accuracy."""
    if metric == "pope_f1_score" and all("pope_accuracy" in (s.get("scores") or {}) for s in samples):
        return "pope_accuracy"
    return metric


def category_table(records: Iterable[Record], store: ResultStore) -> Table | None:
    """Per cell, the score on each category of the task's samples (question kinds: GQA's and the
    built-in tasks' kinds, POPE's splits, MME's subtasks), rebuilt from the per-sample files as the
    stats table rebuilds the whole score; None when no task's samples carry a category."""
    evals = _one_model(records, ("eval",))
    cells = _index(evals)
    metrics = _primary_metrics(evals)
    samples = _Samples(store)
    rows = table_rows(evals)
    index = _row_index(rows, _original_tokens(evals), ["Budget", "Method"])
    values: dict[tuple[int, str], float] = {}
    columns: dict[str, None] = {}
    used: dict[str, str] = {}
    notes: list[str] = []
    order = _task_order(t for _, _, t in cells)
    for (method, budget, task), rec in sorted(cells.items(), key=lambda cell: order.index(cell[0][2])):
        found = samples.of(rec)
        if not found or any("category" not in s for s in found):
            continue
        metric = used.setdefault(task, _category_metric(metrics[task], found))
        where = f"{task} / {method} @ {budget}"
        for kind in sorted({str(s["category"]) for s in found}):
            column = f"{task_name(task)}: {kind}"
            columns.setdefault(column, None)
            try:
                units = stats.units_from_samples([s for s in found if str(s["category"]) == kind], metric, where)
            except stats.StatsError as err:
                notes.append(str(err))
                continue
            values[(rows.index((method, budget)), column)] = _display_factor(metric) * units.value()
    if not columns:
        return None
    frame = pd.DataFrame(math.nan, index=index, columns=list(columns))
    for (i, column), value in values.items():
        frame.at[index[i], column] = value
    notes.insert(0, "score of each task's samples by category ('category' in the per-sample files): "
                 + ", ".join(f"{task_name(t)} {m}" for t, m in used.items()))
    model = evals[0].key.model
    return Table("categories", f"{model}: scores by category", frame, dict.fromkeys(columns, Column()), notes=notes)


def stats_table(records: Iterable[Record], store: ResultStore, n_boot: int = 2000, seed: int = 0) -> Table:
    """Per cell: score, 95 % bootstrap interval, difference / agreement / paired test vs the unpruned run."""
    evals = _one_model(records, ("eval",))
    if not evals:
        raise ReportError("no eval records to tabulate")
    cells = _index(evals)
    metrics = _primary_metrics(evals)
    samples = _Samples(store)
    n_original = _original_tokens(evals)
    tasks = _task_order(t for _, _, t in cells)
    columns = ["Score", "CI low", "CI high", "Δ", "Agree.", "n", "Test", "p"]
    rows, index, notes = [], [], []
    for method, budget in table_rows(evals):
        for task in tasks:
            rec = cells.get((method, budget, task))
            if rec is None:
                continue
            metric, factor = metrics[task], _display_factor(metrics[task])
            row: dict[str, Any] = dict.fromkeys(columns, math.nan)
            row["Test"] = None
            row["Score"] = _display_score(rec, metric)
            try:
                units = samples.units(rec, metric)
                rebuilt = units.value()
                recorded = float(rec.metrics[metric])
                if not math.isclose(rebuilt, recorded, rel_tol=1e-6, abs_tol=1e-9):
                    raise stats.StatsError(
                        f"{task} / {method} @ {budget}: the samples give {metric} = {rebuilt:.6g} but the record says "
                        f"{recorded:.6g}; no interval"
                    )
                low, high = stats.bootstrap_interval(units, n_boot, seed)
                row["CI low"], row["CI high"] = factor * low, factor * high
                base = cells.get((*BASELINE, task))
                if base is not None and rec is not base:
                    shared, same = stats.agreement(samples.of(rec), samples.of(base))
                    row["Agree."] = 100.0 * same / shared if shared else math.nan
                    paired = stats.paired_test(units, samples.units(base, metric), n_boot, seed)
                    row.update(
                        {"Δ": factor * paired.difference, "n": paired.n, "Test": paired.test, "p": paired.p_value}
                    )
            except stats.StatsError as err:
                notes.append(str(err))
            rows.append(row)
            index.append((group_label(budget, n_original), method_name(method), task_name(task)))
    frame = pd.DataFrame(
        rows, index=pd.MultiIndex.from_tuples(index, names=["Budget", "Method", "Task"]), columns=columns
    )
    notes.insert(
        0,
        f"95% percentile bootstrap over samples ({n_boot} replicates, seed {seed}); Δ, Agree. and p vs the "
        "unpruned run on the n samples both answered (MME: image pairs); McNemar exact for 0/1 "
        "per-sample scores, else a paired bootstrap of the difference",
    )
    spec = {
        "Score": Column(),
        "CI low": Column(),
        "CI high": Column(),
        "Δ": Column("number", 2),
        "Agree.": Column("percent"),
        "n": Column("int"),
        "Test": Column("text"),
        "p": Column("p"),
    }
    return Table("stats", f"{evals[0].key.model}: intervals and paired tests vs unpruned", frame, spec, notes=notes)


def compare_table(
    records: Iterable[Record], store: ResultStore, method_a: str, method_b: str, n_boot: int = 2000, seed: int = 0
) -> Table:
    """Two methods head to head at every budget both ran: scores, difference, agreement, paired test."""
    evals = _one_model(records, ("eval",))
    cells = _index(evals)
    known = sorted({m for m, _, _ in cells})
    for spec in (method_a, method_b):
        if spec not in known:
            raise ReportError(f"--compare: no records for method {spec!r}; methods in the store: {', '.join(known)}")
    metrics = _primary_metrics(evals)
    samples = _Samples(store)
    n_original = _original_tokens(evals)
    name_a, name_b = method_name(method_a), method_name(method_b)
    columns = [name_a, name_b, "Δ", "Agree.", "n", "Test", "p"]
    rows, index, notes = [], [], []
    budgets = sorted(
        {b for m, b, _ in cells if m == method_a} & {b for m, b, _ in cells if m == method_b}, key=budget_order
    )
    if not budgets:
        raise ReportError(f"--compare: {method_a!r} and {method_b!r} share no budget")
    for budget in budgets:
        for task in _task_order(t for m, b, t in cells if b == budget):
            rec_a, rec_b = cells.get((method_a, budget, task)), cells.get((method_b, budget, task))
            if rec_a is None or rec_b is None:
                continue
            metric, factor = metrics[task], _display_factor(metrics[task])
            row: dict[str, Any] = dict.fromkeys(columns, math.nan)
            row["Test"] = None
            row[name_a], row[name_b] = _display_score(rec_a, metric), _display_score(rec_b, metric)
            try:
                shared, same = stats.agreement(samples.of(rec_a), samples.of(rec_b))
                row["Agree."] = 100.0 * same / shared if shared else math.nan
                paired = stats.paired_test(samples.units(rec_a, metric), samples.units(rec_b, metric), n_boot, seed)
                row.update({"Δ": factor * paired.difference, "n": paired.n, "Test": paired.test, "p": paired.p_value})
            except stats.StatsError as err:
                notes.append(str(err))
            rows.append(row)
            index.append((group_label(budget, n_original), task_name(task)))
    frame = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples(index, names=["Budget", "Task"]), columns=columns)
    notes.insert(0, f"Δ = {name_a} - {name_b} on the samples both answered; Agree. = share of identical answers")
    spec = {
        name_a: Column(),
        name_b: Column(),
        "Δ": Column("number", 2),
        "Agree.": Column("percent"),
        "n": Column("int"),
        "Test": Column("text"),
        "p": Column("p"),
    }
    title = f"{evals[0].key.model}: {name_a} vs {name_b}"
    return Table("compare", title, frame, spec, notes=notes)


# ---------------------------------------------------------------------------------------------
# speed

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
    recs = _one_model(records, ("eval", "profile"))
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


def speed_table(records: Iterable[Record], title: str | None = None) -> Table:
    recs = _one_model(records, ("eval", "profile"))
    frame = timing_frame(recs)
    if frame.empty:
        raise ReportError("no records with timings")
    n_original = _original_tokens([r for r in recs if r.kind == "eval"] or recs)
    order = table_rows(recs)
    frame["order"] = [order.index((m, b)) for m, b in zip(frame["method"], frame["budget"])]
    frame = frame.sort_values(["order", "source", "device"], kind="stable")
    # a (method, budget) timed several ways gets one row per way, labelled by what differs
    size = frame.groupby(["method", "budget"])["source"].transform("size")
    sources = frame.groupby(["method", "budget"])["source"].transform("nunique")
    labels = [
        method_name(m) + ("" if n == 1 else f" [{s}]" if k == n else f" [{s}, {d}]")
        for m, s, d, n, k in zip(frame["method"], frame["source"], frame["device"], size, sources)
    ]
    index = pd.MultiIndex.from_arrays(
        [[group_label(b, n_original) for b in frame["budget"]], labels], names=["Budget", "Method"]
    )
    out = pd.DataFrame(
        {
            **{label: frame[name].to_numpy(dtype=float) for name, label in TIMINGS.items()},
            "Prefill speedup": frame["prefill_speedup"].to_numpy(dtype=float),
            "TTFT speedup": frame["ttft_speedup"].to_numpy(dtype=float),
            "TFLOPs": frame["tflops"].to_numpy(dtype=float),
            "Tokens (eq.)": frame["tokens"].to_numpy(dtype=float),
            "Device": frame["device"].to_numpy(),
            "Source": frame["source"].to_numpy(),
        },
        index=index,
    )
    spec = {label: Column("number", 2) for label in TIMINGS.values()}
    spec.update(
        {
            "Prefill speedup": Column("ratio", 2),
            "TTFT speedup": Column("ratio", 2),
            "TFLOPs": Column("number", 2),
            "Tokens (eq.)": Column("number", 1),
            "Device": Column("text"),
            "Source": Column("text"),
        }
    )
    notes = [
        (
            "ms per sample (eval records: mean over samples; profile records: median over repeats); speedups vs the unpruned run timed the same way (source) on the same device; "
            "Tokens (eq.) = visual tokens averaged over the LLM's layers"
        )
    ]
    if any(r.provenance.get("vision_reused_batches") for r in recs):
        notes.append("Vision: a run encodes each batch once (--vision-cache-mb); cells that reused it report the time measured then")
    title = title or f"{recs[0].key.model}: speed"
    # a column that holds one value everywhere moves to the title or the notes
    if frame["device"].nunique() == 1:
        title += f" on {frame['device'].iloc[0]}"
        out, spec = out.drop(columns="Device"), {k: v for k, v in spec.items() if k != "Device"}
    if frame["source"].nunique() == 1:
        notes.append(f"all timings from {frame['source'].iloc[0]} records")
        out, spec = out.drop(columns="Source"), {k: v for k, v in spec.items() if k != "Source"}
    return Table("speed", title, out, spec, notes=notes)


# ---------------------------------------------------------------------------------------------
# end of `prunebench run`


def print_summary(records: Iterable[Record], store: ResultStore | None = None, console: Console | None = None) -> None:
    """The accuracy table (with agreement when the store is given) for each model among ``records``."""
    console = console or Console()
    records = list(records)
    for model in sorted({r.key.model for r in records}):
        mine = [r for r in records if r.key.model == model]
        if not any(r.kind == "eval" for r in mine):
            continue
        agree = agreement_frame(mine, store) if store is not None else None
        print_table(accuracy_table(mine, agree), console)


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", default="results", help="results store folder (default: results)")
    parser.add_argument(
        "--model",
        action="append",
        default=None,
        help="model(s) to report, repeatable or comma-separated (default: every model in the store)",
    )
    parser.add_argument(
        "--limit", default=None, help="only records evaluated on this many samples per task ('full' = whole tasks)"
    )
    parser.add_argument(
        "--format",
        default=None,
        help="comma-separated from md,latex,csv,html (default with --out: all; without: none, i.e. rich tables only)",
    )
    parser.add_argument("--out", default=None, help="write tables and plots here, one subfolder per model")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="paired comparison of two method specs")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates (default: 2000)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--stats", action="store_true", help="also print the statistics table on the console")
    parser.add_argument("--no-plots", action="store_true", help="do not draw plots with --out")


def parse_formats(text: str | None, default: tuple[str, ...]) -> list[str]:
    if text is None:
        return list(default)
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ReportError(f"unknown format {', '.join(bad) or repr(text)}; valid formats: {', '.join(FORMATS)}")
    return formats


def load_records(store: ResultStore, models: list[str] | None, limit: str | None) -> dict[str, list[Record]]:
    """model -> its records, filtered by --model and --limit; clear errors for an empty store or unknown model."""
    if not store.root.is_dir():
        raise ReportError(
            f"results folder {str(store.root)!r} does not exist; run `prunebench run` first or pass --results"
        )
    records = list(store.records())
    if not records:
        raise ReportError(f"no records in {str(store.root)!r}; run `prunebench run` first")
    if limit is not None:  # profile records time fixed inputs: no limit applies to them
        want = None if limit.strip().lower() == "full" else _int_limit(limit)
        records = [r for r in records if r.kind != "eval" or r.key.limit == want]
        if not any(r.kind == "eval" for r in records):
            raise ReportError(f"no eval records with --limit {limit}")
    available = sorted({r.key.model for r in records})
    wanted = [m.strip() for text in (models or []) for m in text.split(",") if m.strip()] or available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ReportError(
            f"unknown --model {', '.join(unknown)}; models in {str(store.root)!r}: {', '.join(available)}"
        )
    return {m: [r for r in records if r.key.model == m] for m in wanted}


def _int_limit(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ReportError(f"--limit {text!r}: give a number of samples or 'full'") from None


def build_tables(
    records: list[Record],
    store: ResultStore,
    n_boot: int,
    seed: int,
    compare: tuple[str, str] | None = None,
    with_stats: bool = True,
) -> list[Table]:
    """Every table of one model: accuracy (+ stats) when it has eval records, speed when any has timings."""
    tables: list[Table] = []
    if any(r.kind == "eval" for r in records):
        tables.append(accuracy_table(records, agreement_frame(records, store)))
        if with_stats:
            tables.append(stats_table(records, store, n_boot, seed))
        if (categories := category_table(records, store)) is not None:
            tables.append(categories)
        if compare:
            tables.append(compare_table(records, store, *compare, n_boot=n_boot, seed=seed))
    elif compare:
        raise ReportError("--compare needs eval records")
    if any(r.timing for r in records):
        tables.append(speed_table(records))
    return tables


def main(args: argparse.Namespace) -> int:
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze wide tables into 80 columns
        console.width = max(console.width, 160)
    try:
        formats = parse_formats(args.format, tuple(FORMATS) if args.out else ())
        if args.bootstrap < 1:
            raise ReportError(f"--bootstrap {args.bootstrap}: need at least 1 replicate")
        store = ResultStore(args.results)
        by_model = load_records(store, args.model, args.limit)
        for model, records in by_model.items():
            compare = tuple(args.compare) if args.compare else None
            # the bootstrap is the slow part: skip it when its table goes nowhere
            with_stats = bool(args.out or formats or args.stats)
            tables = build_tables(records, store, args.bootstrap, args.seed, compare, with_stats)
            for table in tables:
                if table.name != "stats" or args.stats:
                    print_table(table, console)
            if args.out:
                folder = Path(args.out) / slug(model)
                folder.mkdir(parents=True, exist_ok=True)
                for table in tables:
                    for fmt in formats:
                        (folder / f"{table.name}.{FORMATS[fmt]}").write_text(render(table, fmt))
                if not args.no_plots:
                    from prunebench.report.plots import draw_all

                    written, notes = draw_all(records, folder)
                    for path in written:
                        console.print(f"wrote {path}")
                    for note in notes:
                        console.print(f"plots: {note}", style="yellow")
                console.print(f"tables ({', '.join(formats)}) written to {folder}")
            else:
                for table in tables:
                    for fmt in formats:
                        sys.stdout.write(render(table, fmt) + "\n")
    except (ReportError, stats.StatsError) as err:
        print(f"prunebench report: error: {err}", file=sys.stderr)
        return 2
    return 0
