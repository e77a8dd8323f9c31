"""VisionZip (Yang et al., CVPR 2025; dvlab-research/VisionZip): pre-LLM, text-agnostic.

Inside the vision tower's layer ``layer`` (LLaVA-1.5: -2, the layer whose output the projector
reads), the CLS query's attention, summed over heads, names the *dominant* patches; the CLS token
itself is kept too (the official code feeds it to the projector even though LLaVA-1.5 drops it).
The remaining patches are merged into ``contextual`` tokens: uniformly spaced targets among them
(in patch order) each absorb the mean of the non-target tokens whose head-averaged keys (same
layer) are most cosine-similar to it; a contextual token is target + that mean, as officially.
Merged tokens are built in vision-feature space and projected with the model's projector.

Budget K counts every token the LLM sees: K = CLS + dominant patches + contextual. Published
splits (dominant incl. CLS + contextual): 64 = 54+10, 128 = 108+20, 192 = 162+30, i.e.
contextual = round(5K/32); the same ratio derives the split for any other K.
The LLM sees [CLS, dominant patches in patch order, contextual tokens], as officially; positions
are re-indexed as in the official LLaVA path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from prunebench import (
    PRE_LLM,
    Budget,
    BudgetError,
    Method,
    MethodError,
    Selection,
    Stage,
    StageContext,
    register_method,
)

CONTEXTUAL_RATIO = 10 / 64  # published: 10 of 64, 20 of 128, 30 of 192


@dataclass(frozen=True)
class ZipStage(Stage):
    """The pre-LLM stage with VisionZip's split: ``keep`` dominant patches, plus CLS and
    ``contextual`` merged tokens that the engine counts as visual tokens too."""

    contextual: int = 0
    cls: bool = False


def split_budget(k: int, contextual: int | None, cls: bool) -> tuple[int, int]:
    """(dominant patches, contextual tokens) for a budget of ``k`` LLM tokens."""
    n_ctx = math.floor(k * CONTEXTUAL_RATIO + 0.5) if contextual is None else contextual
    dominant = k - n_ctx - int(cls)
    if n_ctx < 0 or dominant < 1:
        raise BudgetError(
            f"visionzip: budget K={k} leaves {dominant} dominant patches after {int(cls)} CLS and "
            f"{n_ctx} contextual tokens; choose a larger K or fewer contextual tokens"
        )
    return dominant, n_ctx


@register_method
@dataclass(kw_only=True)
class VisionZip(Method):
    """VisionZip: CLS-attention dominant patches (+CLS) and key-similarity merged contextual tokens."""

    name: ClassVar[str] = "visionzip"
    stage: ClassVar[str] = "pre"
    layer: int = -2  # vision encoder layer (negative index): its attention, keys and output are used
    contextual: int | None = None  # contextual tokens; None: round(5K/32) (54+10, 108+20, 162+30)
    cls: bool = True  # keep the CLS token as one of the K (official)

    def __post_init__(self) -> None:
        if self.layer >= 0:
            raise MethodError(
                f"visionzip: layer={self.layer}; give the vision layer as a negative index "
                "(-2 is LLaVA-1.5's feature layer), so its output is hidden_states[layer]"
            )
        if self.contextual is not None and self.contextual < 0:
            raise MethodError(f"visionzip: contextual={self.contextual} must be >= 0")

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if budget.is_all:  # the unpruned reference: every patch, nothing merged, no CLS
            return [ZipStage(PRE_LLM, n_visual)]
        dominant, n_ctx = split_budget(budget.resolve(n_visual), self.contextual, self.cls)
        return [ZipStage(PRE_LLM, dominant, contextual=n_ctx, cls=self.cls)]

    def select(self, ctx: StageContext) -> Selection:
        stage = ctx.stage
        if not isinstance(stage, ZipStage):
            raise MethodError(f"visionzip: expected its own ZipStage schedule, got {stage!r}")
        hidden = ctx.vision_hidden(self.layer)  # (B, 1 + N, d_v): CLS then patches
        patches = ctx.vision_features
        if hidden.shape[1] != patches.shape[1] + 1 or not torch.equal(hidden[:, 1:], patches):
            raise MethodError(
                f"visionzip: vision layer {self.layer}'s output (with a leading CLS) is not what this "
                "model's projector consumes; set visionzip:layer= to the model's vision_feature_layer"
            )
        scores = ctx.cls_attention(self.layer).sum(1)  # (B, N)
        dominant = scores.topk(ctx.uniform_keep, dim=-1).indices
        leading = ctx.project(hidden[:, :1]) if stage.cls else None  # CLS leads, as officially
        merged = None
        if stage.contextual:
            keys = ctx.vision_keys(self.layer).mean(1)[:, 1:]  # (B, N, d) head-averaged, as officially
            merged = ctx.project(merge_contextual(patches, keys, dominant, stage.contextual))
        return Selection(keep=dominant, merged=merged, leading=leading)


def merge_contextual(features: torch.Tensor, keys: torch.Tensor, dominant: torch.Tensor, n_ctx: int) -> torch.Tensor:
    """``(B, n_ctx, d_v)`` contextual tokens from the patches outside ``dominant``.

    Targets are every ``(R // n_ctx)``-th of the R remaining patches (patch order); every other
    remaining patch joins the target whose key is most cosine-similar; a contextual token is its
    target's features plus the mean of the features that joined it.
    """
    batch, n, _ = features.shape
    rest_mask = torch.ones(batch, n, dtype=torch.bool, device=features.device)
    rest_mask.scatter_(1, dominant, False)
    rest = rest_mask.nonzero()[:, 1].view(batch, -1)  # (B, R) remaining patches in order
    n_rest = rest.shape[1]
    step = max(1, n_rest // n_ctx)
    is_target = torch.zeros(n_rest, dtype=torch.bool, device=features.device)
    is_target[torch.arange(0, n_rest, step, device=features.device)[:n_ctx]] = True
    targets, others = rest[:, is_target], rest[:, ~is_target]

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    unit = F.normalize(keys.float(), dim=-1)
    assign = torch.bmm(take(unit, others), take(unit, targets).transpose(1, 2)).argmax(-1)  # (B, R - n_ctx)
    sums = torch.zeros(batch, n_ctx, features.shape[-1], dtype=features.dtype, device=features.device)
    sums.scatter_add_(1, assign[..., None].expand(-1, -1, features.shape[-1]), take(features, others))
    counts = torch.zeros(batch, n_ctx, dtype=features.dtype, device=features.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=features.dtype))
    return take(features, targets) + sums / counts.clamp(min=1)[..., None]
