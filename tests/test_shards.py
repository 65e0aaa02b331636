"""Shard writing: format, manifest, atomic shards, resume after a kill, verify, own image folders."""

import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from dfcvae_dist.data.loader import EvalStream, SplitSource, make_loader
from dfcvae_dist.data.shards import iter_shard, manifest_of, read_manifest, sha256_file
from dfcvae_dist.errors import UserError
from tests.helpers import ROOT, run_tool, wait_until


def test_manifest_describes_every_shard(shard_dir, celeba_dir):
    manifest = read_manifest(shard_dir)
    assert manifest["image_size"] == 32 and manifest["crop"] == "paper" and len(manifest["attributes"]) == 40
    total = 0
    for split, info in manifest["splits"].items():
        assert info["num_samples"] == sum(s["num_samples"] for s in info["shards"])
        for shard in info["shards"]:
            assert shard["name"].startswith(f"{split}-") and shard["name"].endswith(".tar")
            assert sha256_file(shard_dir / shard["name"]) == shard["sha256"]
        total += info["num_samples"]
    assert total == 400
    assert manifest["splits"]["train"]["num_samples"] == 321  # CelebA's partition fractions


def test_the_manifest_of_data_shards_is_none_only_for_a_url_pattern(shard_dir, tmp_path):
    assert manifest_of(str(shard_dir)) == read_manifest(shard_dir)
    assert manifest_of(f"{shard_dir}/train-{{000000..000008}}.tar") is None
    with pytest.raises(UserError, match=f"^{tmp_path / 'manifest.json'}: no manifest"):
        manifest_of(tmp_path)  # a directory without one is a mistake, not a pattern


def test_manifest_says_whether_the_data_is_synthetic(shard_dir, tmp_path):
    assert read_manifest(shard_dir)["synthetic"] is True  # drawn by the synthetic generator
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(folder / f"{i}.png")
    run_tool("make_shards.py", "--image-folder", folder, "--out", tmp_path / "out", "--image-size", "16")
    assert read_manifest(tmp_path / "out")["synthetic"] is False  # a user's own images
    old = json.loads((shard_dir / "manifest.json").read_text())
    del old["synthetic"]  # a manifest written before it recorded this
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(old))
    assert read_manifest(tmp_path / "old")["synthetic"] is False


def test_sample_format(shard_dir):
    sample = next(iter_shard(str(shard_dir / "train-000000.tar")))
    assert sample["__key__"] == "000001"
    meta = json.loads(sample["json"])
    assert set(meta) == {"attrs", "landmarks", "partition", "identity"}
    assert len(meta["attrs"]) == 40 and set(meta["attrs"].values()) <= {0, 1}
    assert len(meta["landmarks"]) == 10 and meta["partition"] == 0
    image = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)  # npy is the default format
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_landmark_crop_and_jpg_format(celeba_dir, tmp_path):
    run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", tmp_path / "lm", "--crop", "landmarks",
             "--format", "jpg", "--image-size", "48", "--shard-size", "200")
    manifest = read_manifest(tmp_path / "lm")
    assert manifest["crop"] == "landmarks" and manifest["image_format"] == "jpg"
    sample = next(iter_shard(str(tmp_path / "lm" / "train-000000.tar")))
    assert "jpg" in sample and "png" not in sample


def test_npy_format_loads_the_same_pixels_as_png(celeba_dir, shard_dir, tmp_path):
    run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", tmp_path / "png", "--format", "png",
             "--image-size", "32", "--shard-size", "40")
    sample = next(iter_shard(str(tmp_path / "png" / "val-000000.tar")))
    assert "png" in sample and "npy" not in sample and read_manifest(tmp_path / "png")["image_format"] == "png"
    assert read_manifest(shard_dir)["image_format"] == "npy"
    npy, png = (next(iter(make_loader(EvalStream(SplitSource.from_manifest(d, "val"), 8, 0, 1), 0)))
                for d in (shard_dir, tmp_path / "png"))
    assert npy["key"] == png["key"] and npy["image"].dtype == torch.uint8 and torch.equal(npy["image"], png["image"])


def test_interrupted_sharding_leaves_no_whole_looking_shard_and_resumes(celeba_dir, tmp_path, processes):
    out = tmp_path / "s"
    args = [sys.executable, str(ROOT / "tools" / "make_shards.py"), "--celeba-root", str(celeba_dir),
            "--out", str(out), "--shard-size", "10", "--workers", "1"]
    proc = processes.popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: len(list(out.glob("*.tar"))) >= 3, 60, "three finished shards", interval=0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert 3 <= len(done) < 41
    for name in done:  # every final-named shard is whole: its record exists and its hash matches
        record = json.loads((out / ".parts" / f"{name}.json").read_text())
        assert record["sha256"] == sha256_file(out / name)
    subprocess.run(args, check=True, capture_output=True)
    assert {n: (out / n).stat().st_mtime_ns for n in done} == done  # not rewritten
    reference = tmp_path / "ref"
    subprocess.run([*args[:5], str(reference), *args[6:]], check=True, capture_output=True)
    shards_a = {s["name"]: s["sha256"] for v in read_manifest(out)["splits"].values() for s in v["shards"]}
    shards_b = {s["name"]: s["sha256"] for v in read_manifest(reference)["splits"].values() for s in v["shards"]}
    assert shards_a == shards_b and len(shards_a) == 33 + 4 + 4  # train, val, test
    assert not list(out.glob("*.tmp"))


def test_verify_reports_a_damaged_shard(shard_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shard_dir, copy)
    assert run_tool("make_shards.py", "--verify", copy).returncode == 0
    victim = copy / "train-000001.tar"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    proc = run_tool("make_shards.py", "--verify", copy, check=False)
    assert proc.returncode == 1
    assert f"{victim}: sha256 differs from the manifest" in proc.stdout
    assert "1 problem" in proc.stdout or "2 problem" in proc.stdout


def test_reader_rejects_unsafe_member_names(tmp_path):
    import io

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("../../etc/passwd.png", "ok.png"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(UserError, match=r"evil\.tar: unsafe member name '\.\./\.\./etc/passwd'"):
        list(iter_shard(str(path)))


def test_reader_rejects_colliding_keys(tmp_path):
    import io

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as tar:
        for name in ("a.png", "b.png", "a.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            tar.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(UserError, match=r"dup\.tar: duplicate key 'a'"):
        list(iter_shard(str(path)))


def test_image_folder_with_attribute_csv(tmp_path):
    folder = tmp_path / "mine" / "sub"
    folder.mkdir(parents=True)
    rows = ["image,Smiling,Hat"]
    for i in range(12):
        Image.new("RGB", (50 + i, 40), (i * 20, 0, 0)).save(folder / f"img.{i}.png")
        rows.append(f"sub/img.{i}.png,{1 if i % 2 else -1},0")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    run_tool("make_shards.py", "--image-folder", tmp_path / "mine", "--attributes", tmp_path / "labels.csv",
             "--out", tmp_path / "out", "--image-size", "16", "--holdout", "0.2")
    manifest = read_manifest(tmp_path / "out")
    assert manifest["attributes"] == ["Smiling", "Hat"] and manifest["crop"] == "center"
    samples = [s for v in manifest["splits"].values() for s in v["shards"]]
    keys = {s["__key__"]: json.loads(s["json"])
            for sh in samples for s in iter_shard(str(tmp_path / "out" / sh["name"]))}
    assert len(keys) == 12 and keys["sub_img_3"]["attrs"] == {"Smiling": 1, "Hat": 0}


def test_image_folder_csv_error_names_line(tmp_path):
    (tmp_path / "f").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "f" / "a.png")
    (tmp_path / "l.csv").write_text("image,Smiling\na.png,2\n")
    proc = run_tool("make_shards.py", "--image-folder", tmp_path / "f", "--attributes", tmp_path / "l.csv",
                    "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'l.csv'}:2: values must be 0/1 or -1/1" in proc.stderr


def test_output_with_other_settings_is_refused(shard_dir, celeba_dir):
    proc = run_tool("make_shards.py", "--celeba-root", celeba_dir, "--out", shard_dir, "--image-size", "64",
                    "--shard-size", "40", check=False)
    assert proc.returncode == 2 and "holds shards made with other settings" in proc.stderr
    assert os.path.exists(shard_dir / "manifest.json")
