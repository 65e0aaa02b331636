"""The trained model in MLflow 3's model form: a LoggedModel of its run at its step, with the run's metrics
at that step, that `mlflow.pyfunc.load_model` and our inference API both load. One short real run logged
to a real `mlflow server` on loopback (every checkpoint's model), and its final model in a sqlite store."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dfcvae_dist.inference import decode, encode, load_model_uri, load_trained
from dfcvae_dist.model_logging import FINAL_MODEL, ModelUpload
from dfcvae_dist.rundir import find_checkpoint
from tests.test_train import train

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
    ModelUpload(client, run_id, find_checkpoint(server_run.run_dir, "auto"), 4, FINAL_MODEL)()
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


def test_the_final_model_is_a_logged_model_of_the_run_at_its_step_with_its_metrics(logged):
    from mlflow.entities import LoggedModelStatus

    expected = {"model": 4, "step-00000002": 2} if logged.store == "server" else {"model": 4}
    assert set(logged.models) == set(expected)
    outputs = {o.model_id: o.step for o in logged.client.get_run(logged.run_id).outputs.model_outputs}
    for name, step in expected.items():
        model = logged.models[name]
        assert model.source_run_id == logged.run_id and model.status == LoggedModelStatus.READY
        assert outputs[model.model_id] == step  # the run's Models column and the step it was logged at
        run_total = [m.value for m in logged.client.get_metric_history(logged.run_id, "train/total") if m.step == step]
        assert [(m.step, m.value) for m in model.metrics if m.key == "train/total"] == [(step, run_total[0])]
    # linking the metrics to the model left the run's own history with one point per step
    assert [m.step for m in logged.client.get_metric_history(logged.run_id, "train/total")] == [1, 2, 3, 4]


def test_pyfunc_decodes_and_reconstructs_as_our_inference_api_does(logged, tracking_uri):
    import mlflow

    pyfunc = mlflow.pyfunc.load_model(f"models:/{logged.models['model'].model_id}")
    model, _, _ = load_trained(logged.run_dir)
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    decoded = pyfunc.predict(z.numpy().reshape(4, 100, 1, 1), params={"mode": "decode"})
    assert decoded.shape == (4, 3, 32, 32)
    np.testing.assert_allclose(decoded, decode(model, z).numpy(), rtol=0, atol=1e-6)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    mu, logvar = encode(model, images)
    np.testing.assert_allclose(pyfunc.predict(images.numpy(), params={"mode": "encode"}),
                               torch.stack([mu, logvar], 1).numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(pyfunc.predict(images.numpy()), decode(model, mu).numpy(), rtol=0, atol=1e-6)
    assert [p.name for p in pyfunc.metadata.signature.params.params] == ["mode"]


def test_our_inference_api_loads_models_and_runs_uris(logged, tmp_path):
    model, _, checkpoint = load_trained(logged.run_dir)
    expected = model.state_dict()
    final = logged.models["model"].model_id
    loaded = [load_model_uri(f"models:/{final}", tracking_uri=logged.uri, dst=tmp_path / "by-id"),
              load_model_uri(f"runs:/{logged.run_id}/model", tracking_uri=logged.uri, dst=tmp_path / "by-run")]
    for other, config, folder in loaded:
        assert folder.name == "artifacts" and config.model == load_trained(checkpoint)[1].model
        assert other.state_dict().keys() == expected.keys()
        assert all(torch.equal(other.state_dict()[k], expected[k]) for k in expected)
    if logged.store == "server":  # a checkpoint's model, by its id
        step2, _, _ = load_model_uri(f"models:/{logged.models['step-00000002'].model_id}", tracking_uri=logged.uri)
        assert not torch.equal(step2.state_dict()["decoder.fc.weight"], expected["decoder.fc.weight"])
