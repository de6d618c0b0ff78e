"""This process's place in a run: one process, or one of several launched by torchrun.

    from mixret.distributed import Distributed
    with Distributed.from_env() as dist:      # a process group when WORLD_SIZE > 1 (nccl on GPUs, gloo on CPUs)
        dist.run(work)                        # a failure on any rank fails every rank with its message

Text travels between ranks as uint8 tensors: nothing is pickled.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as torch_dist

from mixret.errors import MixretError

T = TypeVar("T")


@dataclass
class Distributed:
    """Rank, world size and device of this process; every method is a no-op (or the identity) alone."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this helper created the process group (and destroys it on close)

    @classmethod
    def from_env(cls, device: str | torch.device | None = None) -> "Distributed":
        """CUDA if available (one GPU per local rank), else the CPU; a process group when launched by
        torchrun (WORLD_SIZE > 1). `device` overrides the device choice."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is not None:
            device = torch.device(device)
        elif torch.cuda.is_available():
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        else:
            device = torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
        if world_size == 1:
            return cls(device=device)
        owns = not torch_dist.is_initialized()
        if owns:
            # generous timeout: the other ranks wait while rank 0 trains a tokenizer or tokenizes a corpus
            torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                          timeout=datetime.timedelta(hours=1))
        return cls(rank=torch_dist.get_rank(), local_rank=local_rank, world_size=torch_dist.get_world_size(),
                   device=device, owns_group=owns)

    def __enter__(self) -> "Distributed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.owns_group and torch_dist.is_initialized():
            torch_dist.destroy_process_group()
            self.owns_group = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce sum of a tensor on self.device, in place; returns it."""
        if self.world_size > 1:
            torch_dist.all_reduce(t)
        return t

    def max(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce max of a tensor on self.device, in place; returns it."""
        if self.world_size > 1:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return t

    def gather_text(self, text: str) -> list[str]:
        """Every rank's `text`, in rank order, on every rank."""
        if self.world_size == 1:
            return [text]
        raw = torch.tensor(list(text.encode("utf-8")), dtype=torch.uint8, device=self.device)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.world_size)]
        torch_dist.all_gather(sizes, torch.tensor([len(raw)], dtype=torch.int64, device=self.device))
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        padded[:len(raw)] = raw
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        torch_dist.all_gather(parts, padded)
        return [bytes(p[:int(n)].cpu().tolist()).decode("utf-8") for p, n in zip(parts, sizes)]

    def broadcast_text(self, text: str) -> str:
        """Rank 0's `text` on every rank."""
        return self.gather_text(text if self.main else "")[0]

    def run(self, fn: Callable[[], T]) -> T:
        """Run fn on every rank. When it raises on any rank, every rank raises MixretError with the message
        of the lowest failing rank, instead of the others waiting for it at the next collective call."""
        result, error = None, ""
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks
            if self.world_size == 1:
                raise
            error = str(e) or type(e).__name__
            if not isinstance(e, MixretError):
                error = f"{type(e).__name__}: {error}"
        if self.world_size > 1:
            errors = self.gather_text(error)
            failed = [r for r, e in enumerate(errors) if e]
            if failed:
                raise MixretError(f"rank {failed[0]}: {errors[failed[0]]}")
        return result

    def on_main(self, fn: Callable[[], T]) -> T | None:
        """Run fn on rank 0 only (None elsewhere); an error raised there is raised on every rank."""
        return self.run(fn if self.main else lambda: None)
