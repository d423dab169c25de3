"""Data-parallel training under torchrun: the same `fit` on one GPU or many.

    torchrun --nproc_per_node 2 -m spottune.cli train --method spottune --out runs/spottune

torchrun starts one process per GPU and sets WORLD_SIZE, RANK and LOCAL_RANK; without them (a plain
`spottune train`) nothing here does anything. Each process trains on its own shard of every epoch
(DistributedSampler) with `data.batch_size` images per step, so the global batch is world_size
times larger; DistributedDataParallel averages the gradients. The epoch's training loss and accuracy
are summed over every rank's shard (`all_reduce_sum`). Rank 0 alone evaluates and writes the
checkpoint, the model and the metrics; the others wait for it where files are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Distributed:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Distributed:
        return cls(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                   int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_name(self, requested: str) -> str:
        """This process's device: its own GPU under torchrun, else what was asked for."""
        if not self.enabled or requested == "cpu" or not torch.cuda.is_available():
            return requested
        return f"cuda:{self.local_rank}"

    def start(self, device: torch.device) -> None:
        """Join the process group: NCCL between GPUs, gloo on CPU (tests, laptops)."""
        if not self.enabled or torch.distributed.is_initialized():
            return
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to call in training: DDP around `model` when distributed, `model` itself otherwise."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # broadcast_buffers=False: DDP's default sends rank 0's buffers (BN statistics) to every rank
        # before each forward, a collective that makes every step wait for the slowest rank (2-6 ms a
        # fine-tuning step on 2 GPUs, docs/performance.md). Rank 0's own statistics are the same either way, and
        # rank 0 alone evaluates and saves the model.
        # Every trainable parameter gets a gradient in every step (SpotTune hands its idle tuned copies
        # exact zeros), so DDP need not search for unused ones, which costs a synchronisation per step.
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over every process, in place (the epoch's training statistics: sums and counts)."""
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def stop(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
