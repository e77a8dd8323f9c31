"""DART (Wen et al., 2025, "Stop Looking for Important Tokens ..."; ZichenWen1/DART): in-LLM, one
stage, duplication-aware. No attention weights are needed.

Before decoder layer K (default 2):
1. pivots: the ``pivot_image`` image tokens and the ``pivot_text`` text tokens after the image
   (the question and the answer prompt, as officially) with the largest L1 norm of their layer
   K-1 keys (all heads, after the rotary embedding, as the official code reads them);
2. every pivot in turn, in the order the official code visits them (Python's iteration order of
   the set of their sequence positions), takes the ``per_pivot`` image tokens least
   cosine-similar to it among those no earlier pivot took (image pivots are never candidates), on
   the hidden states entering layer K passed through the decoder's final norm (as officially);
3. the image pivots and every pick are kept in their original order with their original
   position ids; text pivots are text and stay anyway.
``per_pivot`` = K // (pivot_image + pivot_text), the official arithmetic, so DART keeps
pivot_image + 8 * (K // 8) image tokens: 132 for K = 128 (the engine counts them honestly).
Budget ``all`` keeps every token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from prunebench import (
    Budget,
    BudgetError,
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
class DART(Method):
    """DART: keep pivot tokens (largest key L1 norm) and the image tokens least similar to each pivot."""

    name: ClassVar[str] = "dart"
    stage: ClassVar[str] = "llm"
    layer: int = 2  # K: pruned before this layer, pivots from layer K-1's keys
    pivot_image: int = 4
    pivot_text: int = 4
    positions: PositionPolicy = "original"

    def __post_init__(self) -> None:
        if self.layer < 1:
            raise MethodError(f"dart: layer={self.layer}; DART reads layer K-1's keys, so K >= 1")
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text == 0:
            raise MethodError(f"dart: pivot_image={self.pivot_image}, pivot_text={self.pivot_text}: need >= 0 each, one > 0")

    def per_pivot(self, k: int) -> int:
        return k // (self.pivot_image + self.pivot_text)

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if budget.is_all:
            return [Stage(self.layer, n_visual)]
        k = budget.resolve(n_visual)
        keep = min(n_visual, self.pivot_image + (self.pivot_image + self.pivot_text) * self.per_pivot(k))
        if self.pivot_image > n_visual:
            raise BudgetError(f"{self.pivot_image} image pivots exceed the {n_visual} visual tokens")
        return [Stage(self.layer, keep)]

    def floor_schedule(self, n_visual: int, num_layers: int) -> list[Stage]:
        """The floor control is DART at K = 1: its image pivots alone (K // 8 = 0 picks per pivot)."""
        return self.schedule(n_visual, Budget(tokens=1), num_layers)

    def select(self, ctx: StageContext) -> Selection:
        device = ctx.hidden.device
        if ctx.keep == ctx.n_visual:
            return Selection(keep=[torch.arange(n, device=device) for n in ctx.n_visual])
        keys = ctx.keys(self.layer - 1)  # (B, H_kv, S, d); repeating heads for GQA keeps the ranking
        norms = keys.transpose(1, 2).flatten(2).float().abs().sum(-1)  # (B, S) L1 norm over heads
        states = ctx.final_norm(ctx.layer_input(self.layer)).float()
        text_slots = ctx.text_slots()
        keep = []
        for b, (slots, k) in enumerate(zip(ctx.visual_slots, ctx.keep)):
            after = text_slots[b][text_slots[b] > slots[-1]]
            if len(after) < self.pivot_text:
                raise MethodError(f"dart: sample {b} has {len(after)} text tokens after the image, fewer than pivot_text={self.pivot_text}")
            image_pivots = norms[b, slots].topk(self.pivot_image).indices
            text_pivots = after[norms[b, after].topk(self.pivot_text).indices]
            pivots = torch.cat([slots[image_pivots], text_pivots])
            picks = self._least_similar(states[b], pivots, slots, image_pivots, ctx.layout.order[b], k)
            keep.append(torch.cat([image_pivots, picks]))
        return Selection(keep=keep)

    def _least_similar(self, states, pivots, slots, image_pivots, positions, k) -> torch.Tensor:
        """Indices (into the image tokens) each pivot takes, in the official visiting order."""
        # (P, n) similarity of every pivot to every image token, computed once
        similarity = F.cosine_similarity(states[pivots][:, None], states[slots][None], dim=-1)
        taken = torch.zeros(len(slots), dtype=torch.bool, device=slots.device)
        taken[image_pivots] = True
        pivot_positions = [int(positions[p]) for p in pivots]
        # the official loop visits list(set(image_pivots + text_pivots)) (sequence positions);
        # the set is built from a list, as there, since CPython's iteration order depends on it
        visit = [pivot_positions.index(p) for p in set(pivot_positions)]
        per_pivot, picks = self.per_pivot(k), []
        for i in visit:
            count = min(per_pivot, int((~taken).sum()))
            chosen = similarity[i].masked_fill(taken, float("inf")).topk(count, largest=False).indices
            taken[chosen] = True
            picks.append(chosen)
        return torch.cat(picks)
