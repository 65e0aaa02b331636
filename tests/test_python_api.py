"""The framework as a library: `from dfcvae_dist import Trainer, load_config` trains in the calling process (the
example of docs/python-api.md, run as written on small data), the best checkpoint and early stopping (kept
across a resume), and TensorBoard event files beside MLflow, read back with TensorBoard's own reader."""

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """A test that fails half-way leaves no accelerate state behind for the next one."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def small(shard_dir, run_dir, *overrides) -> list[str]:
    """Overrides for a tiny in-process run on the session's shards (later ones win)."""
    return [f"data.shards={shard_dir}", f"train.run_dir={run_dir}", "train.batch_size=16", "train.val_batches=1",
            "model.latent_dim=16", "model.base_channels=8", "data.num_workers=0", "log.system_metrics=false",
            "log.every_steps=1", "log.progress_every_s=0", *overrides]


def fit(shard_dir, run_dir, *overrides) -> dict:
    from dfcvae_dist import Trainer, load_config

    return Trainer(load_config("quickstart", small(shard_dir, run_dir, *overrides))).fit()


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of RUN_DIR/tensorboard as TensorBoard shows it: (step, value) per tag."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def expected_early_stop(history: list[tuple[int, float]], patience: int) -> tuple[int, int]:
    """(stop step, best step) of a validation history as the docs define them: lower is better, strictly; stop after
    `patience` validations in a row without a better value."""
    best_step, best, since = None, None, 0
    for step, value in history:
        if best is None or value < best:
            best_step, best, since = step, value, 0
        else:
            since += 1
            if since == patience:
                return step, best_step
    raise AssertionError(f"no early stop in {history}: the test's run must stop early")


def test_importing_the_package_and_loading_a_config_import_no_training_stack():
    code = """
import sys
import dfcvae_dist
assert not {"torch", "accelerate", "mlflow"} & set(sys.modules), "import dfcvae_dist"
from dfcvae_dist import load_config
cfg = load_config("quickstart", ["train.max_steps=7", "checkpoint.keep_best=val/total"])
assert cfg.train.max_steps == 7 and cfg.checkpoint.keep_best == "val/total"
assert not {"accelerate", "mlflow", "torch.utils.tensorboard"} & set(sys.modules), "load_config"
from dfcvae_dist import Trainer
from dfcvae_dist.training.trainer import Trainer as Defined
assert Trainer is Defined
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_documented_example_runs_as_written_on_small_data(tmp_path, shard_dir, mlflow_server, monkeypatch):
    import dfcvae_dist
    from dfcvae_dist.config import load_config

    example = re.search(r"```python\n(.*?)```", (ROOT / "docs" / "python-api.md").read_text(), re.S).group(1)
    run_dir = tmp_path / "api-demo"
    data = small(shard_dir, run_dir, "train.max_steps=3", "train.val_every_steps=1", "train.early_stop_patience=1",
                 f"log.tracking_uri={mlflow_server}", "log.image_every_steps=0")
    monkeypatch.setattr(dfcvae_dist, "load_config", lambda name, overrides=(): load_config(name, [*overrides, *data]))
    namespace = {}
    exec(compile(example, "docs/python-api.md", "exec"), namespace)
    summary = namespace["summary"]
    assert summary == json.loads((run_dir / "COMPLETED.json").read_text())
    assert summary["reason"] in ("completed", "early_stop") and summary["best_metric"] == "val/total"
    assert namespace["checkpoint"] == Path(summary["best_checkpoint"]) == run_dir / "checkpoints" / \
        f"step-{summary['best_step']:08d}"
    assert tuple(namespace["faces"].shape) == (16, 3, 32, 32)
    assert (run_dir / "tensorboard").is_dir()


def test_the_best_checkpoint_is_kept_and_patience_stops_the_run_as_completed(tmp_path, shard_dir):
    """lr 0: only batch-norm statistics move, and the validation loss soon stops improving."""
    run_dir = tmp_path / "run"
    steps = ["optim.lr=0", "train.max_steps=30", "train.val_every_steps=1", "checkpoint.keep_best=val/total",
             "train.early_stop_patience=2", "checkpoint.every_steps=0", "checkpoint.keep=1",
             "log.trackers=[tensorboard]", "log.image_every_steps=0"]
    summary = fit(shard_dir, run_dir, *steps)
    stop, best = expected_early_stop(tensorboard_scalars(run_dir)["val/total"], patience=2)
    assert (summary["reason"], summary["step"], summary["best_step"]) == ("early_stop", stop, best)
    assert not summary["stopped_early"] and not (run_dir / "RESUME_ME.json").exists()  # Slurm requeues nothing
    assert json.loads((run_dir / "COMPLETED.json").read_text()) == summary
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == sorted({f"step-{best:08d}", f"step-{stop:08d}"})
    assert (checkpoints / "best").read_text().strip() == f"step-{best:08d}"  # checkpoint.keep=1 did not prune it

    from dfcvae_dist.inference import load_trained

    model, _, checkpoint = load_trained(run_dir, which="best")
    assert checkpoint == checkpoints / f"step-{best:08d}"
    saved = load_file(checkpoint / "weights.safetensors")
    assert all((model.state_dict()[k] == saved[k]).all() for k in saved)
    assert load_trained(run_dir, which="latest")[2] == checkpoints / f"step-{stop:08d}"

    again = fit(shard_dir, run_dir, *steps)  # a relaunch resumes the patience counter: no step more
    assert (again["reason"], again["step"], again["best_step"]) == ("early_stop", stop, best)


def test_a_resume_restores_the_best_value_and_the_patience_counter(tmp_path, shard_dir):
    """The first launch ends at step 3 (its last events after the checkpoint at 2, as a killed launch's would be);
    the second resumes from step 2. Had it forgotten the best value or the count of validations without
    improvement, it would stop at another step or keep another best. TensorBoard shows each step once."""
    run_dir = tmp_path / "run"
    steps = ["optim.lr=0", "train.val_every_steps=1", "checkpoint.keep_best=val/total", "train.early_stop_patience=3",
             "checkpoint.every_steps=2", "checkpoint.keep=5", "log.trackers=[tensorboard]", "log.image_every_steps=0"]
    fit(shard_dir, run_dir, *steps, "train.max_steps=3")
    resumed_from = json.loads((run_dir / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert resumed_from["validations_since_best"] > 0 and resumed_from["best_step"] < 2  # there is a count to keep
    summary = fit(shard_dir, run_dir, *steps, "train.max_steps=30",
                  f"train.resume={run_dir / 'checkpoints' / 'step-00000002'}")
    scalars = tensorboard_scalars(run_dir)
    stop, best = expected_early_stop(scalars["val/total"], patience=3)
    assert (summary["reason"], summary["step"], summary["best_step"]) == ("early_stop", stop, best)
    assert [step for step, _ in scalars["train/total"]] == list(range(1, stop + 1))
    assert [step for step, _ in scalars["val/total"]] == list(range(1, stop + 1))


def test_tensorboard_gets_the_scalars_and_images_mlflow_gets_under_the_same_names(tmp_path, shard_dir, mlflow_server):
    import mlflow
    from tensorboard.backend.event_processing import event_accumulator as ea

    run_dir = tmp_path / "run"
    summary = fit(shard_dir, run_dir, "train.max_steps=3", "train.val_every_steps=2", "log.image_every_steps=2",
                  "log.trackers=[mlflow, tensorboard]", f"log.tracking_uri={mlflow_server}")
    client = mlflow.MlflowClient(mlflow_server)
    in_mlflow = {name: sorted((m.step, m.value) for m in client.get_metric_history(summary["mlflow_run_id"], name))
                 for name in client.get_run(summary["mlflow_run_id"]).data.metrics}
    in_tensorboard = tensorboard_scalars(run_dir)
    assert {"train/total", "val/total", "train/rec_perceptual/relu1_2"} <= set(in_mlflow)
    assert in_tensorboard.keys() == in_mlflow.keys()
    for name, points in in_mlflow.items():
        assert [step for step, _ in in_tensorboard[name]] == [step for step, _ in points], name
        assert [value for _, value in in_tensorboard[name]] == pytest.approx([value for _, value in points]), name
    events = ea.EventAccumulator(str(run_dir / "tensorboard"), size_guidance={ea.IMAGES: 0})
    events.Reload()
    assert {key: [i.step for i in events.Images(key)] for key in events.Tags()["images"]} == \
        {"reconstructions": [0, 2, 3], "samples": [0, 2, 3]}  # from the untrained model, and at the last step
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_a_failed_fit_frees_the_run_directory_and_gives_the_signals_back(tmp_path, shard_dir):
    from dfcvae_dist import Trainer, load_config
    from dfcvae_dist.distributed import make_accelerator
    from dfcvae_dist.errors import UserError

    run_dir = tmp_path / "run"
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(UserError, match="non-finite loss"):
        fit(shard_dir, run_dir, "train.max_steps=2", "loss.feature_scale=1e30", "log.enabled=false")
    assert signal.getsignal(signal.SIGINT) is handler and not (run_dir / ".lock").exists()
    with pytest.raises(UserError, match="not a complete checkpoint"):  # fails in set-up, after taking the lock
        Trainer(load_config("quickstart", small(shard_dir, run_dir, f"train.resume={tmp_path / 'nothing'}")))
    assert not (run_dir / ".lock").exists()
    trainer = Trainer(load_config("quickstart", small(shard_dir, run_dir, "train.max_steps=1", "log.enabled=false")))
    assert trainer.fit()["reason"] == "completed"  # the same process trains on the same directory at once
    with pytest.raises(UserError, match="make a new one"):
        trainer.fit()
    assert trainer.accelerator.num_processes == 1  # still usable after fit()
    assert make_accelerator("bf16").mixed_precision == "bf16"  # the next one may have other settings


@pytest.mark.parametrize("on_unavailable", ["error", "warn"])
def test_tensorboard_that_cannot_write_stops_the_run_in_one_line_or_is_left_out(tmp_path, on_unavailable, caplog):
    from accelerate import Accelerator

    from dfcvae_dist.config import load_config
    from dfcvae_dist.errors import UserError
    from dfcvae_dist.training.tracking import Tracker

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tensorboard").write_text("a file where the event folder goes")
    cfg = load_config(None, [f"train.run_dir={tmp_path / 'run'}", "log.trackers=[mlflow, tensorboard]",
                             f"log.on_unavailable={on_unavailable}", f"log.tracking_uri=sqlite:///{tmp_path}/m.db"])
    if on_unavailable == "error":
        with pytest.raises(UserError, match=rf"TensorBoard cannot write {tmp_path / 'run' / 'tensorboard'} .*"
                                            r"log.on_unavailable=warn"):
            Tracker(cfg, Accelerator(cpu=True))
        assert not (tmp_path / "m.db").exists()  # refused before an MLflow run was made
        return
    cfg.log.trackers = ["tensorboard"]
    tracker = Tracker(cfg, Accelerator(cpu=True))
    assert tracker.tensorboard is None and not tracker.logging
    assert "training continues without it (log.on_unavailable=warn)" in caplog.text
