"""Image quality of one or more trained models on a split, in one table: MSE, SSIM, MS-SSIM, LPIPS, blur ratio,
perceptual distance and FID (DCGAN: FID only). Writes quality.json and logs each model's results into its own
MLflow run (docs/evaluation.md says what each number is and which compare with published ones)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.evaluation.quality import QualityOptions, evaluate_models
from dfcvae_dist.rundir import atomic_path

COLUMNS = {"mse": ("MSE", ".5f"), "ssim": ("SSIM", ".4f"), "ms_ssim": ("MS-SSIM", ".4f"), "lpips": ("LPIPS", ".4f"),
           "blur_ratio": ("blur ratio (ours)", ".3f"), "perceptual_distance": ("perceptual dist. (ours)", ".4g"),
           "fid": ("FID", ".2f"), "fid_samples": ("FID samples", ",d")}


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                   help="model to compare (repeat): a run directory or checkpoint, e.g. dfcvae=runs/dfcvae")
    p.add_argument("--shards", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--vgg-weights", default="imagenet", help="VGG19 of our perceptual distance: imagenet|random|PATH")
    p.add_argument("--max-images", type=int, default=2000, help="images of the split for the reconstruction metrics")
    p.add_argument("--fid-samples", type=int, default=10_000,
                   help="samples and real images for FID (at most the split's size; 50000 for papers that use it; "
                        "0: no FID)")
    p.add_argument("--fid-weights", type=Path, help="the FID Inception weights file (default: torch hub's cache)")
    p.add_argument("--fid", action="store_true", help=argparse.SUPPRESS)  # FID is on by default; old command lines
    p.add_argument("--no-mlflow", action="store_true", help="do not log into the models' MLflow runs")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    checkpoints = dict(parse_model(item) for item in args.checkpoint)
    opts = QualityOptions(args.shards, args.split, args.max_images, args.vgg_weights, args.fid_weights,
                          args.fid_samples)
    quality = evaluate_models(checkpoints, opts)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "quality.json") as tmp:
        tmp.write_text(json.dumps(quality, indent=1))
    print_table(quality, args.split)
    print(f"wrote {args.out / 'quality.json'}")
    if not args.no_mlflow:
        for name, path in checkpoints.items():
            log_to_mlflow(name, path, quality["models"][name], args.out / "quality.json")
    return 0


def parse_model(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    return (name, path) if sep else (Path(name).name, name)


def print_table(quality: dict, split: str) -> None:
    table = Table("model", "family", "images", *(title for title, _ in COLUMNS.values()), title=f"{split} split")
    for name, r in quality["models"].items():
        table.add_row(name, r["family"], str(r["images"]),
                      *("n/a" if r[key] is None else format(r[key], fmt) for key, (_, fmt) in COLUMNS.items()))
    console = Console(width=200)
    console.print(table)
    for key, note in quality["notes"].items():
        console.print(f"{key}: {note}", highlight=False, soft_wrap=True)


def run_directory(path: str) -> Path:
    """The training run directory of a run directory or of one of its checkpoints (RUN/checkpoints/step-N)."""
    path = Path(path)
    return path.parent.parent if path.parent.name == "checkpoints" else path


def log_to_mlflow(name: str, path: str, result: dict, quality_json: Path) -> None:
    """Into the model's own run, named by its COMPLETED.json; a run that was not tracked is skipped in one line."""
    import mlflow

    from dfcvae_dist.training.tracking import default_timeouts, resolve_run_id

    try:
        run_id = resolve_run_id(str(run_directory(path)))
    except UserError as err:
        print(f"MLflow: {name} skipped: {err}")
        return
    try:
        default_timeouts()  # seconds per request, not MLflow's minutes of retries
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(quality_json), "evaluation")
        for key in COLUMNS:
            if result[key] is not None and not (key == "fid_samples" and result["fid"] is None):
                client.log_metric(run_id, f"eval/quality/{key}", result[key])
    except Exception as err:  # noqa: BLE001
        raise UserError(f"MLflow run {run_id} ({name}): cannot log the quality results "
                        f"({str(err).splitlines()[0]})") from None
    print(f"MLflow: {name} logged into run {run_id}")


if __name__ == "__main__":
    sys.exit(main())
