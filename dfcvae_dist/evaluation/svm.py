"""40 linear SVMs on latents (paper section 4.3.5): standardised features, a plain (unweighted) linear
SVM as in the paper, C chosen by accuracy on the validation partition (fitted on a training subsample,
which keeps 40 attributes x a C grid fast), refit on the full training partition, scored on the test
partition. Balanced accuracy and the majority-class baseline are reported beside accuracy, since many
attributes are rare.

An attribute with one class in its train or test split is left out of every mean (and marked in the table):
with one test class "balanced accuracy" is plain accuracy, with one train class there is no classifier, and
either would pull the means towards numbers that say nothing about the features."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from joblib import Parallel, cpu_count, delayed
from sklearn.metrics import accuracy_score, balanced_accuracy_score
from sklearn.preprocessing import StandardScaler
from sklearn.svm import LinearSVC

from dfcvae_dist.errors import UserError, one_line
from dfcvae_dist.evaluation.latent_stats import latent_statistics
from dfcvae_dist.evaluation.paper_table import PAPER_AVERAGES, PAPER_TABLE1
from dfcvae_dist.extraction.latents import load_latents
from dfcvae_dist.metrics import LATENT, SVM, formatted
from dfcvae_dist.rundir import atomic_write
from dfcvae_dist.tracking import mlflow_client

C_GRID = (1e-3, 1e-2, 1e-1, 1.0)
LEFT_OUT_MARK = "†"
REPORT_FILE, TABLE_FILE = "svm_report.json", "svm_table.md"


def evaluate_svms(latents_file: Path, out: Path, subsample: int = 20_000, jobs: int = 2, class_weight: str = "none",
                  focus: str | None = None, run_id: str | None = None, client=None) -> dict:
    """OUT/svm_report.json and OUT/svm_table.md of the latents in `latents_file`: one SVM per attribute
    (`class_weight` none or balanced; C chosen on `subsample` training images; `jobs` attributes at a time, at
    most one per CPU this process may use), the means over the `focus` attributes too (`focus_attributes`), and
    the latent statistics of the test split.
    With `run_id`, also logged into that MLflow run (eval/svm/*, eval/latent/*, the files under evaluation/)
    through `client` (default: a client of MLflow's default store)."""
    start = time.perf_counter()
    latents = load_latents(latents_file)
    focused = focus_attributes(focus, [str(n) for n in latents["attribute_names"]]) if focus else None
    report = evaluate(latents, subsample=subsample, n_jobs=jobs,
                      class_weight=None if class_weight == "none" else class_weight)
    if focused:
        add_focus_means(report, focused)
    latent = latent_statistics(latents)
    if latent:
        report["latent"] = latent
    report["seconds"] = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / REPORT_FILE, json.dumps(report, indent=1))
    atomic_write(out / TABLE_FILE, markdown_table(report))
    if run_id:
        log_svm_report(client or mlflow_client(), run_id, out, report, str(latents["checkpoint"]))
    return report


def log_svm_report(client, run_id: str, out: Path, report: dict, checkpoint: str = "") -> None:
    """The report's files and metrics into the run; the metrics also on the run's logged model of the
    encoder's `checkpoint`, where the run logged one (`model_logging.model_link`)."""
    from dfcvae_dist.model_logging import model_link

    try:
        link = model_link(client, run_id, checkpoint)
        for name in (REPORT_FILE, TABLE_FILE):
            client.log_artifact(run_id, str(out / name), "evaluation")
        for metric in SVM:
            if metric.key in report:
                client.log_metric(run_id, metric.name, report[metric.key], **link)
        for metric in LATENT if "latent" in report else ():
            client.log_metric(run_id, metric.name, report["latent"][metric.key], **link)
    except Exception as err:  # noqa: BLE001 - MLflow raises its own and the store's errors
        raise UserError(f"MLflow run {run_id}: cannot log the SVM report ({one_line(err)})") from None


def fit_attribute(x_train, y_train, x_val, y_val, x_test, y_test, c_grid, subsample: int, seed: int,
                  class_weight: str | None = None) -> dict:
    """Choose C on val (accuracy; balanced accuracy when class_weight="balanced"), refit, score on test.
    `left_out` names why the attribute stays out of the means (one class in a split), else None."""
    majority = float(max(y_test.mean(), 1 - y_test.mean()))
    if len(np.unique(y_train)) < 2:  # one class only: predict it
        pred = np.full_like(y_test, y_train[0])
        return {"C": None, "accuracy": accuracy_score(y_test, pred), "balanced_accuracy": None,
                "majority": majority, "left_out": "one class in the train split"}
    rng = np.random.default_rng(seed)
    pick = rng.permutation(len(y_train))[:subsample]
    if len(np.unique(y_train[pick])) < 2:
        pick = np.arange(len(y_train))
    score = balanced_accuracy_score if class_weight == "balanced" and len(np.unique(y_val)) > 1 else accuracy_score
    svm = lambda c: LinearSVC(C=c, dual=False, class_weight=class_weight)  # noqa: E731
    scores = [score(y_val, svm(c).fit(x_train[pick], y_train[pick]).predict(x_val)) for c in c_grid]
    best = c_grid[int(np.argmax(scores))]
    pred = svm(best).fit(x_train, y_train).predict(x_test)
    one_test_class = len(np.unique(y_test)) < 2
    return {"C": best, "accuracy": accuracy_score(y_test, pred),
            "balanced_accuracy": None if one_test_class else balanced_accuracy_score(y_test, pred),
            "majority": majority, "left_out": "one class in the test split" if one_test_class else None}


def evaluate(latents: dict, c_grid=C_GRID, subsample: int = 20_000, n_jobs: int = 2, seed: int = 0,
             class_weight: str | None = None) -> dict:
    x, attrs, part = latents["mu"].astype(np.float64), latents["attrs"].astype(np.int64), latents["partition"]
    names = [str(n) for n in latents["attribute_names"]]
    train, val, test = (part == 0), (part == 1), (part == 2)
    source = str(latents.get("path", "latents"))
    if not train.any() or not test.any():
        raise UserError(f"{source}: the SVMs need train and test partitions (got {train.sum()} train, {test.sum()} "
                        "test images): extract with --split train,val,test")
    c_chosen_on = "the val partition"
    if not val.any():  # no val partition (own image folders): hold out part of train for C
        if train.sum() < 2:
            raise UserError(f"{source}: no val partition and {int(train.sum())} train image: too few to hold "
                            "some out for choosing C")
        held = np.flatnonzero(train)[:: 10]
        val[held], train[held] = True, False
        c_chosen_on = "every 10th train image (no val partition)"
    scaler = StandardScaler().fit(x[train])
    xs = scaler.transform(x)
    # liblinear is single-threaded: workers past the CPUs this process may use only add their start-up
    results = Parallel(n_jobs=min(n_jobs, cpu_count()) if n_jobs > 0 else n_jobs)(  # joblib's -1: every CPU
        delayed(fit_attribute)(xs[train], attrs[train, j], xs[val], attrs[val, j], xs[test], attrs[test, j],
                               c_grid, subsample, seed, class_weight)
        for j in range(len(names)))
    per_attribute = [{"attribute": n, **r} for n, r in zip(names, results, strict=True)]
    counted = [r for r in per_attribute if not r["left_out"]]
    if not counted:
        raise UserError(f"{source}: every attribute has one class in its train or test split ({int(train.sum())} "
                        f"train, {int(test.sum())} test images): no mean to report; extract more images")
    return {
        "features": str(latents["features"]), "checkpoint": str(latents["checkpoint"]),
        "weights": str(latents["weights"]), **provenance(latents),
        "counts": {"train": int(train.sum()), "val": int(val.sum()), "test": int(test.sum())},
        "c_grid": list(c_grid),
        "c_chosen_on": c_chosen_on,
        "class_weight": class_weight or "none",
        "per_attribute": per_attribute,
        "left_out": [r["attribute"] for r in per_attribute if r["left_out"]],
        **{f"mean_{key}": float(np.mean([r[key] for r in counted])) for key in ("accuracy", "balanced_accuracy",
                                                                                 "majority")},
    }


def provenance(latents: dict) -> dict:
    """Whether the images were synthetic (None: the latents file does not say) and the weights of the loss
    network the model was trained with, as extraction recorded them."""
    synthetic = {"true": True, "false": False}.get(str(latents.get("synthetic", "unknown")))
    return {"synthetic": synthetic, "loss_weights": str(latents.get("loss_weights", "unknown"))}


def comparison_caveats(report: dict) -> list[str]:
    """Why this report's numbers do not compare with the paper's Table 1, one clause each (none: they do)."""
    caveats = []
    if report.get("synthetic") is None:
        caveats.append("the latents do not record whether the images are CelebA (an extraction older than that "
                       "record)")
    elif report["synthetic"]:
        caveats.append("the images are synthetic faces drawn by dfcvae-synthetic, not CelebA")
    if report["features"] == "vgg-fc" and report["weights"].startswith("random"):
        caveats.append(f"the VGG19 features have random weights ({report['weights']})")
    loss_weights = report.get("loss_weights", "unknown")
    if report["features"] == "latent" and loss_weights.startswith("random"):
        caveats.append(f"the model was trained with a loss network of random weights ({loss_weights}), not the "
                       "paper's feature perceptual loss")
    elif report["features"] == "latent" and loss_weights == "unknown":
        caveats.append("the weights of the model's loss network are not recorded")
    if len(report["per_attribute"]) != len(next(iter(PAPER_TABLE1.values()))):
        caveats.append(f"{len(report['per_attribute'])} attributes, not CelebA's 40")
    return caveats


def focus_attributes(spec: str, known: list[str]) -> list[str]:
    """`spec`: comma-separated names, or 'synthetic' for the attributes the synthetic CelebA draws."""
    if spec == "synthetic":
        from dfcvae_dist.data.synthetic import VISIBLE_ATTRIBUTES

        focus = list(VISIBLE_ATTRIBUTES)
    else:
        focus = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in focus if name not in known]
    if unknown or not focus:
        raise UserError(f"--focus: unknown attribute(s) {', '.join(unknown) or '(none given)'}; "
                        f"known: {', '.join(known)}")
    return focus


def add_focus_means(report: dict, focus: list[str]) -> None:
    """Means over a subset, e.g. the attributes a synthetic data set makes visible (less those left out)."""
    rows = {r["attribute"]: r for r in report["per_attribute"]}
    counted = [name for name in focus if not rows[name]["left_out"]]
    if not counted:
        raise UserError("--focus: every focus attribute has one class in its train or test split: no mean to report")
    report["focus"] = focus
    for key in ("accuracy", "balanced_accuracy", "majority"):
        report[f"focus_mean_{key}"] = float(np.mean([rows[name][key] for name in counted]))


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: ours (accuracy %, balanced %, majority %) beside Table 1, then the mean over the counted
    attributes and over the focus ones. '*' marks where we beat a column, only where the numbers compare with the
    paper's (`comparison_caveats`); '†' an attribute left out of the means."""
    header = ["attribute", "accuracy %", "balanced %", "majority %", "C", *PAPER_TABLE1]
    paper_order = len(report["per_attribute"]) == 40
    comparable = not comparison_caveats(report)
    rows = []
    for i, r in enumerate(report["per_attribute"]):
        ours = 100 * r["accuracy"]
        paper = [f"{v[i]}{'*' if comparable and ours > v[i] else ''}" if paper_order else "-"
                 for v in PAPER_TABLE1.values()]
        rows.append([r["attribute"] + (LEFT_OUT_MARK if r["left_out"] else ""), f"{ours:.1f}",
                     percent(r["balanced_accuracy"], ".1f"), f"{100 * r['majority']:.1f}",
                     "-" if r["C"] is None else f"{r['C']:g}", *paper])
    counted = len(report["per_attribute"]) - len(report["left_out"])
    left_out = f"; {len(report['left_out'])}{LEFT_OUT_MARK} left out" if report["left_out"] else ""
    mean = 100 * report["mean_accuracy"]
    rows.append([f"**mean over {counted} attributes{left_out}**", *mean_cells(report, "mean"), "",
                 *[f"{v:.2f}{'*' if comparable and mean > v else ''}" for v in PAPER_AVERAGES.values()]])
    if "focus" in report:
        focus = [name for name in report["focus"] if name not in report["left_out"]]
        rows.append([f"**focus: mean over {len(focus)} attributes**", *mean_cells(report, "focus_mean"), "",
                     *["-"] * len(PAPER_AVERAGES)])
    return header, rows


def percent(value: float | None, spec: str) -> str:
    return "-" if value is None else format(100 * value, spec)


def mean_cells(report: dict, prefix: str) -> list[str]:
    return [percent(report.get(f"{prefix}_{key}"), ".2f") for key in ("accuracy", "balanced_accuracy", "majority")]


def features_source(report: dict, short: bool = False) -> str:
    if report["features"] == "latent":
        return "the model's latent means" + ("" if short else f" (checkpoint {report['checkpoint'] or '-'})")
    return f"{report['features']} features ({report['weights']})"


def header_lines(report: dict) -> list[str]:
    """The table's first lines: what it is and, where it applies, why it does not compare with the paper."""
    lines = [f"# Attribute prediction from {features_source(report, short=True)}: one linear SVM per attribute, "
             "test split"]
    caveats = comparison_caveats(report)
    if caveats:
        lines += ["", f"**Not comparable with the paper's Table 1**: {'; '.join(caveats)}. The paper's columns are "
                  "shown for their layout only; no attribute is marked as beating them."]
    return lines


def footer_lines(report: dict) -> list[str]:
    counts = report["counts"]
    lines = ["- majority %: the test accuracy of always answering the attribute's more common class. "
             + ("With balanced class weights (as here) an SVM trades accuracy on a rare attribute for finding it, so "
                "its accuracy can fall below this while its balanced accuracy (50 = chance) rises."
                if report["class_weight"] == "balanced" else
                "An accuracy at or below it says the features tell nothing about the attribute; balanced accuracy "
                "(50 = chance) shows it directly."),
             f"- features: {features_source(report)}; "
             f"{counts['train']:,} train, {counts['val']:,} val and {counts['test']:,} test images; C chosen on "
             f"{report['c_chosen_on']}; class weights {report['class_weight']}."]
    if not comparison_caveats(report):
        lines.append("- `*`: our accuracy is higher than that column's.")
    if report["left_out"]:
        reasons = ", ".join(f"{r['attribute']} ({r['left_out']})" for r in report["per_attribute"] if r["left_out"])
        lines.append(f"- `{LEFT_OUT_MARK}`: {len(report['left_out'])} attribute(s) left out of the means, their "
                     f"balanced accuracy being undefined: {reasons}.")
    return lines


def markdown_table(report: dict) -> str:
    header, rows = table_rows(report)
    lines = [*header_lines(report), "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join([*lines, "", *footer_lines(report)]) + "\n"


def headline_lines(report: dict) -> list[str]:
    """The report's numbers in a few lines: the means over the focus attributes and over all counted ones, the
    latents' KL and active units; first, whether they compare with the paper's."""
    caveats = comparison_caveats(report)
    means = SVM[:3]  # mean accuracy, mean balanced accuracy, majority-class baseline
    counted = len(report["per_attribute"]) - len(report["left_out"])
    lines = [f"headline (not comparable with the paper's Table 1: {len(caveats)} reason(s) in the table's first "
             "lines):" if caveats else "headline:"]
    if "focus" in report:
        focus = [name for name in report["focus"] if name not in report["left_out"]]
        lines.append(f"  over the {len(focus)} focus attributes: " + ", ".join(
            f"{m.label} {formatted(m, report.get('focus_' + m.key))}" for m in means))
    lines.append(f"  over all {counted} attributes: " + ", ".join(f"{m.label} {formatted(m, report[m.key])}"
                                                                 for m in means))
    if "latent" in report:
        latent = report["latent"]
        kl, active = LATENT
        lines.append(f"  latents ({latent['split']} split): {kl.label} {formatted(kl, latent[kl.key])} {kl.unit}, "
                     f"{active.label} {latent[active.key]} of {latent['units']}")
    return lines
