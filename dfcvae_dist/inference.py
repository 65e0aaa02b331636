"""Using a trained model: load a checkpoint's consolidated weights (no accelerate, no DeepSpeed, no
pickle), from a run directory, a checkpoint folder, a model folder (`dfcvae-export`; local or `hf://` on the
Hugging Face Hub) or a model logged to MLflow; encode images, decode latents, sample (from N(0, I) or a
Gaussian mixture fitted to the training latents), interpolate, and compute attribute vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dfcvae_dist.config import Config, config_from_dict, load_config
from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.families import get_family
from dfcvae_dist.models import VAE
from dfcvae_dist.rundir import CONFIG_FILE, WEIGHTS_FILE, atomic_write, best_checkpoint, find_checkpoint

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
HUB_SCHEME = "hf://"
MODEL_FOLDER_WEIGHTS = "model.safetensors"  # a model folder (`dfcvae-export`): the layout the Hub takes
MODEL_FOLDER_CONFIG = "config.json"
MODEL_FOLDER_CARD = "README.md"


def load_trained(path: str | Path, expect: type | None = VAE,
                 which: str = "latest") -> tuple[torch.nn.Module, Config, Path]:
    """(model in eval mode, its config, the checkpoint folder). `path`: a run directory (its `which` checkpoint:
    latest or best), a checkpoint folder, a model folder (`dfcvae-export`), `hf://OWNER/NAME[@REVISION]` (a model
    folder on the Hugging Face Hub), or an MLflow model URI (`load_model_uri`). The model is what its family
    encodes, decodes and samples with (dfcvae-gan: the VAE without its discriminator). `expect`: the model class
    required (None: any)."""
    if str(path).startswith(MODEL_URI_SCHEMES):
        return load_model_uri(str(path), expect=expect)
    if str(path).startswith(HUB_SCHEME):
        return load_trained(download_hub_model(str(path)), expect)
    if is_model_folder(Path(path)):
        return load_model_folder(Path(path), expect)
    checkpoint = resolve_checkpoint(path, which)
    cfg = load_config(checkpoint / CONFIG_FILE)
    model = load_weights(cfg.model.name, cfg.model, checkpoint / WEIGHTS_FILE)
    return require_class(model, cfg, checkpoint, expect), cfg, checkpoint


def require_class(model: torch.nn.Module, cfg: Config, where: Path, expect: type | None) -> torch.nn.Module:
    if expect is not None and not isinstance(model, expect):
        raise UserError(f"{where}: a {cfg.model.name} model, but this needs a {expect.__name__} (a family that "
                        "encodes)")
    return model


def is_model_folder(path: Path) -> bool:
    """A folder `dfcvae-export` wrote (a checkpoint folder holds accelerate's model.safetensors, but no config.json)."""
    return (path / MODEL_FOLDER_CONFIG).is_file() and (path / MODEL_FOLDER_WEIGHTS).is_file()


def load_model_folder(folder: Path, expect: type | None = VAE) -> tuple[torch.nn.Module, Config, Path]:
    """A model folder `dfcvae-export` wrote: `config.json` (the family, the model's config and the training
    config) and `model.safetensors` (the checkpoint's weights)."""
    path = folder / MODEL_FOLDER_CONFIG
    try:
        meta = json.loads(path.read_text())
        sections = {"model": meta["model"], **meta["training"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a dfcvae_dist model config ({type(err).__name__}: {one_line(err)})") from None
    cfg = config_from_dict(sections, str(path))
    model = load_weights(cfg.model.name, cfg.model, folder / MODEL_FOLDER_WEIGHTS)
    return require_class(model, cfg, folder, expect), cfg, folder


def hub_endpoint() -> str:
    """The Hub huggingface_hub talks to: $HF_ENDPOINT (read at each call, not at import), else huggingface.co."""
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def download_hub_model(uri: str) -> Path:
    """`hf://OWNER/NAME[@REVISION]`: the model folder's files, downloaded by huggingface_hub into its cache."""
    from huggingface_hub import snapshot_download  # here: using a model from disk needs no Hub client

    repo, _, revision = uri.removeprefix(HUB_SCHEME).strip("/").partition("@")
    if repo.count("/") != 1:
        raise UserError(f"{uri}: expected {HUB_SCHEME}OWNER/NAME or {HUB_SCHEME}OWNER/NAME@REVISION")
    try:
        local = snapshot_download(repo, revision=revision or None, endpoint=hub_endpoint(),
                                  allow_patterns=[MODEL_FOLDER_WEIGHTS, MODEL_FOLDER_CONFIG, MODEL_FOLDER_CARD])
    except Exception as err:  # noqa: BLE001 - huggingface_hub raises its own, httpx's and OSError
        raise UserError(f"{uri}: could not download from the Hugging Face Hub at {hub_endpoint()} "
                        f"({type(err).__name__}: {one_line(err, 300)})") from None
    return Path(local)


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

    client = mlflow_client(tracking_uri)
    scheme, _, rest = uri.partition(":/")
    parts = rest.strip("/").split("/")
    if scheme == "models" and len(parts) == 1 and parts[0].startswith("m-"):
        return client.get_logged_model(parts[0]).artifact_location
    if scheme == "runs" and len(parts) >= 2 and (model_id := logged_model_id(client, parts[0], parts[1])):
        return "/".join([client.get_logged_model(model_id).artifact_location.rstrip("/"), *parts[2:]])
    return uri


def load_weights_file(path: str | Path) -> torch.nn.Module:
    """A model (eval mode) from a `weights.safetensors` alone: its metadata holds the model config."""
    from safetensors import safe_open

    from dfcvae_dist.config import ModelConfig

    try:
        with safe_open(str(path), "pt") as f:
            model_config = (f.metadata() or {}).get("model")
    except (SafetensorError, OSError) as err:
        raise UserError(f"{path}: not a readable safetensors file ({err})") from None
    if model_config is None:
        raise UserError(f"{path}: no model config in its metadata (written before it was kept there); load the "
                        "checkpoint folder instead")
    model_cfg = ModelConfig(**json.loads(model_config))
    return load_weights(model_cfg.name, model_cfg, Path(path))


@torch.no_grad()
def encode(model: VAE, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1], (N, 3, H, W) -> (mu, logvar)."""
    return model.encode(images.to(next(model.parameters()).device))


@torch.no_grad()
def decode(model: VAE, z: torch.Tensor) -> torch.Tensor:
    return model.decode(z.to(next(model.parameters()).device))


@torch.no_grad()
def sample(model: VAE, n: int, seed: int = 0, sampler: GaussianMixtureSampler | None = None) -> torch.Tensor:
    """`n` images decoded from z ~ N(0, I) (a GAN: its generator's own z), or from z drawn from `sampler`."""
    if sampler is None:
        return model.sample(n, torch.Generator().manual_seed(seed))
    return decode(model, sampler.sample(n, seed))


def interpolate_latents(z_a: torch.Tensor, z_b: torch.Tensor, steps: int) -> torch.Tensor:
    """(1 - a) z_a + a z_b for `steps` values of a evenly spaced from 0 to 1, both ends exact: (steps, d) for
    latents (d,), (N, steps, d) for N pairs (N, d)."""
    if steps < 2:
        raise UserError(f"interpolation steps: {steps}; at least 2 (both ends)")
    alphas = torch.linspace(0, 1, steps, dtype=z_a.dtype, device=z_a.device).unsqueeze(-1)
    return torch.lerp(z_a.unsqueeze(-2), z_b.to(z_a.device).unsqueeze(-2), alphas)


@torch.no_grad()
def interpolate(model: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
    """Images decoded along the line between the latent means of images x_a and x_b (paper Figure 5):
    (steps, 3, H, W) for two images (3, H, W), (N, steps, 3, H, W) for N pairs (N, 3, H, W)."""
    single = x_a.dim() == 3
    mu_a, mu_b = (encode(model, x[None] if single else x)[0] for x in (x_a, x_b))
    z = interpolate_latents(mu_a, mu_b, steps)
    images = decode(model, z.flatten(0, 1)).unflatten(0, z.shape[:2])
    return images[0] if single else images


def attribute_vector(latents, labels, attribute: int | str, names=None) -> torch.Tensor:
    """The mean latent of the images that have `attribute` minus that of the images that do not (paper
    section 4.3): `latents` (N, d), `labels` (N, A) of 0/1 (e.g. latents.npz's `mu` and `attrs`), `attribute` a
    column of `labels` or its name in `names` (latents.npz's `attribute_names`). Computed in float64."""
    mu = torch.as_tensor(np.asarray(latents), dtype=torch.float64)
    column = attribute_index(attribute, names, torch.as_tensor(np.asarray(labels)).shape[-1])
    has = torch.as_tensor(np.asarray(labels))[:, column].bool()
    if len(has) != len(mu):
        raise UserError(f"attribute vector: {len(mu)} latents but {len(has)} rows of labels")
    if has.all() or not has.any():
        raise UserError(f"attribute vector of {attribute}: all {len(has)} images {'have' if has.all() else 'lack'} "
                        "it; a vector needs images with and without it")
    return mu[has].mean(0) - mu[~has].mean(0)


def attribute_index(attribute: int | str, names, columns: int) -> int:
    if isinstance(attribute, str):
        known = [str(n) for n in (names if names is not None else [])]
        if attribute not in known:
            raise UserError(f"unknown attribute {attribute}" + (f"; known: {', '.join(known)}" if known else
                                                                "; pass the attribute names, or a column index"))
        return known.index(attribute)
    if not 0 <= attribute < columns:
        raise UserError(f"attribute column {attribute}: the labels have {columns} columns")
    return attribute


class GaussianMixtureSampler:
    """Latents drawn from a Gaussian mixture fitted to a VAE's training latents (ex-post density estimation, Ghosh
    et al. 2020; pythae's GaussianMixtureSampler): where the latents the encoder gives do not fill N(0, I), decoded
    mixture draws stay where the decoder was trained. `fit` uses scikit-learn (full covariances, as pythae);
    `sample` draws components by their weights, in random order, deterministic for a seed."""

    def __init__(self, weights: np.ndarray, means: np.ndarray, covariances: np.ndarray):
        self.weights, self.means, self.covariances = (np.asarray(a, dtype=np.float64)
                                                      for a in (weights, means, covariances))
        self.cholesky = np.linalg.cholesky(self.covariances)

    @property
    def n_components(self) -> int:
        return len(self.weights)

    @classmethod
    def fit(cls, mu, n_components: int = 10, seed: int = 0) -> "GaussianMixtureSampler":
        """Fit to latents `mu` (N, d): at most N components (as pythae), EM to a tolerance of 1e-3 in at most
        2,000 iterations (pythae's settings), k-means initialisation seeded by `seed`."""
        from sklearn.mixture import GaussianMixture

        mu = np.asarray(torch.as_tensor(np.asarray(mu)).double())
        if mu.ndim != 2 or len(mu) < 2:
            raise UserError(f"Gaussian mixture: needs at least 2 latents of shape (N, d), got {tuple(mu.shape)}")
        if n_components < 1:
            raise UserError(f"Gaussian mixture: {n_components} components; at least 1")
        mixture = GaussianMixture(min(n_components, len(mu)), covariance_type="full", max_iter=2000, tol=1e-3,
                                  random_state=seed).fit(mu)
        return cls(mixture.weights_, mixture.means_, mixture.covariances_)

    def sample(self, n: int, seed: int | np.random.Generator = 0) -> torch.Tensor:
        """`n` latents (n, d), float32. `seed`: an int, or a numpy Generator to continue (batches of one draw)."""
        rng = np.random.default_rng(seed)
        components = rng.choice(self.n_components, size=n, p=self.weights / self.weights.sum())
        noise = rng.standard_normal((n, self.means.shape[1]))
        z = self.means[components] + np.einsum("nij,nj->ni", self.cholesky[components], noise)
        return torch.from_numpy(z).float()

    def save(self, path: str | Path) -> None:
        """A safetensors file of the mixture's weights, means and covariances (`load` reads it)."""
        from safetensors.numpy import save

        atomic_write(Path(path), save({"weights": self.weights, "means": self.means,
                                       "covariances": self.covariances}))

    @classmethod
    def load(cls, path: str | Path) -> "GaussianMixtureSampler":
        from safetensors.numpy import load_file as load_arrays

        try:
            arrays = load_arrays(str(path))
            return cls(arrays["weights"], arrays["means"], arrays["covariances"])
        except (SafetensorError, OSError, KeyError, np.linalg.LinAlgError) as err:
            raise UserError(f"{path}: not a Gaussian mixture sampler file ({type(err).__name__}: "
                            f"{one_line(err)})") from None
