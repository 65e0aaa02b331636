"""The run directory contract, and the one way this project writes a file atomically.

    RUN_DIR/
      config.yaml                      the resolved config of the newest launch
      RESUME_ME.json | COMPLETED.json  how the newest launch ended (read by slurm/train.sbatch)
      ranks/rank-N.json                per-rank parameter digest and first-epoch shards
      checkpoints/latest               the name of the newest complete checkpoint
      checkpoints/best                 the name of the best validated one (checkpoint.keep_best)
      checkpoints/step-NNNNNNNN/       trainer_state.json, weights.safetensors, config.yaml, accelerate's files

Nothing here imports accelerate, DeepSpeed or MLflow: serving code reads run directories too.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

from dfcvae_dist.errors import UserError

CONFIG_FILE = "config.yaml"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "weights.safetensors"
RESUME_MARKER = "RESUME_ME.json"  # stopped early at a checkpoint: resume me
DONE_MARKER = "COMPLETED.json"
LOCK_FILE = ".lock"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
BEST = "best"
STEP_DIR = re.compile(r"^step-(\d+)$")
LOCK_LOST_EXIT = 2  # as for any error: one line on stderr
LOCK_BYTES = 1024  # a lock record padded to this size, so that a heartbeat rewrites it in place at the same length
log = logging.getLogger(__name__)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write to; on success it is fsynced and renamed to `path`, on any
    failure removed. A reader therefore sees the old file or the whole new one, never a part. A full disk
    becomes one line naming the file and the free space."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise UserError(f"writing {path} failed: {disk_full(path.parent)}") from None
        raise


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp")


def disk_full(directory: Path) -> str:
    return f"No space left on device: {shutil.disk_usage(directory).free / 2**20:.1f} MiB free on {directory}"


def atomic_write(path: Path, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an fcntl lock of `path` (created if missing) for the block: one process at a time, across the hosts of
    a filesystem with flock; released when the file closes, also when the process dies."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:
            raise UserError(f"{path}: cannot lock ({err}); this filesystem has no flock (e.g. Lustre without "
                            "-o flock): use one that has") from None
        yield


def write_end_marker(run_dir: Path, stopped_early: bool, summary: dict) -> None:
    """Leave exactly one of RESUME_ME.json / COMPLETED.json."""
    keep, drop = (RESUME_MARKER, DONE_MARKER) if stopped_early else (DONE_MARKER, RESUME_MARKER)
    atomic_write(Path(run_dir) / keep, json.dumps(summary, indent=1))
    (Path(run_dir) / drop).unlink(missing_ok=True)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not Path(directory).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(directory).iterdir() if (m := STEP_DIR.match(p.name)) and
             (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the run's newest complete checkpoint (`latest`, or the highest step when `latest` is missing
    or names an incomplete one; None if there is none); `none`; or a checkpoint or run directory path."""
    if resume == "none":
        return None
    if resume != "auto":
        path = Path(resume)
        if path.is_dir() and not (path / STATE_FILE).exists() and (path / CHECKPOINTS).is_dir():
            path = find_checkpoint(path, "auto")
        if path is None or not (Path(path) / STATE_FILE).is_file():
            raise UserError(f"train.resume: {resume} is not a complete checkpoint (no {STATE_FILE})")
        return Path(path)
    directory = Path(run_dir) / CHECKPOINTS
    latest = directory / LATEST
    if latest.is_file():
        named = directory / latest.read_text().strip()
        if (named / STATE_FILE).is_file():
            return named
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def best_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint `checkpoints/best` names, if it names a complete one."""
    pointer = Path(run_dir) / CHECKPOINTS / BEST
    if not pointer.is_file():
        return None
    named = pointer.parent / pointer.read_text().strip()
    return named if (named / STATE_FILE).is_file() else None
DEFAULT_STALE_S = 120.0


class RunLock:
    """One owner per run directory, also across the nodes of a shared filesystem: `RUN_DIR/.lock` holds
    {host, pid, process, slurm_job_id, heartbeat_at, stale_s, token}, is created whole or not at all (a hard
    link of a written file), and its heartbeat is refreshed every `stale_s / 12` by a thread of the owner. The
    heartbeat rewrites the owner's own file in place (no new blocks: a full disk cannot stop it), never a lock
    another launch has made since; one that cannot be written (a read-only or failing filesystem) is warned
    about once and retried.

    A second launch stops at once, naming the owner, unless the lock is the owner's no more: its process is
    gone from this host (a SIGKILL), it belongs to this same Slurm job (a requeue), or it was written on another
    host and its heartbeat is older than the owner's `stale_s` (that node died or hangs). Those are taken over
    with a warning. A process alive on this host is never taken over, however old its heartbeat: stopped or
    hung, it still owns its run.

    Every process of a launch watches the lock (`acquire` on the main one, `follow` on the others): one that
    finds it taken over by another launch ends at once (`check`), printing one line and writing nothing more."""

    def __init__(self, run_dir: Path, stale_s: float = DEFAULT_STALE_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.stale_s, self.heartbeat_s = stale_s, stale_s / 12
        self.token = uuid.uuid4().hex
        self.stopped = threading.Event()
        self.writing = threading.Lock()  # a heartbeat never rewrites a lock that release() just removed
        self.held = False
        self.own_file: int | None = None  # read-only descriptor of the lock file this process created

    def owner_record(self) -> bytes:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "process": process_identity(os.getpid()),
                  "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "heartbeat_at": time.time(),
                  "stale_s": self.stale_s, "token": self.token}
        return json.dumps(record).encode().ljust(LOCK_BYTES)

    def acquire(self) -> str:
        """Take the lock (main process); its token, which the launch's other processes `follow`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while not self._create():
            owner = self._read()
            reason = self._takeover_reason(owner)
            if reason is None:
                age = time.time() - owner.get("heartbeat_at", 0)
                job = f", Slurm job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
                raise UserError(f"{self.path.parent} is in use by another run (host {owner.get('host')}, pid "
                                f"{owner.get('pid')}{job}, heartbeat {age:.0f} s ago): wait for it, stop it, or "
                                "choose another train.run_dir")
            log.warning("taking over the lock of %s: %s", self.path.parent, reason)
            if self._read().get("token") == owner.get("token"):  # not a lock another taker just made
                self.path.unlink(missing_ok=True)
        self.held = True
        atexit.register(self.release)
        threading.Thread(target=self._watch, args=(True,), daemon=True, name="run-lock-heartbeat").start()
        return self.token

    def follow(self, token: str) -> None:
        """Watch the lock another process of this launch holds (`token`), ending this one if it is taken over."""
        self.token = token
        threading.Thread(target=self._watch, args=(False,), daemon=True, name="run-lock-watch").start()

    def check(self) -> None:
        """Before a write: if another launch holds the lock now, end this process at once."""
        owner = self._read()
        if owner.get("token") not in (None, self.token):
            self._taken_over(owner)

    def release(self) -> None:
        """Stop watching; remove the lock if it is still ours (a stale-lock taker may have replaced it)."""
        self.stopped.set()
        if not self.held:
            return
        self.held = False
        with self.writing:
            if self._read().get("token") == self.token:
                self.path.unlink(missing_ok=True)
            os.close(self.own_file)

    def _create(self) -> bool:
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        atomic_write(tmp, self.owner_record())
        own_file = os.open(tmp, os.O_RDONLY)  # held open, so that its inode number is never another file's
        try:
            os.link(tmp, self.path)  # fails if the lock exists: creation and content are one step
        except FileExistsError:
            os.close(own_file)
            return False
        finally:
            tmp.unlink(missing_ok=True)
        self.own_file = own_file
        return True

    def live_owner(self) -> dict | None:
        """The record of a live process holding this lock, else None. Read-only: taking the lock to test it
        could make a trainer starting that instant refuse the directory."""
        owner = self._read() if self.path.exists() else None
        return owner if owner and self._takeover_reason(owner) is None else None

    def _read(self) -> dict:
        for _ in range(3):  # a heartbeat rewrites the file in place: a read may meet it half-written
            try:
                return json.loads(self.path.read_text())
            except OSError:
                return {}
            except ValueError:
                time.sleep(0.01)
        return {}

    def _takeover_reason(self, owner: dict) -> str | None:
        if not owner:  # being replaced, or damaged: only an old file is stale
            age = time.time() - self.path.stat().st_mtime if self.path.exists() else self.stale_s + 1
            return f"the lock is unreadable and {age:.0f} s old" if age > self.stale_s else None
        job = os.environ.get("SLURM_JOB_ID")
        if job and owner.get("slurm_job_id") == job:
            return f"it belongs to this Slurm job ({job}), restarted"
        if owner.get("host") == socket.gethostname():
            return None if _alive(owner) else f"its process {owner.get('pid')} is gone"
        age = time.time() - owner.get("heartbeat_at", 0)
        if age > owner.get("stale_s", DEFAULT_STALE_S):
            return f"its heartbeat is {age:.0f} s old (host {owner.get('host')}, pid {owner.get('pid')})"
        return None

    def _watch(self, beat: bool) -> None:
        """Every `heartbeat_s`: end this process if another launch holds the lock; else, on the owner, write the
        heartbeat, surviving write errors (each outage warned about once, and its end)."""
        failing = False
        while not self.stopped.wait(self.heartbeat_s):
            with self.writing:
                if self.stopped.is_set():
                    return
                owner = self._read()
                if owner.get("token") not in (None, self.token):
                    self._taken_over(owner)
                if not beat or not owner:  # unreadable for a moment (NFS): beat next time
                    continue
                try:
                    self._beat()
                except OSError as err:
                    if not failing:
                        log.warning("%s: the heartbeat cannot be written (%s); retrying every %g s", self.path,
                                    err.strerror or err, self.heartbeat_s)
                    failing = True
                    continue
                if failing:
                    log.warning("%s: the heartbeat is written again", self.path)
                    failing = False

    def _beat(self) -> None:
        """The heartbeat, written into the file this process created, whatever has happened to the lock's name
        since it was read: a launch that took it over in between (while this one was stopped) is never written."""
        lock = os.open(self.path, os.O_WRONLY)
        try:
            if not os.path.sameopenfile(lock, self.own_file):
                self._taken_over(self._read())
            os.pwrite(lock, self.owner_record(), 0)
            os.fsync(lock)
        finally:
            os.close(lock)

    def _taken_over(self, owner: dict) -> None:
        """Another launch owns the run directory now (this process stopped or hung past the stale limit): one line,
        then exit at once, without cleanup, so that nothing more is written (no checkpoint, marker, status or
        metric) and no other rank is waited for."""
        rank = f"[rank {os.environ['RANK']}] " if "RANK" in os.environ else ""
        sys.stderr.write(f"error: {rank}{self.path} was taken over by another launch (host {owner.get('host')}, pid "
                         f"{owner.get('pid')}): this launch stops here and writes nothing more\n")
        sys.stderr.flush()
        os._exit(LOCK_LOST_EXIT)


def _alive(owner: dict) -> bool:
    """Whether the lock's process still runs on this host: its pid exists, is no zombie, and is the same
    process (a pid reused after the owner ended, or after a reboot, is not the owner)."""
    pid = owner.get("pid")
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        pass
    recorded, now = owner.get("process"), process_identity(pid)
    return now != "zombie" and (recorded is None or now is None or now == recorded)


def process_identity(pid) -> str | None:
    """The boot and start time of process `pid` (Linux /proc), "zombie" for one that has exited, None where
    unknown: with the pid, it names one process for good."""
    try:
        stat = Path(f"/proc/{int(pid)}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, TypeError, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
    return "zombie" if fields[0] == "Z" else f"{boot}:{fields[19]}"
