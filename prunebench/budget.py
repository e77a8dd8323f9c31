"""Token budgets: an absolute count of visual tokens to keep, or a fraction of them.

``"64"`` keeps 64 tokens; ``"0.25"`` or ``"25%"`` keeps a quarter of each image's visual tokens
(the form Qwen2-VL papers use, since their token count varies per image). ``"all"`` keeps every
token: the unpruned reference. ``"floor"`` is the floor control of an in-LLM method: one visual token
survives each of its stages (the layers before its first stage still see every token), so its
score is what the unpruned layers alone carry (``Method.floor_schedule``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from prunebench.errors import UserError


class BudgetError(UserError, ValueError):
    """A budget that cannot be parsed or cannot be met by an image."""


@dataclass(frozen=True)
class Budget:
    tokens: int | None = None  # absolute K
    fraction: float | None = None  # kept fraction in (0, 1]
    floor: bool = False  # the floor control: K = 1 after each in-LLM stage

    def __post_init__(self) -> None:
        if self.floor and (self.tokens, self.fraction) != (1, None):
            raise BudgetError("the floor budget keeps one token: Budget.floor_control()")
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
    def floor_control(cls) -> Budget:
        return cls(tokens=1, floor=True)

    @classmethod
    def parse(cls, text: str | float | Budget) -> Budget:
        if isinstance(text, Budget):
            return text
        if isinstance(text, int):
            return cls(tokens=text)
        if isinstance(text, float):
            return cls(fraction=text)
        raw = str(text).strip().lower()
        if raw in ("all", "full"):
            return cls.all()
        if raw == "floor":
            return cls.floor_control()
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
                "'all', or 'floor' (in-LLM methods: one token after each stage)"
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
        if self.floor:
            return "floor"
        if self.tokens is not None:
            return str(self.tokens)
        return f"{self.fraction * 100:g}%"


# ---------------------------------------------------------------------------------------------
# multi-stage schedules (PyramidDrop, SparseVLM's derived budgets)


@functools.lru_cache(maxsize=256)
def layer_averaged_counts(n: int, k: int, layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    """Tokens kept after each stage so that the layer average of visual tokens is ``k``.

    Stages prune before ``layers`` (strictly increasing, >= 1) of a ``num_layers``-layer decoder
    fed ``n`` visual tokens. Counts are geometric, n * lam**s for s = 1..m, with lam found by
    bisection on the real-valued average, then rounded to integers whose average is exactly ``k``
    (near the geometric values); if no such integers exist, the nearest
    rounding (the average is then off by less than one token).
    """
    spans = [b - a for a, b in zip(layers, [*layers[1:], num_layers])]
    total = k * num_layers - layers[0] * n  # token-layers the pruned layers must hold
    lowest = (layers[0] * n + sum(spans)) / num_layers
    if total < sum(spans):
        raise BudgetError(
            f"budget K={k} is below {lowest:.1f}, the smallest layer average its stages allow "
            f"(layers 0..{layers[0] - 1} of {num_layers} see all {n} visual tokens); move the first stage "
            f"earlier with the `layers` option"
        )

    def held(lam: float) -> float:
        return sum(span * n * lam ** (s + 1) for s, span in enumerate(spans))

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if held(mid) < total else (lo, mid)
    target = [n * hi ** (s + 1) for s in range(len(spans))]
    exact = _exact_counts(target, spans, total, n)
    if exact is not None:
        return tuple(exact)
    return tuple(min(n, max(1, round(t))) for t in target)  # monotone, as target is


def _exact_counts(target: list[float], spans: list[int], total: int, upper: int) -> list[int] | None:
    """Integers upper >= c_1 >= ... >= c_m >= 1 with sum(span * c) == total, each within
    sum(spans) of its target (clamping later counts to >= 1 can push an earlier one that far),
    the earliest stages closest; None if there are none."""
    if len(spans) == 1:
        count, remainder = divmod(total, spans[0])
        return [count] if remainder == 0 and 1 <= count <= upper else None
    reach, rest_spans = sum(spans), sum(spans[1:])
    guess = round(target[0])
    for count in sorted(range(guess - reach, guess + reach + 1), key=lambda c: abs(c - target[0])):
        rest = total - spans[0] * count
        if 1 <= count <= upper and rest_spans <= rest <= rest_spans * count:
            tail = _exact_counts(target[1:], spans[1:], rest, count)
            if tail is not None:
                return [count, *tail]
    return None
