"""One training job over several processes started by torchrun: process group, shares, who writes.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous; without them the job is one process
and nothing here does anything. Every rank draws the same global logical batch from a generator
seeded alike (under DP the Poisson batch one process would draw) and trains on its share,
``batch[rank::world]``. Gradients are summed over ranks once per logical step: by Opacus'
distributed DP optimizer under DP (noise added on rank 0 only, so once per step), by
DistributedDataParallel otherwise. Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from config import InputError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that writes checkpoints, logs and results."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def share(self, batch: list[int]) -> list[int]:
        return batch[self.rank::self.world]


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(cuda: bool, timeout_s: float) -> Ranks:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU); a single process without torchrun.

    ``timeout_s`` bounds every collective: a rank that died or hangs stops the others with an error
    instead of a silent wait.
    """
    if not launched():
        return Ranks()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size(), local_rank)


def from_main(ranks: Ranks, value):
    """``value`` as rank 0 has it (e.g. an experiment name with a timestamp), on every rank."""
    if not ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finish(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an input error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("training.device: cuda requested but no CUDA device is available")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")
