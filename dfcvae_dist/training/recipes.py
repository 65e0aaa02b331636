"""One recipe per model family. A recipe prepares its modules and optimizers with accelerate, takes one
optimizer step over `grad_accum` micro-batches, gives its weights and decodes samples, so the trainer's
loop never asks which model it trains.

- `VAERecipe`: DFC-VAE (feature perceptual loss on a frozen VGG19 that is never prepared, wrapped or
  saved) and PVAE (pixel loss).
- `GANRecipe`: DCGAN, one discriminator and one generator step per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from accelerate.utils import DistributedType

from dfcvae_dist.config import Config, LossConfig, ModelConfig, OptimConfig
from dfcvae_dist.data.loader import EvalStream, make_loader, model_input
from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import FeaturePerceptualLoss, discriminator_loss, generator_loss, vae_loss
from dfcvae_dist.models import build_model


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


def is_finite(accelerator, loss: torch.Tensor, step: int, policy: str) -> bool:
    """True: go on. False: skip (policy `skip`). Policy `stop` raises, before any checkpoint."""
    ranks = nonfinite_ranks(accelerator, loss)
    if ranks and policy == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {step} on rank(s) {', '.join(map(str, ranks))}; no "
                            "checkpoint was written from this state (train.on_nonfinite=skip skips such steps)")
    return not ranks


def clip_or_norm(accelerator, module, max_norm: float | None) -> torch.Tensor:
    return accelerator.clip_grad_norm_(module.parameters(), max_norm if max_norm is not None else float("inf"))


def set_lr(optimizers, lr: float) -> None:
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


class VAERecipe:
    validates = True

    def __init__(self, accelerator, model_cfg: ModelConfig, loss_cfg: LossConfig, optim_cfg: OptimConfig,
                 on_nonfinite: str, batch_size: int, memory_format: torch.memory_format):
        self.accelerator, self.loss_cfg, self.optim_cfg = accelerator, loss_cfg, optim_cfg
        self.on_nonfinite, self.memory_format = on_nonfinite, memory_format
        self.model_config = vars(model_cfg).copy()
        self.perceptual = None
        if model_cfg.name == "dfcvae":
            with accelerator.main_process_first():  # the main process fetches ImageNet weights, the others read the cache
                self.perceptual = FeaturePerceptualLoss.from_config(loss_cfg, accelerator.device).to(
                    memory_format=memory_format)
        model = build_model(model_cfg).to(memory_format=memory_format)
        optimizer = torch.optim.Adam(model.parameters(), optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2),
                                     weight_decay=optim_cfg.weight_decay)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
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
                if not is_finite(acc, terms["total"], step, self.on_nonfinite):
                    skipped = True
                    continue
                acc.backward(terms["total"])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach() / len(micro_batches)
        if not skipped:
            sums["grad_norm"] = clip_or_norm(acc, self.model, self.optim_cfg.grad_clip)
            self.optimizer.step()
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
    def validation_loss(self, source, batch_size: int, max_batches: int) -> float:
        """Mean total loss over the first `max_batches` batches of the val split on every rank."""
        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        net.eval()
        total = torch.zeros(2, device=acc.device)
        stream = EvalStream(source, batch_size, acc.process_index, acc.num_processes)
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

    def __init__(self, accelerator, model_cfg: ModelConfig, optim_cfg: OptimConfig, on_nonfinite: str,
                 grad_accum: int, memory_format: torch.memory_format):
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            raise UserError("model.name=dcgan is not supported under DeepSpeed (two models, two optimizers); "
                            "use DDP (an accelerate config without deepspeed)")
        if grad_accum > 1:
            raise UserError(f"model.name=dcgan does not support train.grad_accum={grad_accum}: its discriminator "
                            "and generator step on every batch; raise train.batch_size instead")
        self.accelerator, self.optim_cfg, self.on_nonfinite = accelerator, optim_cfg, on_nonfinite
        self.model_config = vars(model_cfg).copy()
        self.latent_dim = model_cfg.latent_dim
        self.gan = build_model(model_cfg).to(memory_format=memory_format)  # holds both networks, unwrapped
        betas = (optim_cfg.beta1, optim_cfg.beta2)
        nets = [self.gan.generator, self.gan.discriminator]
        optimizers = [torch.optim.Adam(n.parameters(), optim_cfg.lr, betas=betas) for n in nets]
        self.generator, self.discriminator, self.opt_g, self.opt_d = accelerator.prepare(*nets, *optimizers)
        self.optimizers = [self.opt_g, self.opt_d]

    @property
    def module(self) -> torch.nn.Module:
        return self.gan

    def _update(self, loss: torch.Tensor, net, optimizer, step: int) -> torch.Tensor | None:
        if not is_finite(self.accelerator, loss, step, self.on_nonfinite):
            return None
        optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(loss)
        norm = clip_or_norm(self.accelerator, net, self.optim_cfg.grad_clip)
        optimizer.step()
        return norm

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


def build_recipe(cfg: Config, accelerator, memory_format: torch.memory_format) -> VAERecipe | GANRecipe:
    if cfg.model.name == "dcgan":
        return GANRecipe(accelerator, cfg.model, cfg.optim, cfg.train.on_nonfinite, cfg.train.grad_accum,
                         memory_format)
    return VAERecipe(accelerator, cfg.model, cfg.loss, cfg.optim, cfg.train.on_nonfinite, cfg.train.batch_size,
                     memory_format)
