"""VisPruner (Zhang et al., ICCV 2025; Theia-4869/VisPruner): pre-LLM, text-agnostic, visual cues only.

Transcribed from ``llava/model/llava_arch.py`` (``encode_images``) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``feature_select``) at commit aefa01a.

1. Important tokens: the ``int(K * important)`` patches with the highest attention of the CLS
   query inside the vision layer whose output the projector reads (LLaVA-1.5: -2), averaged over
   heads (softmax over CLS + patches, patch columns only).
2. Diverse tokens: the remaining patches, in descending attention order, lose duplicates in rounds
   until ``K - int(K * important)`` are left. Each round splits the current list into its even and
   odd positions, scores every even token by its largest cosine similarity to an odd one (on the
   same layer's patch features, before the projector), and drops the ``min(8, surplus)`` highest
   scoring even tokens; the surviving evens (by descending score) followed by the odds form the
   next round's list.
Kept in patch order, positions re-indexed (the official LLaVA path rebuilds contiguous positions).

Divergence: the official round indexes the surviving evens with a ``R // 2``-wide index, which
fails when the list length R is odd (for N = 576 and important = 0.5: every K = 2 or 3 mod 4) or
when fewer than 8 tokens are left to drop with fewer evens than that; here a round drops
``min(8, surplus, evens)`` and indexes the survivors directly. Where the official code runs, the
two give the same tokens. Sorts are stable (the official argsort's tie order is unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from prunebench import (
    Method,
    MethodError,
    Selection,
    SignalUnavailableError,
    StageContext,
    register_method,
)

ROUND = 8  # the most tokens one round drops (official)


@register_method
@dataclass(kw_only=True)
class VisPruner(Method):
    """VisPruner: CLS-attention important tokens + duplicate-removed diverse tokens."""

    name: ClassVar[str] = "vispruner"
    stage: ClassVar[str] = "pre"
    important: float = 0.5  # share of K chosen by CLS attention (official --important_ratio default)
    layer: int = -2  # vision layer (negative index) of the attention and features: the projector's input

    def __post_init__(self) -> None:
        if not 0.0 <= self.important <= 1.0:
            raise MethodError(f"vispruner: important={self.important} must lie in [0, 1]")
        if self.layer >= 0:
            raise MethodError(f"vispruner: layer={self.layer}; give the vision layer as a negative index (-2: LLaVA-1.5)")

    def select(self, ctx: StageContext) -> Selection:
        if ctx.layout.multimodal:
            raise SignalUnavailableError(
                "vispruner: the Qwen-VL vision tower has no CLS token, and the official code has no Qwen-VL "
                "path (its SigLIP path scores by attention received in the last layer, a signal prunebench "
                "does not offer for Qwen-VL's windowed tower)"
            )
        features = ctx.vision_hidden(self.layer)[:, 1:]
        if not torch.equal(features, ctx.vision_features):
            raise MethodError(
                f"vispruner: vision layer {self.layer}'s output is not what this model's projector consumes; "
                "set vispruner:layer= to the model's vision_feature_layer"
            )
        scores = ctx.cls_attention(self.layer).mean(1)  # (B, N)
        return Selection(keep=important_and_diverse(scores, features, ctx.uniform_keep, self.important))


def important_and_diverse(scores: torch.Tensor, features: torch.Tensor, k: int, important: float) -> torch.Tensor:
    """``(B, k)``: the ``int(k * important)`` highest ``scores``, then the rest after duplicate removal."""
    n_important = int(k * important)
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    kept, residual = order[:, :n_important], order[:, n_important:]
    if k == n_important:
        return kept
    diverse = remove_duplicates(F.normalize(features.float(), dim=-1), residual, k - n_important)
    return torch.cat([kept, diverse], dim=1)


def remove_duplicates(unit: torch.Tensor, residual: torch.Tensor, target: int) -> torch.Tensor:
    """``(B, target)`` of the ``residual`` token indices after VisPruner's even/odd rounds; ``unit``:
    ``(B, N, C)`` L2-normalised features."""

    def rows(index: torch.Tensor) -> torch.Tensor:
        return unit.gather(1, index[..., None].expand(-1, -1, unit.shape[-1]))

    while True:
        even, odd = residual[:, 0::2], residual[:, 1::2]
        drop = min(ROUND, residual.shape[1] - target, even.shape[1])
        if drop <= 0:
            return residual
        duplicate = torch.bmm(rows(even), rows(odd).transpose(1, 2)).amax(-1)  # (B, evens)
        survivors = duplicate.sort(dim=-1, descending=True, stable=True).indices[:, drop:]
        residual = torch.cat([even.gather(1, survivors), odd], dim=1)
