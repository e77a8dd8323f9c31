"""The accuracy-retention table, answer agreement with the unpruned model, and per-category scores.

"Avg." = mean over tasks of 100 * score / unpruned score; "Agree." = mean over tasks of the share
of answers identical to the unpruned model's on the same samples. Every row carries its compute:
"Tokens (eq.)" (visual tokens averaged over the LLM's layers, as the engine counts them) and the
LLM prefill FLOPs. The best per budget group is in bold among the rows inside the group's compute
band (Tokens (eq.) within ``BAND`` of the group's K); rows outside it are shown, marked, and not
compared. "Floor" gives, per in-LLM row, the retention of the same method with one visual token
kept after each stage (budget ``floor``), flagged where it beats random pruning at the row's budget.
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
    FLOOR,
    ReportError,
    cell_index,
    display_factor,
    group_k,
    one_model,
    original_tokens,
    primary_metrics,
    row_index,
    method_name,
    score_frame,
    table_rows,
    task_name,
    task_order,
)
from prunebench.report.tables import Column, Table
from prunebench.results import Record, ResultStore


BAND = 0.10  # a row is compared within its group when its Tokens (eq.) lie within 10 % of the group's K
OUT_OF_BAND = "‡"
FLOOR_BEATS_RANDOM = "§"
TOKENS = "Tokens (eq.)"


def accuracy_table(records: Iterable[Record], agreement: pd.DataFrame | None = None, title: str | None = None) -> Table:
    """The paper table for one model: tasks, "Avg." retention %, "Agree." % when ``agreement``
    (an :func:`agreement_frame`) is given, the compute of each row, and the floor control of in-LLM
    rows when the records hold it; cells a method cannot reach ("unreachable" records) are "–"."""
    chosen = one_model(records, ("eval", "unreachable"))
    evals = [r for r in chosen if r.kind == "eval"]
    if not evals:
        raise ReportError("no eval records to tabulate")
    scores = score_frame(evals)
    tasks = task_order(scores["task"])
    unreachable = [r for r in chosen if r.kind == "unreachable"]
    rows = table_rows(evals + unreachable)
    n_original = original_tokens(evals)
    index = row_index(rows, n_original, ["Budget", "Method"])
    summary = ["Avg."] + (["Agree."] if agreement is not None else [])
    flops_scale, flops_label = _flops_unit(scores["tflops"])
    compute = [TOKENS] + ([flops_label] if flops_label else [])
    has_floor = bool((scores["budget"] == FLOOR).any())
    columns = [task_name(t) for t in tasks] + summary + compute + (["Floor"] if has_floor else [])
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
    per_row = scores.groupby(["method", "budget"], sort=False).agg(
        tokens=("tokens", "mean"), tflops=("tflops", "mean"), stage=("stage", "first"))
    compared = np.ones(len(rows), dtype=bool)  # inside its group's compute band (or no band applies)
    for (method, budget), row in per_row.iterrows():
        i = rows.index((method, budget))
        frame.at[index[i], TOKENS] = row.tokens
        if flops_label:
            frame.at[index[i], flops_label] = row.tflops * flops_scale
        k = group_k(budget, n_original)
        if k is not None and not math.isnan(row.tokens) and abs(row.tokens - k) > BAND * k:
            compared[i] = False
            marks.at[index[i], TOKENS] = OUT_OF_BAND
    unflagged = _floor_column(frame, marks, rows, index, per_row) if has_floor else []
    notes = []
    if (marks[summary] != "").any().any():
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
    notes.append(
        f"{TOKENS} = visual tokens averaged over the LLM's layers and samples, as the engine counts them"
        + (f"; {flops_label} = LLM prefill per sample at those tokens" if flops_label else "")
        + f"; bold = best of its group among the rows whose {TOKENS} lie within {BAND:.0%} of the group's K "
        f"(its compute band); {OUT_OF_BAND} = outside the band: shown, not compared"
    )
    if has_floor:
        notes.append(
            "Floor = Avg. of the same method keeping one visual token after each of its stages (budget floor): what "
            f"its layers before the first stage carry without any selection; {FLOOR_BEATS_RANDOM} = the floor retains "
            "more than Random at this budget: the row measures the unpruned prefix, not selection"
        )
        if unflagged:
            notes.append(f"no Random row to compare the floor with at {', '.join(unflagged)}")
    for (method, budget), reason in dict.fromkeys(
            ((r.key.method, r.key.budget), r.provenance.get("reason", "")) for r in unreachable):
        notes.append(f"– {method_name(method)} at {budget}: not run ({reason or 'unreachable on this model'})")
    spec = {task_name(t): Column("number", _score_decimals(scores, t)) for t in tasks}
    spec.update({col: Column("percent", 1) for col in summary})
    spec[TOKENS] = Column("number", 1)
    if flops_label:
        spec[flops_label] = Column("number", 2)
    if has_floor:
        spec["Floor"] = Column("percent", 1)
    model = evals[0].key.model
    table = Table("accuracy", title or f"{model}: accuracy and retention", frame, spec, marks=marks, notes=notes)
    skip = {index[rows.index(mb)][0] for mb in rows if mb == BASELINE or mb[1] == FLOOR}
    table.bold = best_in_group(table, skip_groups=skip, compared=compared,
                               columns=[task_name(t) for t in tasks] + summary)
    return table


def _flops_unit(tflops: pd.Series) -> tuple[float, str | None]:
    """(scale, column label) for the prefill FLOPs: TFLOPs, or GFLOPs on toy models; none without values."""
    if tflops.isna().all():
        return 1.0, None
    return (1.0, "TFLOPs") if tflops.max() >= 0.1 else (1e3, "GFLOPs")


def _floor_column(frame: pd.DataFrame, marks: pd.DataFrame, rows: list[tuple[str, str]], index: pd.MultiIndex,
                  per_row: pd.DataFrame) -> list[str]:
    """Fill "Floor" for in-LLM rows and flag those whose floor beats Random at the row's budget;
    returns the budgets where no Random row exists to compare with."""
    avg = dict(zip(rows, frame["Avg."]))
    floors = {m: avg[(m, b)] for m, b in rows if b == FLOOR}
    random = {}
    for m, b in rows:
        if m.partition(":")[0] == "random":
            random.setdefault(b, avg[(m, b)])
    unflagged = []
    for i, (method, budget) in enumerate(rows):
        if budget in (FLOOR, BASELINE[1]) or method not in floors or (method, budget) not in per_row.index:
            continue
        if per_row.loc[(method, budget), "stage"] != "llm":
            continue
        frame.at[index[i], "Floor"] = floors[method]
        chance = random.get(budget, math.nan)
        if math.isnan(chance):
            unflagged.append(budget)
        elif floors[method] > chance:
            marks.at[index[i], "Floor"] = FLOOR_BEATS_RANDOM
    return list(dict.fromkeys(unflagged))


def _score_decimals(scores: pd.DataFrame, task: str) -> int:
    """One decimal, as papers print; an unknown metric that looks like a fraction keeps three."""
    cells = scores[scores["task"] == task]
    metric = cells["metric"].iloc[0]
    if metric not in stats.METRICS and (cells["score"].abs() <= 1.0).all():
        return 3
    return 1


def best_in_group(table: Table, skip_groups: set[str], compared: np.ndarray | None = None,
                  columns: list[str] | None = None) -> pd.DataFrame:
    """True where a number is the highest of its budget group, compared as printed (ties all bold).

    Only groups with two or more unmarked values in a column get a bold cell there. ``compared``:
    per row, whether it takes part (rows outside the compute band do not); ``columns``: the
    columns compared (default: every number column).
    """
    bold = pd.DataFrame(False, index=table.frame.index, columns=table.frame.columns)
    groups = table.frame.index.get_level_values(0)
    for col in columns or list(table.frame.columns):
        spec = table.columns[col]
        if spec.kind == "text":
            continue
        for group in dict.fromkeys(groups):
            if group in skip_groups:
                continue
            rows = np.flatnonzero(groups == group)
            values = table.frame[col].iloc[rows].round(spec.decimals)
            eligible = values.notna().to_numpy(copy=True)
            if compared is not None:
                eligible &= compared[rows]
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
