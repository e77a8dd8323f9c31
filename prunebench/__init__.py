"""prunebench: benchmark visual-token pruning methods for VLMs under one engine, one protocol, one timer.

The public API, for writing a method and for driving the engine from Python:

    from prunebench import Method, Selection, Stage, StageContext, Budget, register_method
    from prunebench import PruningEngine, load_model

Names load on first use, so ``import prunebench`` (and the CLI's startup) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "Method": "prunebench.engine.method",
    "Selection": "prunebench.engine.method",
    "Stage": "prunebench.engine.method",
    "PRE_LLM": "prunebench.engine.method",
    "register_method": "prunebench.engine.method",
    "create_method": "prunebench.engine.method",
    "available_methods": "prunebench.engine.method",
    "PositionPolicy": "prunebench.engine.sequence",
    "StageContext": "prunebench.engine.signals",
    "SignalUnavailableError": "prunebench.engine.signals",
    "PruningEngine": "prunebench.engine.generate",
    "DecodeConfig": "prunebench.engine.generate",
    "Budget": "prunebench.budget",
    "BudgetError": "prunebench.budget",
    "layer_averaged_counts": "prunebench.budget",
    "MethodError": "prunebench.errors",
    "UserError": "prunebench.errors",
    "load_model": "prunebench.models.loading",
    "load_clip_space": "prunebench.models.clip_text",
    "CheckpointSelector": "prunebench.training.selectors",
}
__all__ = [
    "Budget",
    "BudgetError",
    "CheckpointSelector",
    "DecodeConfig",
    "Method",
    "MethodError",
    "PRE_LLM",
    "PositionPolicy",
    "PruningEngine",
    "Selection",
    "SignalUnavailableError",
    "Stage",
    "StageContext",
    "UserError",
    "available_methods",
    "create_method",
    "layer_averaged_counts",
    "load_clip_space",
    "load_model",
    "register_method",
]

if TYPE_CHECKING:
    from prunebench.budget import Budget, BudgetError, layer_averaged_counts
    from prunebench.engine.generate import DecodeConfig, PruningEngine
    from prunebench.engine.method import (
        PRE_LLM,
        Method,
        Selection,
        Stage,
        available_methods,
        create_method,
        register_method,
    )
    from prunebench.engine.sequence import PositionPolicy
    from prunebench.engine.signals import SignalUnavailableError, StageContext
    from prunebench.errors import MethodError, UserError
    from prunebench.models.clip_text import load_clip_space
    from prunebench.models.loading import load_model
    from prunebench.training.selectors import CheckpointSelector


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prunebench' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
