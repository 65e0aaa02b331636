import os
import shutil
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from dfcvae_dist.config import Config, config_help, config_keys, load_config, load_dataclass, opt, resume_changes
from dfcvae_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


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


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 1\n  batchsize: 16\n")
    with pytest.raises(UserError, match=r"c\.yaml, line 3: unknown key 'train\.batchsize' "
                                        r"\(did you mean 'train\.batch_size'\?\)"):
        load_config(path)


def test_unknown_section_names_file(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml, line 1: unknown section 'trian'"):
        load_config(write(tmp_path, "trian:\n  epochs: 1\n"))


def test_wrong_type_names_key_and_override():
    with pytest.raises(UserError, match=r"override 'train.batch_size=abc'.*'train.batch_size' must be of type int"):
        load_config(None, ["train.batch_size=abc"])


def test_out_of_range_and_bad_choice():
    with pytest.raises(UserError, match=r"'train.batch_size' must be between 1 and 4096, got 0"):
        load_config(None, ["train.batch_size=0"])
    with pytest.raises(UserError, match=r"'model.name' must be one of"):
        load_config(None, ["model.name=gan"])
    with pytest.raises(UserError,
                       match=r"loss.layers: 'relu9_1' is not a layer of vgg19 .*its layers: relu1_1, relu1_2"):
        load_config(None, ["loss.layers=[relu9_1]"])


def test_every_number_key_has_a_range():
    """A number without bounds passes validation and fails later, at run time, with a traceback."""
    from dfcvae_dist.config import _key_fields

    def numeric(hint):
        return hint in (int, float) or any(numeric(arg) for arg in typing.get_args(hint))

    unbounded = [key for key, hint, f in _key_fields() if numeric(hint) and "choices" not in f.metadata
                 and not {"min", "max"} <= set(f.metadata)]
    assert unbounded == []


@pytest.mark.parametrize("override, message", [
    ("train.seed=-1", "'train.seed' must be between 0 and 4294967295, got -1"),  # numpy: "Seed must be between 0 and"
    ("train.seed=4294967296", "'train.seed' must be between 0 and 4294967295, got 4294967296"),
    ("loss.network_seed=-5", "'loss.network_seed' must be between 0 and 4294967295, got -5"),
    ("model.latent_dim=10000000", "'model.latent_dim' must be between 1 and 4096, got 10000000"),  # 160 GB of weights
    ("train.batch_size=1000000", "'train.batch_size' must be between 1 and 4096, got 1000000"),
    ("log.flush_timeout_s=1e300", "'log.flush_timeout_s' must be between 0.0 and 86400, got 1e+300"),  # wait overflow
    ("train.collective_timeout_s=10000000000000", "'train.collective_timeout_s' must be between 1 and 604800, got "
                                                  "10000000000000"),
    ("loss.layer_weights=[1, -1]", "'loss.layer_weights' must be between 0.0 and 1000000.0, got -1.0"),
])
def test_a_value_that_would_fail_at_run_time_is_refused_at_load_naming_key_and_range(override, message):
    with pytest.raises(UserError) as refused:
        load_config(None, [override])
    assert str(refused.value) == f"command-line override '{override}': {message}"


@pytest.mark.parametrize("overrides,message", [
    (["train.early_stop_patience=3"], r"train.early_stop_patience=3 watches the metric of checkpoint.keep_best"),
    (["checkpoint.keep_best=val/totl"], r"'val/totl' is not a validation metric \(one of val/total\) \(did you mean "
                                        r"'val/total'\?\)"),
    (["checkpoint.keep_best=val/total"], r"checkpoint.keep_best=val/total needs validations: set "
                                         r"train.val_every_steps"),
    (["model.name=dcgan", "checkpoint.keep_best=val/total", "train.val_every_steps=5"],
     r"'val/total' is not a validation metric \(model.name=dcgan computes none\)"),
    (["log.trackers=[wandb]"], r"'log.trackers' must be one of \['mlflow', 'tensorboard'\], got 'wandb'"),
], ids=["patience-without-metric", "unknown-metric", "no-validation", "family-without-validation", "tracker"])
def test_best_checkpoint_early_stopping_and_trackers_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_worker_count_is_auto_or_a_count_in_a_file_and_an_override(tmp_path):
    path = write(tmp_path, "data:\n  num_workers: 3\n")
    assert load_config(path).data.num_workers == 3 and load_config(None).data.num_workers == "auto"
    assert load_config(path, ["data.num_workers=auto"]).data.num_workers == "auto"
    for text, shown in (("many", "many"), ('"3"', "3"), ("null", "null")):  # a quoted count is text, not a count
        with pytest.raises(UserError, match=rf"'data.num_workers' must be auto or of type int, got '{shown}'"):
            load_config(None, [f"data.num_workers={text}"])
    with pytest.raises(UserError, match=r"'data.num_workers' must be between 0 and 64, got -1"):
        load_config(None, ["data.num_workers=-1"])


def test_override_without_equals_is_refused():
    with pytest.raises(UserError, match="not of the form section.key=value"):
        load_config(None, ["train.batch_size"])


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "train: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(path)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.epochs=3", "loss.network_weights=random", "log.run_name=2024-05-01"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.digest() == cfg.digest()


# --- values are read by the field's type, not by YAML 1.1's guesses --------------------------------------

def test_a_string_override_keeps_its_text_exactly():
    cfg = load_config(None, ["log.run_name=2024-05-01", "log.experiment=0123", "train.run_dir=runs/yes"])
    assert (cfg.log.run_name, cfg.log.experiment, cfg.train.run_dir) == ("2024-05-01", "0123", "runs/yes")


def test_a_string_field_in_a_file_keeps_its_source_text(tmp_path):
    cfg = load_config(write(tmp_path, "log:\n  run_name: 2024-05-01\n  experiment: 0123\n"))
    assert (cfg.log.run_name, cfg.log.experiment) == ("2024-05-01", "0123")


def test_null_clears_an_optional_string_and_an_int_reads_decimal_digits():
    cfg = load_config(None, ["log.run_name=x", "log.run_name=null", "train.epochs=010"])
    assert cfg.log.run_name is None and cfg.train.epochs == 10


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_a_non_finite_float_is_refused_in_one_line(value):
    with pytest.raises(UserError, match=rf"override 'optim.lr={value}'.*'optim.lr' must be a finite number"):
        load_config(None, [f"optim.lr={value}"])


def test_an_empty_layer_list_is_refused_in_one_line():
    with pytest.raises(UserError, match=r"override 'loss.layers=\[\]'.*'loss.layers' needs at least one entry"):
        load_config(None, ["loss.layers=[]"])


@dataclass
class Section:
    """Another dataclass of `opt()` fields, as a sweep file's `evaluate:` section is."""
    rate: float = opt(0.5, "a float", min=0.0)
    verbose: bool = opt(False, "a bool")
    limit: int | None = opt(10, "an optional int", min=1)
    label: str | None = opt("x", "an optional str")
    mode: str = opt("a", "a choice", choices=["a", "b"])


def test_another_dataclass_loads_from_texts_by_each_fields_type():
    section = load_dataclass(Section, {"rate": "0.25", "verbose": "true", "limit": "null", "label": "2024-05-01"},
                             "s.yaml", "sec.")
    assert (section.rate, section.verbose, section.limit, section.label, section.mode) == \
        (0.25, True, None, "2024-05-01", "a")
    assert load_dataclass(Section, {"label": "null", "limit": "3"}, "s.yaml").limit == 3
    assert load_dataclass(Section, {"label": "null"}, "s.yaml").label is None


@pytest.mark.parametrize("texts, message", [
    ({"rate": "fast"}, "s.yaml: 'sec.rate' must be of type float, got 'fast'"),
    ({"verbose": "maybe"}, "s.yaml: 'sec.verbose' must be of type bool, got 'maybe'"),
    ({"rate": "-1"}, "s.yaml: 'sec.rate' must be >= 0.0, got -1.0"),
    ({"rate": "nan"}, "s.yaml: 'sec.rate' must be a finite number, got nan"),
    ({"limit": "0"}, "s.yaml: 'sec.limit' must be >= 1, got 0"),
    ({"mode": "c"}, "s.yaml: 'sec.mode' must be one of ['a', 'b'], got 'c'"),
    ({"rat": "1"}, "s.yaml: unknown key 'sec.rat' (did you mean 'sec.rate'?)"),
])
def test_another_dataclass_refuses_a_bad_text_in_one_line_naming_the_source_and_key(texts, message):
    with pytest.raises(UserError) as err:
        load_dataclass(Section, texts, "s.yaml", "sec.")
    assert str(err.value) == message


def test_a_key_written_twice_in_a_file_is_refused_naming_file_line_and_key(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 1\n  batch_size: 8\n  epochs: 2\n")
    with pytest.raises(UserError, match=r"c\.yaml, line 4: duplicate key 'train\.epochs' \(first at line 2\)"):
        load_config(path)


def test_a_section_written_twice_in_a_file_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"c\.yaml, line 3: duplicate key 'train'"):
        load_config(write(tmp_path, "train:\n  epochs: 1\ntrain:\n  batch_size: 8\n"))


# --- shipped configs, by name ----------------------------------------------------------------------------

def test_a_shipped_config_is_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").mkdir()  # what `make quickstart` writes: a folder does not hide the config
    assert load_config("dfcvae-123") == load_config(CONFIGS / "dfcvae-123.yaml")
    assert load_config(Path("quickstart.yaml")) == load_config(CONFIGS / "quickstart.yaml")


def test_a_file_in_the_working_directory_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("train:\n  epochs: 9\n")
    assert load_config("quickstart").train.epochs == 9


def test_an_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(UserError, match=r"config 'quikstart' is neither a file nor a shipped config "
                                        r"\(did you mean 'quickstart'\?\); shipped: dcgan, dfcvae-123"):
        load_config("quikstart")


@pytest.mark.slow
def test_an_installed_wheel_carries_the_shipped_configs(tmp_path):
    """Build the wheel from a copy of the sources, install it into a bare target directory and load a config
    by name from elsewhere."""
    src = tmp_path / "src"
    for name in ("configs", "dfcvae_dist"):  # dfcvae_dist/configs stays a link, as in the repository
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src)
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "whl", src],
                   check=True, env=env, cwd=tmp_path, capture_output=True)
    wheel = next((tmp_path / "whl").glob("*.whl"))
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", tmp_path / "site", wheel],
                   check=True, env=env, capture_output=True)
    code = "from dfcvae_dist.config import load_config; print(load_config('dfcvae-345').loss.layers)"
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(tmp_path / "site")},
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "['relu3_1', 'relu4_1', 'relu5_1']"


# --- what each shipped config is for ---------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


def test_dfcvae_123_and_345_are_the_papers_layer_sets_and_recipe():
    for name, layers in (("dfcvae-123", ["relu1_2", "relu2_1", "relu3_1"]),
                         ("dfcvae-345", ["relu3_1", "relu4_1", "relu5_1"])):
        cfg = load_config(name)
        assert (cfg.model.name, cfg.model.image_size, cfg.model.latent_dim) == ("dfcvae", 64, 100)
        assert cfg.loss.layers == layers and (cfg.loss.alpha, cfg.loss.beta) == (1.0, 0.8)
        assert (cfg.optim.lr, cfg.optim.lr_decay_per_epoch, cfg.train.epochs) == (5e-4, 0.5, 5)


def test_dfcvae_128_is_the_released_codes_128_pixel_variant():
    cfg = load_config("dfcvae-128")
    assert (cfg.model.name, cfg.model.image_size) == ("dfcvae", 128)
    assert "128" in cfg.data.shards


def test_pvae_is_the_pixel_loss_vae_with_alpha_and_beta_one():
    cfg = load_config("pvae")
    assert cfg.model.name == "pvae" and (cfg.loss.alpha, cfg.loss.beta) == (1.0, 1.0)


def test_dcgan_uses_radfords_adam_settings_and_a_constant_lr():
    cfg = load_config("dcgan")
    assert cfg.model.name == "dcgan" and cfg.model.base_channels == 64
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.lr_decay_per_epoch) == (2e-4, 0.5, 1.0)


def test_quickstart_is_small_offline_and_states_its_random_vgg_scale():
    cfg = load_config("quickstart")
    assert (cfg.model.image_size, cfg.loss.network_weights, cfg.loss.feature_scale) == (32, "random", 200.0)
    assert cfg.data.shards.startswith("quickstart/") and cfg.train.run_dir.startswith("quickstart/")


# --- help and docs ---------------------------------------------------------------------------------------

def test_help_text_names_every_key_with_type_default_and_help():
    text = config_help()
    for key in config_keys():
        assert f"\n  {key} (" in text
    assert "  optim.lr (float, default 0.0005, 0.0 to 1.0)\n      Adam learning rate" in text
    assert "  log.every_steps (int, default 10, 1 to 1000000000, resume-safe)\n" in text


@pytest.mark.parametrize("page", ["configuration.md", "metrics.md"])
def test_generated_docs_are_what_the_generator_writes(tmp_path, page):
    subprocess.run([sys.executable, ROOT / "tools" / "generate_docs.py", "--out-dir", tmp_path], check=True, cwd=ROOT,
                   capture_output=True)
    assert (ROOT / "docs" / page).read_text() == (tmp_path / page).read_text(), \
        f"docs/{page} is stale: run python tools/generate_docs.py"


def test_every_metric_the_code_logs_is_in_the_metrics_doc():
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for name in ("train/rec_perceptual/<layer>", "train/rec_pixel", "train/loss_g", "train/adversarial", "val/total",
                 "eval/svm/mean_balanced_accuracy", "eval/latent/active_units", "eval/quality/fid",
                 "quality_fid", "svm_mean_accuracy", "wall_time_s"):
        assert f"`{name}`" in doc, name


def test_configuration_doc_shows_resume_safety_of_every_key():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `log.every_steps` | int | `10` | 1 to 1000000000 | yes |" in doc
    assert "| `data.num_workers` | int or auto | `auto` | 0 to 64 | no |" in doc
    assert sum(line.startswith("| `") for line in doc.splitlines()) == len(config_keys())


# --- resume safety -------------------------------------------------------------------------------------

def test_resume_changes_splits_safe_from_refused():
    saved = load_config(None)
    now = load_config(None, ["log.every_steps=5", "train.max_steps=100", "checkpoint.keep=1",
                             "optim.lr=1e-4", "data.num_workers=3", "data.shuffle_buffer=10"])
    safe, refused = resume_changes(load_config(None, ["data.num_workers=2"]), now)
    assert safe == [("train.max_steps", None, 100), ("checkpoint.keep", 3, 1), ("log.every_steps", 10, 5)]
    assert refused == [("data.num_workers", 2, 3), ("data.shuffle_buffer", 1000, 10), ("optim.lr", 5e-4, 1e-4)]
    # auto on either side: the trainer compares the worker count the checkpoint recorded with this launch's
    assert resume_changes(saved, now)[1][0] == ("data.shuffle_buffer", 1000, 10)


def test_resume_allow_changes_takes_responsibility_for_a_named_key():
    saved = load_config(None)
    now = load_config(None, ["optim.lr=1e-4", "model.latent_dim=8", "train.resume_allow_changes=[optim.lr]"])
    safe, refused = resume_changes(saved, now)
    assert ("optim.lr", 5e-4, 1e-4) in safe and ("train.resume_allow_changes", [], ["optim.lr"]) in safe
    assert refused == [("model.latent_dim", 100, 8)]


def test_an_unchanged_config_has_no_resume_changes():
    assert resume_changes(load_config("quickstart"), load_config("quickstart")) == ([], [])


def test_resume_allow_changes_refuses_an_unknown_key():
    with pytest.raises(UserError, match=r"'train.resume_allow_changes' has unknown entry 'optim.lrr' "
                                        r"\(did you mean 'optim.lr'\?\)"):
        load_config(None, ["train.resume_allow_changes=[optim.lrr]"])
