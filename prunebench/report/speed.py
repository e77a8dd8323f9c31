"""The speed table: ms per stage, speedups against the unpruned run timed the same way on the same
device, TFLOPs and layer-averaged visual tokens; profile records win over the timings eval records carry."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from prunebench.report.frames import (
    TIMINGS,
    ReportError,
    group_label,
    method_name,
    one_model,
    original_tokens,
    table_rows,
    timing_frame,
)
from prunebench.report.tables import Column, Table
from prunebench.results import Record


def speed_table(records: Iterable[Record], title: str | None = None) -> Table:
    recs = one_model(records, ("eval", "profile"))
    frame = timing_frame(recs)
    if frame.empty:
        raise ReportError("no records with timings")
    n_original = original_tokens([r for r in recs if r.kind == "eval"] or recs)
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
