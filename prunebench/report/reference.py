"""Published numbers beside prunebench's: the registry (prunebench/references/*.csv) and the parity table.

A published cell is compared with a measured one only where model, method (and the options the paper
fixes), budget, task, metric and scale all match. The measured value is rebuilt on the paper's scale
from the record (MME perception + cognition where the paper prints their sum; POPE's F1 averaged over
its three splits, as LLaVA's script prints it) with a 95 % bootstrap interval from the per-sample
file. The verdict: the published value, widened by its rounding (half a unit of its last printed
digit), lies inside that interval or outside it. Two papers that print different numbers for one
cell (rounding intervals apart) are both shown, marked disputed.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd

from prunebench.budget import Budget, BudgetError
from prunebench.report import stats
from prunebench.report.accuracy import Samples
from prunebench.report.frames import (
    BASELINE,
    ReportError,
    budget_order,
    cell_index,
    display_factor,
    group_label,
    method_name,
    one_model,
    original_tokens,
)
from prunebench.report.tables import Column, Table
from prunebench.results import Record, ResultStore

REGISTRY_DIR = Path(__file__).resolve().parents[1] / "references"


class RegistryError(ReportError):
    """A registry row that breaks the schema; the message names its file and line."""


@dataclass(frozen=True)
class Published:
    """One printed cell of a paper's table (a registry row)."""

    model: str
    method: str
    options: str  # prunebench option syntax, "k=v,k=v": what the paper's setting fixes
    budget: str  # as printed: "192", "33.3%", the full count for "none", "all" with a fixed schedule, "" for none
    benchmark: str
    metric: str
    scale: str
    value: str  # as printed (its decimals are its rounding)
    source: str  # "arXiv:2412.04467 Table 1"
    setting: str
    compare: str  # "" or why the row is never compared with a prunebench run
    note: str
    read_from: str
    where: str = ""  # file:line

    @property
    def number(self) -> float:
        return float(self.value)

    @property
    def half_unit(self) -> float:
        """Half a unit of the last printed digit: the value's rounding."""
        decimals = len(self.value.partition(".")[2])
        return 0.5 * 10.0**-decimals

    @property
    def option_items(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.options.split(",")) if self.options else {}

    @property
    def short_source(self) -> str:
        """'arXiv:2412.04467 Table 1' -> '2412.04467 T1'."""
        return self.source.removeprefix("arXiv:").replace(" Table ", " T")


COLUMNS = [f.name for f in fields(Published) if f.name != "where"]
REQUIRED = ("model", "method", "benchmark", "metric", "scale", "value", "source", "read_from")
SOURCE = re.compile(r"^arXiv:\d{4}\.\d{4,5} Table \d+$")
VALUE = re.compile(r"^\d+(\.\d+)?$")
OPTIONS = re.compile(r"^([a-z_]+=[^,=\s]+)(,[a-z_]+=[^,=\s]+)*$")

_ACC = {("accuracy", "percent")}
# benchmark -> the (metric, scale) pairs its cells may carry; the range each one's values lie in
BENCHMARK_METRICS: dict[str, set[tuple[str, str]]] = {
    **dict.fromkeys(("gqa", "mmbench", "mmbench_cn", "sqa_img", "vqav2", "textvqa", "mmmu", "vizwiz", "chartqa"), _ACC),
    "seed": {("seed_all", "percent"), ("seed_image", "percent"), ("unstated", "percent")},
    "mme": {("mme_total", "score"), ("mme_perception", "score")},
    "pope": {("f1", "percent"), ("accuracy", "percent"), ("unstated", "percent")},
    "docvqa": {("anls", "percent"), ("unstated", "percent")},
    "mmvet": {("gpt_score", "percent")},
    "llava_bench": {("gpt_relative_score", "percent")},
    "ocrbench": {("score", "count_of_1000")},
    "avg": {("mean_relative_to_vanilla", "percent"), ("unstated", "percent")},
}
RANGES: dict[tuple[str, str], tuple[float, float]] = {
    ("mme_total", "score"): (0.0, 2800.0),  # 10 perception + 4 cognition subtasks, 200 points each
    ("mme_perception", "score"): (0.0, 2000.0),
    ("score", "count_of_1000"): (0.0, 1000.0),
    ("mean_relative_to_vanilla", "percent"): (0.0, 200.0),  # a pruned model may beat its vanilla
}
PERCENT = (0.0, 100.0)
MME_AGREEMENT = 0.02  # one model's vanilla MME printed by two tables on one scale agrees within this


def load_registry(directory: str | Path = REGISTRY_DIR) -> list[Published]:
    """Every row of every CSV in ``directory``, each checked (:func:`check_row`), then the whole
    (:func:`check_registry`)."""
    rows = []
    for path in sorted(Path(directory).glob("*.csv")):
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames != COLUMNS:
                raise RegistryError(f"{path.name}: columns {reader.fieldnames} are not {COLUMNS}")
            for line, raw in enumerate(reader, start=2):
                row = Published(**raw, where=f"{path.name}:{line}")
                check_row(row)
                rows.append(row)
    if not rows:
        raise RegistryError(f"no registry CSV files in {directory}")
    check_registry(rows)
    return rows


def check_row(row: Published) -> None:
    """Schema, units and scales of one row."""

    def bad(why: str) -> RegistryError:
        return RegistryError(f"{row.where}: {why}")

    for name in REQUIRED:
        if not getattr(row, name).strip():
            raise bad(f"empty {name!r}")
    if not SOURCE.match(row.source):
        raise bad(f"source {row.source!r} is not 'arXiv:<id> Table <n>'")
    if not VALUE.match(row.value):
        raise bad(f"value {row.value!r} is not a number as printed")
    allowed = BENCHMARK_METRICS.get(row.benchmark)
    if allowed is None:
        raise bad(f"unknown benchmark {row.benchmark!r}; known: {', '.join(BENCHMARK_METRICS)}")
    if (row.metric, row.scale) not in allowed:
        raise bad(f"{row.benchmark} cannot be {row.metric} on scale {row.scale}; allowed: {sorted(allowed)}")
    low, high = RANGES.get((row.metric, row.scale), PERCENT)
    if not low <= row.number <= high:
        raise bad(f"{row.benchmark} {row.metric} = {row.value} lies outside [{low:g}, {high:g}] ({row.scale})")
    if row.scale == "percent" and row.number <= 1.0:
        raise bad(f"{row.value} looks like a fraction in a percent column")
    if row.options and not OPTIONS.match(row.options):
        raise bad(f"options {row.options!r} are not prunebench's 'key=value,key=value'")
    if not row.budget:
        if not row.compare:
            raise bad("a row without a token budget must say why it is not compared ('compare')")
    else:
        try:
            Budget.parse(row.budget)
        except BudgetError as err:
            raise bad(f"budget {row.budget!r}: {err}") from None


def check_registry(rows: list[Published]) -> None:
    """Across rows: one cell per key, one scale per table column, and MME's two scales kept apart
    (a perception value in a perception + cognition column shows as a vanilla that disagrees with the
    other tables' vanilla on that scale, or exceeds the perception vanilla it should sum)."""
    seen: dict[tuple, str] = {}
    column_metric: dict[tuple, tuple[str, str]] = {}
    for row in rows:
        key = (row.source, row.model, row.method, row.options, row.setting, row.budget, row.benchmark)
        if key in seen:
            raise RegistryError(f"{row.where}: the same cell as {seen[key]}")
        seen[key] = row.where
        column = (row.source, row.model, row.benchmark)
        first = column_metric.setdefault(column, (row.metric, row.where))
        if first[0] != row.metric:
            raise RegistryError(
                f"{row.where}: {row.benchmark} is {row.metric} but {first[1]} has {first[0]} in the same table column"
            )
    vanilla: dict[tuple[str, str], list[Published]] = {}
    for row in rows:
        if row.method == "none" and row.benchmark == "mme":
            vanilla.setdefault((row.model, row.metric), []).append(row)
    for (model, metric), group in vanilla.items():
        low, high = min(group, key=lambda r: r.number), max(group, key=lambda r: r.number)
        if high.number > low.number * (1 + MME_AGREEMENT):
            raise RegistryError(
                f"{model} vanilla MME on one scale ({metric}) differs between {low.where} ({low.value}) and "
                f"{high.where} ({high.value}): one of them is on the other scale"
            )
    for model in {m for m, _ in vanilla}:
        perception, total = vanilla.get((model, "mme_perception")), vanilla.get((model, "mme_total"))
        if perception and total and max(r.number for r in perception) >= min(r.number for r in total):
            raise RegistryError(f"{model}: a vanilla mme_perception is not below every vanilla mme_total")


# -- what is compared with what -------------------------------------------------------------------

MME_TOTAL = "mme_perception_score+mme_cognition_score"
POPE_SPLIT_F1 = "pope_f1_score per split, averaged"


@dataclass(frozen=True)
class Target:
    """The measured quantity a published (benchmark, metric) is compared with."""

    task: str  # lmms-eval task
    measure: str  # a record metric, MME_TOTAL or POPE_SPLIT_F1
    caveat: str = ""  # a key of CAVEATS, or "" for an exact match


TARGETS: dict[tuple[str, str], Target] = {
    ("gqa", "accuracy"): Target("gqa", "exact_match"),
    ("mmbench", "accuracy"): Target("mmbench_en_dev_static", "gpt_eval_score", "MMB server"),
    ("mme", "mme_total"): Target("mme", MME_TOTAL),
    ("mme", "mme_perception"): Target("mme", "mme_perception_score"),
    ("pope", "f1"): Target("pope", POPE_SPLIT_F1),
    ("pope", "unstated"): Target("pope", POPE_SPLIT_F1, "assumed F1"),
    ("sqa_img", "accuracy"): Target("scienceqa_img", "exact_match"),
    ("textvqa", "accuracy"): Target("textvqa_val", "exact_match", "OCR prompt"),
    ("mmmu", "accuracy"): Target("mmmu_val", "mmmu_acc", "split unstated"),
    ("seed", "seed_all"): Target("seedbench", "seed_all", "SEED all inferred"),
    ("seed", "seed_image"): Target("seedbench", "seed_image"),
}
CAVEATS = {
    "MMB server": "MMB server: LLaVA's scripts send MMBench-dev answers to the MMBench server for scoring; "
                  "lmms-eval's mmbench_en_dev_static scores the same dev questions locally",
    "assumed F1": "assumed F1: the paper does not name POPE's metric; compared as F1 averaged over POPE's three "
                  "splits, what LLaVA's script prints (the papers' vanilla 85.9 is LLaVA-1.5's published F1)",
    "OCR prompt": "OCR prompt: LLaVA's TextVQA questions carry reference OCR tokens; lmms-eval's textvqa_val "
                  "prompt does not (ocr: false)",
    "split unstated": "split unstated: the paper does not name the split; lmms-eval's validation split is compared",
    "SEED all inferred": "SEED all inferred: the paper's SEED is taken as all questions (image + video) because "
                         "its vanilla equals LLaVA-1.5's published SEED, which LLaVA's script scores over all",
}
NOT_COMPARED = {
    "vqav2": "papers score VQAv2 test-dev on its evaluation server; lmms-eval 0.7.3 has no locally scored VQAv2",
    "vizwiz": "papers score VizWiz test-dev on its evaluation server",
    "mmvet": "scored by a GPT judge",
    "llava_bench": "scored by a GPT judge",
    "avg": "an average over the paper's own set of benchmarks",
}


def target_for(row: Published) -> Target | str:
    """The measured quantity ``row`` is compared with, or why it is not compared."""
    if row.compare:
        return row.compare
    if row.benchmark in NOT_COMPARED:
        return NOT_COMPARED[row.benchmark]
    target = TARGETS.get((row.benchmark, row.metric))
    if target is not None:
        return target
    if row.metric == "unstated":
        return f"the paper does not say which {row.benchmark} metric or split it prints"
    return f"prunebench maps no lmms-eval task and metric to {row.benchmark} ({row.metric})"


def options_match(row: Published, record: Record) -> bool:
    """Every option the paper fixes has that value in the record (defaults included)."""
    for key, wanted in row.option_items.items():
        if key not in record.method_options or not _same(wanted, record.method_options[key]):
            return False
    return True


def _same(wanted: str, value) -> bool:
    parts = value if isinstance(value, (list, tuple)) else [value]
    given = [str(p) for p in parts]
    asked = wanted.split("/")
    if len(given) != len(asked):
        return False
    for a, g in zip(asked, given):
        try:
            if not math.isclose(float(a), float(g)):
                return False
        except ValueError:
            if a.lower() != g.lower():
                return False
    return True


def budget_matches(row: Published, record: Record) -> bool:
    if row.method == "none":  # the unpruned run, printed at the model's full count
        return record.key.budget == BASELINE[1]
    if not row.budget:
        return False
    return Budget.parse(row.budget) == Budget.parse(record.key.budget)


# -- measuring on the paper's scale ---------------------------------------------------------------


@dataclass(frozen=True)
class Measured:
    value: float
    low: float = math.nan  # 95 % interval, NaN when the samples cannot give one
    high: float = math.nan
    n: int = 0
    why: str = ""  # why there is no interval


def measure(rec: Record, target: Target, samples: Samples, n_boot: int, seed: int) -> Measured | str:
    """The record's score on the paper's scale with its interval, or why it cannot be had."""
    if target.measure == MME_TOTAL:
        return _summed(rec, ("mme_perception_score", "mme_cognition_score"), samples, n_boot, seed)
    if target.measure == POPE_SPLIT_F1:
        return _pope_split_f1(rec, samples, n_boot, seed)
    metric = target.measure
    if metric not in rec.metrics:
        return f"the record has no {metric}"
    factor = display_factor(metric)
    value = factor * float(rec.metrics[metric])
    try:
        units = samples.units(rec, metric)
        _check_rebuilt(units.value(), float(rec.metrics[metric]), metric)
        low, high = stats.bootstrap_interval(units, n_boot, seed)
    except stats.StatsError as err:
        return Measured(value, n=rec.n_samples, why=str(err))
    return Measured(value, factor * low, factor * high, len(units))


def _summed(rec: Record, metrics: tuple[str, ...], samples: Samples, n_boot: int, seed: int) -> Measured | str:
    missing = [m for m in metrics if m not in rec.metrics]
    if missing:
        return f"the record has no {', '.join(missing)}"
    value = sum(float(rec.metrics[m]) for m in metrics)
    try:
        parts = [samples.units(rec, m) for m in metrics]
        for units, metric in zip(parts, metrics):
            _check_rebuilt(units.value(), float(rec.metrics[metric]), metric)
        # the parts are disjoint categories, each resampled within itself: their replicates add up
        reps = sum(stats.bootstrap_replicates(units, n_boot, seed + i) for i, units in enumerate(parts))
    except stats.StatsError as err:
        return Measured(value, n=rec.n_samples, why=str(err))
    low, high = stats.percentile_interval(reps)
    return Measured(value, low, high, sum(len(u) for u in parts))


def _pope_split_f1(rec: Record, samples: Samples, n_boot: int, seed: int) -> Measured | str:
    rows = samples.of(rec)
    if not rows:
        return f"POPE's per-split F1 needs the per-sample file ({samples.store.samples_path(rec.key)})"
    if any("category" not in s for s in rows):
        return "POPE's per-split F1 needs each sample's split ('category') in the per-sample file"
    where = f"{rec.key.task} / {rec.key.method} @ {rec.key.budget}"
    splits = sorted({str(s["category"]) for s in rows})
    try:
        parts = [stats.units_from_samples([s for s in rows if str(s["category"]) == split], "pope_f1_score", where)
                 for split in splits]
        reps = sum(stats.bootstrap_replicates(units, n_boot, seed + i) for i, units in enumerate(parts)) / len(parts)
    except stats.StatsError as err:
        return str(err)
    low, high = stats.percentile_interval(reps)
    value = float(np.mean([units.value() for units in parts]))
    return Measured(100.0 * value, 100.0 * low, 100.0 * high, sum(len(u) for u in parts))


def _check_rebuilt(rebuilt: float, recorded: float, metric: str) -> None:
    if not math.isclose(rebuilt, recorded, rel_tol=1e-6, abs_tol=1e-9):
        raise stats.StatsError(f"the samples give {metric} = {rebuilt:.6g} but the record says {recorded:.6g}")


def verdict(row: Published, measured: Measured) -> str:
    """Where the published value (with its rounding) lies against our 95 % interval."""
    if math.isnan(measured.low):
        return "no interval"
    low, high = row.number - row.half_unit, row.number + row.half_unit
    if high < measured.low:
        return "outside: published lower"
    if low > measured.high:
        return "outside: published higher"
    return "inside"


def disputed(rows: list[Published]) -> bool:
    """Two of these values are further apart than their rounding allows."""
    values = sorted(rows, key=lambda r: r.number)
    return any(b.number - b.half_unit > a.number + a.half_unit + 1e-9 for a, b in zip(values, values[1:]))


# -- the table --------------------------------------------------------------------------------------

COLUMNS_SHOWN = ["Published", "Ours", "CI low", "CI high", "Δ", "n", "Verdict", "Match"]
INDEX_NAMES = ["Budget", "Method", "Benchmark", "Source"]
# benchmark -> its label, in the papers' column order
LABELS = {"gqa": "GQA", "mmbench": "MMB", "mmbench_cn": "MMB-CN", "mme": "MME", "pope": "POPE", "sqa_img": "SQA-IMG",
          "vqav2": "VQAv2", "textvqa": "TextVQA", "mmmu": "MMMU", "seed": "SEED", "mmvet": "MM-Vet",
          "llava_bench": "LLaVA-Bench", "vizwiz": "VizWiz", "ocrbench": "OCRBench", "chartqa": "ChartQA",
          "docvqa": "DocVQA", "avg": "Avg."}
METRIC_LABELS = {"mme_total": "MME (P+C)", "mme_perception": "MME-P"}


def reference_table(records: Iterable[Record], store: ResultStore, registry: list[Published] | None = None,
                    n_boot: int = 2000, seed: int = 0, compared_only: bool = False) -> Table:
    """Measured vs published, one row per (measured cell, published cell) that share model, method,
    options and budget. ``compared_only`` drops the rows that say why a cell is not compared."""
    evals = one_model(records, ("eval",))
    if not evals:
        raise ReportError("no eval records to compare with published numbers")
    model = evals[0].key.model
    registry = load_registry() if registry is None else registry
    published = [r for r in registry if r.model == model]
    title = f"{model}: measured vs published"
    columns = {"Published": Column("text"), "Ours": Column(), "CI low": Column(), "CI high": Column(),
               "Δ": Column("number", 1), "n": Column("int"), "Verdict": Column("text"), "Match": Column("text")}
    if not published:
        models = ", ".join(sorted({r.model for r in registry}))
        empty = pd.DataFrame(columns=COLUMNS_SHOWN, index=pd.MultiIndex.from_tuples([], names=INDEX_NAMES))
        return Table("reference", title, empty, columns, notes=[f"no published numbers for {model}; the registry covers {models}"])
    cells = cell_index(evals)
    by_spec: dict[tuple[str, str], dict[str, Record]] = {}
    for (method, budget, task), rec in cells.items():
        by_spec.setdefault((method, budget), {})[task] = rec
    samples = Samples(store)
    n_original = original_tokens(evals)
    lines: list[tuple[tuple, dict]] = []
    unmatched: list[str] = []
    used_caveats: set[str] = set()
    for (spec, budget), tasks in sorted(by_spec.items(), key=lambda item: (budget_order(item[0][1]),
                                                                            item[0] != BASELINE, item[0][0])):
        example = next(iter(tasks.values()))
        rows = [r for r in published if r.method == spec.partition(":")[0] and budget_matches(r, example)
                and options_match(r, example)]
        if not rows:
            unmatched.append(f"{spec} @ {budget}")
            continue
        groups: dict[tuple[str, str], list[tuple[Published, Measured | str]]] = {}
        for row in rows:
            target = target_for(row)
            if isinstance(target, str):
                result: Measured | str = f"not compared: {target}"
            elif target.task not in tasks:
                result = f"not measured: no {target.task} record"
            else:
                result = measure(tasks[target.task], target, samples, n_boot, seed)
                if isinstance(result, str):
                    result = f"not compared: {result}"
                elif target.caveat:
                    used_caveats.add(target.caveat)
            groups.setdefault((row.benchmark, row.metric), []).append((row, result))
        for (benchmark, metric), entries in groups.items():
            compared = [(row, result) for row, result in entries if isinstance(result, Measured)]
            dispute = disputed([row for row, _ in compared])
            label = (group_label(budget, n_original), method_name(spec), _benchmark_label(benchmark, metric))
            for row, result in sorted(compared, key=lambda e: e[0].source):
                target = target_for(row)
                match = (target.caveat or "exact") + (f"; no interval: {result.why}" if result.why else "")
                lines.append(((*label, row.short_source), {
                    "Published": row.value, "Ours": result.value, "CI low": result.low, "CI high": result.high,
                    "Δ": result.value - row.number, "n": result.n,
                    "Verdict": verdict(row, result) + ("; disputed" if dispute else ""), "Match": match}))
            if compared_only:
                continue
            reasons: dict[str, list[Published]] = {}
            for row, result in entries:
                if isinstance(result, str):
                    reasons.setdefault(result, []).append(row)
            for reason, same in reasons.items():  # one line per reason, its sources and values side by side
                same.sort(key=lambda r: r.source)
                lines.append(((*label, ", ".join(r.short_source for r in same)), {
                    **dict.fromkeys(COLUMNS_SHOWN, math.nan), "Published": " / ".join(r.value for r in same),
                    "Verdict": "–", "Match": reason}))
    index = pd.MultiIndex.from_tuples([k for k, _ in lines], names=INDEX_NAMES)
    frame = pd.DataFrame([line for _, line in lines], index=index, columns=COLUMNS_SHOWN)
    frame = frame.iloc[_order(index)] if len(frame) else frame
    return Table("reference", title, frame, columns, notes=_notes(frame, model, used_caveats, unmatched, n_boot, seed))


def _benchmark_label(benchmark: str, metric: str) -> str:
    return METRIC_LABELS.get(metric, LABELS.get(benchmark, benchmark))


def _order(index: pd.MultiIndex) -> list[int]:
    """Budget groups and methods in table order; benchmarks in the papers' column order, then sources."""
    first: dict[tuple, int] = {}
    for i, key in enumerate(index):
        first.setdefault(key[:2], i)
    labels = [*LABELS.values(), *METRIC_LABELS.values()]
    position = {label: n for n, label in enumerate(labels)}
    position.update(dict.fromkeys(METRIC_LABELS.values(), position["MME"]))
    return sorted(range(len(index)), key=lambda i: (first[index[i][:2]], position.get(index[i][2], len(labels)),
                                                    index[i][2], index[i][3]))


# how the papers ran a model, where it differs from a prunebench run
PROTOCOL_NOTES = {
    "llava-hf/llava-1.5-7b-hf": " (the papers ran liuhaotian/llava-v1.5-7b, of which llava-hf/llava-1.5-7b-hf is the HF "
                                "conversion, through LLaVA's scripts: its prompt template, float16, batch 1)",
}


def _notes(frame: pd.DataFrame, model: str, caveats: set[str], unmatched: list[str], n_boot: int,
           seed: int) -> list[str]:
    verdicts = frame["Verdict"].dropna().astype(str) if len(frame) else pd.Series(dtype=str)
    compared = verdicts[verdicts != "–"]
    counts = ", ".join(f"{v} {int((compared.str.split(';').str[0] == v).sum())}"
                       for v in ("inside", "outside: published lower", "outside: published higher", "no interval"))
    notes = [
        f"compared {len(compared)} published cells: {counts}; disputed {int(compared.str.contains('disputed').sum())}",
        "Ours: the measured score on the paper's scale (fractions x100; MME (P+C) = lmms-eval's perception + "
        "cognition scores; POPE = F1 averaged over its three splits); CI: 95 % percentile bootstrap over samples "
        f"({n_boot} replicates, seed {seed}); Δ = Ours - Published",
        "Verdict: inside when the published value, widened by half a unit of its last printed digit, meets the "
        "interval; disputed: the papers printing this cell disagree by more than their rounding",
        "published numbers come from each paper's own evaluation code; ours from lmms-eval's tasks"
        + PROTOCOL_NOTES.get(model, ""),
    ]
    notes += [CAVEATS[c] for c in sorted(caveats)]
    if unmatched:
        notes.append("no published numbers for: " + ", ".join(unmatched))
    return notes
