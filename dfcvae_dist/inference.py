"""Using a trained model: load a checkpoint's consolidated weights (no accelerate, no DeepSpeed, no
pickle), from a run directory, a checkpoint folder or a model logged to MLflow, encode images, decode
latents, sample."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dfcvae_dist.config import Config, load_config
from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.families import get_family
from dfcvae_dist.models import VAE
from dfcvae_dist.rundir import CONFIG_FILE, WEIGHTS_FILE, best_checkpoint, find_checkpoint

WHICH = ("latest", "best")


def resolve_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint folder, or a run directory's checkpoint: its newest complete one (`which="latest"`) or the one
    `checkpoints/best` names (`"best"`: the best validated step of a run trained with checkpoint.keep_best)."""
    if which not in WHICH:
        raise UserError(f"which={which!r}: one of {', '.join(WHICH)}")
    path = Path(path)
    if (path / WEIGHTS_FILE).is_file():
        return path
    if which == "best" and path.is_dir():
        found = best_checkpoint(path)
        if found is None:
            raise UserError(f"{path}: no best checkpoint (checkpoints/best); it is kept by training with "
                            "checkpoint.keep_best=METRIC, e.g. val/total")
        return found
    found = find_checkpoint(path, "auto") if path.is_dir() else None
    if found is None:
        raise UserError(f"{path}: neither a checkpoint (no {WEIGHTS_FILE}) nor a run directory with one")
    return found


MODEL_URI_SCHEMES = ("models:/", "runs:/")


def load_trained(path: str | Path, expect: type | None = VAE,
                 which: str = "latest") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, its config, the checkpoint folder). `path`: a run directory (its `which` checkpoint:
    latest or best), a checkpoint folder, or an MLflow model URI (`load_model_uri`). The model is what its family
    encodes, decodes and samples with (dfcvae-gan: the VAE without its discriminator). `expect`: the model class
    required (None: any)."""
    if str(path).startswith(MODEL_URI_SCHEMES):
        return load_model_uri(str(path), expect=expect)
    checkpoint = resolve_checkpoint(path, which)
    cfg = load_config(checkpoint / CONFIG_FILE)
    model = load_weights(cfg.model.name, cfg.model, checkpoint / WEIGHTS_FILE)
    if expect is not None and not isinstance(model, expect):
        raise UserError(f"{checkpoint}: a {cfg.model.name} checkpoint, but this needs a {expect.__name__} "
                        "(a family that encodes)")
    return model, cfg, checkpoint


def load_weights(family: str, model_cfg, path: Path) -> torch.nn.Module:
    """The family's model with the weights file's tensors, in eval mode: the part that encodes and decodes."""
    family = get_family(family)
    model = family.build_model(model_cfg)
    try:
        model.load_state_dict(load_file(str(path)))
    except (SafetensorError, RuntimeError, OSError) as err:
        raise UserError(f"{path}: does not load into {family.name} ({one_line(err)})") from None
    return family.inference_model(model).eval()


def load_model_uri(uri: str, tracking_uri: str | None = None, dst: str | Path | None = None,
                   expect: type | None = VAE) -> tuple[torch.nn.Module, Config, Path]:
    """A model logged by training (`models:/<model_id>`, or `runs:/<run_id>/model` for a run's final
    model): MLflow downloads it (into `dst`, else a temporary folder), then its `artifacts/` folder, which
    holds `weights.safetensors` and `config.yaml`, loads like a checkpoint. Its code is never run."""
    import mlflow  # here, not at the top: using a model from disk needs no MLflow

    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=model_location(uri, tracking_uri),
                                                    tracking_uri=tracking_uri, dst_path=str(dst) if dst else None)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own and the store's errors
        raise UserError(f"{uri}: MLflow could not fetch the model ({one_line(err, 300)})") from None
    folder = Path(local) / "artifacts"
    if not (folder / WEIGHTS_FILE).is_file():
        raise UserError(f"{uri}: not a model logged by dfcvae_dist training (no artifacts/{WEIGHTS_FILE})")
    return load_trained(folder, expect)


def model_location(uri: str, tracking_uri: str | None) -> str:
    """Where a LoggedModel's files are, for `models:/<model_id>` and `runs:/<run_id>/<name>[/path]`; other
    URIs as they are. MLflow 3.17 resolves both in the process's tracking store, whatever `tracking_uri` says."""
    from dfcvae_dist.model_logging import logged_model_id
    from dfcvae_dist.tracking import mlflow_client

    client = mlflow_client(tracking_uri, read_only=True)
    scheme, _, rest = uri.partition(":/")
    parts = rest.strip("/").split("/")
    if scheme == "models" and len(parts) == 1 and parts[0].startswith("m-"):
        return client.get_logged_model(parts[0]).artifact_location
    if scheme == "runs" and len(parts) >= 2 and (model_id := logged_model_id(client, parts[0], parts[1])):
        return "/".join([client.get_logged_model(model_id).artifact_location.rstrip("/"), *parts[2:]])
    return uri


def load_weights_file(path: str | Path) -> torch.nn.Module:
    """A model (eval mode) from a `weights.safetensors` alone: its metadata holds the model config, read and checked
    as `config.yaml`'s `model:` section is before any model is built (a file is small; the model it asks for need
    not be)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            model_config = (f.metadata() or {}).get("model")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if model_config is None:
        raise UserError(f"{path}: no model config in its metadata (written before it was kept there); load the "
                        "checkpoint folder instead")
    model_cfg = metadata_model_config(model_config, f"{path}: metadata")
    return load_weights(model_cfg.name, model_cfg, Path(path))


def metadata_model_config(text: str, source: str):
    """The `ModelConfig` of a weights file's metadata (JSON), every key read and checked as in a config file."""
    from dfcvae_dist.config import ModelConfig, load_dataclass

    try:
        fields = json.loads(text)
    except ValueError as err:
        raise UserError(f"{source}: the model config is not JSON ({err})") from None
    if not isinstance(fields, dict):
        raise UserError(f"{source}: the model config is not a JSON object")
    texts = {key: value if isinstance(value, str) else json.dumps(value) for key, value in fields.items()}
    return load_dataclass(ModelConfig, texts, source, "model.")


@torch.no_grad()
def encode(model: VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1], (N, 3, H, W) -> (mu, logvar)."""
    return model.encode(images.to(next(model.parameters()).device))


@torch.no_grad()
def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z.to(next(model.parameters()).device))


@torch.no_grad()
def sample(model: VAE, n: int, seed: int = 0) -> torch.Tensor:
    return model.sample(n, torch.Generator().manual_seed(seed))
