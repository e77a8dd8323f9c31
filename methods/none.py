"""The unpruned baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from prunebench import Budget, Method, Stage, register_method


@register_method
@dataclass(kw_only=True)
class NoPruning(Method):
    """Unpruned baseline: every visual token reaches every layer."""

    name: ClassVar[str] = "none"
    stage: ClassVar[str] = "none"

    def schedule(self, n_visual: int, budget: Budget, num_layers: int) -> list[Stage]:
        return []
