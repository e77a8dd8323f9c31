"""FastV (Chen et al., ECCV 2024; pkunlp-icler/FastV): in-LLM, one stage, attention-ranked.

Before decoder layer K (default 2) every image token is scored by the attention the last prompt
token pays it in layer K-1, averaged over heads; the top ones survive in their original order,
text is never dropped, and kept tokens keep their original position ids (the official code sets
``position_ids = keep_indexs``). The official code needs ``output_attentions`` (eager attention)
for that one row; here the engine recomputes just that row from layer K-1's cached keys and its
query, so SDPA/FlashAttention run untouched, batched, with per-sample kept sets.

How much is kept: the engine always passes a budget.
- A budget of K tokens (or a fraction) wins: keep K; ``ratio`` is then ignored.
- Budget ``all`` keeps every token (the unpruned reference) unless ``ratio`` is set: then
  FastV's own knob applies, dropping the fraction R and keeping int(N * (1 - R)) as the official
  lmms-eval script does (R = 0.5, the paper's default, keeps 288 of 576; budget ``50%`` keeps the
  same 288, rounding up instead). ``ratio=0`` keeps all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunebench import (
    Budget,
    Method,
    MethodError,
    PositionPolicy,
    Selection,
    Stage,
    StageContext,
    register_method,
)


@register_method
@dataclass(kw_only=True)
class FastV(Method):
    """FastV: keep the image tokens the last prompt token attends most in layer K-1 (prune before K)."""

    name: ClassVar[str] = "fastv"
    stage: ClassVar[str] = "llm"
    layer: int = 2  # K: the first layer that sees the pruned sequence (scores from layer K-1)
    ratio: float | None = None  # R: fraction of image tokens dropped, used with budget "all" only
    positions: PositionPolicy = "original"

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise MethodError(
                f"fastv: layer={self.layer}; FastV scores with layer K-1's attention, so K >= 1 "
                "(the official K=0 path keeps a random subset: use the `random` method)"
            )
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise MethodError(f"fastv: ratio={self.ratio} is the dropped fraction and must lie in [0, 1)")

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if not budget.is_all:
            keep = budget.resolve(n_visual)
        elif self.ratio is None:
            keep = n_visual
        else:
            keep = max(1, int(n_visual * (1.0 - self.ratio)))
        return [Stage(self.layer, keep)]

    def select(self, ctx: StageContext) -> Selection:
        scores = ctx.attention(self.layer - 1, rows="last").mean(1)[:, 0]  # (B, n_max)
        return Selection(keep=ctx.top_k(scores))
