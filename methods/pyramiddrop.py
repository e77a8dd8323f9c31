"""PyramidDrop (Xing et al., CVPR 2025; Cooperx521/PyramidDrop): in-LLM, multi-stage, attention-ranked.

Before each stage layer (default 8, 16, 24: the official ``layer_list``) the image tokens still
present are ranked by the attention of the last instruction token (the last prompt token) in
that layer itself: the official code projects the hidden states about to enter layer l with
layer l's own norm, q/k and rotary embedding (current, re-indexed position ids) and softmaxes
the one query row, averaged over heads. The top ones survive in their original order and
position ids are re-indexed (contiguous), as officially. The engine recomputes just that row, so
SDPA/FlashAttention run untouched.

How many survive each stage (``N`` image tokens, ``L = num_layers`` decoder layers):
- budget ``all``, ``ratios`` unset: every stage keeps all N (keep-all is exact);
- budget ``all``, ``ratios`` set: the paper's fixed schedule int(N * r) per stage; the paper's
  (0.5, 0.25, 0.125) on LLaVA-1.5 (N=576, L=32) keeps 288/144/72, a layer average of 270;
- a budget of K tokens (or a fraction): the budget wins (``ratios`` ignored). Stage s keeps
  N * lam**s, lam in (0, 1] solved so that the layer-averaged visual tokens the engine counts,
  (l1*N + sum_s span_s * c_s) / L with span_s the layers that see c_s, equal K; counts are then
  rounded to integers whose average is exactly K whenever such integers exist near the
  geometric ones (always on LLaVA-1.5's 8/16/24 of 32). Layers before the
  first stage see all N tokens, so K >= (l1*N + L - l1) / L: 145 for the default stages; for
  K = 128 or 64 move the stages earlier (e.g. ``pyramiddrop:layers=2/6/12`` allows K >= 37).
PyramidDrop's own 192/128/64 settings were never published.

``num_layers`` must equal the model's decoder depth (the layer average needs it before the model
is seen); the first stage checks it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch

from prunebench.budget import Budget, BudgetError
from prunebench.method import Method, MethodError, PositionPolicy, Selection, Stage, register_method
from prunebench.signals import StageContext


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


def check_depth(method: str, num_layers: int, ctx: StageContext) -> None:
    """A schedule averaged over ``num_layers`` layers is only honest on a model that deep."""
    if num_layers != ctx.num_layers:
        raise MethodError(
            f"{method}: num_layers={num_layers} but the model has {ctx.num_layers} decoder layers; "
            f"pass {method}:num_layers={ctx.num_layers} (its budget schedule averages over the layers)"
        )


@register_method
@dataclass(kw_only=True)
class PyramidDrop(Method):
    """PyramidDrop: drop image tokens in stages by the last instruction token's attention (pyramid)."""

    name: ClassVar[str] = "pyramiddrop"
    stage: ClassVar[str] = "llm"
    layers: tuple[int, ...] = (8, 16, 24)  # stage layers: each sees the newly pruned sequence
    ratios: tuple[float, ...] | None = None  # fixed kept fractions per stage, used with budget "all"
    num_layers: int = 32  # decoder depth the budget schedule averages over (LLaVA-1.5-7B: 32)
    positions: PositionPolicy = "reindex"

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 1:
            raise MethodError(f"pyramiddrop: layers={self.layers} must be strictly increasing and >= 1")
        if self.layers[-1] >= self.num_layers:
            raise MethodError(
                f"pyramiddrop: stage layer {self.layers[-1]} is outside a {self.num_layers}-layer decoder "
                f"(num_layers={self.num_layers}); give layers within 1..{self.num_layers - 1}"
            )
        if self.ratios is not None:
            if len(self.ratios) != len(self.layers):
                raise MethodError(f"pyramiddrop: {len(self.ratios)} ratios for {len(self.layers)} stage layers")
            if any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
                raise MethodError(f"pyramiddrop: ratios={self.ratios} must be non-increasing fractions in (0, 1]")

    def schedule(self, n_visual: int, budget: Budget) -> list[Stage]:
        if budget.is_all and self.ratios is None:
            counts = [n_visual] * len(self.layers)
        elif budget.is_all:
            counts = [max(1, int(n_visual * r)) for r in self.ratios]
        else:
            counts = layer_averaged_counts(n_visual, budget.resolve(n_visual), self.layers, self.num_layers)
        return [Stage(layer, keep) for layer, keep in zip(self.layers, counts)]

    def select(self, ctx: StageContext) -> Selection:
        check_depth(self.name, self.num_layers, ctx)
        if ctx.keep == ctx.n_visual:
            return Selection(keep=[torch.arange(n, device=ctx.hidden.device) for n in ctx.n_visual])
        scores = ctx.attention(ctx.layer, rows="last").mean(1)[:, 0]  # (B, n_max)
        return Selection(keep=ctx.top_k(scores))
