"""`prunebench report`: every table of a store, printed and written (md, LaTeX, CSV, HTML), and plots.

Tables (prunebench.report.tables) are pandas frames of numbers, one set per model: accuracy
(report.accuracy), statistics (report.significance), categories, speed (report.speed).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console

from prunebench.report.accuracy import accuracy_table, agreement_frame, category_table
from prunebench.report.frames import ReportError
from prunebench.report.reference import reference_table
from prunebench.report.significance import compare_table, stats_table
from prunebench.report.speed import speed_table
from prunebench.report.tables import FORMATS, Table, print_table, render
from prunebench.results import Record, ResultStore, check_writable_folder, inside, slug


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


def parse_formats(text: str | None, default: tuple[str, ...]) -> list[str]:
    if text is None:
        return list(default)
    formats = [f.strip().lower() for f in text.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ReportError(f"unknown format {', '.join(bad) or repr(text)}; valid formats: {', '.join(FORMATS)}")
    return formats


def load_records(store: ResultStore, models: list[str] | None, limit: str | None,
                 strict: bool = False) -> tuple[dict[str, list[Record]], list[str]]:
    """model -> its records, filtered by --model and --limit, one set of inputs per model
    (``current_inputs``); and the warnings to print: each unreadable record file (skipped, or the
    report refused with ``strict``) and the records left out for their inputs."""
    if not store.root.is_dir():
        raise ReportError(
            f"results folder {str(store.root)!r} does not exist; run `prunebench run` first or pass --results"
        )
    records, bad = store.scan()
    if bad and strict:
        raise ReportError(f"{bad[0]} (--strict: {len(bad)} unreadable record file(s) stop the report)")
    warnings = [f"skipped: {err}" for err in bad]
    if not records:
        raise ReportError(f"no records in {str(store.root)!r}; run `prunebench run` first")
    if limit is not None:  # profile records time fixed inputs: no limit applies to them
        want = None if limit.strip().lower() == "full" else _int_limit(limit)
        records = [r for r in records if r.kind == "profile" or r.key.limit == want]
        if not any(r.kind == "eval" for r in records):
            raise ReportError(f"no eval records with --limit {limit}")
    available = sorted({r.key.model for r in records})
    wanted = [m.strip() for text in (models or []) for m in text.split(",") if m.strip()] or available
    unknown = [m for m in wanted if m not in available]
    if unknown:
        raise ReportError(
            f"unknown --model {', '.join(unknown)}; models in {str(store.root)!r}: {', '.join(available)}"
        )
    out = {}
    for model in wanted:
        out[model], note = current_inputs([r for r in records if r.key.model == model])
        warnings += [note] if note else []
    return out, warnings


def current_inputs(records: list[Record]) -> tuple[list[Record], str | None]:
    """One model's eval records computed from one set of inputs (provenance ``inputs``: model
    files, prompt, decoding settings, each task's data, each method's checkpoint), so that a table
    never sets a cell against a baseline computed from other data: the inputs of the newest record,
    per task those of its newest record, per cell the newest. Returns the records kept (profile
    records all) and a note saying what was left out and which inputs are shown, if any was."""
    evals = [r for r in records if r.kind == "eval"]
    if not evals:
        return records, None

    def parts(r: Record) -> dict:
        return r.provenance.get("inputs") or {}

    def created(r: Record) -> str:
        return r.provenance.get("created", "")

    newest = max(evals, key=created)
    shared = {k: parts(newest).get(k) for k in ("model", "prompt", "decoding")}
    pool = [r for r in evals if all(parts(r).get(k) == v for k, v in shared.items())]
    task_part = {}
    for r in sorted(pool, key=created):
        task_part[(r.key.task, r.key.limit)] = parts(r).get("task")
    cells: dict[tuple, Record] = {}
    for r in sorted(pool, key=created):
        if parts(r).get("task") == task_part[(r.key.task, r.key.limit)]:
            cells[(r.key.method, r.key.budget, r.key.task, r.key.limit, r.key.setting)] = r
    kept = list(cells.values())
    if len(kept) == len(evals):
        return records, None
    data = sorted({(r.key.task, d["path"], d["sha256"][:12]) for r in kept if (d := parts(r).get("task_data"))})
    shown = "; ".join(f"{task} on {path} (sha256 {sha})" for task, path, sha in data)
    note = (f"{newest.key.model}: {len(evals) - len(kept)} record(s) computed from other inputs (model files, prompt, "
            f"decoding settings, task data or checkpoints) are not shown; the tables show the newest inputs"
            f"{' (' + shown + ')' if shown else ''}")
    return [r for r in records if r.kind != "eval"] + kept, note


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
    reference: bool = False,
) -> list[Table]:
    """Every table of one model: accuracy (+ stats) when it has eval records, speed when any has timings,
    and with ``reference`` the published numbers beside the measured ones."""
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
    if reference:
        tables.append(reference_table(records, store, n_boot=n_boot, seed=seed))
    return tables


def write_report(store: ResultStore, models: list[str] | None = None, limit: str | None = None,
                 formats: list[str] | None = None, out: str | None = None, compare: tuple[str, str] | None = None,
                 n_boot: int = 2000, seed: int = 0, show_stats: bool = False, plots: bool = True,
                 console: Console | None = None, reference: bool = False, strict: bool = False) -> None:
    """Every table of every model in ``store``: printed, and written under ``out`` (one folder per
    model) in ``formats`` with plots, or printed in ``formats`` on stdout without ``out``; with
    ``reference``, the published numbers beside the measured ones too. Unreadable record files
    are skipped with a warning naming each (``strict``: refused)."""
    console = console or Console()
    formats = formats or []
    if n_boot < 1:
        raise ReportError(f"--bootstrap {n_boot}: need at least 1 replicate")
    if out:
        check_writable_folder(out, "--out")
    loaded, warnings = load_records(store, models, limit, strict)
    for warning in warnings:
        Console(stderr=True).print(f"warning: {warning}", style="yellow", markup=False, soft_wrap=True)
    for model, records in loaded.items():
        # the bootstrap is the slow part: skip it when its table goes nowhere
        with_stats = bool(out or formats or show_stats)
        tables = build_tables(records, store, n_boot, seed, compare, with_stats, reference)
        for table in tables:
            if table.name != "stats" or show_stats:
                print_table(table, console)
        if out:
            folder = inside(out, slug(model))
            folder.mkdir(parents=True, exist_ok=True)
            for table in tables:
                for fmt in formats:
                    (folder / f"{table.name}.{FORMATS[fmt]}").write_text(render(table, fmt))
            if plots:
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
