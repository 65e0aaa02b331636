"""Own image folders: every image reaches the shards as the 8-bit RGB a viewer shows (16-bit scaled, CMYK and
palettes converted, transparency over white, EXIF orientation applied), checked pixel by pixel in the shards."""

import io

import numpy as np
import pytest
from PIL import Image

from dfcvae_dist.data.shards import iter_shard, read_manifest
from tests.helpers import run_tool

SIZE = 32  # square and equal to --image-size, so the center crop and the resize leave the pixels as they are
LEFT, RIGHT = np.s_[:, : SIZE // 2], np.s_[:, SIZE // 2:]


def halves(left, right, dtype=np.uint8) -> np.ndarray:
    """SIZE x SIZE (x channels) array: `left` in the left half, `right` in the right half."""
    channels = np.shape(left)
    array = np.empty((SIZE, SIZE, *channels), dtype=dtype)
    array[LEFT], array[RIGHT] = left, right
    return array


def write_images(folder):
    Image.fromarray(halves(257 * 50, 257 * 200, np.uint16)).save(folder / "gray16.png")  # mode I;16
    Image.new("CMYK", (SIZE, SIZE), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)  # pure cyan
    palette = Image.fromarray(halves(0, 1))
    palette.putpalette([0, 0, 0, 255, 0, 0])  # index 0 black (transparent), index 1 red
    palette.save(folder / "palette.png", transparency=0)
    Image.fromarray(halves((100, 0), (100, 255))).save(folder / "gray_alpha.png")  # gray 100, alpha 0 | 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: turn 90 degrees clockwise to display
    Image.fromarray(halves((255, 0, 0), (0, 0, 255))).save(folder / "rotated.jpg", quality=100, exif=exif.tobytes())


@pytest.fixture(scope="module")
def pixels(tmp_path_factory) -> dict[str, np.ndarray]:
    """key -> H x W x 3 uint8 image as written into the shards by tools/make_shards.py."""
    tmp = tmp_path_factory.mktemp("folder")
    (tmp / "images").mkdir()
    write_images(tmp / "images")
    run_tool("make_shards.py", "--image-folder", tmp / "images", "--out", tmp / "shards", "--image-size", str(SIZE),
             "--holdout", "0")
    shards = [s["name"] for info in read_manifest(tmp / "shards")["splits"].values() for s in info["shards"]]
    return {sample["__key__"]: np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
            for name in shards for sample in iter_shard(str(tmp / "shards" / name))}


def assert_colour(region: np.ndarray, rgb, tolerance=0):
    difference = np.abs(region.astype(int) - np.array(rgb)).max()
    assert difference <= tolerance, f"{region.reshape(-1, 3)[0]} is not {rgb} (+-{tolerance})"


def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped_to_white(pixels):
    assert_colour(pixels["gray16"][LEFT], (50, 50, 50))
    assert_colour(pixels["gray16"][RIGHT], (200, 200, 200))


def test_cmyk_becomes_its_rgb_colour(pixels):
    assert_colour(pixels["cmyk"], (0, 255, 255), tolerance=3)


def test_palette_transparency_is_composited_over_white(pixels):
    assert_colour(pixels["palette"][LEFT], (255, 255, 255))
    assert_colour(pixels["palette"][RIGHT], (255, 0, 0))


def test_grayscale_with_alpha_is_composited_over_white(pixels):
    assert_colour(pixels["gray_alpha"][LEFT], (255, 255, 255))
    assert_colour(pixels["gray_alpha"][RIGHT], (100, 100, 100))


def test_exif_orientation_is_applied(pixels):
    """Stored red | blue, turned clockwise for display: red on top, blue below (away from the JPEG edge)."""
    image = pixels["rotated"]
    assert_colour(image[: SIZE // 2 - 4], (255, 0, 0), tolerance=8)
    assert_colour(image[SIZE // 2 + 4:], (0, 0, 255), tolerance=8)
