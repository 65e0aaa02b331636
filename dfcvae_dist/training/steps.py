"""One optimizer step of each model family. Both return the loss terms for logging (detached floats are
made by the caller) and never step when a rank saw a non-finite loss."""

from __future__ import annotations

import torch

from dfcvae_dist.errors import UserError
from dfcvae_dist.losses import discriminator_loss, generator_loss, vae_loss


class NonFiniteLoss(UserError):
    pass


def nonfinite_ranks(accelerator, loss: torch.Tensor) -> list[int]:
    """The ranks whose loss is NaN or Inf (one all-reduce, so every rank gets the same answer)."""
    bad = torch.zeros(accelerator.num_processes, device=accelerator.device)
    bad[accelerator.process_index] = float(not torch.isfinite(loss.detach()).all())
    return torch.nonzero(accelerator.reduce(bad, reduction="sum")).flatten().tolist()


def _check(accelerator, total: torch.Tensor, step: int, policy: str) -> bool:
    """True: go on. False: skip this step (policy `skip`). Policy `stop` raises, before any checkpoint."""
    ranks = nonfinite_ranks(accelerator, total)
    if not ranks:
        return True
    if policy == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {step} on rank(s) {', '.join(map(str, ranks))}; no "
                            "checkpoint was written from this state (train.on_nonfinite=skip skips such steps)")
    return False


def vae_step(accelerator, model, optimizer, perceptual, x, cfg, step: int) -> dict | None:
    """DFC-VAE (perceptual given) or PVAE step; None when the step was skipped for a non-finite loss."""
    with accelerator.accumulate(model):
        x_hat, mu, logvar = model(x)
        terms = vae_loss(x, x_hat, mu, logvar, cfg.loss.alpha, cfg.loss.beta, perceptual)
        if not _check(accelerator, terms["total"], step, cfg.train.on_nonfinite):
            optimizer.zero_grad(set_to_none=True)
            return None
        accelerator.backward(terms["total"])
        if accelerator.sync_gradients:
            terms["grad_norm"] = _clip_or_norm(accelerator, model, cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    terms["_images"] = (x, x_hat)
    return terms


def gan_step(accelerator, models, optimizers, x, cfg, step: int) -> dict | None:
    """DCGAN: one discriminator step on real vs fake, then one generator step (non-saturating)."""
    generator, discriminator = models
    opt_g, opt_d = optimizers
    z = torch.randn(x.shape[0], cfg.model.latent_dim, device=x.device)
    fake = generator(z)
    logits = discriminator(torch.cat([x, fake.detach()]))
    loss_d = discriminator_loss(logits[: x.shape[0]], logits[x.shape[0]:])
    if not _check(accelerator, loss_d, step, cfg.train.on_nonfinite):
        return None
    opt_d.zero_grad(set_to_none=True)
    accelerator.backward(loss_d)
    _clip_or_norm(accelerator, discriminator, cfg.optim.grad_clip)
    opt_d.step()
    loss_g = generator_loss(discriminator(fake))
    if not _check(accelerator, loss_g, step, cfg.train.on_nonfinite):
        return None
    opt_g.zero_grad(set_to_none=True)
    accelerator.backward(loss_g)
    grad_norm = _clip_or_norm(accelerator, generator, cfg.optim.grad_clip)
    opt_g.step()
    return {"total": loss_g + loss_d, "loss_d": loss_d, "loss_g": loss_g, "grad_norm": grad_norm,
            "_images": (x, fake)}


def _clip_or_norm(accelerator, model, max_norm: float | None) -> torch.Tensor:
    return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else float("inf"))
