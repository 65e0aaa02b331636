"""Train 40 linear SVMs (one per attribute) on latents and print the table beside the paper's Table 1; report the
latents' KL per image and active units on the test split."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import cli_main
from dfcvae_dist.evaluation.svm import (REPORT_FILE, TABLE_FILE, evaluate_svms, footer_lines, header_lines,
                                        headline_lines, table_rows)
from dfcvae_dist.tracking import resolve_run_id


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latents", type=Path, required=True, help="latents.npz from tools/extract_latents.py")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--mlflow-run", help="log the report into this MLflow run: a run id or a training run directory")
    p.add_argument("--subsample", type=int, default=20_000, help="training images used to choose C")
    p.add_argument("--jobs", type=int, default=2,
                   help="attributes fitted in parallel (at most one per CPU this process may use)")
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
    console = Console(width=220)
    for line in header_lines(report):
        console.print(line, highlight=False, markup=False)
    table = Table(*header)
    for row in rows:
        table.add_row(*(cell.replace("**", "") for cell in row))
    console.print(table)
    for line in footer_lines(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    print(f"wrote {out / REPORT_FILE} and {out / TABLE_FILE} ({report['seconds']:.1f} s)")
    print("\n".join(headline_lines(report)))


if __name__ == "__main__":
    sys.exit(main())
