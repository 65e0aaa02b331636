"""Train DFC-VAE, PVAE or DCGAN on WebDataset shards.

    accelerate launch [--config_file configs/accelerate/X.yaml] -m dfcvae_dist.train --config configs/X.yaml [k=v ...]
    python -m dfcvae_dist.train --config configs/quickstart.yaml         # one process
    torchrun --nproc_per_node 2 -m dfcvae_dist.train --config ...        # also works

Phases, top to bottom: config and accelerator, data, model and loss, resume, tracking, the loop
(step, log, validate, checkpoint, stop on signal), the end.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import pickle
import signal
import sys
import time
from pathlib import Path

import torch
import torchvision
from accelerate.utils import DistributedType, broadcast_object_list, set_seed
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from dfcvae_dist.config import Config, load_config
from dfcvae_dist.data.loader import (EvalStream, TrainStream, batches_per_epoch, make_loader, model_input,
                                     resolve_split)
from dfcvae_dist.distributed import any_rank, make_accelerator
from dfcvae_dist.errors import UserError, cli_main, one_line
from dfcvae_dist.losses import FeaturePerceptualLoss, vae_loss
from dfcvae_dist.models import build_model
from dfcvae_dist.training.checkpoint import Checkpointer, find_checkpoint, read_trainer_state
from dfcvae_dist.training.steps import gan_step, vae_step
from dfcvae_dist.training.tracking import Tracker, code_version

RESUME_MARKER = "RESUME_ME.json"  # "stopped early, resume me": read by slurm/train.sbatch
DONE_MARKER = "COMPLETED.json"
log = logging.getLogger("dfcvae_dist.train")


class StopFlag:
    """Set by SIGTERM/SIGINT (what torchrun and accelerate forward to ranks); ranks agree on it each step."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, accelerator) -> bool:
        return any_rank(accelerator, self.requested)


def slurm_tags() -> dict:
    names = {"SLURM_JOB_ID": "slurm.job_id", "SLURM_RESTART_COUNT": "slurm.restart_count",
             "SLURM_JOB_NODELIST": "slurm.nodelist", "SLURM_NNODES": "slurm.nnodes"}
    return {tag: os.environ[var] for var, tag in names.items() if var in os.environ}


def image_grid(inputs: torch.Tensor, outputs: torch.Tensor, n: int = 8) -> torch.Tensor:
    """Inputs above their reconstructions (or real above fake)."""
    n = min(n, inputs.shape[0])
    return torchvision.utils.make_grid(torch.cat([inputs[:n], outputs[:n]]).float().cpu(), nrow=n, padding=2)


@torch.no_grad()
def validation_loss(accelerator, model, perceptual, cfg: Config, source) -> float:
    """Mean total loss over the first `train.val_batches` batches of the val split on every rank."""
    net = accelerator.unwrap_model(model)
    net.eval()
    total = torch.zeros(2, device=accelerator.device)
    stream = EvalStream(source, cfg.train.batch_size, accelerator.process_index, accelerator.num_processes)
    for i, batch in enumerate(make_loader(stream, 0)):
        if i >= cfg.train.val_batches:
            break
        x = model_input(batch["image"], accelerator.device)
        x_hat, mu, logvar = net(x)
        terms = vae_loss(x, x_hat, mu, logvar, cfg.loss.alpha, cfg.loss.beta, perceptual)
        total += torch.stack([terms["total"] * x.shape[0], torch.tensor(float(x.shape[0]), device=x.device)])
    net.train()
    total = accelerator.reduce(total, reduction="sum")
    return (total[0] / total[1].clamp(min=1)).item()


def run(cfg: Config) -> dict:
    # --- accelerator, run directory -------------------------------------------------------------
    accelerator = make_accelerator(cfg.train.mixed_precision, cfg.train.grad_accum, cfg.train.collective_timeout_s,
                                   cfg.train.threads)
    console = Console(stderr=True, quiet=not accelerator.is_main_process, soft_wrap=True)  # no breaks in paths
    world, rank = accelerator.num_processes, accelerator.process_index
    run_dir = Path(cfg.train.run_dir)
    config_text = cfg.to_yaml()
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config_text)
    set_seed(cfg.train.seed)

    # --- data: an epoch is a fixed number of optimizer steps, the same on every rank --------------
    source = resolve_split(cfg.data.shards, "train", cfg.data.num_samples)
    per_epoch = batches_per_epoch(source.num_samples, cfg.train.batch_size, world, cfg.train.grad_accum)
    steps_per_epoch = per_epoch // cfg.train.grad_accum
    total_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    stream = TrainStream(source, cfg.train.batch_size, per_epoch, rank, world, cfg.data.num_workers,
                         cfg.train.seed, cfg.data.shuffle_buffer, cfg.data.skip_corrupt)
    val_source = None
    if cfg.train.val_every_steps and cfg.model.name != "dcgan":
        val_source = resolve_split(cfg.data.shards, "val", val_pattern=cfg.data.val_shards)
        if not val_source.urls or (Path(cfg.data.shards).is_dir() and val_source.num_samples == 0):
            raise UserError(f"the val split of {cfg.data.shards} is empty; set train.val_every_steps=0 or "
                            "write shards with a val partition")
    global_batch = cfg.train.batch_size * world * cfg.train.grad_accum
    console.print(f"[bold]{cfg.model.name}[/] world size {world}, global batch {global_batch} = "
                  f"{cfg.train.batch_size} per rank x {world} ranks x {cfg.train.grad_accum} accumulation; "
                  f"{steps_per_epoch} steps per epoch, {total_steps} steps")

    # --- model, frozen loss network (never prepared, never saved), optimizers ----------------------
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED  # ZeRO cannot flatten channels-last params
    model = build_model(cfg.model).to(memory_format=torch.contiguous_format if deepspeed else memory_format)
    betas = (cfg.optim.beta1, cfg.optim.beta2)
    perceptual, weights_source = None, "none"
    if cfg.model.name == "dfcvae":
        with accelerator.main_process_first():  # the main process fetches ImageNet weights, others load the cache
            perceptual = FeaturePerceptualLoss.from_config(cfg.loss, accelerator.device).to(memory_format=memory_format)
        weights_source = perceptual.weights_source
    if cfg.model.name == "dcgan":
        if deepspeed:
            raise UserError("model.name=dcgan is not supported under DeepSpeed (two models, two optimizers); "
                            "use DDP (an accelerate config without deepspeed)")
        nets = [model.generator, model.discriminator]
        optimizers = [torch.optim.Adam(n.parameters(), cfg.optim.lr, betas=betas) for n in nets]
        *nets, opt_g, opt_d = accelerator.prepare(*nets, *optimizers)
        optimizers = [opt_g, opt_d]
    else:
        optimizer = torch.optim.Adam(model.parameters(), cfg.optim.lr, betas=betas,
                                     weight_decay=cfg.optim.weight_decay)
        if deepspeed:
            ds = accelerator.state.deepspeed_plugin.deepspeed_config
            ds["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
        model, optimizer = accelerator.prepare(model, optimizer)
        optimizers = [optimizer]
    trained = model  # DCGAN: the plain module holding both prepared networks; VAEs: the prepared model

    # --- resume: the main process picks the checkpoint, every rank loads it -----------------------
    checkpointer = Checkpointer(run_dir, cfg.checkpoint.keep, accelerator)
    choice = [str(find_checkpoint(run_dir, cfg.train.resume) or "") if accelerator.is_main_process else None]
    broadcast_object_list(choice, from_process=0)
    step, run_id, skipped_steps = 0, None, 0
    if choice[0]:
        state = read_trainer_state(Path(choice[0]))
        if state["world_size"] != world:
            raise UserError(f"{choice[0]}: saved with world size {state['world_size']}, now {world}; the data "
                            "position cannot be carried over: resume with the same number of processes, or "
                            "start a new run (train.resume=none, another train.run_dir)")
        if state["model"] != cfg.model.name:
            raise UserError(f"{choice[0]}: a {state['model']} checkpoint, but model.name={cfg.model.name}")
        try:  # accelerate loads with weights_only=True: a file that would run code is refused, not executed
            accelerator.load_state(choice[0])
        except (pickle.UnpicklingError, RuntimeError, OSError) as err:
            raise UserError(f"{choice[0]}: checkpoint refused or unreadable ({str(err).splitlines()[0][:300]})") from None
        step, run_id, skipped_steps = state["step"], state["mlflow_run_id"], state.get("skipped_steps", 0)
        console.print(f"resumed from {choice[0]} at step {step}")

    # --- tracking (main process only) -------------------------------------------------------------
    tracker = Tracker(cfg, accelerator, run_id)
    if not run_id:
        tracker.log_params(cfg.flat())
        tracker.log_text(config_text, "config.yaml")
    tracker.set_tags({"world_size": world, "precision": cfg.train.mixed_precision,
                      "vgg_dtype": str(perceptual.dtype) if perceptual else "none", "vgg_weights": weights_source,
                      "vgg_weights_random": weights_source.startswith("random"), "code_version": code_version(),
                      "distributed_type": str(accelerator.distributed_type), **slurm_tags()})
    if weights_source.startswith("random"):
        console.print("[bold yellow]WARNING: the VGG19 loss network has RANDOM weights: not the paper's loss[/]")

    def save(at_step: int) -> Path:
        trainer_state = {"step": at_step, "epoch": at_step // steps_per_epoch, "world_size": world,
                         "samples_seen": at_step * global_batch, "micro_batches": at_step * cfg.train.grad_accum,
                         "batches_per_epoch": per_epoch, "mlflow_run_id": tracker.run_id or run_id,
                         "config_digest": cfg.digest(), "model": cfg.model.name, "skipped_steps": skipped_steps,
                         "vgg_weights": weights_source}
        weights = accelerator.get_state_dict(trained) if cfg.model.name != "dcgan" else trained.state_dict()
        return checkpointer.save(at_step, trainer_state, weights, config_text)

    # --- the loop -----------------------------------------------------------------------------------
    stop = StopFlag()
    fixed_z = torch.randn(16, cfg.model.latent_dim, generator=torch.Generator().manual_seed(1234))
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeRemainingColumn(), console=console, disable=not accelerator.is_main_process)
    task = progress.add_task("training", total=total_steps, completed=step)
    last_saved, stopped_early, tick, tick_step = step, False, time.perf_counter(), step
    micro, terms, warm = 0, None, None  # warm: (time, step) after the first step, for the summary's img/s
    epoch, batch_in_epoch = divmod(step * cfg.train.grad_accum, per_epoch)
    progress.start()
    while step < total_steps and not stopped_early:
        stream.set_position(epoch, batch_in_epoch)
        lr = cfg.optim.lr * cfg.optim.lr_decay_per_epoch ** epoch
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        for batch in make_loader(stream, cfg.data.num_workers):
            x = model_input(batch["image"], accelerator.device, memory_format)
            if cfg.model.name == "dcgan":
                terms = gan_step(accelerator, nets, optimizers, x, cfg, step + 1)
            else:
                terms = vae_step(accelerator, model, optimizers[0], perceptual, x, cfg, step + 1)
            micro += 1
            if micro % cfg.train.grad_accum:
                continue
            step += 1
            skipped_steps += terms is None
            warm = warm or (time.perf_counter(), step)
            progress.update(task, completed=step, description=f"epoch {epoch + 1} step {step}")

            if terms is not None and (step % cfg.log.every_steps == 0 or step == total_steps):
                scalars = {k: v for k, v in terms.items() if not k.startswith("_")}
                values = accelerator.reduce(torch.stack([torch.as_tensor(v, dtype=torch.float32,
                                                         device=accelerator.device).detach() for v in scalars.values()]),
                                            reduction="mean")
                now = time.perf_counter()
                metrics = {f"train/{k}": v for k, v in zip(scalars, values.tolist())}
                metrics.update({"train/lr": lr, "train/img_per_s": (step - tick_step) * global_batch / (now - tick),
                                "train/epoch": epoch, "train/skipped_steps": skipped_steps})
                tick, tick_step = now, step
                tracker.log_metrics(metrics, step)
                progress.update(task, description=f"epoch {epoch + 1} step {step} loss {metrics['train/total']:.3f} "
                                                  f"{metrics['train/img_per_s']:.0f} img/s")
            if terms is not None and cfg.log.image_every_steps and step % cfg.log.image_every_steps == 0:
                log_images(tracker, accelerator, trained, terms["_images"], fixed_z, step)
            if val_source is not None and step % cfg.train.val_every_steps == 0:
                tracker.log_metrics({"val/total": validation_loss(accelerator, model, perceptual, cfg, val_source)},
                                    step)
            stopped_early = stop.agreed(accelerator)
            if stopped_early or step == total_steps or (cfg.checkpoint.every_steps and
                                                        step % cfg.checkpoint.every_steps == 0):
                save(step)
                last_saved = step
            if stopped_early or step >= total_steps:
                break
        else:
            epoch, batch_in_epoch = epoch + 1, 0
            continue
        epoch, batch_in_epoch = divmod(step * cfg.train.grad_accum, per_epoch)
    progress.stop()
    img_per_s = (step - warm[1]) * global_batch / (time.perf_counter() - warm[0]) if warm and step > warm[1] else None

    # --- the end -------------------------------------------------------------------------------------
    if last_saved != step:
        save(step)
    if terms is not None:
        log_images(tracker, accelerator, trained, terms["_images"], fixed_z, step)
    summary = {"step": step, "total_steps": total_steps, "stopped_early": stopped_early,
               "mlflow_run_id": tracker.run_id, "checkpoint": str(find_checkpoint(run_dir, "auto")),
               "vgg_weights": weights_source, "skipped_steps": skipped_steps, "img_per_s": img_per_s}
    record_rank(run_dir, rank, trained, stream)
    if accelerator.is_main_process:
        marker = run_dir / (RESUME_MARKER if stopped_early else DONE_MARKER)
        (run_dir / (DONE_MARKER if stopped_early else RESUME_MARKER)).unlink(missing_ok=True)
        marker.write_text(json.dumps(summary, indent=1))
    tracker.end("KILLED" if stopped_early else "FINISHED")
    console.print(f"{'stopped at' if stopped_early else 'finished'} step {step}; checkpoint {summary['checkpoint']}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def record_rank(run_dir: Path, rank: int, trained, stream: TrainStream) -> None:
    """`ranks/rank-N.json`: a digest of this rank's parameters (equal on every rank under DDP) and its
    shards of the first epoch (disjoint across ranks)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(trained.named_parameters()):  # not BN running stats: those are per rank
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    (run_dir / "ranks").mkdir(parents=True, exist_ok=True)
    (run_dir / "ranks" / f"rank-{rank}.json").write_text(json.dumps(
        {"rank": rank, "params_sha256": digest.hexdigest(), "first_epoch_shards": stream.rank_shards(0)}))


def log_images(tracker, accelerator, trained, images, fixed_z, step: int) -> None:
    if not tracker.active:
        return
    net = accelerator.unwrap_model(trained)
    x, out = images
    tracker.log_image(image_grid(x.detach(), out.detach()), f"images/reconstructions_step{step:08d}.png")
    was_training = net.training
    net.eval()
    with torch.no_grad():
        decode = net.decode if hasattr(net, "decode") else net.generator
        samples = decode(fixed_z.to(accelerator.device))
    net.train(was_training)
    tracker.log_image(torchvision.utils.make_grid(samples.float().cpu(), nrow=8), f"images/samples_step{step:08d}.png")


@cli_main
def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    try:
        run(cfg)
    except UserError as err:
        rank = os.environ.get("RANK", "0")
        raise UserError(f"[rank {rank}] {one_line(err)}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
