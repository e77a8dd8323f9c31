"""DivPrune (Alvar et al., CVPR 2025; vbdi/divprune): pre-LLM, text-agnostic diversity.

Keep the K visual tokens that greedily solve max-min diversity under cosine distance
d(i, j) = 1 - cos(x_i, x_j) on the post-projector embeddings (the official LLaVA setting).
First pick: the token whose nearest other token is farthest (the official code takes the second
smallest distance of each column, the smallest being the token itself). Each next pick: the
token whose distance to its nearest picked token is largest. Kept in original order, positions
re-indexed (the official LLaVA path re-creates contiguous positions).

The official selection recomputes the min over all picked rows at every step, one image at a
time; here a running minimum makes each pick one O(N) vector update, batched over images, with
no host synchronisation inside the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from prunebench import Method, Selection, StageContext, register_method


@register_method
@dataclass(kw_only=True)
class DivPrune(Method):
    """DivPrune: greedy max-min cosine diversity over the projected visual tokens."""

    name: ClassVar[str] = "divprune"
    stage: ClassVar[str] = "pre"
    space: Literal["projected", "vision"] = "projected"  # official: projected (LLM input) embeddings

    def select(self, ctx: StageContext) -> Selection:
        features = ctx.image_embeds if self.space == "projected" else ctx.vision_features
        if len(set(ctx.n_visual)) == 1 and len(set(ctx.keep)) == 1:
            return Selection(keep=max_min_diverse(features, ctx.uniform_keep))
        # images of different token counts (LLaVA-NeXT, Qwen2-VL): one image at a time
        return Selection(keep=[max_min_diverse(features[b : b + 1, :n], k)[0] for b, (n, k) in enumerate(zip(ctx.n_visual, ctx.keep))])


def cosine_distance(features: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` 1 - cosine similarity, in float32."""
    unit = F.normalize(features.float(), dim=-1)
    return 1.0 - torch.bmm(unit, unit.transpose(1, 2))


def max_min_diverse(features: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` indices picked greedily for max-min cosine distance (in pick order)."""
    dist = cosine_distance(features)
    batch, n, _ = dist.shape
    rows = torch.arange(batch, device=dist.device)
    # column-wise like the official code: the 2nd smallest distance skips the token itself
    pick = dist.topk(min(2, n), dim=1, largest=False).values[:, -1].argmax(-1)
    picks = [pick]
    nearest = dist[rows, pick]  # (B, N) distance of every token to its nearest picked token
    for _ in range(k - 1):
        nearest[rows, pick] = float("-inf")  # a picked token never returns (min keeps -inf)
        pick = nearest.argmax(-1)
        picks.append(pick)
        nearest = torch.minimum(nearest, dist[rows, pick])
    return torch.stack(picks, dim=1)
