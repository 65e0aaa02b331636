"""The comparison report of a sweep (the paper's section 4 side by side): for every run name, its seeds pooled
as mean ± std, from the files each finished task left in its run directory:

    RUN_DIR/COMPLETED.json                 wall time and img/s
    RUN_DIR/eval/svm/svm_report.json       the 40 attribute SVMs, and its "latent" section (KL, active units)
    RUN_DIR/eval/quality/quality.json      MSE, SSIM, MS-SSIM, LPIPS, blur ratio, perceptual distance, FID per
                                           sampler (N(0, I), Gaussian mixture), and the fitted mixture's file

It knows tasks only as `ReportTask`s, so it reports on a sweep file's tasks or on any set of run directories.
A task that has not finished is listed with its status; a finished one whose file is missing or unreadable
is listed with one line naming the file, and the rest of its numbers are still used.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.evaluation.paper_table import PAPER_AVERAGES, PAPER_TABLE1
from dfcvae_dist.evaluation.svm import comparison_caveats
from dfcvae_dist.families import family_names, get_family
from dfcvae_dist.metrics import COST, HEADLINE, LATENT, QUALITY, SVM, keys
from dfcvae_dist.rundir import DONE_MARKER, RESUME_MARKER, atomic_write
from dfcvae_dist.tracking import (experiment_url, mlflow_client, run_page_url, server_reachable,
                                  ui_command)

SVM_FILE = Path("eval/svm/svm_report.json")
QUALITY_FILE = Path("eval/quality/quality.json")
SVM_MEANS, LATENT_KEYS, QUALITY_METRICS, COST_KEYS = keys(SVM), keys(LATENT), keys(QUALITY), keys(COST)


@dataclass(frozen=True)
class ReportTask:
    """One training run of the comparison: `run_name` is its column, `name` tells its seeds apart."""

    name: str
    run_name: str
    family: str  # model.name ("unknown" where the run directory has no config.yaml)
    run_dir: Path
    status: str  # finished, running, incomplete, not started
    latent_dim: int | None = None  # model.latent_dim (None where the run directory has no config.yaml)


@dataclass
class TaskFiles:
    """What a finished task left: COMPLETED.json, its SVM report (VAEs) and its quality entry."""

    task: ReportTask
    completed: dict | None = None
    svm: dict | None = None
    quality: dict | None = None
    quality_notes: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def run_dir_status(run_dir: Path) -> str:
    """The status of a bare run directory (no sweep file to compare its config with)."""
    if (run_dir / DONE_MARKER).is_file():
        return "finished"
    if (run_dir / RESUME_MARKER).is_file() or (run_dir / "checkpoints").is_dir():
        return "incomplete"
    return "not started"


def tasks_from_runs(specs: list[str]) -> list[ReportTask]:
    """`NAME=RUN_DIR` items (a name given twice: its seeds); the family comes from the run's config.yaml."""
    tasks = []
    for spec in specs:
        run_name, sep, path = spec.partition("=")
        if not sep or not run_name or not path:
            raise UserError(f"--runs {spec}: expected NAME=RUN_DIR")
        run_dir = Path(path)
        config = run_dir / "config.yaml"
        try:
            model = yaml.safe_load(config.read_text())["model"] if config.is_file() else {"name": "unknown"}
            family = model["name"]
        except (yaml.YAMLError, KeyError, TypeError) as err:
            raise UserError(f"{config}: no model.name to tell the model family ({err})") from None
        tasks.append(ReportTask(str(run_dir), run_name, family, run_dir, run_dir_status(run_dir),
                                model.get("latent_dim")))
    return tasks


def sweep_tasks(path: Path) -> tuple[list[ReportTask], dict]:
    """A sweep file's tasks with their status, and what the report needs of the sweep itself (its name, its
    evaluation shards, its parent run from SWEEP_DIR/parent.json if there is one)."""
    from dfcvae_dist.sweeps.plan import load_sweep
    from dfcvae_dist.sweeps.status import task_status

    sweep = load_sweep(path)
    tasks = [ReportTask(t.name, t.run_name, t.family, t.run_dir, task_status(t), t.config.model.latent_dim)
             for t in sweep.tasks]
    parent_file = sweep.sweep_dir / "parent.json"
    parent = read_json(parent_file) if parent_file.is_file() else None
    # the faces of reconstructions.png: the quality metrics' shards (the training crop) where the sweep names them
    shards = getattr(sweep.evaluate, "quality_shards", None) or sweep.evaluate.shards
    return tasks, {"title": f"Sweep {sweep.name}", "shards": shards, "parent": parent}


def encodes(family: str) -> bool:
    """The family has an encoder, so its tasks have an SVM report (False for an unknown family)."""
    return family in family_names() and get_family(family).encodes


def in_paper(family: str) -> bool:
    return family in family_names() and get_family(family).in_paper


def expected_files(task: ReportTask) -> list[Path]:
    return [Path(DONE_MARKER), QUALITY_FILE, *([SVM_FILE] if encodes(task.family) else [])]


def missing_files(task: ReportTask) -> list[str]:
    """Of a trained task that is not finished: the evaluation files it still lacks, one line each."""
    if not (task.run_dir / DONE_MARKER).is_file():
        return []
    return [f"{task.run_dir / f}: missing" for f in expected_files(task) if not (task.run_dir / f).is_file()]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable ({one_line(err)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object")
    return data


def read_task(task: ReportTask) -> TaskFiles:
    files = TaskFiles(task)
    # strict=False: a family that encodes nothing expects no SVM file
    for attr, relative in zip(("completed", "quality", "svm"), expected_files(task), strict=False):
        try:
            setattr(files, attr, read_json(task.run_dir / relative))
        except UserError as err:
            files.problems.append(str(err))
    if files.quality is not None:
        files.quality, files.quality_notes = quality_entry(files.quality, task.run_dir / QUALITY_FILE, files.problems)
    return files


def quality_entry(report: dict, path: Path, problems: list[str]) -> tuple[dict | None, dict]:
    """This run's one model in a quality.json, and its notes (why a metric is null, how it was computed)."""
    models = report.get("models")
    if not isinstance(models, dict) or len(models) != 1:
        problems.append(f"{path}: expected one model under 'models', found {len(models or {})}")
        return None, {}
    notes = report.get("notes")
    return next(iter(models.values())), notes if isinstance(notes, dict) else {}


def mean_std(values: list) -> dict | None:
    """Mean, sample standard deviation over seeds (0 for one seed) and n; None where no seed has a number."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
               and math.isfinite(v)]
    if not numbers:
        return None
    mean = sum(numbers) / len(numbers)
    var = sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1) if len(numbers) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(numbers)}


def svm_summary(reports: list[dict]) -> dict | None:
    """Per attribute: accuracy over seeds (and whether any seed left it out of its means); the means."""
    if not reports:
        return None
    names = [r["attribute"] for r in reports[0]["per_attribute"]]
    rows = [{r["attribute"]: r for r in report["per_attribute"]} for report in reports]
    per_attribute = {name: {**(mean_std([row[name]["accuracy"] for row in rows if name in row]) or {}),
                            "left_out": any(row.get(name, {}).get("left_out") for row in rows)} for name in names}
    means = {key: mean_std([r.get(key) for r in reports]) for key in SVM_MEANS}
    caveats = list(dict.fromkeys(c for report in reports for c in comparison_caveats(report)))
    return {"n": len(reports), "per_attribute": per_attribute, **means, "caveats": caveats}


def summarise_run(files: list[TaskFiles]) -> dict:
    """One column of the report: a run name's finished tasks pooled."""
    svm = [f.svm for f in files if f.svm and isinstance(f.svm.get("per_attribute"), list)]
    latents = [f.svm.get("latent") or {} for f in files if f.svm]
    quality = [f.quality for f in files if f.quality]
    notes = {}
    for f in files:
        notes.update(f.quality_notes)
    return {
        "family": files[0].task.family,
        "tasks": [f.task.name for f in files],
        "svm": svm_summary(svm),
        "latent": {key: mean_std([entry.get(key) for entry in latents]) for key in LATENT_KEYS},
        "quality": {key: mean_std([entry.get(key) for entry in quality]) for key in QUALITY_METRICS},
        "quality_notes": notes,
        "cost": {key: mean_std([(f.completed or {}).get(key) for f in files]) for key in COST_KEYS},
        "mlflow_run_ids": [(f.completed or {}).get("mlflow_run_id") for f in files],
    }


def gather(tasks: list[ReportTask]) -> tuple[dict, list[dict]]:
    """(run name -> its pooled column, in task order; one row per task with its status and problems)."""
    by_run: dict[str, list[TaskFiles]] = {}
    rows = []
    for task in tasks:
        files = read_task(task) if task.status == "finished" else None
        if files is not None:
            by_run.setdefault(task.run_name, []).append(files)
        rows.append({"name": task.name, "run_name": task.run_name, "family": task.family,
                     "run_dir": str(task.run_dir), "status": task.status,
                     "problems": files.problems if files else missing_files(task)})
    return {name: summarise_run(files) for name, files in by_run.items()}, rows


def pooling_warnings(tasks: list[ReportTask]) -> list[str]:
    """Run names whose finished tasks are different models (family or latent size), which the report would pool as
    seeds of one."""
    models: dict[str, dict[tuple, list[str]]] = {}
    for task in tasks:
        if task.status == "finished":
            models.setdefault(task.run_name, {}).setdefault((task.family, task.latent_dim), []).append(task.name)
    return [f"{name}: pools different models as seeds (" + "; ".join(
        f"{family} latent_dim {latent}: {', '.join(names)}" for (family, latent), names in kinds.items()) +
        "); give each model its own name" for name, kinds in models.items() if len(kinds) > 1]


def report_metrics(runs: dict) -> dict[str, float]:
    """The summary numbers for MLflow: report/<run_name>/<metric>, the mean over seeds."""
    metrics = {}
    for name, run in runs.items():
        svm = run["svm"] or {}
        picks = {**{f"svm_{key}": svm.get(key) for key in SVM_MEANS}, **run["latent"],
                 **{f"quality_{key}": value for key, value in run["quality"].items()}, **run["cost"]}
        metrics.update({f"report/{name}/{key}": stat["mean"] for key, stat in picks.items() if stat})
    return metrics


def headline_table(runs: dict) -> tuple[list[str], list[list[str]]]:
    """Header and one row per run name: the HEADLINE numbers (metrics.py), mean ± std over its seeds."""
    rows = []
    for name, run in runs.items():
        sections = {"svm": run["svm"] or {}, "latent": run["latent"], "quality": run["quality"]}
        stats = [sections[m.name.split("/")[1]].get(m.key) for m in HEADLINE]
        rows.append([name, str(seeds(run)), *(cell(stat, spec=m.spec, column_n=seeds(run))
                                              for stat, m in zip(stats, HEADLINE, strict=True))])
    return ["run", "seeds", *(m.label for m in HEADLINE)], rows


def run_pages(runs: dict, uri: str | None = None) -> list[str]:
    """Where each finished task's MLflow run is, and how to serve a local store; one line per problem. `uri`:
    the runs' tracking URI (default: MLflow's, from MLFLOW_TRACKING_URI)."""
    ids = [(name, run_id) for name, run in runs.items() for run_id in run.get("mlflow_run_ids", []) if run_id]
    if not ids:
        return []
    client = mlflow_client(uri)
    uri = client.tracking_uri
    problem = server_reachable(uri)
    if problem:
        return [f"MLflow at {uri}: {problem}; no run pages"]
    command = ui_command(uri)
    lines, experiments = [f"MLflow ({uri}" + (f"; serve it: {command})" if command else ")")], {}
    for name, run_id in ids:
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
        except Exception as err:  # noqa: BLE001 - a run from another store: say so, list the others
            lines.append(f"  {name}: run {run_id} is not in this store ({one_line(err, 200)})")
            continue
        experiments.setdefault(experiment_id, None)
        lines.append(f"  {name}: {run_page_url(uri, experiment_id, run_id)}")
    lines += [f"  every run of experiment {e}: {experiment_url(uri, e)}" for e in experiments]
    return lines


def log_to_parent(parent: dict | None, out: Path, metrics: dict[str, float]) -> str:
    """Log the report's files (under report/) and summary numbers into the sweep's parent run; the line to
    print. Never fails the report: an unreachable server or a missing parent is said and skipped."""
    if not parent:
        return "no parent run (parent.json): the report is not logged to MLflow"
    uri, run_id = parent.get("tracking_uri"), parent.get("run_id")
    problem = "no run_id in parent.json" if not run_id else server_reachable(uri) if uri else None
    if problem:
        return f"MLflow parent run {run_id} at {uri}: {problem}; the report is not logged"
    try:
        from mlflow.entities import Metric

        client = mlflow_client(uri)
        client.log_artifacts(run_id, str(out), "report")
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
    except Exception as err:  # noqa: BLE001 - the report on disk stands; the line says why it is not in MLflow
        return f"MLflow parent run {run_id}: the report is not logged ({one_line(err, 300)})"
    return f"logged the report into MLflow parent run {run_id} (artifacts under report/, {len(metrics)} metrics)"


def prepare_output(out: Path) -> None:
    """The report's folder, created and writable, before any work."""
    below = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if below is not None:
        raise UserError(f"--out {out}: {below} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot create it ({err.strerror})") from None
    if not os.access(out, os.W_OK):
        raise UserError(f"--out {out}: the folder is read-only")


def build_report(tasks: list[ReportTask], out: Path, parent: dict | None = None, shards: str | None = None,
                 title: str = "comparison") -> dict:
    """Write report.json, report.md, samples.png and reconstructions.png into `out`; log them to `parent`."""
    from dfcvae_dist.sweeps.figures import comparison_figures

    if not any(task.status == "finished" for task in tasks):
        raise UserError("nothing to report: no finished run (" + "; ".join(
            f"{t.run_dir}: {t.status if t.run_dir.is_dir() else 'no such directory'}" for t in tasks[:5]) +
            ("; …" if len(tasks) > 5 else "") + ")")
    prepare_output(out)
    runs, task_rows = gather(tasks)
    finished = [task for task in tasks if task.status == "finished"]
    figures, figure_problems = comparison_figures(finished, out, shards)
    report = {"title": title, "runs": runs, "tasks": task_rows, "warnings": pooling_warnings(tasks),
              "figures": figures, "figure_problems": figure_problems,
              "paper_table1": {"columns": PAPER_TABLE1, "averages": PAPER_AVERAGES}}
    atomic_write(out / "report.json", json.dumps(report, indent=1, default=str))
    atomic_write(out / "report.md", report_markdown(report))
    report["mlflow"] = log_to_parent(parent, out, report_metrics(runs))
    return report



# report.md

def cell(stat: dict | None, scale: float = 1.0, spec: str = ".1f", column_n: int | None = None) -> str:
    """`mean ± std` (the std only over two seeds or more), `(n=K)` where fewer seeds than the column's have it."""
    if not stat:
        return "n/a"
    text = format(scale * stat["mean"], spec)
    if stat["n"] > 1:
        text += f" ± {format(scale * stat['std'], spec)}"
    return text + (f" (n={stat['n']})" if column_n is not None and stat["n"] != column_n else "")


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table; a `|` in a cell (a run name given with --runs) is escaped, not a column break."""
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]


def seeds(run: dict) -> int:
    return len(run["tasks"])


def tasks_section(task_rows: list[dict]) -> list[str]:
    rows = [[t["name"], t["run_name"], t["family"], t["status"], "; ".join(t["problems"]) or "-"] for t in task_rows]
    unfinished = sum(t["status"] != "finished" for t in task_rows)
    return ["## Tasks", "", f"{len(task_rows)} task(s), {unfinished} not finished (left out of every number below).",
            "", *table(["task", "run name", "family", "status", "problems"], rows), ""]


def headline_section(runs: dict) -> list[str]:
    return ["## Headline numbers", "", *table(*headline_table(runs)), "",
            "Focus: the attributes the images are known to show (for synthetic faces, those drawn); the means "
            "are balanced accuracies (0.5 = chance). Sections below: every number and what it means.", ""]


def svm_section(runs: dict) -> list[str]:
    columns = {name: run["svm"] for name, run in runs.items() if run["svm"]}
    lines = ["## Attribute prediction: 40 linear SVMs on the latents (accuracy %, mean ± std over seeds)", ""]
    if not columns:
        return lines + ["No finished VAE task has an SVM report.", ""]
    caveats = {name: svm.get("caveats", []) for name, svm in columns.items() if svm.get("caveats")}
    if caveats:
        lines += ["**Not comparable with the paper's Table 1**: " + "; ".join(
            f"{name}: {', '.join(reasons)}" for name, reasons in caveats.items()) + ". The paper's columns are "
            "shown for their layout only.", ""]
    names = list(next(iter(columns.values()))["per_attribute"])
    paper = PAPER_TABLE1 if len(names) == 40 else {}  # the paper's columns are in CelebA's 40-attribute order
    extras = {name for name in columns if not in_paper(runs[name]["family"])}
    header = ["attribute", *(f"{name}{' ‡' if name in extras else ''} (n={svm['n']})" for name, svm in columns.items()),
              *paper]
    rows = []
    for i, attribute in enumerate(names):
        stats = [svm["per_attribute"].get(attribute) for svm in columns.values()]
        mark = "†" if any(s and s["left_out"] for s in stats) else ""
        rows.append([attribute + mark, *(cell(s if s and "mean" in s else None, 100, ".1f", svm["n"])
                                         for s, svm in zip(stats, columns.values(), strict=True)),
                     *(str(v[i]) for v in paper.values())])
    for key, label in (("mean_accuracy", "Average accuracy"), ("mean_balanced_accuracy", "Average balanced accuracy"),
                       ("mean_majority", "Majority-class baseline"), ("focus_mean_accuracy", "Focus: accuracy"),
                       ("focus_mean_balanced_accuracy", "Focus: balanced accuracy"),
                       ("focus_mean_majority", "Focus: majority-class baseline")):
        if any(svm.get(key) for svm in columns.values()):
            averages = [f"{v:.2f}" for v in PAPER_AVERAGES.values()] if paper and key == "mean_accuracy" else \
                ["-"] * len(paper)
            cells = (cell(svm.get(key), 100, ".2f", svm["n"]) for svm in columns.values())
            rows.append([f"**{label}**", *cells, *averages])
    note = ("Beside the paper's Table 1 (FaceTracer, PANDA-w, PANDA-l, LNets+ANet, VAE-Z, VGG-FC); the comparison "
            "means something only on real CelebA with ImageNet VGG19 weights. Majority-class baseline: the test "
            "accuracy of always answering an attribute's more common class (an SVM trained with balanced class "
            "weights may score below it while finding the rare class; balanced accuracy, 50 = chance, does not "
            "hide that). `†`: left out of the means in at least one seed (one class in its train or test split). "
            "Averages are over the attributes each seed counted.")
    if extras:
        note += " `‡`: a model family the paper did not train (an extra run beside its comparison)."
    return lines + table(header, rows) + ["", note, ""]


def metric_cells(stats: dict, metrics: list, run: dict) -> list[str]:
    return [cell(stats[m.key], spec=m.spec, column_n=seeds(run)) for m in metrics]


def latent_section(runs: dict) -> list[str]:
    rows = [[name, str(seeds(run)), *metric_cells(run["latent"], LATENT, run)] for name, run in runs.items()]
    return ["## Latent space (test split)", "", *table(["run", "seeds", *(m.label for m in LATENT)], rows), "",
            "n/a: a VAE whose svm_report.json has no `latent` section, or a model without an encoder (a GAN).", ""]


def quality_section(runs: dict) -> list[str]:
    rows = [[name, *metric_cells(run["quality"], QUALITY, run)] for name, run in runs.items()]
    notes = {}
    for name, run in runs.items():
        for metric, note in run["quality_notes"].items():
            notes.setdefault(f"{metric}: {note}", []).append(name)
    why = "the notes below say why" if notes else "its quality.json gives no note"
    return ["## Reconstruction and sample quality (test split)", "",
            *table(["run", *(m.label for m in QUALITY)], rows), "",
            f"n/a: not computed for that model; {why}.", "",
            *(f"- {text} ({', '.join(names)})" for text, names in notes.items()), *([""] if notes else [])]


def cost_section(runs: dict) -> list[str]:
    rows = [[name, *metric_cells(run["cost"], COST, run)] for name, run in runs.items()]
    return ["## Training cost (from COMPLETED.json)", "", *table(["run", *(m.label for m in COST)], rows), ""]


def figures_section(figures: dict, problems: list[str]) -> list[str]:
    lines = ["## Figures", ""]
    if "samples" in figures:
        lines += ["Figure 3: random samples, one row per run name; every VAE decodes the same z, the DCGAN "
                  "draws its own.", "", "![samples](samples.png)", ""]
    if "samples_gmm" in figures:
        lines += ["Figure 3 with the other sampler: each VAE decodes z drawn from the Gaussian mixture its quality "
                  "step fitted to its training latents (`FID (GMM)` above).", "", "![samples from the mixture]"
                  "(samples-gmm.png)", ""]
    if "reconstructions" in figures:
        lines += ["Figure 4: the same test faces (top row) through each VAE.", "",
                  "![reconstructions](reconstructions.png)", ""]
    return lines + [f"- {problem}" for problem in problems] + ([""] if problems else [])


def report_markdown(report: dict) -> str:
    runs = report["runs"]
    lines = [f"# {report['title']}", "",
             "One column per run name; its finished seeds pooled as mean ± std (sample std; none for one seed), "
             "n = the number of seeds.", "", *(f"**Warning:** {w}" for w in report["warnings"]),
             *([""] if report["warnings"] else []), *tasks_section(report["tasks"])]
    if runs:
        lines += [*headline_section(runs), *svm_section(runs), *latent_section(runs), *quality_section(runs),
                  *cost_section(runs)]
    lines += figures_section(report["figures"], report["figure_problems"])
    return "\n".join(lines)
