"""The trainer's parts on their own, in one process: the state's counters, the checkpointer's rules, where a
resume starts, and each recipe's optimizer step."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from dfcvae_dist.config import LossConfig, ModelConfig, OptimConfig
from dfcvae_dist.errors import UserError
from dfcvae_dist.rundir import STATE_FILE, find_checkpoint
from dfcvae_dist.training.checkpoint import Checkpointer
from dfcvae_dist.config import TrainConfig
from dfcvae_dist.distributed import resolve_precision
from dfcvae_dist.training.recipes import GANRecipe, LossHealth, NonFiniteLoss, VAERecipe
from dfcvae_dist.training.state import TrainerState


@pytest.fixture
def accelerator():
    def make(grad_accum: int = 1) -> Accelerator:
        return Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_trainer_state_rolls_over_to_the_next_epoch_and_round_trips_through_json():
    state = TrainerState(batches_per_epoch=6, grad_accum=2, model="dfcvae")
    for skipped in (False, True, False):
        state.advance(skipped)
    assert (state.step, state.epoch, state.batch_in_epoch, state.skipped_steps) == (3, 1, 0, 1)
    state.advance(False)
    assert (state.epoch, state.batch_in_epoch) == (1, 2)
    assert TrainerState.from_dict(json.loads(state.to_json())) == state


def test_trainer_state_reads_the_files_written_before_it_existed():
    old = {"step": 7, "epoch": 1, "world_size": 2, "samples_seen": 448, "micro_batches": 14, "batches_per_epoch": 10,
           "mlflow_run_id": "abc", "config_digest": "d", "model": "pvae", "skipped_steps": 1, "vgg_weights": "none"}
    state = TrainerState.from_dict(old)
    assert (state.step, state.grad_accum, state.epoch, state.batch_in_epoch) == (7, 2, 1, 4)
    assert (state.world_size, state.mlflow_run_id, state.model, state.skipped_steps) == (2, "abc", "pvae", 1)


def test_checkpointer_is_due_at_its_interval_and_at_the_last_step():
    assert [s for s in range(1, 12) if Checkpointer("run", 4, 2, 11, None).due(s)] == [4, 8, 11]
    assert [s for s in range(1, 12) if Checkpointer("run", 0, 2, 11, None).due(s)] == [11]


def fake_checkpoint(run_dir, step):
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    return folder


def test_resume_auto_falls_back_to_the_newest_complete_checkpoint_when_latest_is_missing_or_stale(tmp_path):
    fake_checkpoint(tmp_path, 10)
    newest = fake_checkpoint(tmp_path, 20)
    (tmp_path / "checkpoints" / "step-00000030").mkdir()  # incomplete: no trainer state
    assert find_checkpoint(tmp_path, "auto") == newest
    (tmp_path / "checkpoints" / "latest").write_text("step-00000030\n")
    assert find_checkpoint(tmp_path, "auto") == newest
    assert find_checkpoint(tmp_path, "none") is None
    assert find_checkpoint(tmp_path / "elsewhere", "auto") is None
    assert find_checkpoint(tmp_path, str(tmp_path)) == newest  # a run directory given as the path
    with pytest.raises(UserError, match="step-00000030 is not a complete checkpoint"):
        find_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "step-00000030"))


def test_a_nonfinite_micro_batch_skips_the_whole_accumulated_step(accelerator):
    torch.manual_seed(0)
    acc = accelerator(grad_accum=2)
    recipe = VAERecipe(acc, ModelConfig(name="pvae", image_size=32), LossConfig(), OptimConfig(), LossHealth(acc, "skip"),
                       TrainConfig(batch_size=4, grad_accum=2), torch.contiguous_format)
    params = {k: v.detach().clone() for k, v in recipe.model.named_parameters()}
    nan, good = torch.full((4, 3, 32, 32), float("nan")), torch.rand(4, 3, 32, 32)
    result = recipe.train_step([nan, good], step=1)
    assert result.skipped and not result.metrics
    assert all(torch.equal(params[k], v) for k, v in recipe.model.named_parameters())  # no update from half a step
    result = recipe.train_step([good, good], step=2)
    assert not result.skipped and set(result.metrics) >= {"kl", "rec_pixel", "total", "grad_norm"}
    assert not all(torch.equal(params[k], v) for k, v in recipe.model.named_parameters())


@pytest.mark.parametrize("family", ["pvae", "dcgan"])
def test_an_fp16_scaler_overflow_skips_the_step_without_tripping_the_loss_health_check(accelerator, family):
    # accelerate gives CPU no GradScaler; CUDA fp16 does (tests/test_gpu.py): the same scaler, made to overflow here
    acc = accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # before prepare: the optimizers take it
    model_cfg = ModelConfig(name=family, image_size=32)
    health = LossHealth(acc, "stop")
    recipe = (GANRecipe(acc, model_cfg, OptimConfig(), health, TrainConfig(batch_size=4), torch.contiguous_format) if family == "dcgan" else
              VAERecipe(acc, model_cfg, LossConfig(), OptimConfig(), health, TrainConfig(batch_size=4),
                        torch.contiguous_format))
    params = {k: v.detach().clone() for k, v in recipe.module.named_parameters()}
    result = recipe.train_step([torch.rand(4, 3, 32, 32)], step=1)
    assert result.skipped and not result.metrics
    assert all(torch.equal(params[k], v) for k, v in recipe.module.named_parameters())
    assert acc.scaler.get_scale() < 2.0 ** 127 and not health.agree(stop_requested=False)  # no NonFiniteLoss
    acc.scaler.update(1.0)
    assert not recipe.train_step([torch.rand(4, 3, 32, 32)], step=2).skipped


def test_dcgan_refuses_gradient_accumulation(accelerator):
    acc = accelerator(grad_accum=2)
    with pytest.raises(UserError, match="model.name=dcgan does not support train.grad_accum=2"):
        GANRecipe(acc, ModelConfig(name="dcgan", image_size=32), OptimConfig(), LossHealth(acc, "stop"),
                  TrainConfig(grad_accum=2), torch.contiguous_format)


def test_sync_bn_is_refused_on_cpu_with_its_reason(accelerator):
    acc = accelerator()
    with pytest.raises(UserError, match="train.sync_bn=true needs CUDA: torch's SyncBatchNorm works only with GPU"):
        VAERecipe(acc, ModelConfig(name="pvae", image_size=32), LossConfig(), OptimConfig(), LossHealth(acc, "stop"),
                  TrainConfig(sync_bn=True), torch.contiguous_format)


def test_nonfinite_losses_are_noted_without_a_sync_and_named_when_ranks_agree(accelerator):
    health = LossHealth(accelerator(), "stop")
    for step, loss in [(1, 1.0), (2, float("nan")), (3, float("inf"))]:
        assert health.finite(torch.tensor(loss), step)  # policy stop: the step goes on, nothing is read back
    with pytest.raises(NonFiniteLoss, match=r"non-finite loss at step 2 on rank\(s\) 0;"):
        health.agree(stop_requested=False)
    assert LossHealth(health.accelerator, "stop").agree(stop_requested=True)


@pytest.mark.parametrize("configured,launcher,expected", [
    ("auto", "bf16", "bf16"), ("auto", None, "no"), ("bf16", "no", "bf16"), ("fp16", "fp16", "fp16")])
def test_precision_comes_from_the_launcher_unless_the_config_names_one(configured, launcher, expected):
    assert resolve_precision(configured, launcher, deepspeed=False) == expected


def test_contradicting_precisions_are_refused_and_deepspeed_decides_its_own():
    with pytest.raises(UserError, match="train.mixed_precision=bf16, but the launcher asks for fp16"):
        resolve_precision("bf16", "fp16", deepspeed=False)
    assert resolve_precision("bf16", "fp16", deepspeed=True) is None


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset (util-linux) is not installed")
def test_torch_threads_follow_the_cpus_the_job_may_use():
    """A Slurm job or container gets a share of the machine's cores; os.cpu_count() sees them all."""
    code = "from dfcvae_dist.distributed import make_accelerator; import torch; make_accelerator(); " \
           "print(torch.get_num_threads())"
    proc = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "WORLD_SIZE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "1"
