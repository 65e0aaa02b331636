"""The comparison report on real run directories (the real trainer, extraction, SVM and quality CLIs): one column
per run name with its seeds pooled as mean ± std, unfinished tasks listed, Figures 3 and 4 with a labelled row
per model, everything logged into the sweep's parent MLflow run, a corrupt evaluation file named in one line."""

import json
import re
import shutil
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

from dfcvae_dist.cli.quality import main as quality_main
from dfcvae_dist.cli.report import main as report_main
from dfcvae_dist.cli.svm import main as svm_main
from dfcvae_dist.figures import cell_box, read_layout
from dfcvae_dist.inference import GaussianMixtureSampler, load_trained, sample
from dfcvae_dist.sweeps.report import run_pages
from tests.helpers import ROOT, ProcessGroups, run_tool

pytestmark = pytest.mark.slow


def train_cmd(shard_dir, run_dir, *overrides):
    return [sys.executable, "-m", "dfcvae_dist.train", "--config", ROOT / "configs" / "quickstart.yaml",
            f"data.shards={shard_dir}", f"train.run_dir={run_dir}", "train.max_steps=6", "train.batch_size=16",
            "train.val_every_steps=0", "log.enabled=false", *overrides]


def evaluate(run_dir, name, shard_dir):
    """What a sweep task does after training: RUN_DIR/eval/{latents,svm,quality} (the CLIs' own files)."""
    run_tool("extract_latents.py", "--checkpoint", run_dir, "--shards", shard_dir,
             "--out", run_dir / "eval" / "latents")
    assert svm_main(["--latents", str(run_dir / "eval" / "latents" / "latents.npz"), "--out",
                     str(run_dir / "eval" / "svm"), "--jobs", "1", "--subsample", "200"]) == 0
    assert quality_main(["--checkpoint", f"{name}={run_dir}", "--shards", str(shard_dir), "--vgg-weights", "random",
                         "--max-images", "16", "--out", str(run_dir / "eval" / "quality")]) == 0


@pytest.fixture(scope="module")
def sweep_dir(trained_run, shard_dir, tmp_path_factory):
    """dfcvae (seeds 0 and 1) and pvae trained and evaluated; dcgan not started; a parent run in a sqlite store."""
    root = tmp_path_factory.mktemp("sweep")
    shutil.copytree(trained_run, root / "dfcvae-seed0")  # the session's DFC-VAE (seed 0); never written to
    with ProcessGroups() as groups:
        runs = [groups.popen(train_cmd(shard_dir, root / "dfcvae-seed1", "train.seed=1"), cwd=root),
                groups.popen(train_cmd(shard_dir, root / "pvae-seed0", "model.name=pvae", "loss.beta=1.0"), cwd=root)]
        assert [proc.wait(600) for proc in runs] == [0, 0]
    for task, name in (("dfcvae-seed0", "dfcvae"), ("dfcvae-seed1", "dfcvae"), ("pvae-seed0", "pvae")):
        evaluate(root / task, name, shard_dir)
    from mlflow import MlflowClient

    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("sweeps", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment_id, run_name="tiny").info.run_id
    (root / "parent.json").write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id,
                                                  "tracking_uri": uri}))
    return root


def runs_args(root):
    return [f"dfcvae={root / 'dfcvae-seed0'}", f"dfcvae={root / 'dfcvae-seed1'}", f"pvae={root / 'pvae-seed0'}",
            f"dcgan={root / 'dcgan-seed0'}"]


@pytest.fixture(scope="module")
def report(sweep_dir, shard_dir):
    args = [a for run in runs_args(sweep_dir) for a in ("--runs", run)]
    proc = run_tool("report.py", *args, "--shards", shard_dir, "--parent", sweep_dir / "parent.json",
                    "--out", sweep_dir / "report")
    out = sweep_dir / "report"
    return {"stdout": proc.stdout, "json": json.loads((out / "report.json").read_text()),
            "md": (out / "report.md").read_text(), "out": out}


def svm_report(run_dir):
    return json.loads((run_dir / "eval" / "svm" / "svm_report.json").read_text())


def test_one_column_per_run_name_with_its_seeds_as_mean_and_std(report, sweep_dir):
    runs = report["json"]["runs"]
    assert list(runs) == ["dfcvae", "pvae"]
    seeds = [svm_report(sweep_dir / f"dfcvae-seed{s}")["mean_accuracy"] for s in (0, 1)]
    pooled = runs["dfcvae"]["svm"]["mean_accuracy"]
    assert pooled["n"] == 2 and pooled["mean"] == pytest.approx(statistics.mean(seeds))
    assert pooled["std"] == pytest.approx(statistics.stdev(seeds)) and runs["pvae"]["svm"]["n"] == 1
    header = next(line for line in report["md"].splitlines() if line.startswith("| attribute |"))
    assert header.startswith("| attribute | dfcvae (n=2) | pvae (n=1) | FaceTracer |")
    average = next(line for line in report["md"].splitlines() if line.startswith("| **Average accuracy** |"))
    assert f"| {100 * pooled['mean']:.2f} ± {100 * pooled['std']:.2f} |" in average and "| 87.30 |" in average
    assert len([line for line in report["md"].splitlines() if line.startswith("| 5_o_Clock_Shadow")]) == 1
    cost = runs["dfcvae"]["cost"]
    assert cost["wall_time_s"]["n"] == 2 and cost["img_per_s"]["mean"] > 0
    assert runs["pvae"]["quality"]["mse"]["n"] == 1 and "| MSE | SSIM | MS-SSIM |" in report["md"]


def test_headline_numbers_first_in_the_report_and_last_in_its_output(report):
    runs = report["json"]["runs"]
    md = report["md"].splitlines()
    assert md.index("## Headline numbers") < next(i for i, line in enumerate(md) if line.startswith("## Attribute"))
    header = next(line for line in md if line.startswith("| run | seeds |"))
    assert header == "| run | seeds | focus: mean balanced accuracy | mean balanced accuracy | KL per image | SSIM |"
    kl = runs["pvae"]["latent"]["kl_per_image"]["mean"]
    assert f"| pvae | 1 | n/a | {runs['pvae']['svm']['mean_balanced_accuracy']['mean']:.4f} | {kl:.2f} | " in \
        report["md"]  # no --focus in this sweep's SVMs: n/a
    tail = report["stdout"].strip().splitlines()[-8:]  # these runs were not tracked: no MLflow run pages follow
    assert any("Headline numbers" in line for line in tail) and tail[-1].startswith("└")
    assert any(line.startswith("│ dfcvae │ 2 ") for line in tail) and any(line.startswith("│ pvae ") for line in tail)


def test_run_pages_name_each_tracked_run_and_how_to_serve_a_local_store(sweep_dir):
    parent = json.loads((sweep_dir / "parent.json").read_text())
    uri, run_id, experiment = parent["tracking_uri"], parent["run_id"], parent["experiment_id"]
    lines = run_pages({"dfcvae": {"mlflow_run_ids": [run_id, None]}, "pvae": {"mlflow_run_ids": ["0" * 32]}}, uri)
    program = lines[0].removeprefix(f"MLflow ({uri}; serve it: ").removesuffix(f" ui --backend-store-uri {uri})")
    assert Path(program).name == "mlflow" and Path(program).is_file()  # this environment's, runnable from here
    assert lines[1] == f"  dfcvae: http://127.0.0.1:5000/#/experiments/{experiment}/runs/{run_id}"
    assert lines[2].startswith(f"  pvae: run {'0' * 32} is not in this store (")
    assert lines[3:] == [f"  every run of experiment {experiment}: http://127.0.0.1:5000/#/experiments/{experiment}"
                         "?workflowType=machine_learning"]


def test_an_svm_table_from_synthetic_faces_and_random_loss_weights_says_so_first(report, sweep_dir):
    """Extraction records what the images and the loss network were; the SVM table and the report say it first."""
    table = (sweep_dir / "dfcvae-seed0" / "eval" / "svm" / "svm_table.md").read_text().splitlines()
    assert table[2] == ("**Not comparable with the paper's Table 1**: the images are synthetic faces drawn by "
                        "dfcvae-synthetic, not CelebA; the model was trained with a loss network of random weights "
                        "(random(seed=0)), not the paper's feature perceptual loss. The paper's columns are shown "
                        "for their layout only; no attribute is marked as beating them.")
    section = report["md"].split("## Attribute prediction")[1].splitlines()
    assert section[2].startswith("**Not comparable with the paper's Table 1**: dfcvae: the images are synthetic faces")
    assert "pvae: the images are synthetic faces drawn by dfcvae-synthetic, not CelebA." in section[2]


def test_a_task_that_has_not_finished_is_listed_not_dropped(report, sweep_dir):
    dcgan = [t for t in report["json"]["tasks"] if t["run_name"] == "dcgan"]
    assert [t["status"] for t in dcgan] == ["not started"] and "dcgan" not in report["json"]["runs"]
    assert f"| {sweep_dir / 'dcgan-seed0'} | dcgan | unknown | not started |" in report["md"]
    assert f"{sweep_dir / 'dcgan-seed0'}: not started" in report["stdout"]


def tile(picture: Image.Image, layout: dict, row: int, column: int) -> np.ndarray:
    return np.asarray(picture.crop(cell_box(layout, row, column))).astype(int)


def test_figures_have_a_title_and_a_labelled_row_per_model_from_the_same_z(report, sweep_dir):
    figures = report["json"]["figures"]
    assert figures["samples"]["rows"] == ["dfcvae", "pvae"]
    assert figures["reconstructions"]["rows"] == ["test faces", "dfcvae", "pvae"]
    assert figures["samples"]["title"].startswith("Figure 3: ") and figures["reconstructions"]["title"].startswith(
        "Figure 4: ")
    for name, rows in (("samples", 2), ("reconstructions", 3)):
        layout = figures[name]
        picture = Image.open(report["out"] / layout["file"])
        assert layout["columns"] == 8 and layout["cell_px"] == 128  # 32x32 images, each pixel drawn 4 x 4
        assert picture.size == tuple(layout["size"]) and read_layout(report["out"] / layout["file"])["rows"] == \
            layout["rows"]
        assert cell_box(layout, rows - 1, 7)[3] < picture.size[1] and cell_box(layout, 0, 7)[2] < picture.size[0]
    picture = Image.open(report["out"] / "samples.png").convert("RGB")
    for row, run in enumerate(("dfcvae-seed0", "pvae-seed0")):  # each VAE decodes z of seed 0, upscaled nearest
        model, _, _ = load_trained(sweep_dir / run)
        expected = F.interpolate(sample(model, 8), scale_factor=4, mode="nearest")[3]
        drawn = tile(picture, report["json"]["figures"]["samples"], row, 3)
        assert np.abs(drawn - (expected.permute(1, 2, 0) * 255).numpy()).max() <= 1.0


def test_samples_of_each_vaes_fitted_mixture_beside_its_fid(report, sweep_dir):
    """Each run's quality step fitted a Gaussian mixture to the train latents its extraction left (same checkpoint,
    same shards); the report draws from it and shows both FID columns."""
    layout = report["json"]["figures"]["samples_gmm"]
    assert layout["rows"] == ["dfcvae", "pvae"] and "![samples from the mixture](samples-gmm.png)" in report["md"]
    assert "| FID | FID (GMM) | FID samples |" in report["md"]
    for row, run in enumerate(("dfcvae-seed0", "pvae-seed0")):
        quality = sweep_dir / run / "eval" / "quality"
        fitted = next(iter(json.loads((quality / "quality.json").read_text())["models"].values()))["gmm"]
        assert fitted["fit_on"] == f"{sweep_dir / run / 'eval' / 'latents' / 'latents.npz'} (train partition)"
        model, _, _ = load_trained(sweep_dir / run)
        mixture = GaussianMixtureSampler.load(quality / fitted["file"])
        expected = F.interpolate(sample(model, 8, sampler=mixture), scale_factor=4, mode="nearest")[5]
        drawn = tile(Image.open(report["out"] / "samples-gmm.png"), layout, row, 5)
        assert np.abs(drawn - (expected.permute(1, 2, 0) * 255).numpy()).max() <= 1.0


def test_report_is_logged_into_the_sweeps_parent_run(report, sweep_dir):
    from mlflow import MlflowClient

    parent = json.loads((sweep_dir / "parent.json").read_text())
    client = MlflowClient(tracking_uri=parent["tracking_uri"])
    artifacts = {a.path for a in client.list_artifacts(parent["run_id"], "report")}
    assert {"report/report.md", "report/report.json", "report/samples.png", "report/reconstructions.png"} <= artifacts
    metrics = client.get_run(parent["run_id"]).data.metrics
    assert metrics["report/dfcvae/svm_mean_accuracy"] == pytest.approx(
        report["json"]["runs"]["dfcvae"]["svm"]["mean_accuracy"]["mean"])
    assert "report/pvae/quality_mse" in metrics and "report/dcgan/svm_mean_accuracy" not in metrics
    assert f"logged the report into MLflow parent run {parent['run_id']}" in report["stdout"]


def test_a_corrupt_svm_report_is_one_line_naming_it(sweep_dir, shard_dir, tmp_path, capsys):
    run = tmp_path / "pvae-seed0"
    shutil.copytree(sweep_dir / "pvae-seed0", run)
    (run / "eval" / "svm" / "svm_report.json").write_text('{"per_attribute": [')
    assert report_main(["--runs", f"pvae={run}", "--shards", str(shard_dir), "--out", str(tmp_path / "out")]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "svm_report.json" in line]
    assert lines == [f"  {run / 'eval' / 'svm' / 'svm_report.json'}: unreadable (Expecting value: line 1 column 20 "
                     "(char 19))"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{run / 'eval' / 'svm' / 'svm_report.json'}: unreadable" in md and "No finished VAE task has an SVM" in md
    assert json.loads((tmp_path / "out" / "report.json").read_text())["runs"]["pvae"]["quality"]["mse"]["n"] == 1


def test_without_a_reachable_parent_run_the_report_is_written_and_says_so(sweep_dir, shard_dir, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--runs", f"pvae={sweep_dir / 'pvae-seed0'}", "--shards", str(shard_dir)]
    assert report_main([*args, "--out", str(tmp_path / "alone")]) == 0
    assert "no parent run (parent.json): the report is not logged to MLflow" in capsys.readouterr().out
    (tmp_path / "parent.json").write_text(json.dumps({"run_id": "abc", "experiment_id": "1",
                                                      "tracking_uri": f"http://127.0.0.1:{port}"}))
    assert report_main([*args, "--parent", str(tmp_path / "parent.json"), "--out", str(tmp_path / "down")]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("MLflow parent run abc"))
    assert line.startswith(f"MLflow parent run abc at http://127.0.0.1:{port}: ") and "not logged" in line
    assert (tmp_path / "down" / "report.md").is_file() and (tmp_path / "down" / "samples.png").is_file()


def test_a_run_name_pooling_different_latent_sizes_is_warned_and_a_pipe_in_it_keeps_the_tables(trained_run, tmp_path,
                                                                                                  capsys):
    other = tmp_path / "z16"
    shutil.copytree(trained_run, other)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("latent_dim: 100", "latent_dim: 16"))
    out = tmp_path / "out"
    assert report_main(["--runs", f"a|b={trained_run}", "--runs", f"a|b={other}", "--out", str(out)]) == 0
    warning = (f"a|b: pools different models as seeds (dfcvae latent_dim 100: {trained_run}; dfcvae latent_dim 16: "
               f"{other}); give each model its own name")
    assert f"warning: {warning}" in capsys.readouterr().out.splitlines()
    md = (out / "report.md").read_text()
    assert f"**Warning:** {warning}" in md
    assert json.loads((out / "report.json").read_text())["warnings"] == [warning]
    cost = md.split("## Training cost")[1].splitlines()
    header, row = (line for line in cost if line.startswith("| "))
    columns = [len(re.split(r"(?<!\\)\|", line)) for line in (header, row)]
    assert columns[0] == columns[1] and row.startswith("| a\\|b | ")
