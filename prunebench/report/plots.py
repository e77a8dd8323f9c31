"""The report's figures (PNG and PDF), drawn with seaborn on matplotlib Figures (no pyplot state).

- retention vs visual tokens kept, one line per method;
- average retention vs LLM prefill time, with the Pareto front;
- pruner overhead per method and budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from prunebench.report.frames import (
    BASELINE,
    budget_order,
    group_label,
    method_name,
    score_frame,
    table_rows,
    timing_frame,
)
from prunebench.results import Record

DPI = 150


class NothingToPlot(Exception):
    """The records hold no data for this plot (reported as a skipped plot, never silently)."""


def retention_points(records: Iterable[Record]) -> pd.DataFrame:
    """Per (method, budget): mean retention over tasks (as the table's Avg.) and visual tokens kept."""
    scores = score_frame(records)
    points = (
        scores.groupby(["method", "budget"], sort=False)
        .agg(retention=("retention", "mean"), tokens=("tokens", "mean"), tasks=("retention", "count"))
        .reset_index()
    )
    points["Method"] = points["method"].map(method_name)
    return points


MARKERS = ["o", "X", "s", "P", "D", "^", "v", "<", ">", "p", "h", "8"]


@dataclass(frozen=True)
class Style:
    """One colour and marker per method, the same in every plot (methods in table order)."""

    order: list[str]
    palette: dict[str, tuple]
    markers: dict[str, str]

    @classmethod
    def of(cls, records: list[Record]) -> Style:
        order = list(dict.fromkeys(method_name(m) for m, _ in table_rows(records)))
        colours = sns.color_palette("tab10", max(10, len(order)))
        return cls(order, dict(zip(order, colours)), {m: MARKERS[i % len(MARKERS)] for i, m in enumerate(order)})

    def kwargs(self, present: Iterable[str]) -> dict:
        """hue/style arguments for seaborn, restricted to the methods a plot shows."""
        order = [m for m in self.order if m in set(present)]
        return {
            "hue": "Method",
            "hue_order": order,
            "palette": {m: self.palette[m] for m in order},
            "style": "Method",
            "style_order": order,
            "markers": {m: self.markers[m] for m in order},
        }


def _save(fig: Figure, folder: Path, stem: str) -> list[Path]:
    paths = [folder / f"{stem}.png", folder / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=DPI, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    return paths


def _figure() -> tuple[Figure, object]:
    fig = Figure(figsize=(6.4, 4.2))
    return fig, fig.add_subplot()


def _is_baseline(frame: pd.DataFrame) -> pd.Series:
    return (frame["method"] == BASELINE[0]) & (frame["budget"] == BASELINE[1])


def plot_retention(points: pd.DataFrame, folder: Path, model: str, style: Style) -> list[Path]:
    base = points[_is_baseline(points)]
    pruned = points[~_is_baseline(points) & points["retention"].notna() & points["tokens"].notna()]
    if pruned.empty:
        raise NothingToPlot("no pruned run with a retention and a token count")
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        fig, ax = _figure()
        sns.lineplot(
            data=pruned.sort_values("tokens"),
            x="tokens",
            y="retention",
            dashes=False,
            markersize=8,
            ax=ax,
            **style.kwargs(pruned["Method"]),
        )
        ax.axhline(100.0, color="0.4", linestyle="--", linewidth=1)
        if not base.empty:
            ax.plot(
                base["tokens"],
                base["retention"],
                marker="*",
                markersize=14,
                color="black",
                linestyle="none",
                label="unpruned",
            )
        ax.set_xlabel("visual tokens kept (layer-averaged)")
        ax.set_ylabel("average retention (%)")
        ax.set_title(f"{model}: retention vs tokens kept")
        ax.legend(loc="lower right", fontsize="small")
        return _save(fig, folder, "retention_vs_tokens")


def _main_device(timing: pd.DataFrame) -> str:
    """The device with the most timed runs (ties: the first seen)."""
    counts = timing["device"].value_counts(sort=False)
    return counts.index[int(counts.to_numpy().argmax())]


def _one_device(timing: pd.DataFrame) -> str:
    devices = timing["device"].unique()
    if len(devices) != 1:
        raise ValueError(f"a timing plot takes one device's runs, not {', '.join(devices)}")
    return devices[0]


def plot_pareto(points: pd.DataFrame, timing: pd.DataFrame, folder: Path, model: str, style: Style) -> list[Path]:
    device = _one_device(timing)
    merged = points.merge(timing[["method", "budget", "prefill"]], on=["method", "budget"])
    merged = merged.dropna(subset=["retention", "prefill"])
    if merged.empty:
        raise NothingToPlot("no run has both a retention and a prefill time")
    front = merged.sort_values(["prefill", "retention"], ascending=[True, False])
    front = front[front["retention"] > front["retention"].cummax().shift(fill_value=-math.inf)]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        fig, ax = _figure()
        ax.step(
            front["prefill"],
            front["retention"],
            where="post",
            color="0.5",
            linewidth=1.2,
            zorder=1,
            label="Pareto front",
        )
        sns.scatterplot(
            data=merged, x="prefill", y="retention", s=80, ax=ax, zorder=2, **style.kwargs(merged["Method"])
        )
        for _, row in merged.iterrows():
            label = "all" if row["budget"] == "all" else row["budget"]
            ax.annotate(
                label,
                (row["prefill"], row["retention"]),
                textcoords="offset points",
                xytext=(5, 4),
                fontsize=7,
                color="0.3",
            )
        ax.set_xlabel("LLM prefill (ms per sample)")
        ax.set_ylabel("average retention (%)")
        ax.set_title(f"{model}: accuracy vs prefill time\n{device}")
        ax.legend(loc="lower right", fontsize="small")
        return _save(fig, folder, "pareto_prefill")


def plot_overhead(timing: pd.DataFrame, folder: Path, model: str, n_original: float | None, style: Style) -> list[Path]:
    device = _one_device(timing)
    bars = timing[~_is_baseline(timing)].dropna(subset=["pruner"]).copy()
    if bars.empty:
        raise NothingToPlot("no pruned run has a pruner time")
    bars["Method"] = bars["method"].map(method_name)
    bars["Budget"] = [group_label(b, n_original) for b in bars["budget"]]
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.1):
        fig, ax = _figure()
        budgets = sorted(bars["budget"].unique(), key=budget_order)
        sns.barplot(
            data=bars,
            x="Method",
            y="pruner",
            hue="Budget",
            ax=ax,
            order=[m for m in style.order if m in set(bars["Method"])],
            hue_order=[group_label(b, n_original) for b in budgets],
            palette="crest",
        )
        ax.set_xlabel("")
        ax.set_ylabel("pruner overhead (ms per sample)")
        ax.set_title(f"{model}: pruner overhead\n{device}")
        ax.tick_params(axis="x", labelrotation=20)
        ax.legend(fontsize="small")
        return _save(fig, folder, "pruner_overhead")


def draw_all(records: Iterable[Record], folder: Path) -> tuple[list[Path], list[str]]:
    """Every plot the records allow; returns the files written and notes on what was left out, and why."""
    records = list(records)
    model = records[0].key.model
    evals = [r for r in records if r.kind == "eval"]
    n_original = next((r.visual_tokens["original"] for r in records if r.visual_tokens.get("original")), None)
    style = Style.of(records)
    notes: list[str] = []
    points = timing = None
    if evals:
        points = retention_points(evals)
        n_tasks = len({r.key.task for r in evals})
        partial = points[points["tasks"] < n_tasks]
        if not partial.empty:  # an average over fewer tasks is not comparable with the others
            notes.append("left out, their average misses tasks: " + _runs(partial))
            points = points[points["tasks"] == n_tasks]
    if any(r.timing for r in records):
        timing = timing_frame(records)
        device = _main_device(timing)
        elsewhere = timing[timing["device"] != device]
        if not elsewhere.empty:  # times from two devices on one axis would mislead
            notes.append(f"timing plots show {device} only; left out: " + _runs(elsewhere))
            timing = timing[timing["device"] == device]
    jobs = {
        "retention vs tokens": lambda: plot_retention(points, folder, model, style),
        "pareto": lambda: plot_pareto(points, timing, folder, model, style),
        "pruner overhead": lambda: plot_overhead(timing, folder, model, n_original, style),
    }
    written: list[Path] = []
    for name, draw in jobs.items():
        try:
            if points is None and name != "pruner overhead":
                raise NothingToPlot("no eval records")
            if timing is None and name != "retention vs tokens":
                raise NothingToPlot("no record has timings")
            written += draw()
        except NothingToPlot as why:
            notes.append(f"{name} not drawn: {why}")
    return written, notes


def _runs(frame: pd.DataFrame) -> str:
    return ", ".join(f"{method_name(m)} @ {b}" for m, b in zip(frame["method"], frame["budget"]))
