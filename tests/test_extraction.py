"""Distributed latent extraction: rank-count independent, every key exactly once, VGG-FC baseline, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dfcvae_dist.data.shards import read_manifest
from dfcvae_dist.errors import UserError
from dfcvae_dist.extraction.latents import load_latents, merge_parts, write_part
from tests.helpers import ROOT, run_tool

pytestmark = pytest.mark.slow


def extract(out, *args, nproc=1):
    if nproc == 1:
        return run_tool("extract_latents.py", *args, "--out", out)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", str(ROOT / "tools" / "extract_latents.py"),
           *map(str, args), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_one_and_two_processes_give_the_same_latents_every_key_once(tmp_path, trained_run, shard_dir):
    extract(tmp_path / "one", "--checkpoint", trained_run, "--shards", shard_dir, "--batch-size", "32")
    extract(tmp_path / "two", "--checkpoint", trained_run, "--shards", shard_dir, "--batch-size", "32", nproc=2)
    a, b = load_latents(tmp_path / "one" / "latents.npz"), load_latents(tmp_path / "two" / "latents.npz")
    assert all((a[name] == b[name]).all() for name in ("keys", "attrs", "partition"))
    assert np.abs(a["mu"] - b["mu"]).max() < 1e-5 and np.abs(a["logvar"] - b["logvar"]).max() < 1e-5
    manifest = read_manifest(shard_dir)
    assert len(a["keys"]) == len(set(a["keys"])) == sum(v["num_samples"] for v in manifest["splits"].values())
    assert a["mu"].shape == (400, 100) and a["attrs"].shape == (400, 40) and set(np.unique(a["attrs"])) <= {0, 1}
    assert list(a["attribute_names"]) == manifest["attributes"] and str(a["features"]) == "latent"
    assert sorted((tmp_path / "two" / "parts").iterdir())[0].name == "part-0000-of-0002.npz"


def test_vgg_fc_baseline_with_random_weights_is_tagged(tmp_path, shard_dir):
    extract(tmp_path / "vgg", "--features", "vgg-fc", "--vgg-weights", "random", "--shards", shard_dir,
            "--split", "test", "--batch-size", "64")
    data = load_latents(tmp_path / "vgg" / "latents.npz")
    assert data["mu"].shape[1] == 4096 and str(data["weights"]) == "random(seed=0)"
    assert set(data["partition"]) == {2}


def test_checkpoint_of_another_model_type_is_refused(tmp_path, shard_dir):
    from safetensors.torch import save_file

    from dfcvae_dist.config import load_config
    from dfcvae_dist.families import get_family

    cfg = load_config(None, ["model.name=dcgan", "model.image_size=32", "model.base_channels=8"])
    ckpt = tmp_path / "gan"
    ckpt.mkdir()
    cfg.save(ckpt / "config.yaml")
    save_file(get_family("dcgan").build_model(cfg.model).state_dict(), str(ckpt / "weights.safetensors"))
    proc = run_tool("extract_latents.py", "--checkpoint", ckpt, "--shards", shard_dir, "--out", tmp_path / "o",
                    check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == \
        f"error: {ckpt}: a dcgan model, but this needs a VAE (a family that encodes)"


def test_latents_file_with_missing_arrays_is_named(tmp_path):
    np.savez(tmp_path / "bad.npz", keys=np.array(["a"]), mu=np.zeros((1, 2)))
    proc = run_tool("eval_svm.py", "--latents", tmp_path / "bad.npz", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'bad.npz'}: missing array(s) logvar, attrs, partition, " \
                                  "attribute_names, checkpoint, features, weights"


def rank_part(keys, dim=3):
    n = len(keys)
    return {"keys": np.array(keys), "mu": np.zeros((n, dim), np.float32), "logvar": np.zeros((n, dim), np.float32),
            "attrs": np.zeros((n, 2), np.int64), "partition": np.zeros(n, np.int64)}


META = {"checkpoint": "", "features": "latent", "weights": "trained", "attribute_names": ["a", "b"]}


def test_extracting_empty_splits_names_the_output_directory(tmp_path):
    """Own image folders made with --holdout 0 have empty val and test splits: every rank's part is empty."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(4):
        Image.new("RGB", (16, 16), (60 * i, 0, 0)).save(tmp_path / "images" / f"{i}.png")
    run_tool("make_shards.py", "--image-folder", tmp_path / "images", "--out", tmp_path / "shards",
             "--image-size", "16", "--holdout", "0")
    proc = run_tool("extract_latents.py", "--features", "vgg-fc", "--vgg-weights", "random", "--shards",
                    tmp_path / "shards", "--split", "val,test", "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'out'}: no images to merge, all 1 rank " \
        "part(s) are empty; do the chosen splits hold any images? (see the shards' manifest.json)"


def test_merge_names_the_missing_rank_part(tmp_path):
    write_part(tmp_path, 0, 3, rank_part(["000001"]))
    write_part(tmp_path, 2, 3, rank_part(["000003"]))
    with pytest.raises(UserError) as err:
        merge_parts(tmp_path, 3, META)
    assert str(err.value) == f"{tmp_path / 'parts' / 'part-0001-of-0003.npz'}: the part of rank 1 is missing " \
                             "(1 of 3 parts missing); was extraction interrupted?"
    assert not (tmp_path / "latents.npz").exists()


def test_merge_names_a_key_found_in_two_rank_parts(tmp_path):
    write_part(tmp_path, 0, 2, rank_part(["000001", "000002"]))
    write_part(tmp_path, 1, 2, rank_part(["000002", "000003"]))
    with pytest.raises(UserError) as err:
        merge_parts(tmp_path, 2, META)
    assert str(err.value) == f"{tmp_path / 'parts'}: key '000002' is in part-0000-of-0002.npz and " \
                             "part-0001-of-0002.npz (1 repeated key(s)); the shards overlap"
    assert not (tmp_path / "latents.npz").exists()

