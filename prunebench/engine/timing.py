"""One clock for every stage: CUDA events on a GPU (read after a single sync), perf_counter on CPU."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class StageClock:
    """Accumulates the time spent in named stages (``vision``, ``pruner``, ``prefill``, ``decode``).

    On CUDA each stage is bracketed by events, so timing adds no synchronisation to the hot path;
    :meth:`summary` synchronises once and reads them. On CPU the work is synchronous and
    perf_counter is exact. A disabled clock costs nothing.
    """

    def __init__(self, device: torch.device | str, enabled: bool = True):
        self.device = torch.device(device)
        self.enabled = enabled
        self.cuda = self.device.type == "cuda"
        self._spans: dict[str, list] = defaultdict(list)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._spans[name].append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self._spans[name].append(time.perf_counter() - t0)

    def summary(self) -> dict[str, float]:
        """Milliseconds per stage (summed over its spans)."""
        if self.cuda and self._spans:
            torch.cuda.synchronize(self.device)
            return {k: sum(s.elapsed_time(e) for s, e in v) for k, v in self._spans.items()}
        return {k: 1000.0 * sum(v) for k, v in self._spans.items()}
