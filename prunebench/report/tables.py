"""Tables as numbers plus how to show them, rendered through pandas and rich.

A :class:`Table` is a frame of numbers (NaN = missing) or text, indexed by (group, row[, sub-row]),
with a :class:`Column` spec per column, an optional bold mask and footnote marks. It renders as
Markdown (pandas + tabulate), LaTeX booktabs and HTML (pandas Styler), CSV, or a rich table.
Missing cells read "–" ("--" in LaTeX); text is escaped by pandas, never by hand.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table as RichTable
from rich.text import Text

FORMATS = {"md": "md", "latex": "tex", "csv": "csv", "html": "html"}  # format -> file suffix
MISSING = {"latex": "--"}  # how a missing cell reads; "–" everywhere else
LATEX_MARKS = {"†": r"$^\dagger$", "‡": r"$^\ddagger$", "§": r"$^\S$"}  # footnote marks in LaTeX


@dataclass(frozen=True)
class Column:
    kind: str = "number"  # "number", "percent", "ratio" (a speedup), "p" (a p-value), "int", "text"
    decimals: int = 1

    def render(self, value: Any, fmt: str, mark: str = "") -> str | None:
        """The cell's text in ``fmt`` (None when missing); text cells are left unescaped."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if self.kind == "text":
            return str(value)
        if self.kind == "p":
            if value >= 0.001:
                return f"{value:.3f}"
            return {"latex": "$<$0.001", "html": "&lt;0.001"}.get(fmt, "<0.001")
        text = f"{value:.0f}" if self.kind == "int" else f"{value:.{self.decimals}f}"
        if self.kind == "percent":
            text += r"\%" if fmt == "latex" else "%"
        elif self.kind == "ratio":
            text += r"$\times$" if fmt == "latex" else "×"
        if mark:
            text += LATEX_MARKS.get(mark, mark) if fmt == "latex" else mark
        return text


@dataclass
class Table:
    name: str  # file stem
    title: str
    frame: pd.DataFrame  # index: (budget group, row label[, task]); floats (NaN = missing) or text
    columns: dict[str, Column]
    bold: pd.DataFrame | None = None  # True where a cell is the best of its group
    marks: pd.DataFrame | None = None  # a footnote mark to append ("†"), "" otherwise
    notes: list[str] = field(default_factory=list)

    def rendered(self, fmt: str) -> pd.DataFrame:
        """Cell texts (None = missing) with marks, and bold markup for md and rich."""
        out = pd.DataFrame(index=self.frame.index, columns=self.frame.columns, dtype=object)
        for j, col in enumerate(self.frame.columns):
            spec = self.columns[col]
            for i in range(len(self.frame)):
                mark = "" if self.marks is None else self.marks.iat[i, j]
                text = spec.render(self.frame.iat[i, j], fmt, mark)
                if text is not None and self.bold is not None and self.bold.iat[i, j] and fmt == "md":
                    text = f"**{text}**"
                out.iat[i, j] = text
        return out


class _Raw:
    """A cell text already in the output's markup: the Styler must not escape it."""

    def __init__(self, text: str):
        self.text = text


def _styler(table: Table, fmt: str):
    """A pandas Styler for LaTeX or HTML: text escaped by pandas, numbers as rendered, best in bold."""
    cells = table.rendered(fmt)
    for col, spec in table.columns.items():
        if spec.kind != "text":
            cells[col] = cells[col].map(lambda s: None if s is None else _Raw(s))
    frame = cells.copy()
    frame.columns.name = table.frame.index.names[-1]  # header of the last index column
    frame.index = frame.index.set_names([None] * frame.index.nlevels)
    escape = "latex" if fmt == "latex" else "html"
    styler = frame.style.set_uuid(table.name).format(  # a fixed id keeps regenerated HTML diffable
        lambda x: x.text if isinstance(x, _Raw) else x, escape=escape, na_rep=MISSING.get(fmt, "–")
    )
    header = (lambda s: s.replace("Δ", r"$\Delta$")) if fmt == "latex" else None
    styler = styler.format_index(escape=escape, axis=0).format_index(header, escape=escape, axis=1)
    if table.bold is not None:
        bold = table.bold.to_numpy()
        styler = styler.apply(lambda _: np.where(bold, "font-weight: bold;", ""), axis=None)
    return styler


def render(table: Table, fmt: str) -> str:
    """The table as Markdown, LaTeX (booktabs), HTML or CSV text."""
    if fmt == "csv":
        return table.frame.reset_index().to_csv(index=False)
    if fmt == "md":
        cells = table.rendered("md").fillna("–")
        cells.index = pd.MultiIndex.from_tuples(_shown_labels(table.frame.index), names=table.frame.index.names)
        cells = cells.reset_index()
        align = ["left"] * table.frame.index.nlevels + [
            "left" if table.columns[c].kind == "text" else "right" for c in table.frame.columns
        ]
        text = cells.to_markdown(index=False, colalign=align, disable_numparse=True)
        notes = "".join(f"\n- {note}" for note in table.notes)
        return f"**{table.title}**\n\n{text}\n" + (f"\nNotes:{notes}\n" if notes else "")
    if fmt == "latex":
        styler = _styler(table, "latex")
        column_format = "l" * table.frame.index.nlevels + "".join(
            "l" if spec.kind == "text" else "r" for spec in table.columns.values()
        )
        latex = styler.to_latex(
            hrules=True, convert_css=True, multirow_align="naive", clines="skip-last;data", column_format=column_format
        )
        header = f"% {table.title} (requires \\usepackage{{booktabs}})\n"
        return header + "".join(f"% {note}\n" for note in table.notes) + _booktabs(latex)
    if fmt == "html":
        return _styler(table, "html").set_caption(table.title).to_html()
    raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")


def _booktabs(latex: str) -> str:
    """Styler separates row groups with \\cline; booktabs wants \\midrule / \\cmidrule, and none before \\bottomrule."""
    lines = latex.splitlines()
    out: list[str] = []
    for i, line in enumerate(lines):
        spans = re.findall(r"\\cline\{(\d+)-(\d+)\}", line)
        if not spans:
            out.append(line)
        elif i + 1 < len(lines) and lines[i + 1].startswith(r"\bottomrule"):
            continue
        elif any(start == "1" for start, _ in spans):
            out.append(r"\midrule")
        else:
            out.append(" ".join(rf"\cmidrule(l){{{a}-{b}}}" for a, b in spans))
    return "\n".join(out) + "\n"


def _shown_labels(index: pd.MultiIndex) -> list[tuple[str, ...]]:
    """Row labels with a group's (and sub-group's) label only on its first row, as papers print them."""
    shown, previous = [], None
    for key in index:
        shown.append(
            tuple(
                str(k) if j == len(key) - 1 or previous is None or key[: j + 1] != previous[: j + 1] else ""
                for j, k in enumerate(key)
            )
        )
        previous = key
    return shown


GROUP_LABEL = re.compile(r"^Retain (?P<k>\S+) tokens \((?P<cut>[^)]*)\)$|^Unpruned \((?P<n>\d+) tokens\)$")
OPTIONS_LABEL = re.compile(r"^(?P<name>.+?) \((?P<options>.+)\)$")


def _terminal_labels(index: pd.MultiIndex) -> tuple[list[tuple[str, ...]], list[str]]:
    """Row labels short enough for an 80-column terminal: "Retain 192 tokens (-66.7%)" reads
    "192", "Unpruned (576 tokens)" reads "all"; a method's options become a letter, spelled out in
    the returned notes ("[a] layers=0/1/2")."""
    letters: dict[str, str] = {}
    shown = []
    for labels in _shown_labels(index):
        row = []
        for j, label in enumerate(labels):
            if j == 0 and (m := GROUP_LABEL.match(label)):
                label = m["k"] if m["k"] else "all"
            elif j == 0 and label.startswith("Floor control"):
                label = "floor"
            elif j > 0 and (m := OPTIONS_LABEL.match(label)):
                letter = letters.setdefault(m["options"], "abcdefghijklmnopqrstuvwxyz"[len(letters) % 26])
                label = f"{m['name']} [{letter}]"
            row.append(label)
        shown.append(tuple(row))
    return shown, [f"[{letter}] {options}" for options, letter in letters.items()]


def rich_table(table: Table, columns: list[str] | None = None, title: str | None = None) -> tuple[RichTable, list[str]]:
    """The table (or its ``columns``) for the terminal, and notes for its shortened labels: one
    section per budget group, best values in bold."""
    cells = table.rendered("rich")
    out = RichTable(title=title or table.title, min_width=len(title or table.title))  # the title on one line
    levels = list(table.frame.index.names)
    for name in levels:
        out.add_column("K" if name == "Budget" else str(name), style="bold" if name == levels[0] else None, no_wrap=True)
    shown_columns = [c for c in table.frame.columns if columns is None or c in columns]
    for col in shown_columns:
        out.add_column(str(col), justify="left" if table.columns[col].kind == "text" else "right")
    labels, notes = _terminal_labels(table.frame.index)
    previous = None
    for i, (key, shown) in enumerate(zip(table.frame.index, labels)):
        if previous is not None and key[0] != previous[0]:
            out.add_section()
        row = [Text(label) for label in shown]
        for col in shown_columns:
            j = table.frame.columns.get_loc(col)
            text = cells.iat[i, j]
            bold = table.bold is not None and bool(table.bold.iat[i, j]) and text is not None
            row.append(Text("–" if text is None else text, style="bold" if bold else ""))
        out.add_row(*row)
        previous = key
    return out, notes


def _column_parts(table: Table, console: Console) -> list[list[str]]:
    """The table's columns in consecutive parts, each printable whole within the console's width
    (a number cut short by the terminal would misread)."""
    parts: list[list[str]] = [[]]
    for col in table.frame.columns:
        trial = [*parts[-1], col]
        width = Measurement.get(console, console.options.update_width(1 << 16), rich_table(table, trial)[0]).maximum
        if parts[-1] and width > console.width:
            parts.append([col])
        else:
            parts[-1] = trial
    return parts


def print_table(table: Table, console: Console) -> None:
    parts = _column_parts(table, console)
    for n, part in enumerate(parts):
        title = table.title if n == 0 else f"{table.title} (continued)"
        rendered, label_notes = rich_table(table, part if len(parts) > 1 else None, title)
        console.print(rendered)
    if label_notes:
        console.print(Text(f"  options: {'; '.join(label_notes)}", style="dim"))
    for note in table.notes:
        console.print(Text(f"  note: {note}", style="dim"))
