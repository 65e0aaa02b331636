"""The trainer's parts on their own, in one process: the state's counters, the checkpointer's rules, where a
resume starts, and each recipe's optimizer step."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from dfcvae_dist.config import OptimConfig, load_config
from dfcvae_dist.distributed import resolve_precision
from dfcvae_dist.errors import UserError
from dfcvae_dist.families import get_family
from dfcvae_dist.metrics import Metric
from dfcvae_dist.rundir import STATE_FILE, find_checkpoint
from dfcvae_dist.training.checkpoint import Checkpointer
from dfcvae_dist.training import recipes
from dfcvae_dist.training.compiled import CompiledStep
from dfcvae_dist.training.recipes import LossHealth, NonFiniteLoss, set_lr
from dfcvae_dist.training.recipes import adam as recipes_adam
from dfcvae_dist.training.state import TrainerState


@pytest.fixture
def accelerator():
    def make(grad_accum: int = 1) -> Accelerator:
        return Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)

    yield make
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def recipe(acc, family: str, policy: str = "stop", *overrides: str):
    """`family`'s recipe for 32x32 images (random loss-network weights), as the trainer builds it."""
    cfg = load_config(None, [f"model.name={family}", "model.image_size=32", "train.batch_size=4",
                             "loss.network_weights=random", *overrides])
    return get_family(family).build_recipe(cfg, acc, LossHealth(acc, policy), torch.contiguous_format)


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
           "mlflow_run_id": "abc", "config_digest": "d", "model": "pvae", "skipped_steps": 1,
           "vgg_weights": "random(seed=1)"}
    state = TrainerState.from_dict(old)
    assert (state.step, state.grad_accum, state.epoch, state.batch_in_epoch) == (7, 2, 1, 4)
    assert (state.world_size, state.mlflow_run_id, state.model, state.skipped_steps) == (2, "abc", "pvae", 1)
    assert (state.feature_weights, state.precision) == ("random(seed=1)", "")  # the precision was in the config


def test_checkpointer_is_due_at_its_interval_and_at_the_last_step():
    assert [s for s in range(1, 12) if Checkpointer("run", 4, 2, 11, None).due(s)] == [4, 8, 11]
    assert [s for s in range(1, 12) if Checkpointer("run", 0, 2, 11, None).due(s)] == [11]


def test_checkpointer_keeps_the_strictly_best_finite_value_in_the_metrics_direction():
    def best_steps(metric: Metric, values: list[float]) -> tuple[list[int], int]:
        """The steps saved as a new best, and the validations since the last one."""
        checkpointer, state, saved = Checkpointer("run", 0, 1, 100, None, metric), TrainerState(), []
        for value in values:
            state.step += 1
            checkpointer.validated(state, {metric.name: value})
            saved += [state.step] if checkpointer.due(state.step) else []
        assert state.best_step == (saved[-1] if saved else 0)
        return saved, state.validations_since_best

    loss, score = Metric("val/total", "", ""), Metric("val/score", "", "", higher_is_better=True)
    assert best_steps(loss, [float("nan"), 5.0, 5.0, 4.0, float("inf"), 6.0]) == ([2, 4], 2)
    assert best_steps(score, [1.0, 3.0, 2.0, 3.0]) == ([1, 2], 2)


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
    pvae = recipe(acc, "pvae", "skip", "train.grad_accum=2")
    params = {k: v.detach().clone() for k, v in pvae.model.named_parameters()}
    nan, good = torch.full((4, 3, 32, 32), float("nan")), torch.rand(4, 3, 32, 32)
    result = pvae.train_step([nan, good], step=1)
    assert result.skipped and not result.metrics
    assert all(torch.equal(params[k], v) for k, v in pvae.model.named_parameters())  # no update from half a step
    result = pvae.train_step([good, good], step=2)
    assert not result.skipped and set(result.metrics) >= {"kl", "rec_pixel", "total", "grad_norm"}
    assert not all(torch.equal(params[k], v) for k, v in pvae.model.named_parameters())


@pytest.mark.parametrize("family", ["pvae", "dcgan", "dfcvae-gan"])
def test_an_fp16_scaler_overflow_skips_the_step_without_tripping_the_loss_health_check(accelerator, family):
    # accelerate gives CPU no GradScaler; CUDA fp16 does (tests/test_gpu.py): the same scaler, made to overflow here
    acc = accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # before prepare: the optimizers take it
    trained = recipe(acc, family)
    params = {k: v.detach().clone() for k, v in trained.module.named_parameters()}
    result = trained.train_step([torch.rand(4, 3, 32, 32)], step=1)
    assert result.skipped and not result.metrics
    assert all(torch.equal(params[k], v) for k, v in trained.module.named_parameters())
    assert acc.scaler.get_scale() < 2.0 ** 127 and not trained.health.agree(stop_requested=False)  # no NonFiniteLoss
    acc.scaler.update(1.0)
    assert not trained.train_step([torch.rand(4, 3, 32, 32)], step=2).skipped


@pytest.mark.parametrize("family", ["pvae", "dcgan"])
def test_a_fused_optimizer_takes_the_fp16_overflow_on_the_device_and_the_step_reports_it(accelerator, monkeypatch,
                                                                                        family):
    # The fused Adam the recipes build on CUDA, here on CPU (torch has it there too): the GradScaler hands it
    # found_inf instead of reading it, so the step is not skipped on the host but flagged on the device
    acc = accelerator()
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)
    monkeypatch.setattr(recipes, "adam", lambda module, cfg, device=None, compiled=False:
                        recipes_adam(module, cfg, torch.device("cuda")))  # only the choice of kind reads the device
    trained = recipe(acc, family)
    assert all(o.optimizer.defaults["fused"] for o in trained.optimizers)
    params = {k: v.detach().clone() for k, v in trained.module.named_parameters()}
    result = trained.train_step([torch.rand(4, 3, 32, 32)], step=1)
    assert not result.skipped and result.overflow.dtype == torch.bool and result.overflow
    assert all(torch.equal(params[k], v) for k, v in trained.module.named_parameters())  # the kernel left them
    assert not trained.health.agree(stop_requested=False)
    acc.scaler.update(1.0)
    result = trained.train_step([torch.rand(4, 3, 32, 32)], step=2)
    assert not result.skipped and not result.overflow
    assert any(not torch.equal(params[k], v) for k, v in trained.module.named_parameters())


def test_an_optimizer_keeps_its_implementation_when_it_loads_another_ones_state():
    """train.compile is resume-safe, and older checkpoints load: torch takes the saved param groups whole
    (implementation flags and learning rate), and `recipes.adam` puts its own back."""
    net = torch.nn.Linear(3, 2)
    net(torch.randn(4, 3)).sum().backward()
    eager = recipes_adam(net, OptimConfig(lr=1e-3))
    eager.step()
    compiled = recipes_adam(net, OptimConfig(lr=5e-4), compiled=True)
    lr = compiled.param_groups[0]["lr"]
    compiled.load_state_dict(eager.state_dict())
    group = compiled.param_groups[0]
    assert group["lr"] is lr and lr.item() == pytest.approx(1e-3) and group["capturable"] and group["foreach"]
    set_lr([compiled], 2.5e-4)  # in place: a compiled step reads the same tensor
    assert group["lr"] is lr and lr.item() == pytest.approx(2.5e-4)
    eager.load_state_dict(compiled.state_dict())
    group = eager.param_groups[0]
    assert group["lr"] == pytest.approx(2.5e-4) and not isinstance(group["lr"], torch.Tensor)
    assert not group["capturable"] and eager.state[net.weight]["step"].device.type == "cpu"
    eager.step()  # a foreach, non-capturable Adam refuses a tensor learning rate and capturable steps on CPU


@pytest.mark.parametrize("family", ["dcgan", "dfcvae-gan"])
def test_compiling_the_step_falls_back_in_one_line_for_two_network_families(accelerator, caplog, family):
    with caplog.at_level(logging.WARNING):
        trained = recipe(accelerator(), family, "stop", "train.compile=step")
    assert [r.getMessage() for r in caplog.records if "train.compile" in r.getMessage()] == [
        f"train.compile=step: model.name={family} steps two networks in turn, each with its own optimizer; falling "
        "back to train.compile=loss (its feature network, if any)"]
    if family == "dfcvae-gan":
        assert trained.compiled == "loss" and trained.reconstruction._compiled_call_impl is not None


def test_a_compiled_step_runs_a_batch_of_another_size_eagerly_and_a_new_learning_rate_recompiles_nothing():
    import torch._dynamo.utils

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    optimizer = recipes_adam(net, OptimConfig(lr=1e-2), compiled=True)
    said = []
    step = CompiledStep(lambda x: {"total": (net(x) - x).square().mean()}, list(net.parameters()), optimizer, 1.0, 4,
                        graphs=False, updates=True, say=said.append)
    frames = torch._dynamo.utils.counters["frames"]

    def train(batch: int) -> torch.Tensor:
        step.begin()
        step.losses(torch.randn(batch, 8))["total"].backward()
        norm = step.grad_norm()
        step.optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    train(4)
    compiled = frames["total"]
    set_lr([optimizer], 5e-3)
    before = [p.detach().clone() for p in net.parameters()]
    assert train(4) > 0 and frames["total"] == compiled  # nothing traced anew
    assert all(not torch.equal(a, p) for a, p in zip(before, net.parameters(), strict=True))
    train(3)
    assert frames["total"] == compiled and said == [
        "train.compile=step: a batch of 3 images, not train.batch_size=4: its forward and backward run eagerly"]


@pytest.mark.parametrize("family", ["dcgan", "dfcvae-gan"])
def test_two_network_families_refuse_gradient_accumulation_when_the_config_loads(family):
    with pytest.raises(UserError, match=f"model.name={family} does not support train.grad_accum=2"):
        load_config(None, [f"model.name={family}", "train.grad_accum=2"])


def test_a_dfcvae_gan_step_updates_the_vae_and_its_discriminator_each_with_its_own_optimizer(accelerator):
    torch.manual_seed(0)
    trained = recipe(accelerator(), "dfcvae-gan")
    vae, discriminator = trained.module.vae, trained.module.discriminator
    before = {name: {k: v.detach().clone() for k, v in net.named_parameters()}
              for name, net in (("vae", vae), ("discriminator", discriminator))}
    result = trained.train_step([torch.rand(4, 3, 32, 32)], step=1)
    assert not result.skipped
    assert set(result.metrics) == {"total", "kl", "rec_perceptual", "rec_perceptual/relu1_2", "rec_perceptual/relu2_1",
                                   "rec_perceptual/relu3_1", "adversarial", "loss_d", "grad_norm"}
    m = result.metrics
    torch.testing.assert_close(m["total"], 1.0 * m["kl"] + 0.8 * m["rec_perceptual"] + 1.0 * m["adversarial"])
    for name, net in (("vae", vae), ("discriminator", discriminator)):
        assert any(not torch.equal(before[name][k], v) for k, v in net.named_parameters()), name
    assert [len(o.param_groups[0]["params"]) for o in trained.optimizers] == \
        [len(list(vae.parameters())), len(list(discriminator.parameters()))]
    assert set(trained.weights()) == set(trained.module.state_dict())  # the checkpoint holds both networks


@pytest.mark.parametrize("family", ["dcgan", "dfcvae-gan"])
def test_the_generator_is_trained_against_the_discriminator_its_discriminator_step_trains(accelerator, family):
    # The discriminator's batch norm normalises by batch: a fake judged in a batch mixed with reals gets another
    # logit than in the generator step's all-fake batch (the collapse of the first `make reproduce` DCGAN)
    trained = recipe(accelerator(), family, "stop", "model.base_channels=8", "optim.lr=0.0")
    calls = []
    trained.module.discriminator.register_forward_hook(lambda _, args, out: calls.append((args[0].detach(),
                                                                                          out.detach())))
    torch.manual_seed(0)
    trained.train_step([torch.rand(4, 3, 32, 32)], step=1)  # lr 0: both steps see the same weights
    *discriminator_step, (fakes, generator_step_logits) = calls
    judged_in_the_discriminator_step = torch.cat([out[(images[:, None] == fakes).flatten(2).all(2).any(1)]
                                                  for images, out in discriminator_step])
    assert judged_in_the_discriminator_step.shape == generator_step_logits.shape
    torch.testing.assert_close(judged_in_the_discriminator_step, generator_step_logits)


def test_sync_bn_is_refused_on_cpu_with_its_reason(accelerator):
    acc = accelerator()
    with pytest.raises(UserError, match="train.sync_bn=true needs CUDA: torch's SyncBatchNorm works only with GPU"):
        recipe(acc, "pvae", "stop", "train.sync_bn=true")


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


def test_progress_lines_have_one_format_and_the_last_step_is_in_the_last_epoch():
    """In a job log (not a terminal): step, the epoch the step belongs to, loss, throughput, time left, once
    each; a 7-epoch run ends in epoch 7, not 8."""
    import io
    import re

    from rich.console import Console

    from dfcvae_dist.training.progress import ProgressReporter

    log = io.StringIO()
    progress = ProgressReporter(Console(file=log, width=300), total_steps=14, steps_per_epoch=2, start_step=0,
                                global_batch=32, every_s=0, enabled=True)
    for step in range(1, 15):
        progress.step_done(step)
        progress.logged(step, loss=1.5, img_per_s=100.0)
    lines = log.getvalue().splitlines()
    line_format = r"step \d+/14 epoch \d/7 loss 1\.500 100 img/s \d:\d\d:\d\d left"
    assert len(lines) == 14 and all(re.fullmatch(line_format, line) for line in lines), lines
    assert lines[1].startswith("step 2/14 epoch 1/7 ") and lines[2].startswith("step 3/14 epoch 2/7 ")
    assert lines[-1] == "step 14/14 epoch 7/7 loss 1.500 100 img/s 0:00:00 left"
