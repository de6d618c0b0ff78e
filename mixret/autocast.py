"""bf16 autocast on CUDA, nothing elsewhere: the precision of every forward pass in training, embedding and
benchmarks."""
from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
