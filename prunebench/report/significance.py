"""Per-cell 95 % bootstrap intervals and paired tests against the unpruned run or another method."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pandas as pd

from prunebench.report import stats
from prunebench.report.accuracy import Samples
from prunebench.report.frames import (
    BASELINE,
    ReportError,
    budget_order,
    cell_index,
    display_factor,
    display_score,
    group_label,
    method_name,
    one_model,
    original_tokens,
    primary_metrics,
    table_rows,
    task_name,
    task_order,
)
from prunebench.report.tables import Column, Table
from prunebench.results import Record, ResultStore


def stats_table(records: Iterable[Record], store: ResultStore, n_boot: int = 2000, seed: int = 0) -> Table:
    """Per cell: score, 95 % bootstrap interval, difference / agreement / paired test vs the unpruned run."""
    evals = one_model(records, ("eval",))
    if not evals:
        raise ReportError("no eval records to tabulate")
    cells = cell_index(evals)
    metrics = primary_metrics(evals)
    samples = Samples(store)
    n_original = original_tokens(evals)
    tasks = task_order(t for _, _, t in cells)
    columns = ["Score", "CI low", "CI high", "Δ", "Agree.", "n", "Test", "p"]
    rows, index, notes = [], [], []
    for method, budget in table_rows(evals):
        for task in tasks:
            rec = cells.get((method, budget, task))
            if rec is None:
                continue
            metric, factor = metrics[task], display_factor(metrics[task])
            row: dict[str, Any] = dict.fromkeys(columns, math.nan)
            row["Test"] = None
            row["Score"] = display_score(rec, metric)
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
    evals = one_model(records, ("eval",))
    cells = cell_index(evals)
    known = sorted({m for m, _, _ in cells})
    for spec in (method_a, method_b):
        if spec not in known:
            raise ReportError(f"--compare: no records for method {spec!r}; methods in the store: {', '.join(known)}")
    metrics = primary_metrics(evals)
    samples = Samples(store)
    n_original = original_tokens(evals)
    name_a, name_b = method_name(method_a), method_name(method_b)
    columns = [name_a, name_b, "Δ", "Agree.", "n", "Test", "p"]
    rows, index, notes = [], [], []
    budgets = sorted(
        {b for m, b, _ in cells if m == method_a} & {b for m, b, _ in cells if m == method_b}, key=budget_order
    )
    if not budgets:
        raise ReportError(f"--compare: {method_a!r} and {method_b!r} share no budget")
    for budget in budgets:
        for task in task_order(t for m, b, t in cells if b == budget):
            rec_a, rec_b = cells.get((method_a, budget, task)), cells.get((method_b, budget, task))
            if rec_a is None or rec_b is None:
                continue
            metric, factor = metrics[task], display_factor(metrics[task])
            row: dict[str, Any] = dict.fromkeys(columns, math.nan)
            row["Test"] = None
            row[name_a], row[name_b] = display_score(rec_a, metric), display_score(rec_b, metric)
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
