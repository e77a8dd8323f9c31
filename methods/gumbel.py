"""Gumbel-Softmax autoencoder selector (arXiv 2503.16660): top-K of a trained keep-logit head.

Trained by ``prunebench train gumbel`` on vision features only (reconstruction + a kept-fraction
floor; no LLM, no text). At inference only the selector runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunebench import CheckpointSelector, register_method


@register_method
@dataclass(kw_only=True)
class GumbelSelectorMethod(CheckpointSelector):
    """Gumbel autoencoder selector: top-K of trained keep logits (ckpt=DIR from `prunebench train gumbel`)."""

    name: ClassVar[str] = "gumbel"
