"""How our processes start, coordinate and end: the accelerator for every entry point (CPU/gloo or
GPU/NCCL, DeepSpeed when the launcher asks), one collective for "is this true on any rank", and dying
with the parent process (a rank with its launcher, a loader worker with its rank)."""

from __future__ import annotations

import os
import signal
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dfcvae_dist.errors import UserError


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1, timeout_s: int = 300,
                     threads: int | None = None) -> Accelerator:
    """The Accelerator of a training or extraction process, however it was launched (python, torchrun,
    accelerate launch), with a bounded collective timeout and `threads` torch threads (default: cores /
    local processes)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun / accelerate launch
        die_with_parent()  # ranks must not outlive their launcher
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed  # accelerate turns DeepSpeed off when cpu=True
    handler = InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                     timeout=timedelta(seconds=timeout_s))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # the explicit backend breaks one-process runs
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                              kwargs_handlers=[handler] if distributed else [])
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(f"the launcher asked for DeepSpeed but accelerate set up {accelerator.distributed_type}; "
                        "do not set ACCELERATE_USE_CPU with a DeepSpeed config")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local))
    return accelerator


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); a no-op elsewhere."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
