"""How our processes coordinate and end: one collective for "is this true on any rank", and dying with
the parent process (a rank with its launcher, a loader worker with its rank)."""

from __future__ import annotations

import signal
import sys

import torch


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (one all-reduce)."""
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); a no-op elsewhere."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
