"""AutoSelect (arXiv 2603.07135): a trained, question-agnostic scorer keeps the top-K tokens.

Train the scorer with ``prunebench train autoselect`` (prunebench/training/trainer.py). At
inference only the scorer runs (the soft top-K gate and the denoiser are training-only): hard top-K
of its logits on the vision features before the projector, kept in their original order.

Without ``ckpt``, on builtin:tiny-llava: ``shipped=per-budget`` (default) takes the checkpoint
trained at the run's K (192, 128 and 64 ship; another K is refused with the command that trains
one); ``shipped=sampled-k`` the one scorer trained with K drawn from 64..192.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from prunebench import CheckpointSelector, MethodError, register_method


@register_method
@dataclass(kw_only=True)
class AutoSelectMethod(CheckpointSelector):
    """AutoSelect: top-K of a trained scorer on the vision features (ckpt=DIR from `prunebench train autoselect`)."""

    name: ClassVar[str] = "autoselect"
    shipped: Literal["per-budget", "sampled-k"] = "per-budget"  # without ckpt: which shipped checkpoint(s)

    def __post_init__(self) -> None:
        if self.ckpt and self.shipped != "per-budget":
            raise MethodError("autoselect: shipped= picks among the checkpoints shipped for builtin:tiny-llava; "
                              "it does not combine with ckpt=")
        super().__post_init__()

    @property
    def per_budget(self) -> bool:
        return self.ckpt is None and self.shipped == "per-budget"

    @property
    def variant(self) -> str | None:
        return "sampled-k" if self.ckpt is None and self.shipped == "sampled-k" else None
