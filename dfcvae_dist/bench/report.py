"""The benchmark's JSON as one rich table: medians with their interquartile range over rounds."""

from __future__ import annotations

from rich.table import Table


def median_iqr(s: dict, fmt: str = ".1f") -> str:
    return f"{s['median']:{fmt}} ± {s['iqr'] / 2:{fmt}}"


def bench_table(r: dict) -> Table:
    """Every section the run measured."""
    mode = "quick" if r["settings"]["quick"] else "full"
    table = Table("figure", "median ± IQR/2", "note", title=f"bench on {r['settings']['device']} ({mode})")
    for section, rows in (("train_step", step_rows), ("loader", loader_rows), ("extract", extract_rows),
                          ("svm", svm_rows), ("scaling", scaling_rows), ("end_to_end", end_to_end_rows)):
        if section in r:
            rows(table, r)
    return table


def step_rows(table: Table, r: dict) -> None:
    t, lim = r["train_step"], r["limit"]
    for name, v in t["variants"].items():
        ratio = f"{median_iqr(v['ratio_to_plain'], '.2f')}x plain" if "ratio_to_plain" in v else "reference"
        fraction = lim["fractions"][name]
        flag = " ABOVE PEAK" if fraction["above_peak"] else ""
        table.add_row(f"step img/s, {name}", median_iqr(v["img_s"]),
                      f"{ratio}; {fraction['fraction']:.0%} of peak{flag}")
    for precision, reason in t["skipped"].items():
        table.add_row(f"step img/s, {precision}", "skipped", reason)
    table.add_row("step GFLOP/img ours / plain", f"{t['gflop_per_img']:.2f} / {t['plain_gflop_per_img']:.2f}",
                  f"FLOP ratio {t['flop_ratio']:.2f}x")
    table.add_row("peak GFLOP/s (fp32)", f"{lim['peak_gflops']:.0f}", lim["kernel"])


def loader_rows(table: Table, r: dict) -> None:
    lo = r["loader"]
    for workers, v in lo["npy_img_s_by_workers"].items():
        table.add_row(f"loader img/s, npy, {workers} worker(s)", median_iqr(v, ".0f"), "")
    table.add_row("loader img/s, png / jpeg, 1 worker",
                  f"{lo['png_img_s']['median']:.0f} / {lo['jpeg_img_s']['median']:.0f}",
                  f"npy {median_iqr(lo['ratio_to_jpeg'], '.2f')}x jpeg")
    if "paper_phase" in r:
        pp = r["paper_phase"]
        table.add_row("paper training phase", f"{pp['hours']:.1f} h", f"{pp['images']:,} images at {pp['img_s']:.1f} "
                      f"img/s ({pp['variant']}, bound by the {pp['bound_by'].replace('_', ' ')})")


def extract_rows(table: Table, r: dict) -> None:
    ratio = r["extract"].get("ratio_to_train")
    table.add_row("extraction img/s", f"{r['extract']['img_s']:.0f}", f"{ratio:.1f}x training" if ratio else "")


def svm_rows(table: Table, r: dict) -> None:
    table.add_row(f"SVM 40 attributes, n={r['svm']['n']:,}", f"{r['svm']['seconds']:.1f} s", "")


def scaling_rows(table: Table, r: dict) -> None:
    sc = r["scaling"]
    scaling = (f"{sc['img_s_1proc']:.1f} / {sc['img_s_2proc']:.1f}" if "skipped" not in sc else "skipped")
    table.add_row("scaling img/s, 1 / 2 processes", scaling,
                  sc.get("skipped", f"all-reduce {sc['allreduce_mb_per_step']:.1f} MB/step"))


def end_to_end_rows(table: Table, r: dict) -> None:
    e2e = r["end_to_end"]
    for name, run in e2e["runs"].items():
        ratio = e2e.get("ratio_to_default", {}).get(name)
        table.add_row(f"end to end img/s, {name}", f"{run['img_s']:.1f}",
                      f"start {run['startup_s']:.1f} s, first step {run['first_step_s']:.1f} s, "
                      f"{run['loader_workers']} worker(s)" + (f"; {ratio:.2f}x default" if ratio else ""))
    if "ratio_to_step" in e2e:
        table.add_row("end to end / step alone", f"{e2e['ratio_to_step']:.0%}",
                      "dfcvae-123 with data.cache=memory, against the step timed just before and after")
    for kind in ("skipped", "failed"):
        for name, why in e2e[kind].items():
            table.add_row(f"end to end img/s, {name}", kind, why.strip().splitlines()[-1])
