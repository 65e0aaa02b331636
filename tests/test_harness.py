"""The test harness itself: what a test starts through `processes` does not outlive it."""

from pathlib import Path

import pytest

from tests.helpers import ProcessGroups, wait_until


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie nobody has reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


def test_closing_kills_a_child_its_leader_left_behind():
    with ProcessGroups() as groups:
        orphan = int(groups.run(["bash", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], timeout=30).stdout)
        assert alive(orphan)
    wait_until(lambda: not alive(orphan), 10, f"the orphaned child {orphan} to die")


def test_a_run_past_its_timeout_fails_and_its_whole_group_is_killed(tmp_path):
    pid_file = tmp_path / "child.pid"
    with pytest.raises(AssertionError, match="still running after 3 s"):
        ProcessGroups().run(["bash", "-c", f"sleep 600 & echo $! > {pid_file}; wait"], timeout=3)
    wait_until(lambda: not alive(int(pid_file.read_text())), 10, "the child of the timed-out run to die")
