"""Reading Markdown tables in tests whatever their column padding."""

from __future__ import annotations

import re


def squeeze(text: str) -> str:
    """Markdown table text with the padding around cell separators removed."""
    return re.sub(r" *\| *", "|", text)


def table_row(*cells: str) -> str:
    """The start of a row with these leading cells, as :func:`squeeze` writes it."""
    return "|" + "|".join(cells) + "|"
