"""The comparison report of a sweep: the 40-attribute SVM table (one column per run name, seeds pooled as
mean ± std, beside the paper's Table 1), quality, latent and cost tables, Figures 3 and 4; logged into the
sweep's parent MLflow run. Ends with each run name's headline numbers and its MLflow run pages.

    dfcvae-report --sweep sweeps/paper.yaml --out results/paper
    dfcvae-report --runs dfcvae=runs/a --runs dfcvae=runs/b --runs pvae=runs/c --out results/mine
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from dfcvae_dist.errors import UserError, cli_main
from dfcvae_dist.sweeps.report import build_report, headline_table, read_json, run_pages, sweep_tasks, tasks_from_runs


@cli_main
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep", type=Path, help="a sweep file: its tasks, shards and parent run")
    source.add_argument("--runs", action="append", metavar="NAME=RUN_DIR",
                        help="a run directory and its column (repeat; one NAME given several times: its seeds)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shards", help="manifest directory of the test faces in reconstructions.png (default: the "
                                    "sweep's evaluate.shards, else the first VAE's data.shards)")
    p.add_argument("--parent", type=Path, help="with --runs: a parent.json naming the MLflow run to log into")
    args = p.parse_args(argv)
    if args.sweep:
        if args.parent:
            raise UserError("--parent is for --runs; a sweep's parent run is SWEEP_DIR/parent.json")
        tasks, sweep = sweep_tasks(args.sweep)
    else:
        tasks = tasks_from_runs(args.runs)
        sweep = {"title": "Comparison", "shards": None, "parent": read_json(args.parent) if args.parent else None}
    report = build_report(tasks, args.out, sweep["parent"], args.shards or sweep["shards"], sweep["title"])
    for task in report["tasks"]:
        if task["status"] != "finished" or task["problems"]:
            print(f"{task['name']}: {task['status']}" + "".join(f"\n  {p}" for p in task["problems"]))
    for warning in report["warnings"]:
        print(f"warning: {warning}")
    for problem in report["figure_problems"]:
        print(problem)
    print(report["mlflow"])
    print(f"wrote {args.out / 'report.md'} ({len(report['runs'])} run name(s), {len(tasks)} task(s)), "
          f"report.json, {', '.join(f['file'] for f in report['figures'].values()) or 'no figures'}")
    if report["runs"]:
        print_headline(report["runs"], (sweep["parent"] or {}).get("tracking_uri"))
    return 0


def print_headline(runs: dict, tracking_uri: str | None) -> None:
    """The last lines: the headline numbers of each run name, then where their MLflow runs are."""
    header, rows = headline_table(runs)
    table = Table(*header, title="Headline numbers (mean ± std over seeds; every number: report.md)")
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)
    for line in run_pages(runs, tracking_uri):
        print(line)


if __name__ == "__main__":
    sys.exit(main())
