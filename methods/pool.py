"""Pool: the geometric floor that every pruning method should beat.

``mode=tokens`` (fixed-grid towers: LLaVA-1.5's 24 x 24): the image's visual tokens, laid out on
their 2-D grid, are average-pooled (``adaptive_avg_pool2d``) to an h x w grid with h * w = K,
row-major, and the LLM sees those h * w built tokens in the image's place with contiguous
positions (UniPruneBench's "Pool" baseline, which pools InternVL's projected tokens per tile).
``space=projected`` (default, as UniPruneBench) pools the LLM-input tokens; ``space=vision`` pools
the vision features and projects the result.

K -> grid (``grid``): ``fit`` takes the h x w grid with the most cells <= K whose sides are at most
2:1 and within the token grid, the squarest among equals, wide on a square source (64 = 8 x 8,
128 = 8 x 16, 192 = 12 x 16, 144 = 12 x 12, 97 -> 8 x 12 = 96); ``square`` takes the largest
s x s <= K (128 -> 11 x 11 = 121, 192 -> 13 x 13 = 169). Either way the engine counts the tokens
the LLM really sees (fewer than K where K has no such grid). Budget ``all`` pools the grid onto
itself, which is the identity.

``mode=resize`` (dynamic-resolution towers: Qwen2-VL / Qwen2.5-VL): VTC-Bench's downsampling.
The image is shrunk (bicubic, aspect ratio kept) before the processor to the largest size whose
visual-token count is at most K, so the tower itself yields about K tokens and costs less; the
tokens per layer the engine reports are the exact count. It acts through
:meth:`Method.resize_image`, which ``prunebench run`` calls; the engine alone cannot resize, so a
budget other than ``all`` reaching :meth:`select` is refused with that reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F

from prunebench import (
    PRE_LLM,
    Budget,
    BudgetError,
    Method,
    MethodError,
    Selection,
    SignalUnavailableError,
    Stage,
    StageContext,
    register_method,
)

MAX_ASPECT = 2  # pooled grids at most 2:1, so a pooled cell stays near square


@dataclass(frozen=True)
class PoolStage(Stage):
    """Keep none of the tokens, build about ``tokens`` pooled ones (None: the image's own grid)."""

    tokens: int | None = None


def pool_grid(k: int, grid: Literal["fit", "square"], rows: int, cols: int) -> tuple[int, int]:
    """(h, w) of the pooled grid for budget ``k`` on a ``rows`` x ``cols`` token grid."""
    if grid == "square":
        side = min(math.isqrt(k), rows, cols)
        return side, side
    shapes = [(h, w) for h in range(1, rows + 1) for w in range(1, cols + 1)
              if h * w <= k and max(h, w) <= MAX_ASPECT * min(h, w)]
    # most tokens, then the squarest, then the source's orientation (wide on a wide or square grid)
    return max(shapes, key=lambda s: (s[0] * s[1], -abs(s[0] - s[1]), (s[1] >= s[0]) == (cols >= rows)))


def average_pool(tokens: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """``(B, rows * cols, d)`` row-major tokens -> ``(B, h * w, d)`` adaptive averages, row-major, in float32."""
    batch, _, width = tokens.shape
    image = tokens.float().reshape(batch, *grid, width).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(image, target).flatten(2).transpose(1, 2)


@register_method
@dataclass(kw_only=True)
class Pool(Method):
    """Pool: average-pool the token grid to ~K tokens (or, mode=resize, shrink the image to ~K tokens)."""

    name: ClassVar[str] = "pool"
    stage: ClassVar[str] = "pre"
    mode: Literal["tokens", "resize"] = "tokens"  # tokens: fixed-grid towers; resize: Qwen-VL (VTC-Bench)
    grid: Literal["fit", "square"] = "fit"  # K -> pooled grid (see the module note)
    space: Literal["projected", "vision"] = "projected"  # pool the LLM-input tokens (UniPruneBench) or vision features

    def __post_init__(self) -> None:
        if self.positions != "reindex":
            raise MethodError(
                "pool builds new tokens that have no original position ids; only positions=reindex applies"
            )

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        if budget.is_all:  # nothing to pool; the resize mode's caller runs the engine at "all"
            return [] if self.mode == "resize" else [PoolStage(PRE_LLM, 0)]
        k = budget.resolve(n_visual)
        if self.mode == "resize":
            return [Stage(PRE_LLM, n_visual)]  # select() explains why the engine alone cannot do it
        return [PoolStage(PRE_LLM, 0, tokens=k)]

    def select(self, ctx: StageContext) -> Selection:
        if self.mode == "resize":
            raise MethodError(
                "pool:mode=resize shrinks the image before the processor (prunebench run does it through "
                "Method.resize_image and then runs the engine at budget all); the engine alone cannot resize"
            )
        if ctx.layout.multimodal:
            raise SignalUnavailableError(
                "pool:mode=tokens on Qwen-VL: pooled tokens would need M-RoPE (t, h, w) ids of a coarser grid, "
                "which built tokens do not carry; use pool:mode=resize (a smaller image, as VTC-Bench)"
            )
        grids = ctx.token_grid
        stage = ctx.stage
        if not isinstance(stage, PoolStage) or len(set(grids)) != 1:
            raise MethodError(f"pool: expected its own PoolStage and one grid for the batch, got {stage!r}, {grids}")
        rows, cols = grids[0]
        target = (rows, cols) if stage.tokens is None else pool_grid(stage.tokens, self.grid, rows, cols)
        features = ctx.image_embeds if self.space == "projected" else ctx.vision_features
        pooled = average_pool(features, (rows, cols), target)
        if self.space == "vision":
            pooled = ctx.project(pooled.to(features.dtype))
        empty = torch.empty(ctx.batch_size, 0, dtype=torch.long, device=pooled.device)
        return Selection(keep=empty, merged=pooled)

    @property
    def resizes_images(self) -> bool:
        return self.mode == "resize"

    def resize_image(self, image, budget: Budget, tokens_at):
        if self.mode != "resize":
            raise MethodError("pool:mode=tokens pools the tokens; only pool:mode=resize resizes images")
        height, width = image.height, image.width
        n = tokens_at(height, width)
        k = budget.resolve(n)
        if k == n:
            return image
        size = largest_size_within(height, width, k, tokens_at)
        if size == (height, width):  # no smaller size gives fewer tokens
            raise MethodError(
                f"pool:mode=resize: this model's processor gives {n} visual tokens for this image at any smaller "
                "size (LLaVA-1.5 resizes every image to one size); use pool:mode=tokens"
            )
        from PIL import Image

        return image.resize(size[::-1], resample=Image.BICUBIC)


def largest_size_within(height: int, width: int, k: int, tokens_at) -> tuple[int, int]:
    """The largest (height, width) of the same aspect ratio whose token count is at most ``k``:
    a binary search over the long side (the count grows with the size)."""
    long = max(height, width)

    def size(side: int) -> tuple[int, int]:
        return max(1, round(height * side / long)), max(1, round(width * side / long))

    smallest = tokens_at(*size(1))
    if smallest > k:
        if smallest == tokens_at(height, width):
            return height, width
        raise BudgetError(f"pool:mode=resize: even the smallest image gives {smallest} visual tokens, more than K={k}")
    low, high = 1, long  # tokens_at(size(low)) <= k throughout
    while low < high:
        mid = (low + high + 1) // 2
        if tokens_at(*size(mid)) <= k:
            low = mid
        else:
            high = mid - 1
    return size(low)
