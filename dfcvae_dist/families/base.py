"""What the framework asks of a model family: `ModelFamily`, the protocol every family implements (the built-ins in
this package, or a plug-in registered under the entry point group `dfcvae_dist.families`; docs/extending.md).

The trainer, the run page, the evaluations, the sweeps, the report and the figures ask the family; none of them
compares `model.name` with a family's name."""

from __future__ import annotations

from torch import nn

from dfcvae_dist.config import Config, ModelConfig
from dfcvae_dist.errors import UserError
from dfcvae_dist.metrics import Metric

# Config keys only a family with a feature network reads (left out of the others' MLflow params).
FEATURE_NETWORK_KEYS = {"loss.network", "loss.layers", "loss.layer_weights", "loss.feature_scale",
                        "loss.network_weights", "loss.network_dtype", "loss.network_seed"}
VALIDATION_KEYS = {"train.val_every_steps", "train.val_batches", "data.val_shards"}


class ModelFamily:
    """A model family. Subclass it, set the attributes and implement `build_model` and `build_recipe`; the
    defaults describe a VAE without a feature network.

    Attributes:
    - `name`: the `model.name` that selects it;
    - `title`: how run pages and reports name it, e.g. "DFC-VAE (feature perceptual loss)";
    - `encodes`: it has an encoder, so it reconstructs, its latents are extracted and scored by the attribute
      SVMs, and its reconstructions are drawn;
    - `feature_network`: its loss runs a frozen feature network (`loss.network`) on every rank;
    - `validates`: it computes a validation loss (`val/total`);
    - `evaluations`: the evaluation steps a sweep runs for it, in order (`extract`, `svm`, `quality`);
    - `in_paper`: the paper trained it (DFC-VAE, PVAE, DCGAN); a report marks the others as extra runs;
    - `accumulates`: it can accumulate gradients over micro-batches (`train.grad_accum`); a family whose two
      networks step on every batch cannot."""

    name: str = ""
    title: str = ""
    encodes: bool = True
    feature_network: bool = False
    validates: bool = True
    evaluations: tuple[str, ...] = ("extract", "svm", "quality")
    in_paper: bool = False
    accumulates: bool = True

    def check_config(self, cfg: Config) -> None:
        """Refuse what this family cannot train, naming the keys (raise `UserError`); fill in its defaults."""
        from dfcvae_dist.losses.feature_networks import DEFAULT_LAYERS, check_network

        if not self.accumulates and cfg.train.grad_accum > 1:
            raise UserError(f"model.name={self.name} does not support train.grad_accum={cfg.train.grad_accum}: its "
                            "two networks step on every batch; raise train.batch_size instead")

        if self.feature_network:
            check_network(cfg.loss.network, [])
        if cfg.loss.layers is None:  # filled in for every family, so a config reads the same whatever the family
            cfg.loss.layers = list(DEFAULT_LAYERS.get(cfg.loss.network, [])) or None
        if self.feature_network:
            if cfg.loss.layers is None:
                raise UserError(f"loss.layers: name the layers of loss.network={cfg.loss.network} the loss compares")
            check_network(cfg.loss.network, cfg.loss.layers)

    def unused_keys(self, cfg: Config) -> set[str]:
        """Config keys this family never reads: left out of its MLflow params."""
        unused = set() if self.feature_network else set(FEATURE_NETWORK_KEYS)
        if not self.validates:
            unused |= VALIDATION_KEYS
        return unused | {"loss.adversarial_weight"}

    def build_model(self, model_cfg: ModelConfig) -> nn.Module:
        """The whole trained model (what a checkpoint's weights load into)."""
        raise NotImplementedError

    def inference_model(self, model: nn.Module) -> nn.Module:
        """The part of the trained model that encodes (if it `encodes`), decodes and samples: `encode(x)`,
        `decode(z)`, `sample(n, generator)`."""
        return model

    def build_recipe(self, cfg: Config, accelerator, health, memory_format):
        """Its `training.recipes.Recipe`."""
        raise NotImplementedError

    def metrics(self, cfg: Config | None = None) -> list[Metric]:
        """The training metrics it logs besides `metrics.TRAINING` (`cfg` None: as docs/metrics.md lists them)."""
        return []

    def loss_lines(self, cfg: Config, feature_weights: str) -> list[str]:
        """Markdown lines of the run page about its loss, beside the model and data lines."""
        return []

    def images_caption(self) -> str:
        """What the run page's image panels show."""
        return ("`reconstructions`, the same faces every time (input above reconstruction, decoded from the mean of "
                "z); `samples`, decoded from one fixed z.")

    def samples_label(self, run_name: str) -> str:
        """Its row label in a figure of samples where the VAEs decode one shared z."""
        return run_name
