"""Data-parallel runs under `accelerate launch` / `torchrun`.

lmms-eval shards each task's samples across ranks and gathers the logged samples on rank 0; we
only make every rank agree on which cells to run (rank 0 decides and holds the store's locks) and
collect the engine's per-sample statistics on rank 0, which alone writes records and prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> World:
    return World(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0")))


def init(world: World, device: str) -> None:
    if world.size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def finish(world: World) -> None:
    """Every rank done, then the process group closed: left to interpreter exit, its threads can
    abort a rank after the run has finished (seen with gloo)."""
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(value: Any, world: World) -> Any:
    """Rank 0's value, on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any, world: World) -> list[Any]:
    """Every rank's value, on every rank."""
    if world.size == 1:
        return [value]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out
