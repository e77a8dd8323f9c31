"""Methods that exist only for the tests: they exercise each stage of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunebench.budget import Budget
from prunebench.engine.method import PRE_LLM, Method, Selection, Stage, register_method


@register_method
@dataclass(kw_only=True)
class StridedAt(Method):
    """Test method: keep every visual token whose index is in a fixed pattern, at one stage."""

    name: ClassVar[str] = "test-strided"
    stage: ClassVar[str] = "llm"
    layer: int = 1  # -1: pre-LLM
    offset: int = 0

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        return [Stage(PRE_LLM if self.layer < 0 else self.layer, budget.resolve(n_visual))]

    def select(self, ctx) -> Selection:
        return Selection(keep=[pattern(n, k, self.offset) for n, k in zip(ctx.n_visual, ctx.keep)])


def pattern(n: int, k: int, offset: int = 0) -> torch.Tensor:
    """k indices of 0..n-1, spread out and rotated by ``offset`` (deterministic)."""
    picks = (torch.arange(k) * n // k + offset) % n
    return picks.sort().values


@register_method
@dataclass(kw_only=True)
class LastTokenTopK(Method):
    """Test method: FastV's rule in a few lines (top-K by last-token attention of layer L-1)."""

    name: ClassVar[str] = "test-lasttoken"
    stage: ClassVar[str] = "llm"
    layer: int = 2

    def select(self, ctx) -> Selection:
        scores = ctx.attention(self.layer - 1, rows="last").mean(1)[:, 0]
        return Selection(keep=scores.topk(ctx.uniform_keep, dim=-1).indices)


@register_method
@dataclass(kw_only=True)
class TwoStage(Method):
    """Test method: strided pruning at two layers (keep K, then a fraction ``second`` of K)."""

    name: ClassVar[str] = "test-twostage"
    stage: ClassVar[str] = "llm"
    layers: tuple[int, ...] = (1, 3)
    second: float = 0.5

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        k = budget.resolve(n_visual)
        return [Stage(self.layers[0], k), Stage(self.layers[1], max(1, int(k * self.second)))]

    def select(self, ctx) -> Selection:
        return Selection(keep=[pattern(n, k) for n, k in zip(ctx.n_visual, ctx.keep)])


@register_method
@dataclass(kw_only=True)
class MergeRest(Method):
    """Test method: keep a strided set and add the mean of the dropped tokens as one token,
    after the kept ones (or before them with ``lead``)."""

    name: ClassVar[str] = "test-merge"
    stage: ClassVar[str] = "pre"
    lead: bool = False

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        return [Stage(PRE_LLM, budget.resolve(n_visual) - 1)]

    def select(self, ctx) -> Selection:
        visual = ctx.visual_hidden()
        keep, merged = [], []
        for b, (n, k) in enumerate(zip(ctx.n_visual, ctx.keep)):
            kept = pattern(n, k)
            dropped = torch.ones(n, dtype=torch.bool)
            dropped[kept] = False
            keep.append(kept)
            merged.append(visual[b, dropped].mean(0, keepdim=True))
        built = torch.stack(merged)
        return Selection(keep=keep, leading=built) if self.lead else Selection(keep=keep, merged=built)


@register_method
@dataclass(kw_only=True)
class Probe(Method):
    """Test method: hands its stage context to ``Probe.hook``, keeps everything."""

    name: ClassVar[str] = "test-probe"
    stage: ClassVar[str] = "llm"
    layer: int = 2
    hook: ClassVar = None
    seen: ClassVar[list] = []

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        return [Stage(PRE_LLM if self.layer < 0 else self.layer, n_visual)]

    def select(self, ctx) -> Selection:
        Probe.seen.append(Probe.hook(ctx))
        return Selection(keep=[torch.arange(n) for n in ctx.n_visual])
