"""Console scripts: each one pyproject.toml declares exists and answers --help; defaults that work on small
data."""

import importlib
import tomllib

import pytest

from tests.helpers import ROOT, run_tool

SCRIPTS = ["dfcvae-train", "dfcvae-synthetic", "dfcvae-shards", "dfcvae-extract", "dfcvae-svm", "dfcvae-explore",
           "dfcvae-quality", "dfcvae-bench", "dfcvae-fetch-vgg19", "dfcvae-sweep", "dfcvae-report", "dfcvae-export"]


def declared_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})


def test_pyproject_declares_every_console_script():
    assert sorted(declared_scripts()) == sorted(SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS)
def test_console_script_answers_help(script, capsys):
    module, _, function = declared_scripts()[script].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")


@pytest.mark.slow
def test_explore_defaults_use_a_split_smaller_than_the_tsne_default(tmp_path, trained_run, shard_dir):
    """--tsne-images defaults to 1,600; a split holding fewer still gets every figure, with one line saying so."""
    run_tool("extract_latents.py", "--checkpoint", trained_run, "--shards", shard_dir, "--split", "train",
             "--out", tmp_path / "latents")
    latents = tmp_path / "latents" / "latents.npz"
    proc = run_tool("explore_latents.py", "--checkpoint", trained_run, "--latents", latents, "--shards", shard_dir,
                    "--split", "train", "--out", tmp_path / "studies")
    notes = [line for line in proc.stdout.splitlines() if "fewer than --tsne-images 1600" in line]
    assert len(notes) == 1 and "the train split" in notes[0]
    assert (tmp_path / "studies" / "tsne.png").is_file()
