"""The accuracy-retention table, answer agreement with the unpruned model, and per-category scores.

"Avg." = mean over tasks of 100 * score / unpruned score; "Agree." = mean over tasks of the share
of answers identical to the unpruned model's on the same samples; the best per budget group in bold.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from prunebench.report import stats
from prunebench.report.frames import (
    BASELINE,
    ReportError,
    cell_index,
    display_factor,
    one_model,
    original_tokens,
    primary_metrics,
    row_index,
    score_frame,
    table_rows,
    task_name,
    task_order,
)
from prunebench.report.tables import Column, Table
from prunebench.results import Record, ResultStore


def accuracy_table(records: Iterable[Record], agreement: pd.DataFrame | None = None, title: str | None = None) -> Table:
    """The paper table for one model: tasks, "Avg." retention %, and "Agree." % when ``agreement``
    (an :func:`agreement_frame`) is given."""
    evals = one_model(records, ("eval",))
    if not evals:
        raise ReportError("no eval records to tabulate")
    scores = score_frame(evals)
    tasks = task_order(scores["task"])
    rows = table_rows(evals)
    index = row_index(rows, original_tokens(evals), ["Budget", "Method"])
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


class Samples:
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
    evals = one_model(records, ("eval",))
    cells = cell_index(evals)
    samples = Samples(store)
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
    evals = one_model(records, ("eval",))
    cells = cell_index(evals)
    metrics = primary_metrics(evals)
    samples = Samples(store)
    rows = table_rows(evals)
    index = row_index(rows, original_tokens(evals), ["Budget", "Method"])
    values: dict[tuple[int, str], float] = {}
    columns: dict[str, None] = {}
    used: dict[str, str] = {}
    notes: list[str] = []
    order = task_order(t for _, _, t in cells)
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
            values[(rows.index((method, budget)), column)] = display_factor(metric) * units.value()
    if not columns:
        return None
    frame = pd.DataFrame(math.nan, index=index, columns=list(columns))
    for (i, column), value in values.items():
        frame.at[index[i], column] = value
    notes.insert(0, "score of each task's samples by category ('category' in the per-sample files): "
                 + ", ".join(f"{task_name(t)} {m}" for t, m in used.items()))
    model = evals[0].key.model
    return Table("categories", f"{model}: scores by category", frame, dict.fromkeys(columns, Column()), notes=notes)
