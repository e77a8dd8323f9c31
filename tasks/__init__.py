"""prunebench's own lmms-eval tasks (YAML + generators); installed as ``prunebench.tasks``.

``GENERATED`` is the catalogue of the generated tasks: the lmms-eval task each one runs as (its
prompts and metric), how its fixed evaluation set is drawn, and its size and seed. Real tasks
come from lmms-eval itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GeneratedTask:
    base: str  # the lmms-eval task whose prompts and metric it uses
    generate: Callable[[int, int], Any]  # (n, seed) -> datasets.Dataset
    size: int  # samples in the fixed evaluation set
    seed: int
    description: str


def _generated(task: str) -> Callable[[int, int], Any]:
    def generate(n: int, seed: int):
        from prunebench.tasks.synthetic import task_dataset

        return task_dataset(task, n, seed)

    return generate


GENERATED = {
    "synth-gqa": GeneratedTask("prunebench_synth_gqa", _generated("synth-gqa"), 500, 2024,
                               "GQA-like: colour, shape, left/right and count of small shapes, exact match"),
    "synth-textvqa": GeneratedTask("prunebench_synth_textvqa", _generated("synth-textvqa"), 500, 2024,
                                   "TextVQA-like: read a number or word printed 4 px high among shapes, exact match"),
    "synth-pope": GeneratedTask("pope", _generated("synth-pope"), 500, 2024,
                                "POPE-like: balanced yes/no existence of a coloured shape, POPE's metrics"),
}
