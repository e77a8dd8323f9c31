"""AutoSelect (arXiv 2603.07135): a trained, question-agnostic scorer keeps the top-K tokens.

Train the scorer with ``prunebench train autoselect`` (see prunebench/train.py). At inference only
the scorer runs (the soft top-K gate and the denoiser are training-only): hard top-K of its logits
on the vision features before the projector, kept in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prunebench.method import Method, Selection, register_method
from prunebench.selectors import CheckpointScorer
from prunebench.signals import StageContext


@register_method
@dataclass(kw_only=True)
class AutoSelectMethod(Method):
    """AutoSelect: top-K of a trained scorer on the vision features (ckpt=DIR from `prunebench train autoselect`)."""

    name: ClassVar[str] = "autoselect"
    stage: ClassVar[str] = "pre"
    ckpt: str | None = None  # checkpoint directory (config.json + model.safetensors)
    _scorer: CheckpointScorer | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._scorer = CheckpointScorer(self.name, self.ckpt)  # a missing or bad checkpoint fails here

    def select(self, ctx: StageContext) -> Selection:
        return self._scorer.top_k(ctx)
