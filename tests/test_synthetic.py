"""Synthetic CelebA: exact layout, determinism, CelebA-like statistics, landmarks on the drawing."""

import hashlib

import numpy as np
from PIL import Image

from dfcvae_dist.data import celeba
from dfcvae_dist.data.synthetic import (ATTRIBUTE_NAMES, CELEBA_ATTRIBUTE_RATES, is_synthetic,
                                        make_synthetic_celeba)
from tests.helpers import run_tool


def digest(root):
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def test_layout_matches_official(celeba_dir):
    for name in (celeba.ATTR_FILE, celeba.PARTITION_FILE, celeba.LANDMARK_FILE, celeba.BBOX_FILE,
                 celeba.IDENTITY_FILE):
        assert (celeba_dir / name).is_file(), name
    lines = (celeba_dir / celeba.ATTR_FILE).read_text().splitlines()
    assert lines[0] == "400" and lines[1].split() == ATTRIBUTE_NAMES
    image = Image.open(celeba_dir / "img_align_celeba" / "000001.jpg")
    assert image.size == (178, 218) and image.mode == "RGB" and image.format == "JPEG"
    assert (celeba_dir / "img_align_celeba" / "000400.jpg").exists()


def test_output_is_marked_synthetic_and_real_layouts_are_not(celeba_dir, tmp_path):
    assert is_synthetic(celeba_dir)
    assert not is_synthetic(tmp_path)


def test_deterministic_for_a_seed(tmp_path):
    run_tool("make_synthetic_celeba.py", "--out", tmp_path / "a", "--num", "20", "--seed", "3")
    make_synthetic_celeba(tmp_path / "b", 20, seed=3, workers=1)
    make_synthetic_celeba(tmp_path / "c", 20, seed=4, workers=1)
    assert digest(tmp_path / "a") == digest(tmp_path / "b") != digest(tmp_path / "c")


def test_label_statistics_look_like_celeba(tmp_path):
    root = tmp_path / "s"
    make_synthetic_celeba(root, 2000, seed=0, workers=2)
    names, records = celeba.read_celeba(root)
    rates = np.array([r.attrs for r in records]).mean(0)
    for name, rate in zip(names, rates, strict=True):
        assert abs(rate - CELEBA_ATTRIBUTE_RATES[name]) < 0.12, (name, rate)
    by = {n: np.array([r.attrs[i] for r in records]) for i, n in enumerate(names)}
    hair = by["Black_Hair"] + by["Blond_Hair"] + by["Brown_Hair"] + by["Gray_Hair"]
    assert hair.max() == 1  # at most one hair colour
    assert not (by["Mustache"] & (1 - by["Male"])).any()  # no women with moustaches


def test_landmarks_sit_on_the_drawn_pupils(celeba_dir):
    _, records = celeba.read_celeba(celeba_dir)
    dark = 0
    for r in records[:50]:
        pixels = np.asarray(Image.open(r.path).convert("L"), dtype=float)
        for x, y in ((r.landmarks[0], r.landmarks[1]), (r.landmarks[2], r.landmarks[3])):
            dark += pixels[y, x] < 90
    assert dark >= 90  # pupils (or dark glasses) under nearly all 100 eye landmarks


def test_visible_attribute_changes_the_image(celeba_dir):
    """Eyeglasses darken the eye region: a learnable, visible attribute."""
    names, records = celeba.read_celeba(celeba_dir)
    g = names.index("Eyeglasses")

    def eye_brightness(r):
        pixels = np.asarray(Image.open(r.path).convert("L"), dtype=float)
        x, y = r.landmarks[0], r.landmarks[1]
        return pixels[y - 6:y + 7, x - 9:x - 5].mean()

    with_g = [eye_brightness(r) for r in records if r.attrs[g]]
    without = [eye_brightness(r) for r in records if not r.attrs[g]]
    assert with_g and np.mean(with_g) < np.mean(without) - 60
