"""The trained model in MLflow 3's model form: a LoggedModel of its run at its step, named `<family>-<run
name>`, with a description, the run's params, and the run's metrics at that step with their datasets; the
evaluations' metrics linked to it; `mlflow.pyfunc.load_model` and our inference API both load it. One short
real run logged to a real `mlflow server` on loopback (every checkpoint's model), its final model in a sqlite
store, and the run's pages in a real browser."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfcvae_dist.config import load_config
from dfcvae_dist.data.shards import manifest_digest, manifest_of
from dfcvae_dist.inference import decode, encode, load_model_uri, load_trained
from dfcvae_dist.model_logging import FINAL_TAG, ModelUpload
from dfcvae_dist.rundir import find_checkpoint
from dfcvae_dist.training.run_page import model_card
from tests.browser import CHROMIUM, Chromium
from tests.helpers import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server_run(shard_dir, tmp_path_factory, mlflow_server):
    """A 4-step run logged to a real `mlflow server`, with every checkpoint's model (log.model=checkpoints)."""
    import mlflow

    work = tmp_path_factory.mktemp("logged-server")
    train(work, shard_dir, work / "run", "train.max_steps=4", "checkpoint.every_steps=2", "log.model=checkpoints",
          f"log.tracking_uri={mlflow_server}", "log.experiment=logged-model")
    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    run_id = json.loads((work / "run" / "COMPLETED.json").read_text())["mlflow_run_id"]
    return SimpleNamespace(store="server", uri=mlflow_server, client=client, run_dir=work / "run", run_id=run_id,
                           models=models_by_name(client, run_id))


def sqlite_run(server_run, work):
    """The same run's final model uploaded into a sqlite store, by the code the trainer uses (a second
    training would cost as much again, and the store is what differs)."""
    import mlflow
    from mlflow.entities import Metric

    uri = f"sqlite:///{work}/mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("logged", artifact_location=str(work / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    history = server_run.client.get_metric_history(server_run.run_id, "train/total")
    client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step) for m in history])
    checkpoint = find_checkpoint(server_run.run_dir, "auto")
    cfg = load_config(checkpoint / "config.yaml")
    card = model_card(cfg, "random(seed=0)", manifest_of(cfg.data.shards), "run")
    ModelUpload(client, run_id, checkpoint, 4, card, final=True)()
    client.set_terminated(run_id)
    return SimpleNamespace(store="sqlite", uri=uri, client=client, run_dir=server_run.run_dir, run_id=run_id,
                           models=models_by_name(client, run_id))


def models_by_name(client, run_id):
    return {m.name: m for m in client.search_logged_models([client.get_run(run_id).info.experiment_id])}


@pytest.fixture(scope="module", params=["server", "sqlite"])
def logged(request, server_run, tmp_path_factory):
    """The run as one store holds it: its URI, client, run directory, run id and logged models by name."""
    return server_run if request.param == "server" else sqlite_run(server_run, tmp_path_factory.mktemp("sqlite"))


@pytest.fixture
def tracking_uri(logged, monkeypatch):
    """`mlflow.pyfunc.load_model` reads the process's tracking URI: the store's, for this test only."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged.uri)
    mlflow.set_tracking_uri(logged.uri)
    yield logged.uri
    mlflow.set_tracking_uri(None)


def test_the_final_model_is_a_logged_model_of_the_run_at_its_step_with_its_card_and_metrics(logged, shard_dir):
    """Named `<family>-<run name>` (a checkpoint's with its folder), described, with the run's params and its
    metrics at that step, each with the dataset it was measured on (the model page's "Datasets used")."""
    from mlflow.entities import LoggedModelStatus

    expected = {"dfcvae-run": 4, "dfcvae-run-step-00000002": 2} if logged.store == "server" else {"dfcvae-run": 4}
    assert set(logged.models) == set(expected)
    outputs = {o.model_id: o.step for o in logged.client.get_run(logged.run_id).outputs.model_outputs}
    train_dataset = (f"{shard_dir.name}/train", manifest_digest(manifest_of(shard_dir)))
    for name, step in expected.items():
        model = logged.models[name]
        assert model.source_run_id == logged.run_id and model.status == LoggedModelStatus.READY
        assert outputs[model.model_id] == step  # the run's Models column and the step it was logged at
        assert model.tags[FINAL_TAG] == str(step == 4).lower()
        description = model.tags["mlflow.note.content"]
        assert description.startswith("**DFC-VAE (feature perceptual loss)** of run `run`: 32×32 images")
        assert "RANDOM vgg19" in description and "(N, 100) or (N, 100, 1, 1)" in description
        assert f"Logged at step {step}" in description
        assert model.params["model.name"] == "dfcvae" and model.params["train.batch_size"] == "16"
        assert not any(key.startswith(("log.", "checkpoint.")) for key in model.params)  # bookkeeping: config.yaml
        run_total = [m.value for m in logged.client.get_metric_history(logged.run_id, "train/total") if m.step == step]
        assert [(m.step, m.value) for m in model.metrics if m.key == "train/total"] == [(step, run_total[0])]
        assert {(m.dataset_name, m.dataset_digest) for m in model.metrics if m.key.startswith("train/")} == \
            {train_dataset}
    # linking the metrics to the model left the run's own history with one point per step
    assert [m.step for m in logged.client.get_metric_history(logged.run_id, "train/total")] == [1, 2, 3, 4]


def test_pyfunc_decodes_and_reconstructs_as_our_inference_api_does(logged, tracking_uri):
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(f"models:/{logged.models['dfcvae-run'].model_id}")
    model, _, _ = load_trained(logged.run_dir)
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    for latents in (z.numpy(), z.numpy().reshape(4, 100, 1, 1)):  # (N, latent_dim) and (N, latent_dim, 1, 1)
        decoded = pyfunc.predict(latents, params={"mode": "decode"})
        assert decoded.shape == (4, 3, 32, 32)
        np.testing.assert_allclose(decoded, decode(model, z).numpy(), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"decode takes latents of shape \(N, 100\) or \(N, 100, 1, 1\), not "
                                         r"\(4, 99\)"):
        pyfunc.predict(z.numpy()[:, :99], params={"mode": "decode"})
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mu, logvar = encode(model, images)
    np.testing.assert_allclose(pyfunc.predict(images.numpy(), params={"mode": "encode"}),
                               torch.stack([mu, logvar], 1).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), decode(model, mu).numpy(), rtol=0, atol=1e-6)
    assert [p.name for p in pyfunc.metadata.signature.params.params] == ["mode"]
    assert "(N, 100) or (N, 100, 1, 1)" in pyfunc.metadata.metadata["inputs"]  # the shapes, in the MLmodel file
    local = mlflow.artifacts.download_artifacts(f"models:/{logged.models['dfcvae-run'].model_id}")
    meta = mlflow.models.Model.load(local)
    example, params = meta.load_input_example(local), meta.load_input_example_params(local)
    assert example.shape == (2, 100) and params == {"mode": "decode"}  # the input example: latents, decoded
    assert pyfunc.predict(example, params=params).shape == (2, 3, 32, 32)


def test_our_inference_api_loads_models_and_runs_uris(logged, tmp_path):
    model, _, checkpoint = load_trained(logged.run_dir)
    expected = model.state_dict()
    final = logged.models["dfcvae-run"].model_id
    loaded = [load_model_uri(f"models:/{final}", tracking_uri=logged.uri, dst=tmp_path / "by-id"),
              load_model_uri(f"runs:/{logged.run_id}/model", tracking_uri=logged.uri, dst=tmp_path / "by-run"),
              load_model_uri(f"runs:/{logged.run_id}/dfcvae-run", tracking_uri=logged.uri, dst=tmp_path / "by-name")]
    for other, config, folder in loaded:
        assert folder.name == "artifacts" and config.model == load_trained(checkpoint)[1].model
        assert other.state_dict().keys() == expected.keys()
        assert all(torch.equal(other.state_dict()[k], expected[k]) for k in expected)
    if logged.store == "server":  # a checkpoint's model, by its id
        step2, _, _ = load_model_uri(f"models:/{logged.models['dfcvae-run-step-00000002'].model_id}",
                                     tracking_uri=logged.uri)
        assert not torch.equal(step2.state_dict()["decoder.fc.weight"], expected["decoder.fc.weight"])


def test_an_evaluations_metrics_are_linked_to_the_model_of_the_checkpoint_it_evaluated(server_run, tmp_path):
    """The SVMs of the final checkpoint's latents: their eval/* metrics are the run's and its final model's; the
    model of the step-2 checkpoint gets none."""
    from dfcvae_dist.evaluation.svm import evaluate_svms
    from tests.helpers import synthetic_latents

    final = find_checkpoint(server_run.run_dir, "auto")
    np.savez(tmp_path / "latents.npz", **{**synthetic_latents(n=600), "checkpoint": np.array(str(final))})
    report = evaluate_svms(tmp_path / "latents.npz", tmp_path / "svm", jobs=1, run_id=server_run.run_id,
                           client=server_run.client)
    models = models_by_name(server_run.client, server_run.run_id)
    linked = {m.key: m.value for m in models["dfcvae-run"].metrics if m.key.startswith("eval/")}
    assert linked["eval/svm/mean_accuracy"] == pytest.approx(report["mean_accuracy"])
    assert linked["eval/latent/kl_per_image"] == pytest.approx(report["latent"]["kl_per_image"])
    assert not any(m.key.startswith("eval/") for m in models["dfcvae-run-step-00000002"].metrics)
    assert server_run.client.get_run(server_run.run_id).data.metrics["eval/svm/mean_accuracy"] == \
        pytest.approx(report["mean_accuracy"])


@pytest.mark.skipif(CHROMIUM is None, reason="no `chromium` on PATH: Debian's chromium (`make test` installs it "
                                             "when run as root)")
def test_the_run_page_opens_on_content_in_a_real_browser(server_run, shard_dir, processes, tmp_path):
    """Headless Chromium on the run's page: its description shown whole, its datasets, its logged model by name,
    and in Model metrics the image cards, which open on step 0, showing the step-0 images. Screenshots of both
    views are left in tmp_path."""
    experiment = server_run.client.get_run(server_run.run_id).info.experiment_id
    url = f"{server_run.uri}/#/experiments/{experiment}/runs/{server_run.run_id}"
    browser = Chromium(processes, tmp_path / "profile")
    overview = browser.open(url, height=2400)  # the logged-models table renders the rows in view only
    overview.wait_for("document.body.innerText.includes('dfcvae-run-step-00000002')", 60, "the run's logged models")
    overview.screenshot(tmp_path / "run-page.png")
    text = overview.text()
    assert "DFC-VAE (feature perceptual loss): 32×32 images, latent size 100, trained on 321 train" in text
    assert "Warning: the vgg19 loss network has RANDOM weights" in text and "Show more" not in text  # whole
    assert f"{shard_dir.name}/train" in text and "Training" in text  # the dataset and its context
    charts = browser.open(f"{url}/model-metrics")
    search = "document.querySelector('input[placeholder=\"Search metric charts\"]')"
    charts.wait_for(f"!!{search}", 60, "the metric charts' search box")
    charts.evaluate(f"{search}.focus()")
    charts.call("Input.insertText", text="reconstructions")  # the image cards only, so they render in view
    charts.wait_for("[...document.images].some(i => i.src.includes('images%2Freconstructions%2Bstep%2B0%2B'))", 60,
                    "the reconstructions card to show its step-0 image")
    assert "No image logged at this step" not in charts.text()
    charts.screenshot(tmp_path / "image-cards.png")
