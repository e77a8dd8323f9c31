"""The published-number registry and `prunebench report --reference`, checked by hand."""

from __future__ import annotations

import dataclasses
import math
import re
import shutil

import pytest
from support.stores import PARITY_MODEL, write_parity_store

from prunebench.budget import Budget
from prunebench.commands.main import main as cli
from prunebench.engine.method import available_methods, get_method_class
from prunebench.report.reference import (
    REGISTRY_DIR,
    Measured,
    Published,
    RegistryError,
    check_registry,
    check_row,
    disputed,
    load_registry,
    reference_table,
    target_for,
    verdict,
)

VANILLA, K192, K64 = "Unpruned (576 tokens)", "Retain 192 tokens (-66.7%)", "Retain 64 tokens (-88.9%)"


@pytest.fixture(scope="module")
def registry() -> list[Published]:
    return load_registry()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_parity_store(tmp_path_factory.mktemp("parity") / "results")


@pytest.fixture(scope="module")
def frame(store):
    return reference_table(list(store.records()), store, n_boot=2000).frame


# -- the registry ---------------------------------------------------------------------------------


def test_every_row_has_a_source_and_where_it_was_read(registry):
    assert len(registry) == 503
    assert {r.source for r in registry} == {
        "arXiv:2412.04467 Table 1", "arXiv:2410.04417 Table 1", "arXiv:2502.11494 Table 1",
        "arXiv:2502.11494 Table 4", "arXiv:2502.11494 Table 8", "arXiv:2410.17247 Table 5", "arXiv:2603.07135 Table 1",
    }
    assert all(r.read_from for r in registry)


def test_methods_options_and_budgets_are_prunebench_s(registry):
    known = available_methods()
    for row in registry:
        assert row.method in known, row.where
        fields = {f.name for f in get_method_class(row.method).options()}
        assert set(row.option_items) <= fields, row.where
        if row.method == "none":  # the unpruned run, printed at the model's full count
            assert row.budget == ("576" if row.model == PARITY_MODEL else "100%"), row.where
        elif row.budget:
            Budget.parse(row.budget)
        else:
            assert row.compare, row.where


def test_units_and_scales(registry):
    for row in registry:
        if row.benchmark == "mme":
            assert row.scale == "score" and row.metric in ("mme_total", "mme_perception"), row.where
            assert row.number <= (2000 if row.metric == "mme_perception" else 2800), row.where
        elif row.scale == "percent":
            assert 1 < row.number <= (200 if row.benchmark == "avg" else 100), row.where
    # LLaVA-1.5-7B's vanilla MME: perception 1510.7 (LLaVA-1.5's published score), perception +
    # cognition about 1862 in every table that prints the sum
    vanilla = {(r.metric, r.value) for r in registry if r.model == PARITY_MODEL and r.method == "none"
               and r.benchmark == "mme"}
    assert vanilla == {("mme_perception", "1510.7"), ("mme_total", "1862"), ("mme_total", "1864")}


def test_transcribed_cells_match_the_anchor_table(registry):
    """Spot checks against the anchor table of the project's reference notes (VisionZip's Table 1)."""
    def cell(source, method, budget, benchmark):
        (row,) = [r for r in registry if r.source == source and r.method == method and r.budget == budget
                  and r.benchmark == benchmark and not r.compare.startswith("VisionZip‡")]
        return row.value

    vz = "arXiv:2412.04467 Table 1"
    assert cell(vz, "fastv", "64", "gqa") == "46.1" and cell(vz, "fastv", "64", "pope") == "48.0"
    assert cell(vz, "visionzip", "192", "mme") == "1782.6" and cell(vz, "visionzip", "64", "textvqa") == "55.5"
    assert cell("arXiv:2603.07135 Table 1", "autoselect", "128", "mme") == "1765"
    assert cell("arXiv:2410.04417 Table 1", "fastv", "64", "pope") == "38.2"  # the disputed FastV
    assert cell("arXiv:2410.17247 Table 5", "none", "576", "mme") == "1510.7"


def _row(**changes) -> Published:
    base = Published(model=PARITY_MODEL, method="none", options="", budget="576", benchmark="mme", metric="mme_total",
                     scale="score", value="1862", source="arXiv:2412.04467 Table 1", setting="", compare="", note="",
                     read_from="test", where="test.csv:2")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("changes, message", [
    ({"source": "VisionZip paper"}, "is not 'arXiv:<id> Table <n>'"),
    ({"source": ""}, "empty 'source'"),
    ({"metric": "mme_perception", "value": "2317"}, r"outside \[0, 2000\]"),
    ({"benchmark": "gqa", "metric": "accuracy", "scale": "percent", "value": "0.619"}, "looks like a fraction"),
    ({"benchmark": "gqa", "metric": "mme_total"}, "gqa cannot be mme_total"),
    ({"value": "about 1862"}, "is not a number as printed"),
    ({"method": "fastv", "budget": ""}, "must say why it is not compared"),
    ({"method": "fastv", "budget": "many"}, "cannot read budget"),
    ({"options": "layer 2"}, "not prunebench's 'key=value,key=value'"),
])
def test_a_bad_row_is_refused_naming_file_and_line(changes, message):
    with pytest.raises(RegistryError, match="test.csv:2: .*" + message):
        check_row(_row(**changes))


def test_a_perception_value_in_a_perception_plus_cognition_column_is_caught(registry):
    swapped = [dataclasses.replace(r, value="1510.7") if r.where.startswith("arxiv-2412.04467") and r.method == "none"
               and r.benchmark == "mme" else r for r in registry]
    with pytest.raises(RegistryError, match=r"vanilla MME on one scale \(mme_total\) differs .* other scale"):
        check_registry(swapped)
    # a whole table printing perception under the sum's label agrees with itself but not with the others
    relabelled = [dataclasses.replace(r, metric="mme_total") if r.metric == "mme_perception" else r for r in registry]
    with pytest.raises(RegistryError, match="differs"):
        check_registry(relabelled)
    mixed = [*registry, _row(benchmark="mme", metric="mme_perception", method="fastv", budget="64", value="1200",
                             where="x.csv:9")]
    with pytest.raises(RegistryError, match="x.csv:9: mme is mme_perception but .* mme_total in the same table column"):
        check_registry(mixed)


def test_a_broken_csv_names_its_file(tmp_path):
    for path in REGISTRY_DIR.glob("*.csv"):
        shutil.copy(path, tmp_path)
    (tmp_path / "arxiv-2412.04467-visionzip.csv").write_text(
        (REGISTRY_DIR / "arxiv-2412.04467-visionzip.csv").read_text().replace(",61.9,", ",61.9%,", 1))
    with pytest.raises(RegistryError, match=r"arxiv-2412.04467-visionzip.csv:2: value '61.9%'"):
        load_registry(tmp_path)


# -- what is compared -------------------------------------------------------------------------------


def test_verdict_uses_the_interval_and_the_printed_rounding():
    ours = Measured(60.0, 55.0, 65.0, 100)
    assert verdict(_row(value="61.9"), ours) == "inside"
    assert verdict(_row(value="65.0"), ours) == "inside"
    assert verdict(_row(value="65.1"), ours) == "outside: published higher"  # 65.05 > 65
    assert verdict(_row(value="66"), ours) == "outside: published higher"  # 65.5 > 65
    assert verdict(_row(value="65"), ours) == "inside"  # printed without decimals: 64.5-65.5 meets 65
    assert verdict(_row(value="54.9"), ours) == "outside: published lower"
    assert verdict(_row(value="55.0"), ours) == "inside"
    assert verdict(_row(), Measured(60.0)) == "no interval"
    assert not disputed([_row(value="61.9"), _row(value="62.0")])  # rounding intervals touch
    assert disputed([_row(value="1862"), _row(value="1864")])


def test_targets_say_why_a_cell_is_not_compared():
    assert target_for(_row(benchmark="vqav2", metric="accuracy", scale="percent", value="78.5")).startswith(
        "papers score VQAv2 test-dev")
    assert target_for(_row(benchmark="seed", metric="unstated", scale="percent", value="60.3")) == (
        "the paper does not say which seed metric or split it prints")
    assert target_for(_row(compare="VisionZip‡ fine-tunes the projector")) == "VisionZip‡ fine-tunes the projector"
    assert target_for(_row(benchmark="pope", metric="unstated", scale="percent", value="85.9")).caveat == "assumed F1"
    assert target_for(_row()).measure == "mme_perception_score+mme_cognition_score"


# -- the table on the fixture store ------------------------------------------------------------------


def _cells(frame, budget, method, benchmark):
    part = frame.xs((budget, method, benchmark), level=(0, 1, 2))
    return {source: row for source, row in part.iterrows()}


def test_differences_by_hand(frame):
    gqa = _cells(frame, VANILLA, "Vanilla", "GQA")  # 12 of 20 right
    assert gqa["2412.04467 T1"]["Ours"] == pytest.approx(60.0)
    assert gqa["2412.04467 T1"]["Δ"] == pytest.approx(-1.9) and gqa["2410.17247 T5"]["Δ"] == pytest.approx(-2.0)
    assert {row["Verdict"] for row in gqa.values()} == {"inside"}  # 61.9 and 62.0 agree within rounding
    total = _cells(frame, VANILLA, "Vanilla", "MME (P+C)")  # perception 200 + 125, cognition 200
    assert total["2412.04467 T1"]["Ours"] == pytest.approx(525.0)
    assert total["2412.04467 T1"]["Δ"] == pytest.approx(-1337.0) and total["2410.04417 T1"]["Δ"] == pytest.approx(-1339.0)
    # resampling the two 'count' images gives 125, 200 or 50: totals 525, 600, 450
    assert (total["2502.11494 T1"]["CI low"], total["2502.11494 T1"]["CI high"]) == (450.0, 600.0)
    assert total["2502.11494 T1"]["Verdict"] == "outside: published higher; disputed"  # 1862 vs 1864
    perception = _cells(frame, VANILLA, "Vanilla", "MME-P")
    assert perception["2410.17247 T5"]["Ours"] == pytest.approx(325.0)
    assert perception["2410.17247 T5"]["Δ"] == pytest.approx(-1185.7)
    assert (perception["2410.17247 T5"]["CI low"], perception["2410.17247 T5"]["CI high"]) == (250.0, 400.0)
    pope = _cells(frame, VANILLA, "Vanilla", "POPE")  # F1 per split 2/3, 1, 4/5; lmms-eval's overall F1 is 5/6
    assert pope["2412.04467 T1"]["Ours"] == pytest.approx(100 * (2 / 3 + 1 + 4 / 5) / 3)
    assert pope["2412.04467 T1"]["Δ"] == pytest.approx(100 * (2 / 3 + 1 + 4 / 5) / 3 - 85.9)
    assert pope["2412.04467 T1"]["Match"] == "assumed F1"


def test_disputed_fastv_shows_both_papers(frame):
    pope = _cells(frame, K64, "FastV", "POPE")  # F1 per split 0, 2/3, 1
    ours = 100 * (0 + 2 / 3 + 1) / 3
    assert {s: row["Published"] for s, row in pope.items()} == {
        "2410.04417 T1": "38.2", "2412.04467 T1": "48.0", "2502.11494 T1": "48.0"}
    assert pope["2410.04417 T1"]["Δ"] == pytest.approx(ours - 38.2)
    assert pope["2412.04467 T1"]["Δ"] == pytest.approx(ours - 48.0)
    assert all(row["Verdict"].endswith("; disputed") for row in pope.values())
    gqa = _cells(frame, K64, "FastV", "GQA")  # 36 of 40 right: far above every paper's 46.1
    assert gqa["2412.04467 T1"]["Δ"] == pytest.approx(43.9)
    assert gqa["2412.04467 T1"]["Verdict"] == "outside: published lower"


def test_options_decide_which_rows_match(frame):
    gqa = _cells(frame, K192, "SparseVLM", "GQA")  # version 1.5 (the default): 11 of 20 right
    assert gqa["2410.04417 T1"]["Δ"] == pytest.approx(55.0 - 59.5)
    assert gqa["2502.11494 T1"]["Δ"] == pytest.approx(55.0 - 57.6)  # DART's row, labelled ICML25 (version 1.5)
    assert gqa["2412.04467 T1"]["Match"].startswith("not compared: SparseVLM's arXiv v1")
    v2 = frame.xs((K192, "SparseVLM (version=2.0)"), level=(0, 1))
    assert v2["Match"].str.startswith("not compared: SparseVLM's arXiv v1").all()  # no version-2.0 numbers published
    pdrop = _cells(frame, VANILLA, "PyramidDrop (ratios=0.5/0.25/0.125)", "MME-P")
    assert pdrop["2410.17247 T5"]["Δ"] == pytest.approx(200.0 - 1500.8)


def test_uncompared_cells_say_why(frame):
    vqa = _cells(frame, VANILLA, "Vanilla", "VQAv2")
    (row,) = vqa.values()
    assert row["Published"] == "78.5 / 78.5" and row["Match"].startswith("not compared: papers score VQAv2 test-dev")
    assert math.isnan(row["Ours"])
    sqa = _cells(frame, VANILLA, "Vanilla", "SQA-IMG")
    assert list(sqa) == ["2410.04417 T1, 2410.17247 T5, 2412.04467 T1, 2502.11494 T1"]
    assert next(iter(sqa.values()))["Match"] == "not measured: no scienceqa_img record"


def test_notes_count_verdicts_and_name_unmatched_cells(store):
    table = reference_table(list(store.records()), store, n_boot=200)
    notes = "\n".join(table.notes)
    assert re.search(r"compared \d+ published cells: inside \d+, outside: published lower \d+", notes)
    assert "no published numbers for: random @ 64" in notes
    assert "assumed F1:" in notes and "POPE" in notes


def test_compared_only_drops_the_reasons(store):
    frame = reference_table(list(store.records()), store, n_boot=100, compared_only=True).frame
    assert not frame["Match"].str.startswith("not").any() and len(frame) > 10


def test_pope_without_splits_is_not_compared(tmp_path):
    source = write_parity_store(tmp_path / "a")
    records = list(source.records())
    for rec in records:  # drop the split of every POPE sample
        if rec.key.task == "pope":
            rows = [{k: v for k, v in s.items() if k != "category"} for s in source.samples(rec.key)]
            source.write(rec, rows)
    frame = reference_table(records, source, n_boot=50).frame
    (row,) = _cells(frame, VANILLA, "Vanilla", "POPE").values()
    assert row["Match"] == "not compared: POPE's per-split F1 needs each sample's split ('category') in the per-sample file"


def test_a_model_without_published_numbers_gets_a_note(tmp_path):
    from support.stores import _record

    from prunebench.results import ResultStore

    other = ResultStore(tmp_path)
    other.write(_record("tiny-llava", "none", "all", "gqa", metrics={"exact_match": 0.5}, primary="exact_match"))
    table = reference_table(list(other.records()), other)
    assert table.frame.empty
    assert table.notes[0].startswith("no published numbers for tiny-llava; the registry covers Qwen/Qwen2-VL-7B")


def test_cli_prints_and_writes_the_table(store, tmp_path, capsys):
    assert cli(["report", "--results", str(store.root), "--reference", "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "measured vs published" in out and "disputed" in out  # the console squeezes wide columns
    assert cli(["report", "--results", str(store.root), "--reference", "--bootstrap", "50", "--out",
                str(tmp_path / "out"), "--format", "md,csv", "--no-plots"]) == 0
    folder = tmp_path / "out" / "llava-hf__llava-1.5-7b-hf"
    written = (folder / "reference.md").read_text()
    assert "| Unpruned (576 tokens)" in written and "-1337.0" in written
    assert "2502.11494 T1" in (folder / "reference.csv").read_text()
