"""`train.compile`: which parts of a training step a run compiles, and the compiled step of a one-network recipe.

- `off`: eager.
- `loss`: the recipe `torch.compile`s its loss network and distances (the feature perceptual loss).
- `step`: the forward and the loss in one compiled function, whose backward is AOTAutograd's compiled backward
  graph; the gradient norm (clipped) in a second and the optimizer step in a third (torch.optim breaks the graph
  around its step on purpose). On one CUDA GPU all run as CUDA graphs (inductor's `triton.cudagraphs`, what
  `mode="reduce-overhead"` sets), with Adam capturable and its learning rate a device tensor: the per-epoch schedule
  writes into that tensor, so it neither recompiles nor records anew. Random draws come from torch's generator
  (`fallback_random`), as in the eager step.

Where `step` cannot work, one line says so and the run falls back (`compile_mode`, `CompiledStep`).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from accelerate.utils import DistributedType

log = logging.getLogger(__name__)


def say(accelerator, text: str) -> None:
    """One line, from the main process only."""
    if accelerator.is_main_process:
        log.warning("%s", text)


def compile_mode(cfg, accelerator, one_network: bool) -> str:
    """`train.compile` as this run can honour it: `step` falls back to `loss` under DeepSpeed (its engine runs the
    backward and the optimizer step) and for families that step two networks in turn."""
    if cfg.train.compile != "step":
        return cfg.train.compile
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        reason = "DeepSpeed's engine runs the backward and the optimizer step"
    elif not one_network:
        reason = f"model.name={cfg.model.name} steps two networks in turn, each with its own optimizer"
    else:
        return "step"
    say(accelerator, f"train.compile=step: {reason}; falling back to train.compile=loss (its feature network, if any)")
    return "loss"


def captures_graphs(accelerator) -> bool:
    """CUDA graphs on one CUDA device in one process; with several, DDP's all-reduce of the gradients runs between
    the compiled parts, and the step is compiled without graphs."""
    if accelerator.device.type != "cuda":
        return False
    if accelerator.num_processes > 1:
        say(accelerator, f"train.compile=step with {accelerator.num_processes} processes: compiled without CUDA "
                         "graphs (DDP all-reduces the gradients between the compiled parts)")
        return False
    return True


def compiles_update(accelerator) -> bool:
    """Whether the optimizer step can be compiled: not under fp16, whose GradScaler unscales and steps eagerly."""
    if accelerator.scaler is None:
        return True
    say(accelerator, "train.compile=step under fp16: the optimizer step stays eager (fused Adam takes the GradScaler's "
                     "verdict on the device, without a host sync); forward, loss and backward are compiled")
    return False


class CompiledStep:
    """The compiled parts of one optimizer step of a one-network recipe: `losses(x)` (forward and loss; backward
    compiled through it), `grad_norm()` (global gradient norm, clipped to `max_norm` unless None) and
    `optimizer_step()` (when `updates`; else the caller keeps its eager ones), as CUDA graphs when `graphs`. Call
    `begin()` at the start of every step. A batch of another size than `batch_size` runs its forward and backward
    eagerly (`say` says so once)."""

    def __init__(self, losses: Callable, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                 max_norm: float | None, batch_size: int, graphs: bool, updates: bool,
                 say: Callable[[str], None] = log.warning):
        self.graphs, self.updates = graphs, updates
        options = {"fallback_random": True, "triton.cudagraphs": graphs}
        self.eager_losses, self.batch_size, self.say = losses, batch_size, say
        self.params, self.optimizer, self.max_norm = params, optimizer, max_norm
        self.compiled_losses = torch.compile(losses, options=options)
        self.grad_norm = torch.compile(self._grad_norm, options=options)
        self.optimizer_step = torch.compile(self._optimizer_step, options=options)
        self.odd_batch_said = False

    def begin(self) -> None:
        if self.graphs:  # the outputs of the previous step's graphs may be overwritten from here on
            torch.compiler.cudagraph_mark_step_begin()

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[0] == self.batch_size:
            return self.compiled_losses(x)
        if not self.odd_batch_said:
            self.odd_batch_said = True
            self.say(f"train.compile=step: a batch of {x.shape[0]} images, not train.batch_size={self.batch_size}: "
                     "its forward and backward run eagerly")
        return self.eager_losses(x)

    def _grad_norm(self) -> torch.Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.max_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_norm, norm, foreach=True)
        return norm

    def _optimizer_step(self) -> None:
        self.optimizer.step()
