"""Train 40 linear SVMs (one per attribute) on latents and print the table beside the paper's Table 1; report the
latents' KL per image and active units on the test split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import cli_main
from dfcvae_dist.evaluation.svm import REPORT_FILE, evaluate_svms, table_rows
from dfcvae_dist.tracking import resolve_run_id


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
    report = evaluate_svms(args.latents, args.out, args.subsample, args.jobs, args.class_weight, args.focus, run_id)
    print_report(report, args.out)
    return 0


def print_report(report: dict, out: Path) -> None:
    header, rows = table_rows(report)
    table = Table(*header, title=f"Attribute prediction, {report['features']} ({report['weights']})")
    for row in rows:
        table.add_row(*row)
    Console(width=220).print(table)
    print(f"mean accuracy {report['mean_accuracy']:.4f}, mean balanced accuracy "
          f"{report['mean_balanced_accuracy']:.4f}, majority {report['mean_majority']:.4f}; "
          f"{report['seconds']:.1f}s; wrote {out / REPORT_FILE}"
          + (f"; {len(report['left_out'])} attribute(s) left out of the means" if report.get("left_out") else ""))
    if "focus" in report:
        print(f"over the {len(report['focus'])} focus attributes: mean accuracy {report['focus_mean_accuracy']:.4f}, "
              f"mean balanced accuracy {report['focus_mean_balanced_accuracy']:.4f}")
    if "latent" in report:
        latent = report["latent"]
        print(f"latents ({latent['split']} split): KL per image {latent['kl_per_image']:.2f} nats, "
              f"{latent['active_units']} of {latent['units']} units active")


if __name__ == "__main__":
    sys.exit(main())
