"""How our processes start, coordinate and end: the accelerator for every entry point (CPU/gloo or
GPU/NCCL, DeepSpeed when the launcher asks), one collective for "is this true on any rank", and dying
with the parent process (a rank with its launcher, a loader worker with its rank)."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from dfcvae_dist.errors import UserError
from dfcvae_dist.lifeline import die_with_parent

_released = False  # an accelerator of this process was released (`release`)


def resolve_precision(configured: str, launcher: str | None, deepspeed: bool) -> str | None:
    """The mixed precision to ask accelerate for (None: DeepSpeed's config decides). `launcher`: what
    `accelerate launch` exports as ACCELERATE_MIXED_PRECISION (always, as 'no' when nothing was given)."""
    if deepspeed:
        return None
    launcher = (launcher or "no").lower()
    if configured == "auto":
        return launcher
    if launcher not in ("no", configured):
        raise UserError(f"train.mixed_precision={configured}, but the launcher asks for {launcher} (accelerate "
                        "launch --mixed_precision or its config file): make them agree, or set "
                        "train.mixed_precision=auto")
    return configured


def cpus_available() -> int:
    """The CPUs this process may run on (a Slurm job's or a container's share, not the whole machine)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_processes() -> int:
    """Processes of this job on this node (torchrun and accelerate launch export LOCAL_WORLD_SIZE)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def make_accelerator(mixed_precision: str = "auto", grad_accum: int = 1, timeout_s: int = 300,
                     threads: int | None = None) -> Accelerator:
    """The Accelerator of a training or extraction process, however it was launched (python, torchrun,
    accelerate launch), with the precision of `resolve_precision`, a bounded collective timeout and
    `threads` torch threads (default: available CPUs / local processes)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun / accelerate launch
        die_with_parent()  # ranks must not outlive their launcher
    forget_released_state()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    cpu = not torch.cuda.is_available() and not deepspeed  # accelerate turns DeepSpeed off when cpu=True
    handler = InitProcessGroupKwargs(backend="nccl" if torch.cuda.is_available() else "gloo",
                                     timeout=timedelta(seconds=timeout_s))
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1  # the explicit backend breaks one-process runs
    precision = resolve_precision(mixed_precision, os.environ.get("ACCELERATE_MIXED_PRECISION"), deepspeed)
    accelerator = Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_steps=grad_accum,
                              kwargs_handlers=[handler] if distributed else [])
    if deepspeed and accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(f"the launcher asked for DeepSpeed but accelerate set up {accelerator.distributed_type}; "
                        "do not set ACCELERATE_USE_CPU with a DeepSpeed config")
    torch.set_num_threads(threads or max(1, cpus_available() // local_processes()))
    return accelerator


def release(accelerator: Accelerator) -> None:
    """End `accelerator` (its process group destroyed). The next `make_accelerator` of this process then starts
    from a clean accelerate state, so a script or notebook can train again, with other settings (accelerate
    keeps one state per process and refuses other settings while it lasts)."""
    global _released
    accelerator.end_training()
    _released = True


def forget_released_state() -> None:
    """After `release`: forget accelerate's process-wide state (the released accelerator keeps working until then)."""
    global _released
    if _released:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        _released = False


def set_determinism(deterministic: bool) -> None:
    """train.deterministic: deterministic kernels (cuBLAS workspace, cuDNN, torch's checks) and no TF32, so a
    resumed GPU run matches an uninterrupted one bit for bit. Otherwise PyTorch's defaults stand: TF32 off for
    matmuls, on for cuDNN convolutions, and cuDNN picks its (possibly nondeterministic) algorithms."""
    if not deterministic:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
