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
PyramidDrop's own 192/128/64 settings were never published. A stage at layer 0 ranks by layer 0's
attention over the input embeddings; on shallow models (the built-in 4-layer one) that is what
lets low budgets be met (``pyramiddrop:layers=0/1/2``).

``L`` is the model's decoder depth, which the engine hands to ``schedule``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunebench import (
    Budget,
    Method,
    MethodError,
    PositionPolicy,
    Selection,
    Stage,
    StageContext,
    layer_averaged_counts,
    register_method,
)


@register_method
@dataclass(kw_only=True)
class PyramidDrop(Method):
    """PyramidDrop: drop image tokens in stages by the last instruction token's attention (pyramid)."""

    name: ClassVar[str] = "pyramiddrop"
    stage: ClassVar[str] = "llm"
    layers: tuple[int, ...] = (8, 16, 24)  # stage layers: each sees the newly pruned sequence
    ratios: tuple[float, ...] | None = None  # fixed kept fractions per stage, used with budget "all"
    positions: PositionPolicy = "reindex"

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)) or self.layers[0] < 0:
            raise MethodError(f"pyramiddrop: layers={self.layers} must be strictly increasing and >= 0")
        if self.ratios is not None:
            if len(self.ratios) != len(self.layers):
                raise MethodError(f"pyramiddrop: {len(self.ratios)} ratios for {len(self.layers)} stage layers")
            if any(not 0 < r <= 1 for r in self.ratios) or list(self.ratios) != sorted(self.ratios, reverse=True):
                raise MethodError(f"pyramiddrop: ratios={self.ratios} must be non-increasing fractions in (0, 1]")

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if self.layers[-1] >= num_layers:
            raise MethodError(
                f"pyramiddrop: stage layer {self.layers[-1]} is outside this {num_layers}-layer decoder; "
                f"give layers within 0..{num_layers - 1} (e.g. pyramiddrop:layers=2/4/6 for 8 layers)"
            )
        if budget.is_all and self.ratios is None:
            counts = [n_visual] * len(self.layers)
        elif budget.is_all:
            counts = [max(1, int(n_visual * r)) for r in self.ratios]
        else:
            counts = layer_averaged_counts(n_visual, budget.resolve(n_visual), self.layers, num_layers)
        return [Stage(layer, keep) for layer, keep in zip(self.layers, counts)]

    def select(self, ctx: StageContext) -> Selection:
        if ctx.keep == ctx.n_visual:
            return Selection(keep=[torch.arange(n, device=ctx.hidden.device) for n in ctx.n_visual])
        scores = ctx.attention(ctx.layer, rows="last").mean(1)[:, 0]  # (B, n_max)
        return Selection(keep=ctx.top_k(scores))
