"""Faults injected for real into training runs: the user gets a clear message and loses nothing beyond
the last checkpoint interval."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import base_args, env_for, launch_cmd, run_tool, same_weights, train, wait_until

pytestmark = pytest.mark.slow


def start(processes, tmp_path, shard_dir, run_dir, *overrides, nproc=2):
    return processes.popen([*launch_cmd(nproc), *base_args(shard_dir, run_dir, *overrides)], cwd=tmp_path,
                           env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 300, poll: float = 0.05) -> None:
    wait_until(path.exists, timeout, str(path), interval=poll)


def rank_pid(launcher: int, local_rank: int) -> int:
    """The training process of `local_rank` started by the launcher `launcher`."""
    for proc in Path("/proc").iterdir():
        try:
            if int((proc / "stat").read_text().split()[3]) != launcher:
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if f"LOCAL_RANK={local_rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no rank {local_rank} under launcher {launcher}")


def test_sigkill_of_one_rank_ends_the_job_and_auto_resume_continues(tmp_path, shard_dir, processes):
    run_dir = tmp_path / "run"
    steps = ["train.max_steps=20", "checkpoint.every_steps=5", "train.collective_timeout_s=60"]
    proc = start(processes, tmp_path, shard_dir, run_dir, *steps)
    wait_for(run_dir / "checkpoints" / "step-00000005")
    os.kill(rank_pid(proc.pid, 1), signal.SIGKILL)
    start_wait = time.time()
    proc.communicate(timeout=180)  # the other rank must not hang
    assert proc.returncode != 0 and time.time() - start_wait < 180
    assert not (run_dir / "COMPLETED.json").exists()
    resumed = train(tmp_path, shard_dir, run_dir, *steps, nproc=2)
    assert "resumed from" in resumed.stderr
    assert json.loads((run_dir / "COMPLETED.json").read_text())["step"] == 20


def test_kill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, shard_dir, processes):
    # A wide model makes each checkpoint ~200 MB, so the write lasts long enough to be interrupted (the last one's,
    # at step 6: the run resumes from step 3's). Two ranks: each writes its part of a checkpoint.
    steps = ["train.max_steps=6", "checkpoint.every_steps=3", "model.base_channels=128"]
    run_dir = tmp_path / "run"
    proc = start(processes, tmp_path, shard_dir, run_dir, *steps)
    wait_for(run_dir / "checkpoints" / ".tmp-step-00000006", poll=0.001)
    processes.kill(proc)  # the whole job, mid-write
    checkpoints = run_dir / "checkpoints"
    assert not (checkpoints / "step-00000006" / "trainer_state.json").exists()
    assert (checkpoints / "latest").read_text().strip() == "step-00000003"
    resumed = train(tmp_path, shard_dir, run_dir, *steps, nproc=2)
    assert f"resumed from {checkpoints / 'step-00000003'} at step 3" in resumed.stderr
    train(tmp_path, shard_dir, tmp_path / "straight", *steps, nproc=2)
    assert same_weights(tmp_path / "straight", run_dir, 6)  # nothing lost beyond the interval, bit for bit


def mounted_tmpfs(mount: Path, size: str):
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root to mount a small tmpfs")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path / "small", "20M")


@pytest.fixture
def tiny_disk(tmp_path):
    yield from mounted_tmpfs(tmp_path / "tiny", "256k")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, shard_dir, small_disk):
    run_dir = small_disk / "run"  # one checkpoint (~14 MB) fits in 20 MB, a second beside it does not
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=20", "checkpoint.every_steps=10", nproc=1,
                 check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [rank 0] writing checkpoint {run_dir / 'checkpoints' / 'step-00000020'} failed")
    assert "No space left on device" in last and f"{run_dir / 'checkpoints' / 'step-00000010'} is intact" in last
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000010"
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
    assert load_file(run_dir / "checkpoints" / "step-00000010" / "weights.safetensors")


def test_truncated_shard_stops_training_naming_the_shard(tmp_path, shard_dir):
    damaged = tmp_path / "shards"
    shutil.copytree(shard_dir, damaged)
    for shard in damaged.glob("train-*.tar"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    proc = train(tmp_path, damaged, tmp_path / "run", "train.max_steps=5", nproc=1, check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [rank 0] {damaged}/train-") and ".tar: damaged shard" in last
    assert "Traceback" not in proc.stderr


class Boom:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('PWNED').touch()",))


def test_malicious_pickle_in_a_checkpoint_is_refused(tmp_path, shard_dir):
    import pickle

    run_dir = tmp_path / "run"
    train(tmp_path, shard_dir, run_dir, "train.max_steps=2")
    with open(run_dir / "checkpoints" / "step-00000002" / "optimizer.bin", "wb") as f:
        pickle.dump({"state": Boom()}, f)
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=4", check=False)
    assert proc.returncode == 2 and not (tmp_path / "PWNED").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: [rank 0] {run_dir / 'checkpoints' / 'step-00000002'}: checkpoint refused")


def test_empty_val_split_is_refused_before_any_step(tmp_path, shard_dir):
    shards = tmp_path / "shards"
    shutil.copytree(shard_dir, shards)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["val"] = {"num_samples": 0, "shards": []}
    (shards / "manifest.json").write_text(json.dumps(manifest))
    proc = train(tmp_path, shards, tmp_path / "run", "train.max_steps=2", "train.val_every_steps=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: [rank 0] the val split of {shards} is empty; set " \
        "train.val_every_steps=0 or write shards with a val partition"
    assert not (tmp_path / "run" / "checkpoints").exists()


def write_lock(run_dir: Path, host: str, heartbeat_age_s: float, **extra) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".lock").write_text(json.dumps({"host": host, "pid": 4242, "slurm_job_id": None,
                                               "heartbeat_at": time.time() - heartbeat_age_s, "token": "x", **extra}))


def test_a_run_directory_owned_by_a_live_run_on_another_host_is_refused_at_once(tmp_path, shard_dir):
    run_dir = tmp_path / "run"
    write_lock(run_dir, "node-17", heartbeat_age_s=3)
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=2", nproc=1, check=False)
    assert proc.returncode == 2
    assert re.fullmatch(rf"error: \[rank 0\] {re.escape(str(run_dir))} is in use by another run \(host node-17, pid "
                        r"4242, heartbeat \d+ s ago\): wait for it, stop it, or choose another train.run_dir",
                        proc.stderr.strip().splitlines()[-1])
    assert not (run_dir / "config.yaml").exists() and json.loads((run_dir / ".lock").read_text())["host"] == "node-17"


def test_a_second_launch_on_a_running_directory_stops_naming_the_owner(tmp_path, shard_dir, processes):
    run_dir = tmp_path / "run"
    first = start(processes, tmp_path, shard_dir, run_dir, "train.max_steps=400", "log.progress_every_s=0", nproc=1)
    for line in first.stderr:  # the first run is inside its loop
        if line.startswith("step 2/400"):
            break
    second = train(tmp_path, shard_dir, run_dir, "train.max_steps=400", nproc=1, check=False)
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
    assert second.returncode == 2
    assert f"is in use by another run (host {os.uname().nodename}, pid {first.pid}" in second.stderr.splitlines()[-1]
    assert json.loads((run_dir / "RESUME_ME.json").read_text())["step"] > 0  # the first run was not disturbed
    assert not (run_dir / ".lock").exists()  # released when it stopped


@pytest.mark.parametrize("case", ["stale-heartbeat", "same-slurm-job"])
def test_a_stale_or_requeued_owner_is_taken_over_with_a_warning(tmp_path, shard_dir, case):
    run_dir = tmp_path / "run"
    if case == "stale-heartbeat":
        write_lock(run_dir, "node-17", heartbeat_age_s=3600)
        env = {}
    else:
        write_lock(run_dir, "node-17", heartbeat_age_s=3, slurm_job_id="777")
        env = {"SLURM_JOB_ID": "777"}
    proc = train(tmp_path, shard_dir, run_dir, "train.max_steps=1", env=env)
    reason = "its heartbeat is 360" if case == "stale-heartbeat" else "it belongs to this Slurm job (777)"
    assert f"taking over the lock of {run_dir}: {reason}" in proc.stderr
    assert not (run_dir / ".lock").exists()


def rank_pids(launcher: int) -> list[int]:
    found = []
    for local_rank in (0, 1):
        try:
            found.append(rank_pid(launcher, local_rank))
        except AssertionError:
            return []
    return found


def test_ranks_die_with_a_launcher_killed_as_they_start(tmp_path, shard_dir, processes):
    proc = start(processes, tmp_path, shard_dir, tmp_path / "run", "train.max_steps=400")
    ranks = wait_until(lambda: rank_pids(proc.pid), 120, "the ranks to start", interval=0.01)
    time.sleep(0.3)  # the fault's timing, not a wait: the ranks are still importing torch and accelerate
    os.kill(proc.pid, signal.SIGKILL)  # the launcher alone, not its process group
    proc.communicate()
    wait_until(lambda: not [pid for pid in ranks if running(pid)], 30, f"ranks {ranks} to die with their launcher")


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except OSError:
        return False


def leftovers(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_disk_full_while_sharding_is_one_line_and_leaves_no_partial_file(celeba_dir, tiny_disk):
    out = tiny_disk / "shards"
    proc = run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", out, "--image-size", "32", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing {out}/") and "No space left on device" in last and f"free on {out}" in last
    assert not leftovers(tiny_disk)


def test_disk_full_while_extracting_is_one_line_and_leaves_no_partial_file(trained_run, shard_dir, tiny_disk):
    (tiny_disk / "filler").write_bytes(b"\0" * 200 * 1024)  # what is left is less than the latents need
    out = tiny_disk / "latents"
    proc = run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--out", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing {out}/") and "No space left on device" in last
    assert not leftovers(tiny_disk)


def damage_every_shard(src: Path, dst: Path) -> None:
    """A copy of the shards in which the second, fourth and sixth sample of every shard are damaged: no image
    member, invalid JSON, a truncated image."""
    import io
    import tarfile

    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        keys = sorted({m.name.split(".")[0] for m, _ in members})
        victims = dict(zip(keys[1:6:2], ["no-image", "bad-json", "cut-image"], strict=False))  # a short shard: fewer
        with tarfile.open(shard, "w") as tar:
            for member, data in members:
                key, ext = member.name.split(".", 1)
                kind = victims.get(key)
                if kind == "no-image" and ext != "json":
                    continue
                data = b"{not json" if kind == "bad-json" and ext == "json" else data
                data = data[:-7] if kind == "cut-image" and ext != "json" else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


def test_damaged_samples_are_skipped_counted_and_a_resume_after_them_is_bit_exact(tmp_path, shard_dir):
    shards = tmp_path / "damaged"
    damage_every_shard(shard_dir, shards)
    common = ["data.skip_corrupt=true", "train.val_every_steps=3", "checkpoint.every_steps=3",
              "train.threads=2"]  # a one-process run sums on 2 threads, whatever the worker's share of the cores
    proc = train(tmp_path, shards, tmp_path / "straight", "train.max_steps=12", *common)
    assert "skipped: " in proc.stderr and "does not decode" in proc.stderr
    at_9 = tmp_path / "straight" / "checkpoints" / "step-00000009"
    resumed = train(tmp_path, shards, tmp_path / "resumed", "train.max_steps=12", *common, f"train.resume={at_9}")
    assert f"resumed from {at_9} at step 9" in resumed.stderr
    assert same_weights(tmp_path / "straight", tmp_path / "resumed", 12)  # where the uninterrupted run was
    summary = json.loads((tmp_path / "straight" / "COMPLETED.json").read_text())
    assert summary["skipped_samples"] >= 3  # 12 steps x 16 images pass through several damaged training shards
    assert json.loads((tmp_path / "resumed" / "COMPLETED.json").read_text())["skipped_samples"] == \
        summary["skipped_samples"]  # the count carried over the resume
    import mlflow

    history = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_metric_history(summary["mlflow_run_id"],
                                                                                       "train/skipped_samples")
    assert history and history[-1].value == summary["skipped_samples"]


def on_another_host(cmd: list, host: str = "localhost") -> list:
    """`cmd` run as if on another node of a shared filesystem: in a UTS namespace of its own, named `host` (a
    name that resolves: the launcher's rendezvous connects to its own host name)."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode:
        pytest.skip("needs root and unshare to give a launch another host name")
    return ["unshare", "--uts", "sh", "-c", f'hostname {host} && exec "$@"', "sh", *cmd]


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: a launcher, its ranks (each in a session of its own) and their loader workers."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        try:
            parent, child = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]), int(proc.name)
        except (OSError, ValueError, IndexError):  # gone, or not a process (/proc/self)
            continue
        children.setdefault(parent, []).append(child)
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def signal_tree(pid: int, sig: int) -> None:
    """`sig` to `pid` and its descendants; a SIGSTOP returns once every thread of them has stopped (a write under
    way when it arrived has ended)."""
    members = process_tree(pid)
    for member in members:
        try:
            os.kill(member, sig)
        except ProcessLookupError:
            pass
    if sig == signal.SIGSTOP:
        wait_until(lambda: all(thread_state(t) in ("T", "Z", None) for m in members
                               for t in Path(f"/proc/{m}/task").glob("*")), 30, f"process {pid} to stop", 0.01)


def thread_state(task: Path) -> str | None:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def snapshot(directory: Path) -> dict:
    """Every file and folder under `directory` with its size and modification time."""
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def last_step(log: Path) -> int:
    return max(int(m) for m in re.findall(r"^step (\d+)/", log.read_text(), re.M))


def test_an_owner_whose_lock_was_taken_over_stops_at_once_and_writes_nothing_more(tmp_path, shard_dir, mlflow_server,
                                                                                  processes):
    """A 2-rank owner on another host hangs (SIGSTOP) past its stale limit; a launch here takes the run directory
    over. When the owner wakes up, each of its ranks ends at once: no checkpoint, marker, status or metric."""
    import mlflow

    run_dir, owner_log, taker_log = tmp_path / "run", tmp_path / "owner.err", tmp_path / "taker.err"
    common = ["checkpoint.every_steps=5", "log.progress_every_s=0", "train.lock_stale_s=2",
              f"log.tracking_uri={mlflow_server}", "log.system_metrics_interval_s=0.5", "model.base_channels=8"]
    owner = processes.popen(on_another_host([*launch_cmd(2), *base_args(shard_dir, run_dir, "train.max_steps=400",
                                                                        *common)]),
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=owner_log.open("w"))
    wait_until(lambda: "\nstep 2/400" in owner_log.read_text(), 300, "the owner's second step")
    signal_tree(owner.pid, signal.SIGSTOP)  # its node hangs
    owner_steps = last_step(owner_log)
    time.sleep(2.5)  # past the stale limit
    taker = processes.popen([*launch_cmd(1), *base_args(shard_dir, run_dir, "train.max_steps=400", "train.resume=none",
                                                        *common)],
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=taker_log.open("w"))
    wait_until(lambda: "\nstep 2/400" in taker_log.read_text(), 300, "the taker's second step")
    signal_tree(taker.pid, signal.SIGSTOP)  # held still: whatever changes now is the owner's doing
    assert f"taking over the lock of {run_dir}: its heartbeat is " in taker_log.read_text()
    before = snapshot(run_dir)
    signal_tree(owner.pid, signal.SIGCONT)
    wait_until(lambda: owner.poll() is not None, 30, "the owner to end", interval=0.1)  # no rank hangs in a collective
    assert snapshot(run_dir) == before
    log = owner_log.read_text()
    for rank in (0, 1):
        assert f"error: [rank {rank}] {run_dir}/.lock was taken over by another launch (host {os.uname().nodename}, " \
               f"pid {taker.pid}): this launch stops here and writes nothing more" in log
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    owner_run = client.get_run(re.search(r"MLflow: run (\w+) in", log).group(1))
    assert owner_run.info.status == "RUNNING"  # no status written after the takeover
    assert max(m.step for m in client.get_metric_history(owner_run.info.run_id, "train/total")) <= owner_steps + 1
    signal_tree(taker.pid, signal.SIGCONT)
    taker.send_signal(signal.SIGTERM)
    assert taker.wait(timeout=120) == 0, taker_log.read_text()[-3000:]
    assert json.loads((run_dir / "RESUME_ME.json").read_text())["mlflow_run_id"] != owner_run.info.run_id
    assert not (run_dir / ".lock").exists()


def fill(path: Path) -> None:
    """Write zeros to `path` until its filesystem is full."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(fd, b"\0" * 65536):
            pass
    except OSError as err:
        assert err.errno == errno.ENOSPC, err
    finally:
        os.close(fd)


def heartbeat_at(run_dir: Path) -> float:
    try:
        return json.loads((run_dir / ".lock").read_text())["heartbeat_at"]
    except ValueError:  # met half-rewritten
        return 0.0


def test_the_heartbeat_outlives_full_and_read_only_disks_and_a_live_owner_is_never_taken_over(tmp_path, shard_dir,
                                                                                              small_disk, processes):
    run_dir, log = small_disk / "run", tmp_path / "owner.err"
    common = ["checkpoint.every_steps=0", "log.progress_every_s=0", "train.lock_stale_s=2", "model.base_channels=8"]
    owner = processes.popen([*launch_cmd(1), *base_args(shard_dir, run_dir, "train.max_steps=400", *common)],
                            cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_until(lambda: "\nstep 2/400" in log.read_text(), 300, "the owner's second step")
    fill(small_disk / "filler")
    full = time.time()
    wait_until(lambda: heartbeat_at(run_dir) > full, 10, "a heartbeat on the full disk")
    (small_disk / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)  # read-only for a few seconds
    wait_until(lambda: "the heartbeat cannot be written (Read-only file system)" in log.read_text(), 10,
               "the heartbeat to meet the read-only filesystem")
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    writable = time.time()
    wait_until(lambda: heartbeat_at(run_dir) > writable, 10, "the heartbeat to be written again")
    assert f"{run_dir}/.lock: the heartbeat is written again" in log.read_text() and "Traceback" not in log.read_text()
    os.killpg(owner.pid, signal.SIGSTOP)  # alive on this host, silent past its stale limit
    time.sleep(3)
    second = train(tmp_path, shard_dir, run_dir, "train.max_steps=2", *common, check=False)
    os.killpg(owner.pid, signal.SIGCONT)
    owner.send_signal(signal.SIGTERM)
    assert owner.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert second.returncode == 2
    assert re.fullmatch(rf"error: \[rank 0\] {re.escape(str(run_dir))} is in use by another run \(host "
                        rf"{re.escape(os.uname().nodename)}, pid {owner.pid}, heartbeat \d+ s ago\): .*",
                        second.stderr.strip().splitlines()[-1])
    assert json.loads((run_dir / "RESUME_ME.json").read_text())["step"] > 2  # the owner was not disturbed
    assert not (run_dir / ".lock").exists()


def test_a_stop_ends_a_one_process_run_waiting_on_a_hung_read(tmp_path, shard_dir, processes):
    """Its shards come through a pipe that sends a shard's first 36 of 40 samples and then nothing, never closing
    (a hung network filesystem): after two batches the run waits in a read. SIGTERM stops it there, after its last
    whole step, as any stop does. (Not a whole shard and then silence: the reader sees the end of the archive,
    and where it then waits depends on when the garbage collector closes the shard's pipe.)"""
    run_dir, log = tmp_path / "run", tmp_path / "train.err"
    with tarfile.open(shard_dir / "train-000000.tar") as tar:  # two members a sample (every shard laid out alike)
        cut = tar.getmembers()[72].offset
    hung = f"pipe:head -c {cut} {shard_dir}/train-{{000000..000007}}.tar && sleep 600"
    cmd = [*launch_cmd(1), *base_args(shard_dir, run_dir, f"data.shards={hung}", "data.num_samples=320",
                                      "data.shuffle_buffer=0", "log.enabled=false", "log.progress_every_s=0",
                                      "train.max_steps=400", "checkpoint.every_steps=0", "model.base_channels=8")]
    proc = processes.popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.DEVNULL, stderr=log.open("w"))
    wait_until(lambda: "\nstep 2/400" in log.read_text(), 300, "the run's second step")
    time.sleep(1)  # waiting for the third batch, which never comes
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    assert json.loads((run_dir / "RESUME_ME.json").read_text())["step"] == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000002"
