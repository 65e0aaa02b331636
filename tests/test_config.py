from pathlib import Path

import pytest

from dfcvae_dist.config import Config, load_config
from dfcvae_dist.errors import UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides_in_order(tmp_path):
    path = write(tmp_path, "train:\n  batch_size: 16\nloss:\n  layers: [relu3_1, relu4_1, relu5_1]\n")
    cfg = load_config(path, ["train.batch_size=8", "optim.lr=1e-3", "train.max_steps=null"])
    assert cfg.train.batch_size == 8
    assert cfg.optim.lr == 1e-3
    assert cfg.loss.layers == ["relu3_1", "relu4_1", "relu5_1"]
    assert cfg.train.max_steps is None


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "train:\n  batchsize: 16\n")
    with pytest.raises(UserError, match=r"c\.yaml: unknown key 'train\.batchsize' \(did you mean 'train\.batch_size'\?\)"):
        load_config(path)


def test_unknown_section_names_file(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml: unknown section 'trian'"):
        load_config(write(tmp_path, "trian:\n  epochs: 1\n"))


def test_wrong_type_names_key_and_override():
    with pytest.raises(UserError, match=r"override 'train.batch_size=abc'.*'train.batch_size' must be of type int"):
        load_config(None, ["train.batch_size=abc"])


def test_out_of_range_and_bad_choice():
    with pytest.raises(UserError, match=r"'train.batch_size' must be >= 1, got 0"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(UserError, match=r"'model.name' must be one of"):
        load_config(None, ["model.name=gan"])
    with pytest.raises(UserError, match=r"'loss.layers' has unknown entry 'relu9_1'"):
        load_config(None, ["loss.layers=[relu9_1]"])


def test_override_without_equals_is_refused():
    with pytest.raises(UserError, match="not of the form section.key=value"):
        load_config(None, ["train.batch_size"])


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "loss.vgg_weights=random"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.digest() == cfg.digest()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)
