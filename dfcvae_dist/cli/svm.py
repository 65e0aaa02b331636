"""Train 40 linear SVMs (one per attribute) on latents and print the table beside the paper's Table 1; report the
latents' KL per image and active units on the test split."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.evaluation.latent_stats import latent_statistics
from dfcvae_dist.evaluation.svm import add_focus_means, evaluate, focus_attributes, markdown_table, table_rows
from dfcvae_dist.extraction.latents import load_latents
from dfcvae_dist.training.tracking import default_timeouts, resolve_run_id


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latents", type=Path, required=True, help="latents.npz from tools/extract_latents.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mlflow-run", help="log the report into this MLflow run: a run id or a training run directory")
    p.add_argument("--subsample", type=int, default=20_000, help="training images used to choose C")
    p.add_argument("--jobs", type=int, default=2, help="attributes fitted in parallel")
    p.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="none: the paper's plain SVM (accuracy); balanced: reweight rare classes")
    p.add_argument("--focus", help="also report the means over these attributes (comma-separated), or "
                                   "'synthetic': the ones the synthetic CelebA draws")
    args = p.parse_args(argv)
    run_id = resolve_run_id(args.mlflow_run) if args.mlflow_run else None  # a bad value fails before the work
    start = time.perf_counter()
    latents = load_latents(args.latents)
    focus = focus_attributes(args.focus, [str(n) for n in latents["attribute_names"]]) if args.focus else None
    report = evaluate(latents, subsample=args.subsample, n_jobs=args.jobs,
                      class_weight=None if args.class_weight == "none" else "balanced")
    if focus:
        add_focus_means(report, focus)
    latent = latent_statistics(latents)
    if latent:
        report["latent"] = latent
    report["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "svm_report.json").write_text(json.dumps(report, indent=1))
    (args.out / "svm_table.md").write_text(markdown_table(report))
    header, rows = table_rows(report)
    table = Table(*header, title=f"Attribute prediction, {report['features']} ({report['weights']})")
    for row in rows:
        table.add_row(*row)
    Console(width=220).print(table)
    print(f"mean accuracy {report['mean_accuracy']:.4f}, mean balanced accuracy "
          f"{report['mean_balanced_accuracy']:.4f}, majority {report['mean_majority']:.4f}; "
          f"{report['seconds']:.1f}s; wrote {args.out / 'svm_report.json'}"
          + (f"; {len(report['left_out'])} attribute(s) left out of the means" if report.get("left_out") else ""))
    if focus:
        print(f"over the {len(report['focus'])} focus attributes: mean accuracy {report['focus_mean_accuracy']:.4f}, "
              f"mean balanced accuracy {report['focus_mean_balanced_accuracy']:.4f}")
    if latent:
        print(f"latents ({latent['split']} split): KL per image {latent['kl_per_image']:.2f} nats, "
              f"{latent['active_units']} of {latents['mu'].shape[1]} units active")
    if run_id:
        log_to_mlflow(run_id, args.out, report)
    return 0


def log_to_mlflow(run_id: str, out: Path, report: dict) -> None:
    import mlflow

    try:
        default_timeouts()  # seconds per request, not MLflow's minutes of retries
        client = mlflow.MlflowClient()
        client.log_artifact(run_id, str(out / "svm_report.json"), "evaluation")
        client.log_artifact(run_id, str(out / "svm_table.md"), "evaluation")
        for key in ("mean_accuracy", "mean_balanced_accuracy", "mean_majority", "focus_mean_accuracy",
                    "focus_mean_balanced_accuracy"):
            if key in report:
                client.log_metric(run_id, f"eval/svm/{key}", report[key])
        for key in ("kl_per_image", "active_units"):
            if "latent" in report:
                client.log_metric(run_id, f"eval/latent/{key}", report["latent"][key])
    except Exception as err:  # noqa: BLE001
        raise UserError(f"MLflow run {run_id}: cannot log the SVM report ({str(err).splitlines()[0]})") from None


if __name__ == "__main__":
    sys.exit(main())
