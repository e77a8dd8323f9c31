"""Token budgets: an absolute count of visual tokens to keep, or a fraction of them.

``"64"`` keeps 64 tokens; ``"0.25"`` or ``"25%"`` keeps a quarter of each image's visual tokens
(the form Qwen2-VL papers use, since their token count varies per image). ``"all"`` keeps every
token: the unpruned reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prunebench.errors import UserError


class BudgetError(UserError, ValueError):
    """A budget that cannot be parsed or cannot be met by an image."""


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None  # absolute K
    fraction: float | None = None  # kept fraction in (0, 1]

    def __post_init__(self) -> None:
        if self.is_all and self.fraction is None:
            return
        if (self.tokens is None) == (self.fraction is None):
            raise BudgetError("a budget is either an absolute token count or a fraction, not both")
        if self.tokens is not None and self.tokens <= 0:
            raise BudgetError(f"budget K={self.tokens}: K must be a positive number of tokens")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise BudgetError(f"budget fraction {self.fraction}: must lie in (0, 1]")

    @property
    def is_all(self) -> bool:
        return self.tokens == -1

    @classmethod
    def all(cls) -> Budget:
        return cls(tokens=-1)

    @classmethod
    def parse(cls, text: str | int | float | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, int):
            return cls(tokens=text)
        if isinstance(text, float):
            return cls(fraction=text)
        raw = str(text).strip().lower()
        if raw in ("all", "full"):
            return cls.all()
        try:
            if raw.endswith("%"):
                return cls(fraction=float(raw[:-1]) / 100.0)
            if raw.isdigit() or (raw.startswith("-") and raw[1:].isdigit()):
                return cls(tokens=int(raw))
            return cls(fraction=float(raw))
        except ValueError as err:
            if isinstance(err, BudgetError):
                raise
            raise BudgetError(
                f"cannot read budget {text!r}: give a token count (64), a kept fraction (0.25 or 25%), "
                "or 'all'"
            ) from None

    def resolve(self, n_visual: int) -> int:
        """Number of tokens to keep out of ``n_visual``; raises if the image cannot meet it."""
        if self.is_all:
            return n_visual
        if self.tokens is not None:
            if self.tokens > n_visual:
                raise BudgetError(
                    f"budget K={self.tokens} exceeds the {n_visual} visual tokens of this image; "
                    f"choose K <= {n_visual} or a fraction"
                )
            return self.tokens
        return max(1, min(n_visual, math.ceil(self.fraction * n_visual - 1e-9)))

    def __str__(self) -> str:
        if self.is_all:
            return "all"
        if self.tokens is not None:
            return str(self.tokens)
        return f"{self.fraction * 100:g}%"
