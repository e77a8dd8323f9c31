"""`prunebench report`: every cell against a hand computation on the tiny fixture store."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from rich.console import Console
from support.stores import (
    FIXTURE_DEVICE,
    TINY_MODEL,
    _record,
    _tiny_tokens,
    write_example_store,
    write_tiny_store,
)

from prunebench.commands.main import main as cli
from prunebench.report import stats
from prunebench.report.accuracy import accuracy_table, agreement_frame, category_table
from prunebench.report.build import print_summary
from prunebench.report.frames import ReportError, group_label, paper_metric
from prunebench.report.plots import draw_all
from prunebench.report.significance import compare_table, stats_table
from prunebench.report.speed import speed_table
from prunebench.report.tables import render
from prunebench.results import ResultStore

G192, G64, G_ALL = "Retain 192 tokens (-66.7%)", "Retain 64 tokens (-88.9%)", "Unpruned (576 tokens)"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> ResultStore:
    return write_tiny_store(tmp_path_factory.mktemp("tiny") / "results")


@pytest.fixture(scope="module")
def records(tiny) -> list:
    return list(tiny.records())


@pytest.fixture(scope="module")
def table(records, tiny):
    return accuracy_table(records, agreement_frame(records, tiny))


@pytest.fixture(scope="module")
def banded(records, tiny):
    """The table with FastV's layer-averaged tokens set to its K: every row inside its compute band."""
    inside = [
        dataclasses.replace(r, visual_tokens={**r.visual_tokens, "equivalent": float(r.key.budget)})
        if r.key.method == "fastv" and r.kind == "eval" else r
        for r in records
    ]
    return accuracy_table(inside, agreement_frame(inside, tiny))


# -- accuracy table ----------------------------------------------------------------------------


def test_rows_groups_and_columns(table):
    assert list(table.frame.index) == [
        (G_ALL, "Vanilla"),
        (G192, "FastV"),
        (G192, "Random"),
        (G64, "FastV"),
        (G64, "Random"),
    ]
    assert list(table.frame.columns) == ["GQA", "MME-P", "POPE", "Avg.", "Agree.", "Tokens (eq.)"]  # no FLOPs stored


def test_scores_on_native_scale(table):
    f = table.frame
    # GQA / POPE are fractions shown x100; MME perception stays on its own scale (cognition, 300, is ignored)
    assert f.loc[(G_ALL, "Vanilla"), ["GQA", "MME-P", "POPE"]].tolist() == pytest.approx([80.0, 400.0, 100.0])
    assert f.loc[(G64, "FastV"), ["GQA", "MME-P", "POPE"]].tolist() == pytest.approx([70.0, 150.0, 80.0])
    assert f.loc[(G64, "Random"), ["GQA", "MME-P", "POPE"]].tolist() == pytest.approx([60.0, 325.0, 200 / 3])
    assert f.loc[(G192, "FastV"), ["GQA", "MME-P", "POPE"]].tolist() == pytest.approx([80.0, 325.0, 100.0])
    assert f.loc[(G192, "Random"), "GQA"] == pytest.approx(80.0)
    assert math.isnan(f.loc[(G192, "Random"), "MME-P"])  # no record: missing, not dropped
    assert f.loc[(G192, "Random"), "POPE"] == pytest.approx(800 / 9)  # P 1, R 0.8


def test_average_retention(table):
    avg = table.frame["Avg."]
    assert avg[(G_ALL, "Vanilla")] == pytest.approx(100.0)
    assert avg[(G64, "FastV")] == pytest.approx((70 / 80 + 150 / 400 + 0.8 / 1.0) / 3 * 100)
    assert avg[(G64, "Random")] == pytest.approx((60 / 80 + 325 / 400 + (2 / 3) / 1.0) / 3 * 100)
    assert avg[(G192, "FastV")] == pytest.approx((1.0 + 325 / 400 + 1.0) / 3 * 100)
    assert avg[(G192, "Random")] == pytest.approx((1.0 + 8 / 9) / 2 * 100)  # over the two tasks it has
    assert table.marks.loc[(G192, "Random"), "Avg."] == "†"
    assert (table.marks[["Avg.", "Agree."]].drop(index=[(G192, "Random")]) == "").all().all()


def test_agreement_with_unpruned_answers(table):
    agree = table.frame["Agree."]
    # GQA: fastv@64 changes 1 of 10 answers ("cat " strips to "cat"); MME: 4 of 8; POPE: 2 of 10
    assert agree[(G64, "FastV")] == pytest.approx((0.9 + 0.5 + 0.8) / 3 * 100)
    assert agree[(G64, "Random")] == pytest.approx((0.7 + 0.875 + 0.5) / 3 * 100)
    assert agree[(G192, "FastV")] == pytest.approx((0.9 + 0.875 + 1.0) / 3 * 100)
    assert agree[(G192, "Random")] == pytest.approx((1.0 + 0.9) / 2 * 100)
    assert agree[(G_ALL, "Vanilla")] == pytest.approx(100.0)


def test_rows_outside_the_compute_band_are_marked_and_not_compared(table):
    # FastV prunes at layer 2 of the fixture's 8: (2 x 576 + 6 K) / 8 tokens, 288 for K = 192 (+50 %),
    # 192 for K = 64 (+200 %): both outside 10 % of K; Random holds K exactly
    tokens = table.frame["Tokens (eq.)"]
    assert tokens.tolist() == pytest.approx([576.0, 288.0, 192.0, 192.0, 64.0])
    marked = {row for row in table.frame.index if table.marks.loc[row, "Tokens (eq.)"] == "‡"}
    assert marked == {(G192, "FastV"), (G64, "FastV")}
    assert not table.bold.any().any()  # each group keeps one compared row: nothing to beat
    assert any("within 10% of the group's K" in note and "‡ = outside the band" in note for note in table.notes)


def test_bold_is_the_best_per_group(banded):
    table = banded
    assert (table.marks["Tokens (eq.)"] == "").all()
    bold = {(*row, col) for row in table.frame.index for col in table.frame.columns if table.bold.loc[row, col]}
    assert bold == {
        (G64, "FastV", "GQA"),
        (G64, "Random", "MME-P"),
        (G64, "FastV", "POPE"),
        (G64, "Random", "Avg."),
        (G64, "FastV", "Agree."),
        (G192, "FastV", "GQA"),
        (G192, "Random", "GQA"),  # a tie: both
        (G192, "FastV", "POPE"),
        # MME-P @192 has one value, Avg. / Agree. @192 one unmarked value: nothing to beat, no bold
    }


def _md_rows(table) -> set[tuple[str, ...]]:
    md = render(table, "md")
    return {tuple(c.strip() for c in line.strip("|").split("|")) for line in md.splitlines() if line.startswith("|")}


def test_markdown_cells(table, banded):
    rows = _md_rows(banded)
    assert ("Retain 192 tokens (-66.7%)", "FastV", "**80.0**", "325.0", "**100.0**", "93.8%", "92.5%", "192.0") in rows
    assert ("", "Random", "**80.0**", "–", "88.9", "94.4%†", "95.0%†", "192.0") in rows
    assert ("Retain 64 tokens (-88.9%)", "FastV", "**70.0**", "150.0", "**80.0**", "68.3%", "**73.3%**", "64.0") in rows
    assert ("", "Random", "60.0", "**325.0**", "66.7", "**74.3%**", "69.2%", "64.0") in rows
    assert "† mean over the tasks of the row that have a value" in render(banded, "md")
    assert ("Retain 64 tokens (-88.9%)", "FastV", "70.0", "150.0", "80.0", "68.3%", "73.3%", "192.0‡") in _md_rows(table)


def _balanced(latex: str) -> None:
    begins, ends = re.findall(r"\\begin\{(\w+)\}", latex), re.findall(r"\\end\{(\w+)\}", latex)
    assert begins and sorted(begins) == sorted(ends)
    body = [line for line in latex.splitlines() if not line.startswith("%")]
    assert body.count(r"\toprule") == 1 and body.count(r"\bottomrule") == 1
    assert not any(r"\cline" in line for line in body)
    assert body[body.index(r"\bottomrule") - 1].endswith(r"\\")  # no rule right before \bottomrule


def test_latex_booktabs_bold_and_missing(table, banded):
    latex = render(banded, "latex")
    _balanced(latex)
    assert (
        r"Retain 64 tokens (-88.9\%) & FastV & \bfseries 70.0 & 150.0 & \bfseries 80.0 & 68.3\% & \bfseries 73.3\% & 64.0 \\"
        in latex
    )
    assert r" & Random & \bfseries 80.0 & -- & 88.9 & 94.4\%$^\dagger$ & 95.0\%$^\dagger$ & 192.0 \\" in latex
    assert latex.count(r"\midrule") == 3  # under the header and between the three groups
    assert latex.count(r"\bfseries") == 8
    assert r"& 73.3\% & 192.0$^\ddagger$ \\" in render(table, "latex")


def test_latex_escapes_task_and_method_names(tmp_path):
    store = ResultStore(tmp_path)
    for method, budget, value in [("none", "all", 0.5), ("my_method:alpha=0.5", "64", 0.25)]:
        store.write(_record("m", method, budget, "ocr_bench&co", metrics={"acc_%": value}, primary="acc_%", n=4))
    latex = render(accuracy_table(store.records()), "latex")
    _balanced(latex)
    assert r"ocr\_bench\&co" in latex and "ocr_bench&co" not in latex.split("\\begin")[1]
    assert r"my\_method (alpha=0.5)" in latex
    assert r"0.250 & 50.0\%" in latex  # an unknown metric in [0, 1] keeps three decimals, shown as is


def test_csv_and_html(table, banded):
    csv = pd.read_csv(io.StringIO(render(table, "csv")))
    row = csv[(csv["Budget"] == G192) & (csv["Method"] == "Random")].iloc[0]
    assert row["GQA"] == pytest.approx(80.0) and math.isnan(row["MME-P"]) and row["Avg."] == pytest.approx(850 / 9)
    assert row["Tokens (eq.)"] == 192.0
    html = render(banded, "html")
    assert html.count("<tr>") == 6 and "font-weight: bold" in html and ">–</td>" in html


def test_paper_metric_wins_over_lmms_eval_first_metric(table):
    # the tiny POPE records name pope_accuracy (0.5) as primary, as the harness does; papers report F1
    assert table.frame.loc[(G_ALL, "Vanilla"), "POPE"] == 100.0
    assert paper_metric("pope") == "pope_f1_score" and paper_metric("synth-pope") == "pope_f1_score"
    assert paper_metric("mme") == "mme_perception_score" and paper_metric("my_task") is None


def test_group_label_printed_once_per_group(tmp_path):
    store = ResultStore(tmp_path)
    for method, budget, value in [("none", "all", 0.8), ("fastv", "192", 0.7), ("fastv", "64", 0.6)]:
        store.write(_record("m", method, budget, "gqa", metrics={"exact_match": value}, n=1))
    md = render(accuracy_table(store.records()), "md")
    rows = [tuple(c.strip() for c in line.strip("|").split("|"))[:3] for line in md.splitlines()[4:7]]
    assert rows == [
        ("Unpruned", "Vanilla", "80.0"),
        ("Retain 192 tokens", "FastV", "70.0"),
        ("Retain 64 tokens", "FastV", "60.0"),
    ]


def test_group_labels():
    assert group_label("all", 576) == "Unpruned (576 tokens)"
    assert group_label("128", 576) == "Retain 128 tokens (-77.8%)"
    assert group_label("25%", 2880) == "Retain 25% of tokens (-75.0%)"
    assert group_label("64", None) == "Retain 64 tokens"


def test_without_baseline_retention_is_missing(records):
    pruned = [r for r in records if r.key.method != "none"]
    t = accuracy_table(pruned)
    assert t.frame["Avg."].isna().all()
    assert any("no unpruned" in note for note in t.notes)
    assert t.frame.loc[(G64, "FastV"), "GQA"] == pytest.approx(70.0)


# -- statistics --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stats_frame(records, tiny):
    return stats_table(records, tiny, n_boot=300, seed=0).frame


def test_interval_mean_metric_by_hand(stats_frame):
    right = np.array([1.0] * 8 + [0.0] * 2)  # unpruned GQA
    idx = np.random.default_rng(0).integers(0, 10, size=(300, 10))
    low, high = np.quantile(right[idx].mean(axis=1), [0.025, 0.975]) * 100
    cell = stats_frame.loc[(G_ALL, "Vanilla", "GQA")]
    assert (cell["CI low"], cell["CI high"]) == pytest.approx((low, high))
    assert cell["CI low"] <= cell["Score"] == 80.0 <= cell["CI high"]


def test_interval_mme_stratified_by_hand(stats_frame):
    # fastv@64: pair scores (acc + acc+) per category, pairs in question-id order; categories sorted
    pairs = {"color": [200.0, 50.0], "count": [50.0, 0.0]}
    rng = np.random.default_rng(0)
    draws = {c: rng.integers(0, 2, size=(300, 2)) for c in sorted(pairs)}
    reps = [sum(np.mean([pairs[c][j] for j in draws[c][b]]) for c in pairs) for b in range(300)]
    cell = stats_frame.loc[(G64, "FastV", "MME-P")]
    assert (cell["CI low"], cell["CI high"]) == pytest.approx(tuple(np.quantile(reps, [0.025, 0.975])))
    assert cell["n"] == 4  # image pairs


def test_interval_pope_f1_by_hand(stats_frame):
    pred = np.array([1] * 10)  # random@64 answers "yes" to everything
    gold = np.array([1] * 5 + [0] * 5)
    idx = np.random.default_rng(0).integers(0, 10, size=(300, 10))
    f1s = []
    for row in idx:
        tp = sum(pred[i] and gold[i] for i in row)
        p = tp / sum(pred[i] for i in row)
        r = tp / sum(gold[i] for i in row) if sum(gold[i] for i in row) else 0.0
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    cell = stats_frame.loc[(G64, "Random", "POPE")]
    assert (cell["CI low"], cell["CI high"]) == pytest.approx(tuple(np.quantile(f1s, [0.025, 0.975]) * 100))


def test_paired_tests_by_hand(stats_frame):
    # GQA random@64: unpruned right & random wrong on 2 samples, the reverse on none -> p = 2 * (1/2)^2
    cell = stats_frame.loc[(G64, "Random", "GQA")]
    assert (cell["Test"], cell["p"], cell["n"], cell["Agree."]) == ("McNemar exact", 0.5, 10, 70.0)
    assert cell["Δ"] == pytest.approx(-20.0)
    assert stats_frame.loc[(G64, "FastV", "GQA"), "p"] == 1.0  # one discordant pair
    # POPE is F1, not a mean: paired bootstrap; identical answers give p = 1
    assert stats_frame.loc[(G192, "FastV", "POPE"), ["Test", "p"]].tolist() == ["paired bootstrap", 1.0]
    # random@64 POPE by hand: same resamples for both runs, p = 2 (k + 1) / (B + 1)
    gold = np.array([1] * 5 + [0] * 5)
    idx = np.random.default_rng(0).integers(0, 10, size=(300, 10))
    d = []
    for row in idx:
        tp = gold[row].sum()
        f1_random = 2 * (tp / 10) * 1.0 / (tp / 10 + 1.0) if tp else 0.0
        d.append(f1_random - (1.0 if tp else 0.0))
    k = min(sum(x <= 0 for x in d), sum(x >= 0 for x in d))
    assert stats_frame.loc[(G64, "Random", "POPE"), "p"] == pytest.approx(min(1.0, 2 * (k + 1) / 301))
    assert stats_frame.loc[(G_ALL, "Vanilla", "GQA"), ["Test", "p"]].isna().all()


def test_mcnemar_exact_values():
    assert stats.mcnemar_exact(0, 2) == 0.5
    assert stats.mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)
    assert stats.mcnemar_exact(0, 0) == 1.0 and stats.mcnemar_exact(3, 3) == 1.0
    assert stats.mcnemar_exact(4000, 4400) == stats.mcnemar_exact(4400, 4000) < 0.01  # big n, exact integers


def test_mcnemar_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for b, c in [(3, 11), (20, 9), (150, 190)]:
        assert stats.mcnemar_exact(b, c) == pytest.approx(scipy_stats.binomtest(b, b + c, 0.5).pvalue)


def test_interval_coverage_is_sane():
    """A Bernoulli(0.5) sample of 400: the bootstrap interval is about +-1.96 * 2.5 points wide."""
    values = np.random.default_rng(1).permutation([1.0] * 200 + [0.0] * 200)
    units = stats.units_from_samples(
        [{"doc_id": i, "scores": {"exact_match": v}} for i, v in enumerate(values)], "exact_match"
    )
    low, high = stats.bootstrap_interval(units, 4000, seed=3)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.006) and high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.006)


def test_stats_problems_become_notes(tmp_path):
    store = ResultStore(tmp_path)
    store.write(
        _record("m", "none", "all", "gqa", metrics={"exact_match": 0.5}, primary="exact_match", n=2),
        [
            {"doc_id": 0, "output": "a", "target": "a", "scores": {"exact_match": 1.0}},
            {"doc_id": 1, "output": "b", "target": "a", "scores": {"exact_match": 0.0}},
        ],
    )
    store.write(
        _record("m", "fastv", "64", "gqa", metrics={"exact_match": 0.9}, primary="exact_match", n=2),
        [
            {"doc_id": 0, "output": "a", "target": "a", "scores": {"exact_match": 1.0}},
            {"doc_id": 1, "output": "b", "target": "a", "scores": {"exact_match": 0.0}},
        ],
    )  # record disagrees
    store.write(
        _record("m", "random", "64", "gqa", metrics={"exact_match": 0.5}, primary="exact_match", n=2)
    )  # no samples
    store.write(
        _record("m", "none", "all", "mme", metrics={"mme_perception_score": 100.0}, primary="mme_perception_score"),
        [{"doc_id": 0, "output": "Yes", "target": "Yes", "scores": {"mme_perception_score": 1.0}}],
    )
    t = stats_table(store.records(), store, n_boot=50)
    assert t.frame.loc[("Retain 64 tokens", "FastV", "GQA"), ["CI low", "p"]].isna().all()
    notes = " ".join(t.notes)
    assert "the samples give exact_match = 0.5 but the record says 0.9" in notes
    assert "no per-sample file" in notes
    assert "MME samples need 'category' and 'question_id'" in notes


# -- categories --------------------------------------------------------------------------------


def test_category_scores_by_hand(records, tiny):
    """MME's subtasks (the only task of the fixture whose samples carry a category): each column is
    that category's mean over images of acc + acc+, and the columns sum to the perception score."""
    table = category_table(records, tiny)
    assert list(table.frame.columns) == ["MME-P: color", "MME-P: count"]
    expected = {G_ALL: ("Vanilla", 200.0, 200.0), G64: ("FastV", 125.0, 25.0)}
    for group, (method, color, count) in expected.items():
        assert table.frame.loc[(group, method)].tolist() == [color, count]
    assert table.frame.loc[(G64, "Random")].tolist() == [200.0, 125.0]
    whole = {(r.key.method, r.key.budget): r.metrics["mme_perception_score"] for r in records if r.key.task == "mme"}
    assert table.frame.loc[(G64, "FastV")].sum() == whole[("fastv", "64")]
    assert math.isnan(table.frame.loc[(G192, "Random")].iloc[0])  # random @ 192 has no MME record
    assert "MME-P mme_perception_score" in table.notes[0]


def test_pope_categories_use_accuracy_and_none_without_categories(tmp_path):
    """POPE's F1 is undefined on a category of one answer: its categories show accuracy."""
    store = ResultStore(tmp_path)
    kinds = ["present"] * 4 + ["absent"] * 4
    targets = ["yes"] * 4 + ["no"] * 4
    outputs = {("none", "all"): targets, ("random", "64"): ["yes", "no", "no", "yes", "no", "yes", "no", "no"]}
    for (method, budget), outs in outputs.items():
        samples = [{"doc_id": i, "output": o, "target": t, "category": k,
                    "scores": {"pope_accuracy": float(o == t), "pope_f1_score": float(o == t)}}
                   for i, (o, t, k) in enumerate(zip(outs, targets, kinds))]
        store.write(_record(TINY_MODEL, method, budget, "pope", metrics={"pope_f1_score": 0.5, "pope_accuracy": 0.5},
                            primary="pope_accuracy", n=8, tokens=_tiny_tokens(method, budget)), samples)
    table = category_table(list(store.records()), store)
    assert list(table.frame.columns) == ["POPE: absent", "POPE: present"]
    assert table.frame.loc[(G_ALL, "Vanilla")].tolist() == [100.0, 100.0]
    assert table.frame.loc[(G64, "Random")].tolist() == [75.0, 50.0]  # 3 of 4 "no" right, 2 of 4 "yes"
    assert "POPE pope_accuracy" in table.notes[0]
    for path in store.root.glob("*/*/*.jsonl"):  # the same samples without categories: no table
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "category"}) + "\n" for r in rows))
    assert category_table(list(store.records()), store) is None


def test_compare_two_methods(records, tiny):
    t = compare_table(records, tiny, "fastv", "random", n_boot=100)
    assert list(t.frame.index) == [(G192, "GQA"), (G192, "POPE"), (G64, "GQA"), (G64, "MME-P"), (G64, "POPE")]
    row = t.frame.loc[(G64, "GQA")]
    # fastv right & random wrong on sample 6 only: McNemar p = 1; answers differ on samples 6 and 9
    assert (row["FastV"], row["Random"], row["Δ"], row["p"]) == (70.0, 60.0, pytest.approx(10.0), 1.0)
    assert row["Agree."] == pytest.approx(80.0)
    with pytest.raises(ReportError, match="no records for method 'nope'.*fastv, none, random"):
        compare_table(records, tiny, "fastv", "nope")


# -- speed -------------------------------------------------------------------------------------


def test_speed_cells(records):
    t = speed_table(records)
    f = t.frame
    assert list(f.index) == [
        (G_ALL, "Vanilla [eval]"),
        (G_ALL, "Vanilla [profile]"),
        (G192, "FastV"),
        (G192, "Random"),
        (G64, "FastV"),
        (G64, "Random"),
    ]
    # profile records win where they exist; speedups only against the baseline timed the same way
    fastv = f.loc[(G64, "FastV")]
    assert (fastv["Prefill (ms)"], fastv["Pruner (ms)"], fastv["TFLOPs"], fastv["Device"]) == (
        40.0,
        2.0,
        3.0,
        f"{FIXTURE_DEVICE}, bf16",
    )
    assert fastv["Prefill speedup"] == pytest.approx(2.5) and fastv["TTFT speedup"] == pytest.approx(110 / 52)
    assert fastv["Tokens (eq.)"] == pytest.approx((2 * 576 + 6 * 64) / 8)
    # eval timings: per-sample means weighted by each task's samples (gqa 10, mme 8, pope 10)
    random = f.loc[(G64, "Random")]
    assert random["Prefill (ms)"] == pytest.approx((30 * 10 + 40 * 8 + 20 * 10) / 28)
    assert random["Prefill speedup"] == pytest.approx(2.0) and math.isnan(random["TFLOPs"])
    assert (random["Device"], random["Source"]) == ("cpu", "eval")
    assert f.loc[(G_ALL, "Vanilla [profile]"), "Prefill speedup"] == 1.0
    latex = render(t, "latex")
    _balanced(latex)
    assert r"2.50$\times$" in latex


def test_speed_single_device_moves_to_title(tmp_path):
    store = write_example_store(tmp_path / "results")
    t = speed_table(store.records())
    assert t.title.endswith(f"on {FIXTURE_DEVICE}, bf16") and "Device" not in t.frame.columns
    assert t.frame.loc[(G64, "AutoSelect"), "Prefill speedup"] == pytest.approx((576 + 64) / (64 + 64), rel=1e-3)


# -- plots -------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny", "example"])
def test_plots_are_written(which, tiny, tmp_path):
    store = tiny if which == "tiny" else write_example_store(tmp_path / "results")
    written, notes = draw_all(list(store.records()), tmp_path)
    if which == "tiny":  # what a plot leaves out is said, never dropped silently
        assert notes == [
            "left out, their average misses tasks: Random @ 192",
            "timing plots show cpu only; left out: FastV @ 64, Vanilla @ all",
        ]
    else:
        assert notes == ["left out, their average misses tasks: SparseVLM @ 64"]
    names = sorted(p.name for p in written)
    assert names == sorted(
        f"{stem}.{ext}"
        for stem in ("retention_vs_tokens", "pareto_prefill", "pruner_overhead")
        for ext in ("png", "pdf")
    )
    for path in written:
        assert path.stat().st_size > 5000
        if path.suffix == ".png":
            pixels = imread(path)
            assert pixels.shape[0] > 300 and pixels.std() > 0.05  # drawn, not blank
        else:
            assert path.read_bytes().startswith(b"%PDF")


def test_plot_without_timings_is_reported(records, tmp_path):
    evals = [dataclasses.replace(r, timing={}) for r in records if r.kind == "eval"]
    written, notes = draw_all(evals, tmp_path)
    assert [p.name for p in written] == ["retention_vs_tokens.png", "retention_vs_tokens.pdf"]
    assert notes[1:] == ["pareto not drawn: no record has timings", "pruner overhead not drawn: no record has timings"]


# -- command line and errors -------------------------------------------------------------------


def test_cli_writes_every_format(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    assert cli(["report", "--results", str(tiny.root), "--out", str(out), "--bootstrap", "50", "--no-plots"]) == 0
    folder = out / TINY_MODEL
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"{t}.{s}" for t in ("accuracy", "stats", "categories", "speed") for s in ("md", "tex", "csv", "html")
    )
    assert "**tiny-llava: accuracy and retention**" in (folder / "accuracy.md").read_text()
    shown = capsys.readouterr().out  # the console table: budgets as K, options as letters in a note
    assert "│ 64  │" in shown and "Retain 64 tokens" not in shown


def test_cli_prints_formats_without_out(tiny, capsys):
    assert cli(["report", "--results", str(tiny.root), "--format", "latex", "--bootstrap", "20"]) == 0
    _balanced(capsys.readouterr().out.split("% tiny-llava: intervals")[0].split("% tiny-llava: accuracy")[1])


def test_print_summary_for_run(records, tiny):
    console = Console(record=True, width=200)
    print_summary([r for r in records if r.kind == "eval"], tiny, console)
    text = console.export_text()
    assert "tiny-llava: accuracy and retention" in text and "94.4%†" in text and "Agree." in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--format", "md,pdf"], "unknown format pdf; valid formats: md, latex, csv, html"),
        (["--model", "llava-9b"], "unknown --model llava-9b; models in .*: tiny-llava"),
        (["--limit", "ten"], "--limit 'ten': give a number of samples or 'full'"),
        (["--limit", "5"], "no eval records with --limit 5"),
        (["--compare", "fastv", "dart"], "no records for method 'dart'"),
    ],
)
def test_cli_bad_input(tiny, capsys, argv, message):
    assert cli(["report", "--results", str(tiny.root), "--bootstrap", "10", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_empty_or_missing_store(tmp_path, capsys):
    assert cli(["report", "--results", str(tmp_path)]) == 2
    assert "no records in" in capsys.readouterr().err
    assert cli(["report", "--results", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_ambiguous_or_broken_records(tmp_path):
    store = ResultStore(tmp_path)
    store.write(_record("m", "none", "all", "gqa", metrics={"exact_match": 0.5}, primary="exact_match", limit=10))
    store.write(_record("m", "none", "all", "gqa", metrics={"exact_match": 0.6}, primary="exact_match"))
    with pytest.raises(ReportError, match=r"several sample limits \(10, full\); choose one with --limit"):
        accuracy_table(store.records())
    bad = [_record("m", "none", "all", "gqa", metrics={"exact_match": 61.9}, primary="exact_match")]
    with pytest.raises(ReportError, match="fraction in"):
        accuracy_table(bad)
    with pytest.raises(ReportError, match="has no 'exact_match'"):
        accuracy_table([_record("m", "none", "all", "gqa", metrics={"f1": 0.5}, primary="exact_match")])
    with pytest.raises(ReportError, match="one model"):
        accuracy_table(
            [
                _record("a", "none", "all", "gqa", metrics={"exact_match": 0.5}),
                _record("b", "none", "all", "gqa", metrics={"exact_match": 0.5}),
            ]
        )


def test_terminal_labels_fit_80_columns():
    """The console table shows budgets as K and a method's options as a letter explained in a note."""
    import pandas as pd

    from prunebench.report.tables import _terminal_labels

    index = pd.MultiIndex.from_tuples([
        ("Unpruned (576 tokens)", "Vanilla"),
        ("Retain 64 tokens (-88.9%)", "FastV (layer=3)"),
        ("Retain 64 tokens (-88.9%)", "PyramidDrop (layers=1/2/3)"),
        ("Retain 25% tokens (-75.0%)", "FastV (layer=3)"),
    ])
    labels, notes = _terminal_labels(index)
    assert labels == [("all", "Vanilla"), ("64", "FastV [a]"), ("", "PyramidDrop [b]"), ("25%", "FastV [a]")]
    assert notes == ["[a] layer=3", "[b] layers=1/2/3"]
