"""Processes that must not outlive their parent: a rank its launcher, a loader worker its rank. Kept free
of heavy imports, so that an entry point can arm it in its first milliseconds (dfcvae_dist/cli/__init__.py),
not after seconds of importing torch, when a killed launcher would already have left it orphaned."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (PR_SET_PDEATHSIG); a no-op elsewhere."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def arm_if_launched() -> None:
    """In a process started by torchrun or `accelerate launch`: die with the launcher from now on, and exit
    at once if it is already gone (this process was then handed to init, pid 1)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    die_with_parent()
    if os.getppid() == 1:
        print("error: the launcher of this rank is gone; exiting", file=sys.stderr)
        os._exit(1)
