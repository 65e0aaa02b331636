"""Training steps. A model family (`dfcvae_dist/families/`) builds its model and one of these recipes: a `Recipe`
prepares its modules and optimizers with accelerate, takes one optimizer step over `grad_accum` micro-batches,
gives its weights and decodes samples, so the trainer's loop never asks which model it trains.

- `VAERecipe`: a VAE with a reconstruction loss, either the feature perceptual loss on a frozen feature network
  that is never prepared, wrapped or saved (DFC-VAE), or the pixel loss (PVAE).
- `VAEGANRecipe`: a VAE recipe plus a discriminator on images against reconstructions and samples (dfcvae-gan).
- `GANRecipe`: DCGAN, one discriminator and one generator step per batch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType

from dfcvae_dist.config import Config, OptimConfig
from dfcvae_dist.data.loader import EvalStream, make_loader, model_input
from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import FeaturePerceptualLoss, discriminator_loss, generator_loss, vae_loss
from dfcvae_dist.training.compiled import CompiledStep, captures_graphs, compile_mode, compiles_update, say

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step gives the loop: detached scalar metrics (device tensors: reading them is the
    loop's choice, at log steps only), whether the step was skipped, and `overflow`: under fp16 with a fused
    optimizer, whether the GradScaler found inf/NaN gradients and the fused kernel left the weights alone, as a
    device bool that the loop reads only when it reads anything else (None: the step's fate is `skipped`)."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False
    overflow: torch.Tensor | None = None


class NonFiniteLoss(UserError):
    pass


def nonfinite_ranks(accelerator, loss: torch.Tensor) -> list[int]:
    """The ranks whose loss is NaN or Inf (one all-reduce, so every rank gets the same answer)."""
    bad = torch.zeros(accelerator.num_processes, device=accelerator.device)
    bad[accelerator.process_index] = float(not torch.isfinite(loss.detach()).all())
    return torch.nonzero(accelerator.reduce(bad, reduction="sum")).flatten().tolist()


class LossHealth:
    """Non-finite losses. Policy `stop`: noted on the device, with no host sync and no collective; ranks
    agree on them, together with a stop request, in `agree` (every train.sync_every_steps steps and before
    every checkpoint), so a non-finite loss never reaches a checkpoint. Policy `skip`: every rank must
    agree at once to skip the step, at one collective and one host sync per micro-batch."""

    def __init__(self, accelerator, policy: str):
        self.accelerator, self.policy = accelerator, policy
        self.first_bad = torch.zeros((), dtype=torch.long, device=accelerator.device)  # 0: none on this rank

    def finite(self, loss: torch.Tensor, step: int) -> bool:
        """False only under policy `skip`: then skip this step on every rank."""
        if self.policy == "skip":
            return not nonfinite_ranks(self.accelerator, loss)
        bad = ~torch.isfinite(loss.detach()).all()
        self.first_bad.masked_fill_(bad & (self.first_bad == 0), step)  # `step` goes to the kernel as an argument
        return True

    def agree(self, stop_requested: bool) -> bool:
        """One collective: raises naming the first non-finite step and its ranks; else whether any rank
        asked to stop."""
        acc = self.accelerator
        flags = torch.zeros(acc.num_processes + 1, dtype=torch.long, device=acc.device)
        flags[0] = int(stop_requested)
        flags[1 + acc.process_index] = self.first_bad
        flags = acc.reduce(flags, reduction="sum").tolist()
        bad = {rank: step for rank, step in enumerate(flags[1:]) if step}
        if bad:
            first = min(bad.values())
            ranks = ", ".join(str(rank) for rank, step in bad.items() if step == first)
            raise NonFiniteLoss(f"non-finite loss at step {first} on rank(s) {ranks}; no checkpoint was written "
                                "from this state (train.on_nonfinite=skip skips such steps)")
        return flags[0] > 0


def prepare_batch_norm(model: torch.nn.Module, accelerator, sync_bn: bool, batch_size: int) -> torch.nn.Module:
    """SyncBatchNorm under multi-process DDP on CUDA; refused on CPU, where torch cannot run it."""
    if sync_bn and accelerator.device.type != "cuda":
        raise UserError("train.sync_bn=true needs CUDA: torch's SyncBatchNorm works only with GPU modules; "
                        "leave it off on CPU")
    if sync_bn and accelerator.num_processes > 1:
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if accelerator.num_processes > 1 and batch_size < 16:
        log.warning("batch norm sees %d images per rank (the paper's sees 64): set train.sync_bn=true on GPUs to "
                    "normalise over the global batch", batch_size)
    return model


def check_deepspeed(accelerator, grad_accum: int, grad_clip: float | None, on_nonfinite: str) -> None:
    """DeepSpeed clips and accumulates by its own config: carry ours there, or refuse a contradiction."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    if on_nonfinite == "skip" and grad_accum > 1:  # its engine steps at the boundary whatever we skip
        raise UserError("train.on_nonfinite=skip with train.grad_accum > 1 is not supported under DeepSpeed: its "
                        "engine steps on the accumulated gradients regardless; use train.on_nonfinite=stop")
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise UserError(f"train.grad_accum={grad_accum}, but the DeepSpeed config accumulates "
                        f"{accelerator.gradient_accumulation_steps} micro-batches: make them agree")
    clip = grad_clip or 0.0
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = clip
    elif float(ds["gradient_clipping"]) != clip:
        raise UserError(f"optim.grad_clip={grad_clip}, but the DeepSpeed config clips at {ds['gradient_clipping']}: "
                        "make them agree")


def clip_or_norm(accelerator, module, max_norm: float | None) -> torch.Tensor:
    return accelerator.clip_grad_norm_(module.parameters(), max_norm if max_norm is not None else float("inf"))


def gradients_finite(accelerator, health: "LossHealth", grad_norm: torch.Tensor, step: int) -> bool:
    """Under fp16 the GradScaler judges the gradients itself: overflow in its first steps is expected."""
    return accelerator.scaler is not None or health.finite(grad_norm, step)


def optimizer_stepped(accelerator, optimizer) -> bool:
    """Steps; False when fp16's GradScaler skipped the step for inf/NaN gradients and lowered its scale
    (reading that flag costs no host sync of ours: the scaler's step has already read it). A fused optimizer
    always steps: the scaler hands it its verdict on the device (`fp16_overflow`)."""
    optimizer.step()
    return accelerator.scaler is None or not optimizer.step_was_skipped


def fp16_overflow(accelerator, optimizer, *grad_norms: torch.Tensor) -> torch.Tensor | None:
    """Under fp16 with fused optimizers (`optimizer` and any other of the step, built alike), whether a step found
    inf/NaN gradients (its kernel then left the weights alone), as a device bool: the unscaled gradients hold an
    inf or NaN exactly when their norm is not finite."""
    if accelerator.scaler is None:  # no GradScaler: neither fp16 nor one to skip steps (DeepSpeed scales its own)
        return None
    inner = getattr(optimizer, "optimizer", None)  # DeepSpeed's ZeRO optimizer has no torch `defaults`
    if not getattr(inner, "defaults", {}).get("fused"):
        return None
    return ~torch.isfinite(torch.stack(grad_norms)).all()


def set_lr(optimizers, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # in place: a compiled or graphed step reads it where it is
            else:
                group["lr"] = lr


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def metric_name(term: str, rec_metric: str) -> str:
    """The logged name of a loss term, saying what the reconstruction term measures: `rec` is `rec_metric`
    (`rec_pixel`, `rec_perceptual`), a per-layer term `rec_<layer>` is `<rec_metric>/<layer>`."""
    if term == "rec":
        return rec_metric
    if term.startswith("rec_"):
        return f"{rec_metric}/{term.removeprefix('rec_')}"
    return term


def check_deepspeed_single_model(accelerator, family: str) -> None:
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise UserError(f"model.name={family} is not supported under DeepSpeed (two models, two optimizers); use DDP "
                        "(an accelerate config without deepspeed)")


def adam(module: torch.nn.Module, optim_cfg: OptimConfig, device: torch.device | None = None,
         compiled: bool = False) -> torch.optim.Adam:
    """Adam for training on `device`: fused on CUDA (a few kernels for all parameters; under fp16 it takes the
    GradScaler's found_inf on the device, so the step needs no host sync), foreach elsewhere. `compiled` (the
    optimizer step of train.compile=step): foreach and capturable, its learning rate a tensor on `device`, so that a
    CUDA graph can capture the step and a new learning rate changes neither. Loading a checkpoint saved with
    another implementation keeps this one (`keep_implementation`)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    lr = torch.tensor(optim_cfg.lr, device=device) if compiled else optim_cfg.lr
    kinds = {"foreach": True, "capturable": True} if compiled else {"fused": True} if on_cuda else {"foreach": True}
    optimizer = torch.optim.Adam(module.parameters(), lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                 weight_decay=optim_cfg.weight_decay, **kinds)
    optimizer.register_load_state_dict_post_hook(keep_implementation(optimizer))
    return optimizer


def keep_implementation(optimizer: torch.optim.Optimizer):
    """A load_state_dict post-hook: torch takes the saved param groups whole, implementation flags and learning
    rate included. Restore this optimizer's flags, its learning-rate tensor (the very object a compiled step reads;
    the value is the loaded one) and where its step counters live (on the device when fused or capturable, else on
    the host)."""
    own = [({k: group[k] for k in ("foreach", "fused", "capturable")}, group["lr"]) for group in optimizer.param_groups]

    def hook(optimizer: torch.optim.Optimizer) -> None:
        for group, (flags, lr) in zip(optimizer.param_groups, own, strict=True):
            if isinstance(lr, torch.Tensor):
                lr.fill_(float(group["lr"]))
                group["lr"] = lr
            else:
                group["lr"] = float(group["lr"])
            group.update(flags)
            on_device = flags["fused"] or flags["capturable"]
            for param in group["params"]:
                state = optimizer.state.get(param, {})
                if "step" in state:
                    state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)

    return hook


@contextlib.contextmanager
def eval_mode(net: torch.nn.Module):
    """`net` in eval mode (batch norm from its running statistics), back in its former mode after."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


class Recipe:
    """What the trainer's loop asks of a family's training step.

    - `optimizers`: every optimizer (the loop sets their learning rate per epoch);
    - `module`: the whole trained model, unwrapped (its parameters are what a rank records);
    - `model_config`: the model section of the config, stored beside the weights;
    - `feature_network`: the frozen loss network, or None;
    - `train_step(micro_batches, step)`, `weights()`, `decode(z)`; encoders also `reconstruct(images)`,
      validating families `validation_loss(...)`."""

    optimizers: list[torch.optim.Optimizer]
    model_config: dict
    feature_network = None
    compiled = "off"  # what of the step train.compile compiles in this run: off, loss or step

    @property
    def module(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        raise NotImplementedError

    def weights(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.module)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images of latents `z`, the model in eval mode (and back in its mode after)."""
        with eval_mode(self.generator_for_images()) as net:
            return net.decode(z.to(self.accelerator.device))

    def generator_for_images(self) -> torch.nn.Module:
        """The module whose `decode` (and `encode`, for encoders) draw the run's images."""
        return self.accelerator.unwrap_model(self.module)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images through the encoder's mean and the decoder, in eval mode."""
        with eval_mode(self.generator_for_images()) as net:
            mu, _ = net.encode(images.to(self.accelerator.device).contiguous(memory_format=self.memory_format))
            return net.decode(mu)


class VAERecipe(Recipe):
    """`model` (a VAE) trained on alpha x KL + beta x `reconstruction(x, x_hat)` (`losses.vae_loss`): e.g. a
    `FeaturePerceptualLoss` or `losses.pixel_loss`. `rec_metric` names the reconstruction term in the metrics.
    Under train.compile=step its forward, loss, backward and optimizer step are compiled (`compiled.CompiledStep`)."""

    one_network = True  # one model, one optimizer: what train.compile=step compiles

    def __init__(self, cfg: Config, accelerator, health: LossHealth, memory_format: torch.memory_format,
                 model: torch.nn.Module, reconstruction, rec_metric: str):
        train_cfg, optim_cfg = cfg.train, cfg.optim
        self.accelerator, self.loss_cfg, self.optim_cfg = accelerator, cfg.loss, optim_cfg
        self.health, self.memory_format, self.rec_metric = health, memory_format, rec_metric
        self.model_config = vars(cfg.model).copy()
        self.reconstruction = reconstruction
        self.feature_network = reconstruction.features if isinstance(reconstruction, FeaturePerceptualLoss) else None
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.compiled = compile_mode(cfg, accelerator, self.one_network)
        if self.compiled == "loss" and isinstance(reconstruction, torch.nn.Module):
            reconstruction.compile()
        compiled_update = self.compiled == "step" and compiles_update(accelerator)
        model = model.to(memory_format=torch.contiguous_format if deepspeed else memory_format)
        model = prepare_batch_norm(model, accelerator, train_cfg.sync_bn, train_cfg.batch_size)
        optimizer = adam(model, optim_cfg, None if deepspeed else accelerator.device,  # DeepSpeed: its own loop
                         compiled=compiled_update)
        if deepspeed:  # ZeRO cannot flatten channels-last parameters
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
            check_deepspeed(accelerator, train_cfg.grad_accum, optim_cfg.grad_clip, train_cfg.on_nonfinite)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.optimizers = [self.optimizer]
        self.compiled_step = None
        if self.compiled == "step":
            self.compiled_step = CompiledStep(lambda x: self.losses(x)[0], list(model.parameters()), optimizer,
                                              optim_cfg.grad_clip, train_cfg.batch_size, captures_graphs(accelerator),
                                              compiled_update, functools.partial(say, accelerator))

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def losses(self, x: torch.Tensor, model=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x_hat, mu, logvar = (model or self.model)(x)
        terms = vae_loss(x, x_hat, mu, logvar, self.loss_cfg.alpha, self.loss_cfg.beta, self.reconstruction)
        return {metric_name(term, self.rec_metric): value for term, value in terms.items()}, x_hat

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        """One optimizer step; skipped as a whole (no update) when any micro-batch's loss is non-finite
        under policy `skip`. Metrics are the means over the micro-batches."""
        acc, sums, skipped, compiled = self.accelerator, {}, False, self.compiled_step
        if compiled:
            compiled.begin()
        for x in micro_batches:
            with acc.accumulate(self.model):
                terms = compiled.losses(x) if compiled else self.losses(x)[0]
                if not self.health.finite(terms["total"], step):
                    skipped = True
                    continue
                acc.backward(terms["total"])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / len(micro_batches)
        compiled_update = compiled is not None and compiled.updates
        if not skipped:
            # None under DeepSpeed before its first step
            norm = compiled.grad_norm() if compiled_update else clip_or_norm(acc, self.model, self.optim_cfg.grad_clip)
            if norm is not None:  # a finite loss can still give infinite gradients, and NaN weights after the step
                sums["grad_norm"] = torch.as_tensor(norm, device=acc.device)  # DeepSpeed's norm is a float
                skipped = not gradients_finite(acc, self.health, sums["grad_norm"], step)
        if not skipped and compiled_update:
            compiled.optimizer_step()
        elif not skipped:
            skipped = not optimizer_stepped(acc, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        if skipped:
            return StepResult({}, True)
        norms = [sums["grad_norm"]] if "grad_norm" in sums else []  # none under DeepSpeed's first step
        return StepResult(sums, False, fp16_overflow(acc, self.optimizer, *norms) if norms else None)

    @torch.no_grad()
    def validation_loss(self, source, batch_size: int, max_batches: int, skip_corrupt: bool = False) -> float:
        """Mean total loss over the first `max_batches` batches of the val split on every rank."""
        acc = self.accelerator
        total = torch.zeros(2, device=acc.device)  # loss x images, images
        stream = EvalStream(source, batch_size, acc.process_index, acc.num_processes, skip_corrupt)
        with eval_mode(acc.unwrap_model(self.model)) as net:
            for i, batch in enumerate(make_loader(stream, 0)):
                if i >= max_batches:
                    break
                x = model_input(batch["image"], acc.device, self.memory_format)
                terms, _ = self.losses(x, net)
                total[0] += terms["total"] * x.shape[0]
                total[1] += x.shape[0]  # a kernel argument, not a tensor made from host data
        total = acc.reduce(total, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).item()


def adversarial_update(recipe, loss: torch.Tensor, net, optimizer, step: int) -> torch.Tensor | None:
    """One update of `net` on `loss` (zero, backward, clip, step); its gradient norm, or None when the step is
    skipped (a non-finite loss under policy `skip`, non-finite gradients, or an fp16 overflow)."""
    if not recipe.health.finite(loss, step):
        return None
    optimizer.zero_grad(set_to_none=True)
    recipe.accelerator.backward(loss)
    norm = clip_or_norm(recipe.accelerator, net, recipe.optim_cfg.grad_clip)
    if not gradients_finite(recipe.accelerator, recipe.health, norm, step):
        return None
    return norm if optimizer_stepped(recipe.accelerator, optimizer) else None


class VAEGANRecipe(VAERecipe):
    """dfcvae-gan (Larsen et al.'s VAE/GAN, on the DFC-VAE objective): per batch, a discriminator step on images
    against reconstructions and samples of N(0, I), then a VAE step on alpha x KL + beta x perceptual +
    `loss.adversarial_weight` x the decoder's non-saturating GAN loss on the same reconstructions and samples.
    `model` holds `vae` and `discriminator`; they are prepared apart, each with its own Adam."""

    one_network = False

    def __init__(self, cfg: Config, accelerator, health: LossHealth, memory_format: torch.memory_format,
                 model: torch.nn.Module, reconstruction, rec_metric: str):
        check_deepspeed_single_model(accelerator, cfg.model.name)
        self.container = model
        super().__init__(cfg, accelerator, health, memory_format, model.vae, reconstruction, rec_metric)
        discriminator = prepare_batch_norm(model.discriminator.to(memory_format=memory_format), accelerator,
                                           cfg.train.sync_bn, cfg.train.batch_size)
        self.discriminator, self.opt_d = accelerator.prepare(discriminator,
                                                             adam(discriminator, cfg.optim, accelerator.device))
        self.optimizers = [self.optimizer, self.opt_d]
        self.adversarial_weight = cfg.loss.adversarial_weight

    @property
    def module(self) -> torch.nn.Module:
        return self.container

    def weights(self) -> dict[str, torch.Tensor]:
        return self.container.state_dict()

    def generator_for_images(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        (x,) = micro_batches
        terms, x_hat = self.losses(x)
        z = torch.randn(x.shape[0], self.accelerator.unwrap_model(self.model).latent_dim, device=x.device)
        fakes = torch.cat([x_hat, self.accelerator.unwrap_model(self.model).decode(z)])
        loss_d = discriminator_loss(self.discriminator(x), self.discriminator(fakes.detach()))  # see GANRecipe
        norm_d = adversarial_update(self, loss_d, self.discriminator, self.opt_d, step)
        if norm_d is None:
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(skipped=True)
        terms["adversarial"] = generator_loss(self.discriminator(fakes))
        terms["total"] = terms["total"] + self.adversarial_weight * terms["adversarial"]
        grad_norm = adversarial_update(self, terms["total"], self.model, self.optimizer, step)
        if grad_norm is None:
            return StepResult(skipped=True)
        metrics = {**terms, "loss_d": loss_d, "grad_norm": grad_norm}
        return StepResult({k: v.detach() for k, v in metrics.items()},
                          overflow=fp16_overflow(self.accelerator, self.opt_d, norm_d, grad_norm))


class GANRecipe(Recipe):
    """DCGAN: `model` holds `generator` and `discriminator`, prepared apart, each with its own Adam."""

    def __init__(self, cfg: Config, accelerator, health: LossHealth, memory_format: torch.memory_format,
                 model: torch.nn.Module):
        check_deepspeed_single_model(accelerator, cfg.model.name)
        self.accelerator, self.optim_cfg, self.health = accelerator, cfg.optim, health
        self.model_config = vars(cfg.model).copy()
        self.latent_dim = cfg.model.latent_dim
        compile_mode(cfg, accelerator, one_network=False)  # says so if train.compile=step; nothing else to compile
        self.gan = prepare_batch_norm(model.to(memory_format=memory_format), accelerator, cfg.train.sync_bn,
                                      cfg.train.batch_size)  # both networks, unwrapped
        nets = [self.gan.generator, self.gan.discriminator]
        optimizers = [adam(n, cfg.optim, accelerator.device) for n in nets]
        self.generator, self.discriminator, self.opt_g, self.opt_d = accelerator.prepare(*nets, *optimizers)
        self.optimizers = [self.opt_g, self.opt_d]

    @property
    def module(self) -> torch.nn.Module:
        return self.gan

    def weights(self) -> dict[str, torch.Tensor]:
        return self.gan.state_dict()

    def generator_for_images(self) -> torch.nn.Module:
        return self.gan

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        """A discriminator step on real vs fake, then a generator step (non-saturating loss). Reals and fakes
        go through the discriminator as separate batches, as the generator step's fakes do: its batch norm
        must see the same all-fake batches in both steps, or it judges a fake in a mixed batch by other
        statistics than the generator is trained against (the generator then collapses to one image)."""
        (x,) = micro_batches
        fake = self.generator(torch.randn(x.shape[0], self.latent_dim, device=x.device))
        loss_d = discriminator_loss(self.discriminator(x), self.discriminator(fake.detach()))
        norm_d = adversarial_update(self, loss_d, self.discriminator, self.opt_d, step)
        if norm_d is None:
            return StepResult(skipped=True)
        loss_g = generator_loss(self.discriminator(fake))
        grad_norm = adversarial_update(self, loss_g, self.generator, self.opt_g, step)
        if grad_norm is None:
            return StepResult(skipped=True)
        metrics = {"total": loss_g + loss_d, "loss_d": loss_d, "loss_g": loss_g, "grad_norm": grad_norm}
        return StepResult({k: v.detach() for k, v in metrics.items()},
                          overflow=fp16_overflow(self.accelerator, self.opt_d, norm_d, grad_norm))
