"""AutoSelect (arXiv 2603.07135): a trained, question-agnostic scorer keeps the top-K tokens.

Train the scorer with ``prunebench train autoselect`` (see prunebench/training/trainer.py). At inference only
the scorer runs (the soft top-K gate and the denoiser are training-only): hard top-K of its logits
on the vision features before the projector, kept in their original order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunebench import CheckpointSelector, register_method


@register_method
@dataclass(kw_only=True)
class AutoSelectMethod(CheckpointSelector):
    """AutoSelect: top-K of a trained scorer on the vision features (ckpt=DIR from `prunebench train autoselect`)."""

    name: ClassVar[str] = "autoselect"
