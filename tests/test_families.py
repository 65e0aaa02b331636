"""Model families: the registry, a family added by another package through an entry point (the worked example of
docs/extending.md, installed as a plug-in and trained), the built-ins that prove it (dfcvae-gan), and that nothing
outside dfcvae_dist/families/ asks which family it has by name."""

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dfcvae_dist.config import config_help, load_config
from dfcvae_dist.errors import UserError
from dfcvae_dist.families import ENTRY_POINT_GROUP, family_names, get_family
from dfcvae_dist.families.base import ModelFamily
from tests.helpers import ROOT, run_tool

BUILTINS = ["dcgan", "dfcvae", "dfcvae-gan", "pvae"]


def extending_example() -> str:
    """The plug-in module of docs/extending.md: its first python block."""
    text = (ROOT / "docs" / "extending.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def install_plugin(root: Path, module_source: str, module: str = "l1vae") -> Path:
    """A distribution as pip would leave it: the module and a `*.dist-info` whose `entry_points.txt` names its
    FAMILY as `l1-vae`, in `root` (to be put on sys.path). Each test its own module name: Python keeps modules."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(module_source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nl1-vae = {module}:FAMILY\n")
    return root


def test_the_builtin_families_are_registered_and_an_unknown_name_lists_them():
    assert family_names() == BUILTINS
    assert all(isinstance(get_family(name), ModelFamily) and get_family(name).name == name for name in BUILTINS)
    with pytest.raises(UserError, match=r"'model.name' must be one of \['dcgan', 'dfcvae', 'dfcvae-gan', 'pvae'\], "
                                        r"got 'dcgam' \(did you mean 'dcgan'\?\)"):
        load_config(None, ["model.name=dcgam"])
    assert "one of dcgan, dfcvae, dfcvae-gan, pvae" in config_help()


def test_a_plugin_family_joins_the_choices_and_loads_from_its_entry_point(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "site", extending_example())))
    assert family_names() == [*BUILTINS, "l1-vae"]
    family = get_family("l1-vae")
    assert (family.title, family.encodes, family.feature_network) == ("L1-VAE (L1 pixel loss)", True, False)
    cfg = load_config("quickstart", ["model.name=l1-vae"])
    assert "train/rec_l1" in [m.name for m in family.metrics(cfg)]
    assert get_family("l1-vae").unused_keys(cfg) == get_family("pvae").unused_keys(cfg)  # no feature network


def test_a_broken_plugin_is_one_line_naming_its_entry_point(tmp_path, monkeypatch):
    with monkeypatch.context() as patched:
        patched.syspath_prepend(str(install_plugin(tmp_path / "a", "FAMILY = 'not a family'\n", "notafamily")))
        with pytest.raises(UserError, match=r"entry point 'l1-vae' = notafamily:FAMILY in group dfcvae_dist.families "
                                            r"is not a ModelFamily named 'l1-vae'"):
            load_config(None, ["model.name=l1-vae"])
    monkeypatch.syspath_prepend(str(install_plugin(tmp_path / "b", "raise ImportError('no torchx')\n", "brokenfam")))
    with pytest.raises(UserError, match=r"model family 'l1-vae' \(entry point brokenfam:FAMILY\) does not load: no "
                                        r"torchx"):
        load_config(None, ["model.name=l1-vae"])


def test_no_family_is_compared_by_name_outside_the_families_package():
    """The trainer, run page, evaluations, sweeps, report and figures ask the family what it does."""
    names = "|".join(re.escape(n) for n in BUILTINS)
    comparison = re.compile(rf"""(==|!=|\bin)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    found = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for path in (ROOT / "dfcvae_dist").rglob("*.py") if "families" not in path.parts
             for number, line in enumerate(path.read_text().splitlines(), 1) if comparison.search(line)]
    assert not found, "\n".join(found)


def train_args(work: Path, shard_dir: Path, *overrides: str) -> list:
    return [sys.executable, "-m", "dfcvae_dist.train", "--config", "quickstart", f"data.shards={shard_dir}",
            f"train.run_dir={work / 'run'}", "train.max_steps=2", "train.batch_size=8", "train.val_every_steps=2",
            "log.enabled=false", "data.num_workers=0", "model.base_channels=8", "model.latent_dim=16", *overrides]


@pytest.mark.slow
def test_the_plugin_family_trains_and_its_model_loads(tmp_path, shard_dir, processes):
    site = install_plugin(tmp_path / "site", extending_example())
    env = {**os.environ, "PYTHONPATH": f"{site}:{ROOT}"}
    proc = processes.run(train_args(tmp_path, shard_dir, "model.name=l1-vae"), 600, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "L1-VAE (L1 pixel loss)" in proc.stderr and json.loads((tmp_path / "run" / "COMPLETED.json").read_text())[
        "step"] == 2
    code = ("from dfcvae_dist.inference import load_trained, sample; m, cfg, _ = load_trained(%r); "
            "print(cfg.model.name, tuple(sample(m, 2).shape))" % str(tmp_path / "run"))
    loaded = processes.run([sys.executable, "-c", code], 300, env=env)
    assert loaded.stdout.split() == ["l1-vae", "(2,", "3,", "32,", "32)"], loaded.stderr[-2000:]


@pytest.mark.slow
def test_a_resnet18_feature_network_trains_and_is_tagged_as_such(tmp_path, shard_dir, processes):
    proc = processes.run(train_args(tmp_path, shard_dir, "loss.network=resnet18", "loss.layers=null"), 600,
                         cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert (saved.loss.network, saved.loss.layers) == ("resnet18", ["relu", "layer1", "layer2"])
    assert "WARNING: the resnet18 loss network has RANDOM weights" in proc.stderr
    assert json.loads((tmp_path / "run" / "COMPLETED.json").read_text())["feature_weights"] == "random(seed=0)"


@pytest.mark.slow
def test_dfcvae_gan_trains_and_its_vae_is_extracted_without_the_discriminator(tmp_path, shard_dir, processes):
    proc = processes.run(train_args(tmp_path, shard_dir, "model.name=dfcvae-gan", "loss.adversarial_weight=0.5"),
                         600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file

    from dfcvae_dist.inference import load_trained
    from dfcvae_dist.models import VAE

    checkpoint = json.loads((tmp_path / "run" / "COMPLETED.json").read_text())["checkpoint"]
    weights = load_file(str(Path(checkpoint) / "weights.safetensors"))
    assert any(k.startswith("discriminator.") for k in weights) and any(k.startswith("vae.") for k in weights)
    model, cfg, _ = load_trained(tmp_path / "run")
    assert isinstance(model, VAE) and cfg.model.name == "dfcvae-gan" and cfg.loss.adversarial_weight == 0.5
    run_tool("extract_latents.py", "--checkpoint", tmp_path / "run", "--shards", shard_dir, "--out", tmp_path / "lat")
    with np.load(tmp_path / "lat" / "latents.npz") as latents:
        assert latents["mu"].shape[1] == 16 and torch.isfinite(torch.from_numpy(latents["mu"])).all()
