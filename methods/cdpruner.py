"""CDPruner (Zhang et al., NeurIPS 2025; Theia-4869/CDPruner): pre-LLM, instruction-conditioned diversity.

Transcribed from ``llava/model/llava_arch.py`` (``encode_images``) and
``llava/model/multimodal_encoder/clip_encoder.py`` (``load_text_tower``, ``forward``) at commit 9541616.

Kernel: L = diag(r) S diag(r), with S the cosine similarity of the projected visual tokens (the
LLM-input embeddings) and r each token's relevance to the instruction. The K tokens are the greedy
MAP of the DPP with kernel L: each step picks the token with the largest remaining gain d_j^2 and
updates every gain with the new Cholesky row e = (L_j - c_j . C) / d_j (Chen et al., 2018), batched
over images with no host synchronisation; the kernel rows L_j are computed as tokens are picked
(the official code builds the whole N x N kernel first). Kept in patch order, positions re-indexed (official).

Relevance (``text``):
- ``clip`` (official, LLaVA-1.5): the patch states the projector reads, through CLIP's
  ``post_layernorm`` and ``visual_projection``, against CLIP's text embedding of the instruction
  (``clip``: the CLIP checkpoint the tower came from; LLaVA checkpoints lack its text tower, so it is
  loaded from local files, and a missing one is refused when the method is created). r is the
  *negative* cosine, averaged over 77-token chunks of the text, min-max scaled per image. The
  instruction is the prompt text after the image, without LLaVA-1.5's " ASSISTANT:" tail and the
  answer-format suffixes the official eval scripts remove.
- ``llm`` (no CLIP text tower: Qwen-VL, LLaVA-NeXT, the built-in model): the official code has none;
  as OpenVINO GenAI's CDPruner port for Qwen-VL, r is the (positive) cosine between each projected
  token and the mean LLM input embedding of the prompt's text tokens, min-max scaled per image.
``theta`` applies the official code's commented-out r -> exp(theta / (2 (1 - theta)) r).

Divergences from the official code: relevance is scaled per image (official: over the whole
batch, which is one image for LLaVA-1.5; its LLaVA-NeXT path pools five crops) and a constant r
becomes 1 instead of a division by zero; once the best gain is <= 1e-5 (the picked tokens span
every other one: more picks than the kernel's rank, e.g. K > the LLM width), the official code
takes the square root of a non-positive gain and repeats tokens, while here the remaining picks go
by descending relevance; LLaVA-NeXT runs one DPP over all packed tokens (officially one per crop,
with newline tokens always kept).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from prunebench import (
    Method,
    MethodError,
    Selection,
    SignalUnavailableError,
    StageContext,
    load_clip_space,
    register_method,
)

EXHAUSTED = 1e-5  # a best DPP gain at or below this: the picked tokens span the rest
# what the official eval scripts strip from the question before CLIP sees it, and LLaVA-1.5's template tail
NOT_INSTRUCTION = re.compile(
    r"\s*Answer the question using a single word or phrase\s*\.|\s*Answer with the option's letter from the given "
    r"choices directly\s*\.|\s*ASSISTANT\s*:\s*$",
    re.IGNORECASE,
)


@register_method
@dataclass(kw_only=True)
class CDPruner(Method):
    """CDPruner: greedy MAP of a DPP over instruction relevance x token similarity."""

    name: ClassVar[str] = "cdpruner"
    stage: ClassVar[str] = "pre"
    text: Literal["clip", "llm"] = "clip"  # relevance: CLIP text tower (official) or LLM embeddings (no CLIP)
    clip: str = "openai/clip-vit-large-patch14-336"  # CLIP checkpoint of the tower (text=clip)
    theta: float | None = None  # None: plain min-max relevance (official); else exp(theta/(2(1-theta)) r)
    _space: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.theta is not None and not 0.0 < self.theta < 1.0:
            raise MethodError(f"cdpruner: theta={self.theta} must lie in (0, 1)")
        if self.text == "clip":
            self._space = load_clip_space(self.clip)  # a missing checkpoint fails before any work

    def input_files(self) -> list[Path]:
        return self._space.files if self._space is not None else []

    def select(self, ctx: StageContext) -> Selection:
        relevance = self.clip_relevance(ctx) if self.text == "clip" else llm_relevance(ctx)
        relevance = min_max(relevance, ctx.visual_mask)
        if self.theta is not None:
            relevance = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        picks = conditional_dpp(ctx.image_embeds, relevance, ctx.visual_mask, max(ctx.keep))
        return Selection(keep=[row[:k] for row, k in zip(picks, ctx.keep)])

    def clip_relevance(self, ctx: StageContext) -> torch.Tensor:
        """``(B, n_max)`` negative cosine of CLIP image and instruction embeddings, chunk-averaged."""
        if ctx.layout.multimodal:
            raise SignalUnavailableError(
                "cdpruner:text=clip needs a CLIP vision tower; Qwen-VL's has no CLIP text space and the official "
                "code has no Qwen-VL path: use cdpruner:text=llm (OpenVINO GenAI's port)"
            )
        features = ctx.vision_features
        space = self._space.to(features.device)
        if features.shape[-1] != space.vision_width:
            raise MethodError(
                f"cdpruner: the CLIP checkpoint {self.clip!r} has vision width {space.vision_width}, this tower "
                f"{features.shape[-1]}; give cdpruner:clip= the checkpoint the tower came from, or use text=llm"
            )
        image = F.normalize(space.image_embeds(features), dim=-1)
        rows = []
        for b, text in enumerate(ctx.text_after_image()):
            chunks = F.normalize(space.text_embeds(instruction(text)), dim=-1)  # (M, P)
            rows.append(-(image[b] @ chunks.T).mean(-1))
        return torch.stack(rows)


def instruction(text: str) -> str:
    """The question as the official eval scripts hand it to CLIP."""
    return NOT_INSTRUCTION.sub("", text).strip()


def llm_relevance(ctx: StageContext) -> torch.Tensor:
    """``(B, n_max)`` cosine of each projected token and the mean LLM embedding of the prompt's text."""
    text = torch.stack([ctx.hidden[b, slots].float().mean(0) for b, slots in enumerate(ctx.text_slots())])
    return F.cosine_similarity(ctx.image_embeds.float(), text[:, None], dim=-1)


def min_max(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per image, (s - min + 1e-6) / (max - min) over its real tokens (1 where all are equal); 0 on padding."""
    low = scores.masked_fill(~mask, math.inf).amin(-1, keepdim=True)
    high = scores.masked_fill(~mask, -math.inf).amax(-1, keepdim=True)
    spread = high - low
    scaled = torch.where(spread > 0, (scores - low + 1e-6) / spread.clamp_min(1e-30), torch.ones_like(scores))
    return scaled.masked_fill(~mask, 0.0)


def conditional_dpp(features: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` token indices in pick order: fast greedy MAP inference (incremental Cholesky rows)
    of the DPP with kernel L = diag(r) S diag(r), S the cosine similarity of ``features``.

    ``gains[b, n]`` is token n's squared distance, in the kernel's feature space, to the span of
    the tokens picked so far. Only the K kernel rows of the picked tokens are ever needed, so they
    are computed as the picks are made (K x N x D multiply-adds instead of the N x N x D kernel).
    Once a sample's best gain is <= EXHAUSTED its remaining picks follow ``relevance`` (descending)
    among the unpicked tokens."""
    unit = F.normalize(features.float(), dim=-1)
    r = relevance.float()
    batch, n, _ = unit.shape
    rows = torch.arange(batch, device=unit.device)
    gains = (r * r * (unit * unit).sum(-1)).masked_fill(~mask, -math.inf)  # diag(L)
    order = r.masked_fill(~mask, -math.inf)
    chol = unit.new_zeros(batch, k, n)  # row i: the Cholesky row of pick i, over all tokens
    picks = torch.empty(batch, k, dtype=torch.long, device=unit.device)
    spent = torch.zeros(batch, dtype=torch.bool, device=unit.device)
    for i in range(k):
        pick = gains.argmax(-1)
        best = gains[rows, pick]
        spent = spent | (best <= EXHAUSTED)
        pick = torch.where(spent, order.argmax(-1), pick)
        picks[:, i] = pick
        kernel_row = r[rows, pick, None] * torch.bmm(unit[rows, pick][:, None], unit.transpose(1, 2))[:, 0] * r
        known = torch.einsum("bi,bin->bn", chol[rows, :i, pick], chol[:, :i])
        row = (kernel_row - known) / best.clamp_min(EXHAUSTED).sqrt()[:, None]
        chol[:, i] = row.masked_fill(spent[:, None], 0.0)
        gains = gains - chol[:, i] ** 2
        gains[rows, pick] = -math.inf
        order[rows, pick] = -math.inf
    return picks
