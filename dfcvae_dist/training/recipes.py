"""One recipe per model family. A recipe prepares its modules and optimizers with accelerate, takes one
optimizer step over `grad_accum` micro-batches, gives its weights and decodes samples, so the trainer's
loop never asks which model it trains.

- `VAERecipe`: DFC-VAE (feature perceptual loss on a frozen VGG19 that is never prepared, wrapped or
  saved) and PVAE (pixel loss).
- `GANRecipe`: DCGAN, one discriminator and one generator step per batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType

from dfcvae_dist.config import Config, LossConfig, ModelConfig, OptimConfig, TrainConfig
from dfcvae_dist.data.loader import EvalStream, make_loader, model_input
from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import FeaturePerceptualLoss, discriminator_loss, generator_loss, vae_loss
from dfcvae_dist.models import build_model

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one optimizer step gives the loop: detached scalar metrics (device tensors: reading them is the
    loop's choice, at log steps only), the last micro-batch's images, and whether the step was skipped."""

    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    images: tuple[torch.Tensor, torch.Tensor] | None = None  # (inputs, reconstructions or fakes)
    skipped: bool = False


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
        self.first_bad = torch.where(bad & (self.first_bad == 0), step, self.first_bad)
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
    (reading that flag costs no host sync of ours: the scaler's step has already read it)."""
    optimizer.step()
    return accelerator.scaler is None or not optimizer.step_was_skipped


def set_lr(optimizers, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


def metric_name(term: str, pixel: bool) -> str:
    """The logged name of a loss term, saying what the reconstruction term measures: `rec_pixel` (PVAE),
    `rec_perceptual` (DFC-VAE, the sum over layers) and `rec_perceptual/<layer>`."""
    if term == "rec":
        return "rec_pixel" if pixel else "rec_perceptual"
    if term.startswith("rec_"):
        return "rec_perceptual/" + term.removeprefix("rec_")
    return term


class VAERecipe:
    validates = True

    def __init__(self, accelerator, model_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                 health: LossHealth, train_cfg: TrainConfig, memory_format: torch.memory_format):
        self.accelerator, self.loss_cfg, self.optim_cfg = accelerator, loss_cfg, optim_cfg
        self.health, self.memory_format = health, memory_format
        self.model_config = vars(model_cfg).copy()
        self.perceptual = None
        if model_cfg.name == "dfcvae":
            with accelerator.main_process_first():  # the main process fetches ImageNet weights, the others read the cache
                self.perceptual = FeaturePerceptualLoss.from_config(loss_cfg, accelerator.device).to(
                    memory_format=memory_format)
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        model = build_model(model_cfg).to(memory_format=torch.contiguous_format if deepspeed else memory_format)
        model = prepare_batch_norm(model, accelerator, train_cfg.sync_bn, train_cfg.batch_size)
        optimizer = torch.optim.Adam(model.parameters(), optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                     weight_decay=optim_cfg.weight_decay)
        if deepspeed:  # ZeRO cannot flatten channels-last parameters
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = train_cfg.batch_size
            check_deepspeed(accelerator, train_cfg.grad_accum, optim_cfg.grad_clip, train_cfg.on_nonfinite)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.optimizers = [self.optimizer]

    @property
    def weights_source(self) -> str:
        return self.perceptual.weights_source if self.perceptual is not None else "none"

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def losses(self, x: torch.Tensor, model=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        x_hat, mu, logvar = (model or self.model)(x)
        return vae_loss(x, x_hat, mu, logvar, self.loss_cfg.alpha, self.loss_cfg.beta, self.perceptual), x_hat

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        """One optimizer step; skipped as a whole (no update) when any micro-batch's loss is non-finite
        under policy `skip`. Metrics are the means over the micro-batches."""
        acc, sums, skipped = self.accelerator, {}, False
        for x in micro_batches:
            with acc.accumulate(self.model):
                terms, x_hat = self.losses(x)
                if not self.health.finite(terms["total"], step):
                    skipped = True
                    continue
                acc.backward(terms["total"])
            for term, value in terms.items():
                name = metric_name(term, pixel=self.perceptual is None)
                sums[name] = sums.get(name, 0.0) + value.detach() / len(micro_batches)
        if not skipped:
            norm = clip_or_norm(acc, self.model, self.optim_cfg.grad_clip)  # None under DeepSpeed before its first step
            if norm is not None:  # a finite loss can still give infinite gradients, and NaN weights after the step
                sums["grad_norm"] = torch.as_tensor(norm, device=acc.device)
                skipped = not gradients_finite(acc, self.health, sums["grad_norm"], step)
        if not skipped:
            skipped = not optimizer_stepped(acc, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult({} if skipped else sums, (x, x_hat.detach()), skipped)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.accelerator.get_state_dict(self.model)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        net = self.accelerator.unwrap_model(self.model)
        was_training = net.training
        net.eval()
        images = net.decode(z.to(self.accelerator.device))
        net.train(was_training)
        return images

    @torch.no_grad()
    def validation_loss(self, source, batch_size: int, max_batches: int, skip_corrupt: bool = False) -> float:
        """Mean total loss over the first `max_batches` batches of the val split on every rank."""
        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        net.eval()
        total = torch.zeros(2, device=acc.device)
        stream = EvalStream(source, batch_size, acc.process_index, acc.num_processes, skip_corrupt)
        for i, batch in enumerate(make_loader(stream, 0)):
            if i >= max_batches:
                break
            x = model_input(batch["image"], acc.device, self.memory_format)
            terms, _ = self.losses(x, net)
            total += torch.stack([terms["total"] * x.shape[0], torch.tensor(float(x.shape[0]), device=x.device)])
        net.train()
        total = acc.reduce(total, reduction="sum")
        return (total[0] / total[1].clamp(min=1)).item()


class GANRecipe:
    validates = False
    weights_source = "none"
    perceptual = None

    def __init__(self, accelerator, model_cfg: ModelConfig, optim_cfg: OptimConfig, health: LossHealth,
                 train_cfg: TrainConfig, memory_format: torch.memory_format):
        grad_accum = train_cfg.grad_accum
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("model.name=dcgan is not supported under DeepSpeed (two models, two optimizers); "
                            "use DDP (an accelerate config without deepspeed)")
        if grad_accum > 1:
            raise UserError(f"model.name=dcgan does not support train.grad_accum={grad_accum}: its discriminator "
                            "and generator step on every batch; raise train.batch_size instead")
        self.accelerator, self.optim_cfg, self.health = accelerator, optim_cfg, health
        self.model_config = vars(model_cfg).copy()
        self.latent_dim = model_cfg.latent_dim
        gan = build_model(model_cfg).to(memory_format=memory_format)
        self.gan = prepare_batch_norm(gan, accelerator, train_cfg.sync_bn, train_cfg.batch_size)  # both networks, unwrapped
        betas = (optim_cfg.beta1, optim_cfg.beta2)
        nets = [self.gan.generator, self.gan.discriminator]
        optimizers = [torch.optim.Adam(n.parameters(), optim_cfg.lr, betas=betas) for n in nets]
        self.generator, self.discriminator, self.opt_g, self.opt_d = accelerator.prepare(*nets, *optimizers)
        self.optimizers = [self.opt_g, self.opt_d]

    @property
    def module(self) -> torch.nn.Module:
        return self.gan

    def _update(self, loss: torch.Tensor, net, optimizer, step: int) -> torch.Tensor | None:
        if not self.health.finite(loss, step):
            return None
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        norm = clip_or_norm(self.accelerator, net, self.optim_cfg.grad_clip)
        if not gradients_finite(self.accelerator, self.health, norm, step):
            return None
        return norm if optimizer_stepped(self.accelerator, optimizer) else None

    def train_step(self, micro_batches: list[torch.Tensor], step: int) -> StepResult:
        """A discriminator step on real vs fake, then a generator step (non-saturating loss)."""
        (x,) = micro_batches
        fake = self.generator(torch.randn(x.shape[0], self.latent_dim, device=x.device))
        logits = self.discriminator(torch.cat([x, fake.detach()]))
        loss_d = discriminator_loss(logits[: x.shape[0]], logits[x.shape[0]:])
        if self._update(loss_d, self.discriminator, self.opt_d, step) is None:
            return StepResult(skipped=True)
        loss_g = generator_loss(self.discriminator(fake))
        grad_norm = self._update(loss_g, self.generator, self.opt_g, step)
        if grad_norm is None:
            return StepResult(skipped=True)
        metrics = {"total": loss_g + loss_d, "loss_d": loss_d, "loss_g": loss_g, "grad_norm": grad_norm}
        return StepResult({k: v.detach() for k, v in metrics.items()}, (x, fake.detach()))

    def weights(self) -> dict[str, torch.Tensor]:
        return self.gan.state_dict()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.gan.eval()
        images = self.gan.generator(z.to(self.accelerator.device))
        self.gan.train()
        return images


def recipe_class(cfg: Config) -> type[VAERecipe] | type[GANRecipe]:
    return GANRecipe if cfg.model.name == "dcgan" else VAERecipe


def build_recipe(cfg: Config, accelerator, health: LossHealth,
                 memory_format: torch.memory_format) -> VAERecipe | GANRecipe:
    if recipe_class(cfg) is GANRecipe:
        return GANRecipe(accelerator, cfg.model, cfg.optim, health, cfg.train, memory_format)
    return VAERecipe(accelerator, cfg.model, cfg.loss, cfg.optim, health, cfg.train, memory_format)
