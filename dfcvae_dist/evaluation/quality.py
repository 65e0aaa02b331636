"""Image-quality metrics of trained models, computed as papers compute them where a standard exists:

- SSIM and MS-SSIM: torchmetrics, Gaussian 11x11 window (sigma 1.5), data range 1;
- LPIPS: the `lpips` package (AlexNet backbone, its learned linear weights), when the ImageNet AlexNet is cached;
- FID: torchmetrics' `FrechetInceptionDistance` with torch-fidelity's FID Inception weights, uint8 inputs and the
  TensorFlow-1 bilinear resize of the original FID code, samples against real images: one FID per sampler, from
  N(0, I) and from a Gaussian mixture fitted to a VAE's training latents (evaluation/samplers.py), each sampler's
  samples also drawn as a figure.

Two numbers are ours and compare only with each other: the blur ratio (variance of the Laplacian of the
reconstructions over that of the inputs: 1 = as sharp, < 1 = blurrier) and the perceptual distance (our training
loss's VGG19 feature distance). Each metric is None where it cannot be computed, and `notes` says why."""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           structural_similarity_index_measure)

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.evaluation.samplers import (DEFAULT_SAMPLERS, FID_KEYS, model_samplers, parse_samplers,
                                             sampler_batches, sampler_files, write_sampler_files)
from dfcvae_dist.metrics import QUALITY, RECONSTRUCTION, keys
from dfcvae_dist.rundir import atomic_write
from dfcvae_dist.tracking import mlflow_client

SSIM_WINDOW = {"gaussian_kernel": True, "kernel_size": 11, "sigma": 1.5, "data_range": 1.0}
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, finest scale first
FID_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the FID Inception
FID_WEIGHTS_ALIASES = (FID_WEIGHTS_FILE, "pt_inception-2015-12-05-6726825d.pth")  # pytorch-fid's copy
FID_WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{FID_WEIGHTS_FILE}"
LPIPS_BACKBONE_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_BACKBONE_URL = f"https://download.pytorch.org/models/{LPIPS_BACKBONE_FILE}"
RECONSTRUCTION_METRICS = keys(RECONSTRUCTION)
METRICS = keys(QUALITY)
QUALITY_FILE = "quality.json"


def hub_checkpoints() -> Path:
    """Where torch.hub (and so torchvision, lpips and torch-fidelity) caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def ssim(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """SSIM per image, images in [0, 1]: the mean of torchmetrics' SSIM map over the pixels whose whole window
    lies inside the image, as Wang et al.'s reference code ('valid' filtering) and scikit-image average it;
    torchmetrics' own mean also counts the 5-px border computed from reflected padding."""
    _, full = structural_similarity_index_measure(x_hat, x, reduction="none", return_full_image=True, **SSIM_WINDOW)
    border = SSIM_WINDOW["kernel_size"] // 2
    return full[..., border:-border, border:-border].flatten(1).mean(1)


def ms_ssim_scales(size: int) -> int | None:
    """The most scales (5, the standard, else 3) an 11x11 window fits at `size` px, or None. torchmetrics
    needs size // (scales - 1)**2 > 10: 176 px for 5 scales, 44 px for 3."""
    return next((s for s in (5, 3) if size // (s - 1) ** 2 > SSIM_WINDOW["kernel_size"] - 1), None)


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """The standard weights of the finest `scales` scales, renormalised to sum to 1."""
    kept = MS_SSIM_BETAS[:scales]
    return tuple(b / sum(kept) for b in kept)


def ms_ssim(x_hat: torch.Tensor, x: torch.Tensor, scales: int) -> torch.Tensor:
    """MS-SSIM per image; negative terms are clipped to 0 ("relu", as TensorFlow's ssim_multiscale does)."""
    return multiscale_structural_similarity_index_measure(x_hat, x, reduction="none", betas=ms_ssim_betas(scales),
                                                          normalize="relu", **SSIM_WINDOW)


def ms_ssim_note(size: int) -> tuple[int | None, str]:
    scales = ms_ssim_scales(size)
    if scales is None:
        return None, (f"n/a: {size} px images are below the 44 px that 3 scales of an 11x11 window need "
                      "(5 scales, the standard, need 176 px)")
    betas = ", ".join(f"{b:.4f}" for b in ms_ssim_betas(scales))
    if scales == 5:
        return scales, f"torchmetrics MS-SSIM, the standard 5 scales, betas ({betas})"
    return scales, (f"torchmetrics MS-SSIM with 3 scales, not the standard 5 (which need 176 px; these images are "
                    f"{size} px): the first 3 betas renormalised to ({betas}); not comparable with 5-scale numbers")


def laplacian_variance(x: torch.Tensor) -> torch.Tensor:
    gray = x.mean(1, keepdim=True)
    kernel = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]], device=x.device).view(1, 1, 3, 3)
    return F.conv2d(gray, kernel).flatten(1).var(1)


def lpips_or_reason(random_backbone_not_lpips: bool = False):
    """(lpips.LPIPS, how it was computed) or (None, why not). `random_backbone_not_lpips` (tests only) builds
    the network on a random AlexNet: it exercises the computation, and its numbers are NOT LPIPS."""
    import lpips

    if random_backbone_not_lpips:
        return lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval(), \
            "NOT LPIPS: random AlexNet backbone (a test of the computation path)"
    cached = hub_checkpoints() / LPIPS_BACKBONE_FILE
    if not cached.is_file():
        return None, (f"n/a: LPIPS needs torchvision's ImageNet AlexNet, {LPIPS_BACKBONE_FILE}, not found; download "
                      f"{LPIPS_BACKBONE_URL} into {hub_checkpoints()}/ (torch hub's cache, $TORCH_HOME)")
    try:
        return lpips.LPIPS(net="alex", verbose=False).eval(), \
            f"the lpips package's v0.1 learned linear weights on torchvision's ImageNet AlexNet ({cached})"
    except (OSError, RuntimeError) as err:
        return None, f"n/a: LPIPS's AlexNet {cached} does not load ({one_line(err)})"


@torch.no_grad()
def reconstruction_metrics(model, batches, perceptual, lpips_net=None, scales: int | None = None) -> dict:
    """Means over all images of `batches` (tensors in [0, 1]), reconstructions from the mean latent; the blur
    ratio is a ratio of the summed variances. `lpips_net` / `scales` (of MS-SSIM) None: that metric is None."""
    sums = dict.fromkeys(("mse", "ssim", "ms_ssim", "lpips", "blur_num", "blur_den", "perceptual_distance"), 0.0)
    n = 0
    for x in batches:
        x_hat = model.decode(model.encode(x)[0]).clamp(0, 1)
        sums["mse"] += F.mse_loss(x_hat, x, reduction="none").flatten(1).mean(1).sum().item()
        sums["ssim"] += ssim(x_hat, x).sum().item()
        if scales:
            sums["ms_ssim"] += ms_ssim(x_hat, x, scales).sum().item()
        if lpips_net is not None:
            sums["lpips"] += lpips_net(x_hat, x, normalize=True).sum().item()
        sums["blur_num"] += laplacian_variance(x_hat).sum().item()
        sums["blur_den"] += laplacian_variance(x).sum().item()
        sums["perceptual_distance"] += sum(perceptual(x, x_hat).values()).item() * x.shape[0]
        n += x.shape[0]
    means = {key: sums[key] / n for key in RECONSTRUCTION_METRICS if key != "blur_ratio"}
    means["ms_ssim"] = means["ms_ssim"] if scales else None
    means["lpips"] = means["lpips"] if lpips_net is not None else None
    means["blur_ratio"] = sums["blur_num"] / max(sums["blur_den"], 1e-12)
    return {"images": n, **{key: means[key] for key in RECONSTRUCTION_METRICS}}


def find_fid_weights(path: str | Path | None) -> Path | None:
    """`path` if given, else the FID Inception in torch hub's cache (under either of its two names), else None."""
    if path is not None:
        return Path(path)
    return next((hub_checkpoints() / name for name in FID_WEIGHTS_ALIASES if (hub_checkpoints() / name).is_file()),
                None)


def missing_fid_weights_note() -> str:
    return (f"n/a: FID needs the FID Inception weights {FID_WEIGHTS_FILE} (torch-fidelity's; pytorch-fid's "
            f"pt_inception-2015-12-05-6726825d.pth also loads), not found; download {FID_WEIGHTS_URL} and pass "
            f"--fid-weights PATH, or put it in {hub_checkpoints()}/ (torch hub's cache, $TORCH_HOME). "
            "No other Inception weights are used: their FID would compare with no published number")


def fid_metric(weights: Path):
    """torchmetrics' FID on torch-fidelity's Inception, fed uint8 images and resized with the TensorFlow-1
    bilinear resize (antialias=False) of the original FID code; statistics in float64."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=False, antialias=False, reset_real_features=False,
                                          feature_extractor_weights_path=str(weights))
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"{weights}: not the FID Inception weights {FID_WEIGHTS_FILE} "
                        f"({one_line(err, 200)})") from None
    return metric


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats -> uint8 rounded as an image file would store them (what FID's Inception expects)."""
    return images.clamp(0, 1).mul(255).round().to(torch.uint8)


@torch.no_grad()
def add_fid_images(metric, batches, real: bool) -> int:
    """Feed batches of [0, 1] images to one side of the FID; returns how many."""
    n = 0
    for x in batches:
        metric.update(to_uint8(x.to(metric.device)), real=real)
        n += len(x)
    return n


def split_batches(shards: Path, split: str, n: int, batch: int = 250):
    """The first `n` images of a split as [0, 1] batches, streamed (FID reads up to 50,000)."""
    from dfcvae_dist.data.loader import EvalStream, SplitSource, make_loader, model_input

    left = n
    for item in make_loader(EvalStream(SplitSource.from_manifest(shards, split), batch, 0, 1), 0):
        if left <= 0:
            break
        images = item["image"][:left]
        left -= len(images)
        yield model_input(images, "cpu")


@dataclass
class QualityOptions:
    shards: Path
    split: str = "test"
    max_images: int = 2000  # reconstruction metrics
    network_weights: str = "imagenet"  # the perceptual distance's feature network
    fid_weights: Path | None = None
    fid_samples: int = 10_000
    random_lpips_backbone_not_lpips: bool = False  # tests only
    network: str = "vgg19"  # the perceptual distance's feature network, at its default layers (VGG: '123')
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    samplers: tuple[str, ...] = DEFAULT_SAMPLERS  # normal and/or gmm[:K]: FID and a sample figure for each
    gmm_fit_images: int = 20_000  # training latents the mixture is fitted to


def fixed_notes(perceptual) -> dict[str, str]:
    return {
        "mse": "mean over images of the per-pixel squared error, images in [0, 1], reconstruction from the mean latent",
        "ssim": "torchmetrics SSIM map, Gaussian 11x11 window, sigma 1.5, data range 1, averaged over the pixels "
                "whose window lies inside the image (as Wang et al.'s code and scikit-image), then over images",
        "blur_ratio": "ours: variance of the Laplacian of the reconstructions over that of the inputs (1 = as sharp); "
                      "no published counterpart",
        "perceptual_distance": "ours: the feature perceptual distance of the DFC-VAE's loss on "
                               f"{perceptual.features.network} ({', '.join(perceptual.features.layers)}), "
                               f"weights {perceptual.weights_source}; "
                               "not comparable with published numbers",
    }


def evaluate_quality(checkpoints: dict[str, str], opts: QualityOptions, out: Path,
                     run_ids: Mapping[str, str] | None = None, client=None) -> dict:
    """OUT/quality.json of the named models (`evaluate_models`); each model named in `run_ids` logged into that
    MLflow run (quality.json under evaluation/, every number as eval/quality/*) through `client` (default: a
    client of MLflow's default store)."""
    out.mkdir(parents=True, exist_ok=True)
    quality = evaluate_models(checkpoints, opts, out)
    atomic_write(out / QUALITY_FILE, json.dumps(quality, indent=1))
    if run_ids:
        client = client or mlflow_client()
        for name, run_id in run_ids.items():
            log_quality(client, run_id, name, quality["models"][name], out / QUALITY_FILE)
    return quality


def log_quality(client, run_id: str, name: str, result: dict, quality_json: Path) -> None:
    """quality.json and the model's sample figures and mixture under evaluation/; its numbers as eval/quality/*,
    also on the run's logged model of the evaluated checkpoint, where the run logged one
    (`model_logging.model_link`)."""
    from dfcvae_dist.model_logging import model_link

    try:
        link = model_link(client, run_id, result["checkpoint"])
        for path in [quality_json, *(quality_json.parent / file for file in sampler_files(result))]:
            client.log_artifact(run_id, str(path), "evaluation")
        for metric in QUALITY:
            if result[metric.key] is not None and not (metric.key == "fid_samples" and not result[metric.key]):
                client.log_metric(run_id, metric.name, result[metric.key], **link)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own and the store's errors
        raise UserError(f"MLflow run {run_id} ({name}): cannot log the quality results ({one_line(err)})") from None


def evaluate_models(checkpoints: dict[str, str], opts: QualityOptions, out: Path) -> dict:
    """quality.json's content for the named models (a run directory or checkpoint each): reconstruction
    metrics for the VAEs, FID for every model and sampler; each sampler's figure (and mixture) written into `out`."""
    from dfcvae_dist.data.loader import read_images
    from dfcvae_dist.families import get_family
    from dfcvae_dist.inference import load_trained
    from dfcvae_dist.losses import FeaturePerceptualLoss
    from dfcvae_dist.losses.feature_networks import DEFAULT_LAYERS

    specs = parse_samplers(opts.samplers)  # a bad --sampler fails before the work
    perceptual = FeaturePerceptualLoss(DEFAULT_LAYERS[opts.network], weights=opts.network_weights,
                                       network=opts.network).to(opts.device)
    notes = fixed_notes(perceptual)
    lpips_net, notes["lpips"] = lpips_or_reason(opts.random_lpips_backbone_not_lpips)
    lpips_net = lpips_net.to(opts.device) if lpips_net is not None else None
    images = read_images(opts.shards, opts.split, opts.max_images)["image"].to(opts.device)
    scales, notes["ms_ssim"] = ms_ssim_note(images.shape[-1])
    models, samplers, fitted, results = {}, {}, {}, {}
    for name, path in checkpoints.items():
        model, cfg, checkpoint = load_trained(path, expect=None)
        models[name] = model.to(opts.device)
        encodes = get_family(cfg.model.name).encodes
        results[name] = {"checkpoint": str(checkpoint), "family": cfg.model.name, "split": opts.split}
        if encodes:
            results[name] |= reconstruction_metrics(model, images.split(200), perceptual, lpips_net, scales)
        else:
            results[name] |= {"images": 0, **dict.fromkeys(RECONSTRUCTION_METRICS)}
        samplers[name], fitted[name] = model_samplers(name, model, checkpoint, encodes, specs, opts.shards,
                                                      opts.gmm_fit_images, opts.device)
    no_encoder = sorted(name for name, r in results.items() if not get_family(r["family"]).encodes)
    for key in RECONSTRUCTION_METRICS if no_encoder else ():
        notes[key] += f"; null for {', '.join(no_encoder)}: a GAN has no encoder, so no reconstructions"
    add_fid(models, samplers, results, opts, notes)
    fid_sampler_notes(specs, no_encoder, notes)
    for name, model in models.items():
        results[name]["gmm"] = fitted[name]
        results[name]["samples"] = write_sampler_files(name, model, samplers[name], out)
    return {"models": results, "notes": notes}


def add_fid(models: dict, samplers: dict, results: dict, opts: QualityOptions, notes: dict) -> None:
    """FID of each model's samples from each of its samplers against as many images of the split (at most
    --fid-samples)."""
    weights = find_fid_weights(opts.fid_weights)
    for r in results.values():
        r |= {**dict.fromkeys(FID_KEYS.values()), "fid_samples": 0}
    if opts.fid_samples <= 0 or weights is None:
        notes["fid"] = "n/a: --fid-samples 0" if opts.fid_samples <= 0 else missing_fid_weights_note()
        notes["fid_gmm"] = "n/a: as fid"
        return
    if not weights.is_file():
        raise UserError(f"--fid-weights {weights}: no such file (the FID Inception weights, {FID_WEIGHTS_URL})")
    metric = fid_metric(weights).to(opts.device)
    real = add_fid_images(metric, split_batches(opts.shards, opts.split, opts.fid_samples), real=True)
    if real < 2:
        notes["fid"], notes["fid_gmm"] = f"n/a: the {opts.split} split has {real} image(s); FID needs at least 2", \
            "n/a: as fid"
        return
    for name, model in models.items():
        for kind, sampler in samplers[name].items():
            metric.reset()  # the fake side only (reset_real_features=False)
            add_fid_images(metric, sampler_batches(model, real, sampler), real=False)
            results[name][FID_KEYS[kind]], results[name]["fid_samples"] = float(metric.compute()), real
    against = (f"against {real:,} {opts.split} images" + (f" ({opts.fid_samples:,} asked; the {opts.split} split "
                                                          f"has {real:,})" if real < opts.fid_samples else "")
               + f"; torchmetrics FrechetInceptionDistance, FID Inception weights {weights}")
    notes["fid"] = f"FID of {real:,} samples from N(0, I) {against}"
    notes["fid_gmm"] = (f"FID of {real:,} samples decoded from z drawn from a Gaussian mixture fitted to the model's "
                        f"training latents (its `gmm` entry says which, and how many components) {against}")


def fid_sampler_notes(specs, no_encoder: list[str], notes: dict) -> None:
    """Why a sampler's FID is null for every model (not asked) or for some (no encoder: no latents to fit)."""
    asked = {spec.kind for spec in specs}
    for kind, key in FID_KEYS.items():
        if kind not in asked:
            notes[key] = f"n/a: not asked (--sampler {','.join(sorted(asked))})"
    if "gmm" in asked and no_encoder:
        notes["fid_gmm"] += (f"; null for {', '.join(no_encoder)}: no encoder, so no training latents to fit a "
                             "mixture to")
