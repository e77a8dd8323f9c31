"""Uniformly random visual tokens: the honest floor every method must beat."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from prunebench import Method, Selection, StageContext, register_method


@register_method
@dataclass(kw_only=True)
class RandomPruning(Method):
    """Keep K visual tokens drawn uniformly at random (seeded), in their original order."""

    name: ClassVar[str] = "random"
    stage: ClassVar[str] = "pre"
    seed: int = 0

    def select(self, ctx: StageContext) -> Selection:
        keep = []
        for b, (n, k) in enumerate(zip(ctx.n_visual, ctx.keep)):
            generator = ctx.generator(b)
            keep.append(torch.randperm(n, generator=generator, device=generator.device)[:k].sort().values)
        return Selection(keep=keep)
