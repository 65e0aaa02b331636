"""A private two-node Slurm cluster on this host for tests: its own munge socket, ports and state dir.

Uses slurmctld, slurmd and munged when present (the Makefile's test target installs Debian's slurm-wlm
and munge when it runs as root); installs nothing itself. Nodes n1 and n2 both live on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.helpers import wait_until


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def unavailable_reason() -> str | None:
    missing = [t for t in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol") if not shutil.which(t)]
    if missing:
        return f"Slurm not installed (missing {', '.join(missing)}; `make test` installs slurm-wlm and munge as root)"
    if os.geteuid() != 0:
        return "a private Slurm cluster needs root (slurmd runs jobs as their users)"
    return None


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def start(self) -> "SlurmCluster":
        r = self.root
        for d in ("state", "spool-n1", "spool-n2", "munge"):
            (r / d).mkdir(parents=True, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        (r / "munge").chmod(0o700)
        sock = r / "munge" / "munge.socket"
        subprocess.run(["munged", "--force", "--key-file", str(key), "--socket", str(sock), "--pid-file",
                        str(r / "munge" / "munged.pid"), "--log-file", str(r / "munge" / "munged.log"),
                        "--seed-file", str(r / "munge" / "munged.seed")], check=True, capture_output=True)
        ctl, n1, n2 = _free_ports(3)
        host = socket.gethostname()
        self.conf.write_text(f"""ClusterName=dfcvaetest
SlurmctldHost={host}
SlurmctldPort={ctl}
AuthType=auth/munge
AuthInfo=socket={sock},cred_expire=10
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# a requeued job waits ~10 s, then for the next scheduling pass: every second here, not every 60 s (30 backfilling)
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=60
MinJobAge=600
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={n1} CPUs=1 State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={n2} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
""")
        subprocess.run(["slurmctld", "-f", str(self.conf)], check=True, env=self.env)
        for node in ("n1", "n2"):
            subprocess.run(["slurmd", "-N", node, "-f", str(self.conf)], check=True, env=self.env)
        wait_until(lambda: self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.strip() == "idle 2", 60,
                   "both nodes of the Slurm cluster to come up idle")
        return self

    def cancel_all_jobs(self, timeout: float = 120) -> None:
        """Cancel every job (batch shell and steps) and wait until the queue is empty and both nodes are idle."""
        jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            self.run("scancel", "--full", *jobs, check=False)
        wait_until(lambda: not self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
                   and self.run("sinfo", "-h", "-o", "%T %D", check=False).stdout.strip() == "idle 2", timeout,
                   f"Slurm jobs {jobs} to end")

    def stop(self) -> None:
        """End the jobs, then the daemons (slurmd leaves running job steps behind, so the jobs go first)."""
        try:
            self.cancel_all_jobs()
        finally:
            for pid_file in [self.root / "slurmd-n1.pid", self.root / "slurmd-n2.pid", self.root / "slurmctld.pid",
                             self.root / "munge" / "munged.pid"]:
                try:
                    os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
                except (OSError, ValueError):
                    pass

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster; `env` adds to what a submitted job sees."""
        return subprocess.run(list(cmd), env={**self.env, **(env or {})}, capture_output=True, text=True, check=check,
                              timeout=60)

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"
