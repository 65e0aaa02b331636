"""Every entry point, given a path that does not exist: exit 2, one `error:` line naming it, no traceback."""

import os
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dfcvae_dist.errors import UserError, one_line
from tests.helpers import run_tool

MISSING = "/nonexistent/dfcvae"


@pytest.mark.parametrize("tool,args", [
    ("make_shards.py", ["--celeba-root", MISSING, "--out", "{tmp}/o"]),
    ("make_shards.py", ["--verify", MISSING]),
    ("extract_latents.py", ["--checkpoint", MISSING, "--shards", MISSING, "--out", "{tmp}/o"]),
    ("eval_svm.py", ["--latents", MISSING, "--out", "{tmp}/o"]),
    ("explore_latents.py", ["--checkpoint", MISSING, "--latents", MISSING, "--shards", MISSING, "--out", "{tmp}/o"]),
    ("quality.py", ["--checkpoint", f"a={MISSING}", "--shards", MISSING, "--vgg-weights", "random",
                    "--out", "{tmp}/o"]),
    ("-m dfcvae_dist.train", ["--config", MISSING]),
    ("-m dfcvae_dist.train", [f"data.shards={MISSING}", "train.run_dir={tmp}/run", "log.enabled=false"]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_missing_path_is_one_clear_line(tmp_path, tool, args):
    proc = run_tool(tool, *[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and MISSING in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_debug_flag_shows_the_traceback(tmp_path):
    proc = run_tool("eval_svm.py", "--latents", MISSING, "--out", tmp_path, "--debug", check=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_one_line_is_the_first_line_of_a_library_message_at_most_limit_characters():
    assert one_line(ValueError("Some library:\n\tits details")) == "Some library:"
    assert one_line(ValueError("Some library: its details"), limit=12) == "Some library"
    assert one_line(OSError()) == "OSError"  # no message: its class
    wrapped = ValueError("Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File \"x.py\", line 1, in f\nValueError: x.tar: damaged\n")
    assert one_line(wrapped) == "x.tar: damaged"


@pytest.fixture
def make_read_only():
    """Makes a folder really read-only: a read-only bind mount of itself as root (root writes through file modes),
    else mode 0555; undone in teardown."""
    mounted, chmodded = [], []

    def read_only(folder):
        if os.geteuid() != 0:
            folder.chmod(0o555)
            chmodded.append(folder)
            return folder
        for cmd in (["mount", "--bind", folder, folder], ["mount", "-o", "remount,bind,ro", folder]):
            if subprocess.run([str(c) for c in cmd], capture_output=True).returncode:
                pytest.skip("cannot make a read-only bind mount here")
            mounted.append(folder)
        return folder

    yield read_only
    for folder in mounted[::2]:
        subprocess.run(["umount", str(folder)], capture_output=True)
    for folder in chmodded:
        folder.chmod(0o755)


def test_an_unusable_sqlite_store_is_one_line_at_once(tmp_path, make_read_only):
    """MLflow retried a new store in a read-only folder for two minutes, then raised; the others were tracebacks."""
    from dfcvae_dist.tracking import get_or_create_experiment, mlflow_client

    (tmp_path / "not-a-db.db").write_text("a text file\n")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder.db").mkdir()
    existing = tmp_path / "existing"
    get_or_create_experiment(mlflow_client(f"sqlite:///{existing}/mlflow.db"), "made before")
    make_read_only(existing)
    empty = make_read_only(Path(tempfile.mkdtemp(dir=tmp_path)))
    cases = {f"{tmp_path}/not-a-db.db": f"{tmp_path}/not-a-db.db is not an SQLite database",
             f"{tmp_path}/a-file/mlflow.db": f"{tmp_path}/a-file is a file, not a folder",
             f"{tmp_path}/a-folder.db": f"{tmp_path}/a-folder.db is a folder, not a database file",
             f"{empty}/mlflow.db": f"cannot create mlflow.db, {empty} is read-only",
             f"{existing}/mlflow.db": f"{existing}/mlflow.db is read-only (sqlite writes the database and a journal "
                                      "beside it)"}
    for path, reason in cases.items():
        started = time.monotonic()
        with pytest.raises(UserError) as refused:
            get_or_create_experiment(mlflow_client(f"sqlite:///{path}"), "x")
        assert str(refused.value) == f"MLflow tracking store sqlite:///{path}: {reason}"
        assert time.monotonic() - started < 30
    assert mlflow_client(f"sqlite:///{existing}/mlflow.db", read_only=True).get_experiment_by_name("made before")


def test_a_report_with_an_output_it_cannot_write_or_nothing_finished_is_one_line(trained_run, tmp_path,
                                                                                 make_read_only, capsys):
    from dfcvae_dist.cli.report import main as report_main

    (tmp_path / "a-file").write_text("x")
    read_only = make_read_only(Path(tempfile.mkdtemp(dir=tmp_path)))
    cases = {(f"a={trained_run}", str(read_only)): f"--out {read_only}: the folder is read-only",
             (f"a={trained_run}", f"{read_only}/new"): f"--out {read_only}/new: cannot create it (",
             (f"a={trained_run}", f"{tmp_path}/a-file"): f"--out {tmp_path}/a-file: {tmp_path}/a-file is a file, not a "
                                                         "folder",
             (f"a={MISSING}", f"{tmp_path}/out"): f"nothing to report: no finished run ({MISSING}: no such directory)"}
    for (runs, out), message in cases.items():
        assert report_main(["--runs", runs, "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {message}") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
