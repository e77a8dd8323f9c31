"""Gumbel-Softmax autoencoder selector (arXiv 2503.16660): top-K of a trained keep-logit head.

Trained by ``prunebench train gumbel`` on vision features only (reconstruction + a kept-fraction
floor; no LLM, no text). At inference only the selector runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prunebench.method import Method, Selection, register_method
from prunebench.selectors import CheckpointScorer
from prunebench.signals import StageContext


@register_method
@dataclass(kw_only=True)
class GumbelSelectorMethod(Method):
    """Gumbel autoencoder selector: top-K of trained keep logits (ckpt=DIR from `prunebench train gumbel`)."""

    name: ClassVar[str] = "gumbel"
    stage: ClassVar[str] = "pre"
    ckpt: str | None = None  # checkpoint directory (config.json + model.safetensors)
    _scorer: CheckpointScorer | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._scorer = CheckpointScorer(self.name, self.ckpt)  # a missing or bad checkpoint fails here

    def select(self, ctx: StageContext) -> Selection:
        return self._scorer.top_k(ctx)
