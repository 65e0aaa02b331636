"""Every metric name the framework logs, declared once with what it measures and its unit: the trainer, the
families, the evaluations, their tables and the report use these declarations, and docs/metrics.md is generated
from them (`python tools/generate_docs.py`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str  # as logged, e.g. eval/quality/ssim
    meaning: str
    unit: str
    label: str = ""  # its column title in a table
    spec: str = ""  # its number format in a table
    higher_is_better: bool = False  # for a validation metric: which way checkpoint.keep_best and early stopping read it

    @property
    def key(self) -> str:
        """The last part of the name: the key of the JSON file it comes from (`ssim`)."""
        return self.name.rsplit("/", 1)[-1]


def keys(metrics: list[Metric]) -> tuple[str, ...]:
    return tuple(m.key for m in metrics)


def validation_metrics(metrics: list[Metric]) -> list[Metric]:
    """Those computed on the val split (`val/...`): what checkpoint.keep_best may name."""
    return [m for m in metrics if m.name.startswith("val/")]


def formatted(metric: Metric, value: float | None) -> str:
    return "n/a" if value is None else format(value, metric.spec or ".4g")


# Logged by the trainer for every family; a family adds its own (`ModelFamily.metrics`).
TRAINING = [
    Metric("train/total", "the optimised objective (each family's, below); the progress metric", "that of its terms"),
    Metric("train/grad_norm", "global L2 norm of the gradients before clipping (two-network families: the "
           "generator's or VAE's)", "gradient units"),
    Metric("train/lr", "the learning rate of the step", "—"),
    Metric("train/epoch", "whole epochs over the training split completed after the step", "epochs"),
    Metric("train/img_per_s", "training throughput since the previous log step, all ranks together", "images / s"),
    Metric("train/skipped_steps", "optimizer steps skipped so far for a non-finite loss (`train.on_nonfinite=skip`) "
           "or an fp16 overflow", "steps"),
    Metric("train/compile_s", "with `train.compile` on: how long the first step of a launch took, compiling "
           "included (logged once per launch, at its first log step)", "s"),
    Metric("train/skipped_samples", "damaged samples passed over so far, summed over ranks (with "
           "`data.skip_corrupt`)", "samples"),
]

# MLflow's own monitor: `system/<name>`, or `system/nodeN/<name>` with an http(s) URI and several nodes.
SYSTEM = [
    Metric("cpu_utilization_percentage", "CPU use of the machine", "%"),
    Metric("system_memory_usage_megabytes, system_memory_usage_percentage", "memory in use on the machine", "MB, %"),
    Metric("disk_usage_megabytes, disk_usage_percentage, disk_available_megabytes", "the root filesystem", "MB, %"),
    Metric("network_receive_megabytes, network_transmit_megabytes", "network traffic since the monitor started",
           "MB"),
    Metric("gpu_<i>_utilization_percentage", "GPU i busy (nvidia-ml-py)", "%"),
    Metric("gpu_<i>_memory_usage_megabytes, gpu_<i>_memory_usage_percentage", "GPU i memory in use", "MB, %"),
    Metric("gpu_<i>_power_usage_watts, gpu_<i>_power_usage_percentage", "GPU i power draw", "W, % of its limit"),
]

# dfcvae-svm: svm_report.json's means, logged into the training run.
SVM = [
    Metric("eval/svm/mean_accuracy", "test accuracy of one linear SVM per attribute on the latent means, averaged "
           "over the attributes", "fraction", "mean accuracy", ".4f"),
    Metric("eval/svm/mean_balanced_accuracy", "the same, balanced accuracy (mean of the per-class recalls; 0.5 = "
           "chance)", "fraction", "mean balanced accuracy", ".4f"),
    Metric("eval/svm/mean_majority", "the majority-class baseline averaged over the same attributes", "fraction",
           "majority-class baseline", ".4f"),
    Metric("eval/svm/focus_mean_accuracy", "the mean accuracy over the focus attributes only (`--focus`; for "
           "synthetic data the attributes the drawing shows)", "fraction", "focus: mean accuracy", ".4f"),
    Metric("eval/svm/focus_mean_balanced_accuracy", "the mean balanced accuracy over the focus attributes only",
           "fraction", "focus: mean balanced accuracy", ".4f"),
    Metric("eval/svm/focus_mean_majority", "the majority-class baseline averaged over the focus attributes only",
           "fraction", "focus: majority-class baseline", ".4f"),
]

# dfcvae-svm: svm_report.json's `latent` section (the test split's posteriors).
LATENT = [
    Metric("eval/latent/kl_per_image", "KL(q(z|x) ‖ N(0, I)) on the test split", "nats per image", "KL per image",
           ".2f"),
    Metric("eval/latent/active_units", "active latent dimensions: the variance over the test images of the "
           "dimension's mean above 0.01 (Burda et al.)", "dimensions", "active units", ".1f"),
]

# dfcvae-quality: quality.json's numbers per model. The reconstruction metrics first (None for a model without
# an encoder), then FID.
QUALITY = [
    Metric("eval/quality/mse", "pixel mean squared error of reconstructions (decoded from the mean of z)",
           "squared [0, 1] intensity per pixel", "MSE", ".3g"),
    Metric("eval/quality/ssim", "structural similarity of reconstruction and input", "-1..1 (1 = identical)", "SSIM",
           ".4f"),
    Metric("eval/quality/ms_ssim", "multi-scale SSIM", "0..1", "MS-SSIM", ".4f"),
    Metric("eval/quality/lpips", "learned perceptual distance (LPIPS)", "distance (0 = identical)", "LPIPS", ".4f"),
    Metric("eval/quality/blur_ratio", "variance of the Laplacian of reconstructions over that of the inputs",
           "ratio (1 = as sharp, < 1 = blurrier)", "blur ratio", ".3g"),
    Metric("eval/quality/perceptual_distance", "the feature perceptual loss between input and reconstruction, on "
           "the evaluation's feature network (its note names it)", "as `train/rec_perceptual`",
           "perceptual distance", ".4g"),
    Metric("eval/quality/fid", "Fréchet Inception distance of samples from N(0, I) (every family; `--sampler "
           "normal`) to as many images of the split, torch-fidelity's FID Inception ([evaluation](evaluation.md))",
           "distance (0 = same statistics)", "FID", ".2f"),
    Metric("eval/quality/fid_gmm", "the same FID, of samples decoded from z drawn from a Gaussian mixture fitted to "
           "the VAE's training latents (`--sampler gmm[:K]`; [samplers](evaluation.md#samplers))", "distance (0 = "
           "same statistics)", "FID (GMM)", ".2f"),
    Metric("eval/quality/fid_samples", "images each side of the FID", "images", "FID samples", ",.0f"),
]
RECONSTRUCTION = QUALITY[:6]

# dfcvae-report, into the sweep's parent run: report/<run_name>/<name>, the mean over the run name's finished seeds.
COST = [
    Metric("wall_time_s", "training wall time summed over launches (COMPLETED.json)", "s", "wall time (s)", ".0f"),
    Metric("img_per_s", "training images per second (COMPLETED.json)", "images / s", "img/s", ".1f"),
]


def metric(name: str) -> Metric:
    return next(m for m in SVM + LATENT + QUALITY + COST if m.name == name)


# A run's numbers in one line each: the end of `make quickstart` and of dfcvae-report, and the report's first table.
HEADLINE = [metric("eval/svm/focus_mean_balanced_accuracy"), metric("eval/svm/mean_balanced_accuracy"),
            metric("eval/latent/kl_per_image"), metric("eval/quality/ssim")]


def report_names() -> list[tuple[str, str]]:
    """(name under report/<run_name>/, what it is) of every number the report logs."""
    return ([(f"svm_{m.key}", f"`{m.name}`") for m in SVM] + [(m.key, f"`{m.name}`") for m in LATENT]
            + [(f"quality_{m.key}", f"`{m.name}`") for m in QUALITY] + [(m.key, m.meaning) for m in COST])


METRICS_DOC_INTRO = """\
# Metric names

<!-- Generated by `python tools/generate_docs.py` from dfcvae_dist/metrics.py and the model families; do not edit.
     tests/test_config.py checks that this file is what the generator writes. -->

Every metric a run logs to MLflow, training and evaluation, in one list. A name says what it measures:
a pixel loss and a feature-network loss never share a name, so the compare view never draws them on one axis.
The sweep report reads these names. Images are [0, 1] floats; "batch mean" is the mean over the images
of a batch (over every rank's, at a log step)."""


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def training_rows() -> list[list[str]]:
    """One row per (name, meaning): the trainer's own, then each built-in family's, families joined."""
    from dfcvae_dist.families import builtin_families

    rows: dict[tuple[str, str, str], list[str]] = {(m.name, m.meaning, m.unit): ["all"] for m in TRAINING}
    for family in sorted(builtin_families().values(), key=lambda f: (not f.in_paper, f.name)):
        for m in family.metrics():
            rows.setdefault((m.name, m.meaning, m.unit), []).append(family.name)
    first = {}
    for name, _, _ in rows:
        first.setdefault(name, len(first))
    ordered = sorted(rows.items(), key=lambda row: first[row[0][0]])  # a name's rows together
    return [[f"`{name}`", ", ".join(families), meaning, unit] for (name, meaning, unit), families in ordered]


def metrics_markdown() -> str:
    """docs/metrics.md."""
    out = [METRICS_DOC_INTRO, "", "## Training (`dfcvae-train`, every `log.every_steps` steps and at the last step)",
           "", "| name | family | what it measures | unit |", "| --- | --- | --- | --- |",
           *map(_row, training_rows()), "", "## System (MLflow's monitor, every `log.system_metrics_interval_s`)", "",
           "Named `system/<name>`, or `system/nodeN/<name>` with an http(s) tracking URI and several nodes.", "",
           "| name | what it measures | unit |", "| --- | --- | --- |",
           *(_row([", ".join(f"`{n}`" for n in m.name.split(", ")), m.meaning, m.unit]) for m in SYSTEM), "",
           "## Evaluation (logged into the training run by the evaluation tools)", "",
           "| name | what it measures | unit |", "| --- | --- | --- |",
           *(_row([f"`{m.name}`", m.meaning, m.unit]) for m in SVM + LATENT + QUALITY), "",
           "Where a metric cannot be computed (no ImageNet or Inception weights, the reconstructions of a model "
           "without an encoder), it is not logged, and the evaluation's JSON file says why.", "",
           "## Sweep report (`dfcvae-report`, into the sweep's parent run)", "",
           "Named `report/<run_name>/<name>`: the mean over the run name's finished seeds (the report's JSON also "
           "holds the standard deviation and n).", "", "| name | what it is |", "| --- | --- |",
           *(_row([f"`{name}`", what]) for name, what in report_names())]
    return "\n".join(out) + "\n"
