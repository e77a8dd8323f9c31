"""The accuracy table's equal-compute reporting, against hand computations on a fixture store:
Tokens (eq.) and prefill FLOPs per row, best-in-group only inside the compute band, the floor
control of in-LLM rows flagged against random, and cells a method cannot reach."""

from __future__ import annotations

import dataclasses
import math

import pytest
from support.stores import _record

from prunebench.report.accuracy import accuracy_table
from prunebench.report.tables import render
from prunebench.results import Record

G64, FLOOR = "Retain 64 tokens (-88.9%)", "Floor control (1 token after each in-LLM stage)"
PDROP_REASON = "budget K=64 is below 144.8, the smallest layer average its stages allow"
# (method, budget): (GQA exact match, layer-averaged visual tokens, prefill TFLOPs, stage)
CELLS = {
    ("none", "all"): (0.80, 576.0, 2.0, "none"),
    ("random", "64"): (0.40, 64.0, 0.4, "pre"),
    ("divprune", "64"): (0.72, 64.0, 0.4, "pre"),
    ("visionzip", "64"): (0.74, 71.0, 0.41, "pre"),  # +10.9 %: just outside the band
    ("gumbel", "64"): (0.70, 70.0, 0.41, "pre"),  # +9.4 %: inside
    ("fastv", "64"): (0.78, 320.0, 1.2, "llm"),  # layers 0-1 of 4 see all 576 tokens
    ("dart", "64"): (0.70, 322.0, 1.21, "llm"),
    ("fastv", "floor"): (0.76, 288.5, 1.1, "llm"),  # 95 % of the unpruned score with one token
    ("dart", "floor"): (0.30, 290.0, 1.1, "llm"),  # 37.5 %
}


def fixture_records(tflops_scale: float = 1.0) -> list[Record]:
    records = []
    for (method, budget), (score, tokens, tflops, stage) in CELLS.items():
        rec = _record("m", method, budget, "gqa", metrics={"exact_match": score}, primary="exact_match", n=100,
                      tokens={"equivalent": tokens, "original": 576.0}, timing={"tflops": tflops * tflops_scale})
        records.append(dataclasses.replace(rec, stage=stage))
    unreachable = _record("m", "pyramiddrop:layers=1/2/3", "64", "gqa", kind="unreachable")
    records.append(dataclasses.replace(unreachable, stage="llm", provenance={"reason": PDROP_REASON}))
    return records


@pytest.fixture(scope="module")
def table():
    return accuracy_table(fixture_records())


def test_rows_and_compute_columns(table):
    assert list(table.frame.index) == [
        ("Unpruned (576 tokens)", "Vanilla"),
        (G64, "Random"), (G64, "DivPrune"), (G64, "VisionZip"), (G64, "Gumbel AE"), (G64, "FastV"), (G64, "DART"),
        (G64, "PyramidDrop (layers=1/2/3)"),
        (FLOOR, "FastV"), (FLOOR, "DART"),
    ]
    assert list(table.frame.columns) == ["GQA", "Avg.", "Tokens (eq.)", "TFLOPs", "Floor"]
    assert table.frame["Tokens (eq.)"].tolist()[:7] == [576.0, 64.0, 64.0, 71.0, 70.0, 320.0, 322.0]
    assert table.frame.loc[(G64, "FastV"), "TFLOPs"] == pytest.approx(1.2)


def test_band_marks_and_bold(table):
    # |71 - 64| = 7 > 6.4: VisionZip is outside; |70 - 64| = 6 <= 6.4: Gumbel inside; in-LLM rows far outside
    marked = {row[1] for row in table.frame.index if table.marks.loc[row, "Tokens (eq.)"] == "‡"}
    assert marked == {"VisionZip", "FastV", "DART"}
    bold = {(row[1], col) for row in table.frame.index for col in table.frame.columns if table.bold.loc[row, col]}
    # among Random 40, DivPrune 72 and Gumbel 70, DivPrune is best (FastV's 78 and VisionZip's 74 are not compared);
    # the unpruned and floor groups are never bolded, nor the compute columns
    assert bold == {("DivPrune", "GQA"), ("DivPrune", "Avg.")}
    assert table.frame.loc[(G64, "DivPrune"), "Avg."] == pytest.approx(90.0)


def test_floor_column_and_flags(table):
    floor = table.frame["Floor"]
    assert floor[(G64, "FastV")] == pytest.approx(95.0)  # 0.76 / 0.80
    assert floor[(G64, "DART")] == pytest.approx(37.5)  # 0.30 / 0.80
    assert floor.drop(index=[(G64, "FastV"), (G64, "DART")]).isna().all()  # pre-LLM, unpruned and floor rows
    # random retains 50 % at K = 64: FastV's floor beats it (flagged), DART's does not
    assert table.marks.loc[(G64, "FastV"), "Floor"] == "§" and table.marks.loc[(G64, "DART"), "Floor"] == ""
    assert any("§ = the floor retains more than Random" in note for note in table.notes)


def test_unreachable_cell_is_missing_with_its_reason(table):
    assert table.frame.loc[(G64, "PyramidDrop (layers=1/2/3)")].isna().all()
    assert f"– PyramidDrop (layers=1/2/3) at 64: not run ({PDROP_REASON})" in table.notes


def test_rendered_marks(table):
    md = render(table, "md")
    rows = {tuple(c.strip() for c in line.strip("|").split("|")) for line in md.splitlines() if line.startswith("|")}
    assert ("", "FastV", "78.0", "97.5%", "320.0‡", "1.20", "95.0%§") in rows
    assert "**72.0**" in md and "**78.0**" not in md
    latex = render(table, "latex")
    assert r"320.0$^\ddagger$" in latex and r"95.0\%$^\S$" in latex


def test_toy_model_flops_shown_in_gflops():
    t = accuracy_table(fixture_records(tflops_scale=1e-3))  # 2 GFLOPs unpruned
    assert "GFLOPs" in t.frame.columns and "TFLOPs" not in t.frame.columns
    assert t.frame.loc[(G64, "FastV"), "GFLOPs"] == pytest.approx(1.2)


def test_without_flops_or_floor_records_those_columns_are_left_out():
    plain = [dataclasses.replace(r, timing={}) for r in fixture_records() if r.key.budget != "floor"]
    t = accuracy_table(plain)
    assert list(t.frame.columns) == ["GQA", "Avg.", "Tokens (eq.)"]
    assert not any(math.isnan(v) for v in t.frame["Tokens (eq.)"].iloc[:7])


def test_console_splits_a_wide_table_rather_than_cut_numbers(table):
    import io

    from rich.console import Console

    from prunebench.report.tables import print_table

    console = Console(width=50, file=io.StringIO(), record=True)  # too narrow for the whole table
    print_table(table, console)
    text = console.export_text()
    assert text.count("m: accuracy and retention") >= 2 and "(continued)" in text
    assert "320.0‡" in text and "95.0%§" in text and "…" not in text
    assert all(len(line) <= 50 for line in text.splitlines() if "│" in line)
