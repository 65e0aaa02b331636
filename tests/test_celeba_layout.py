"""The CelebA reader: official and torchvision layouts, CRLF files, and every kind of bad input."""

import shutil

import pytest

from dfcvae_dist.data import celeba
from dfcvae_dist.data.synthetic import make_synthetic_celeba
from dfcvae_dist.errors import UserError
from tests.helpers import run_tool


@pytest.fixture
def tiny(tmp_path):
    root = tmp_path / "celeba"
    make_synthetic_celeba(root, num=30, seed=1, workers=1)
    return root


def edit_line(path, lineno, new):
    lines = path.read_text().splitlines()
    lines[lineno - 1] = new
    path.write_text("\n".join(lines) + "\n")


def test_reads_official_layout(tiny):
    names, records = celeba.read_celeba(tiny)
    assert len(names) == 40 and names[0] == "5_o_Clock_Shadow" and names[-1] == "Young"
    assert [r.image_id for r in records][:2] == ["000001.jpg", "000002.jpg"]
    assert all(set(r.attrs) <= {0, 1} and len(r.landmarks) == 10 for r in records)
    assert {r.partition for r in records} == {0, 1, 2}


def test_crlf_files_parse_the_same(tiny):
    expected = celeba.read_celeba(tiny)
    for name in (celeba.ATTR_FILE, celeba.PARTITION_FILE, celeba.LANDMARK_FILE, celeba.IDENTITY_FILE):
        path = tiny / name
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert celeba.read_celeba(tiny) == expected


def test_torchvision_layout(tiny, tmp_path):
    root = tmp_path / "tv"
    shutil.copytree(tiny, root / "celeba")
    names, records = celeba.read_celeba(root)
    assert len(records) == 30 and records[0].path == root / "celeba" / "img_align_celeba" / "000001.jpg"


def test_missing_text_file_is_named(tiny):
    (tiny / celeba.LANDMARK_FILE).unlink()
    with pytest.raises(UserError, match=r"list_landmarks_align_celeba\.txt: missing CelebA file"):
        celeba.read_celeba(tiny)


def test_wrong_field_count_names_file_and_line(tiny):
    edit_line(tiny / celeba.ATTR_FILE, 5, "000003.jpg 1 -1 1")
    with pytest.raises(UserError, match=r"list_attr_celeba\.txt:5: expected 41 fields"):
        celeba.read_celeba(tiny)


def test_value_not_plus_minus_one_names_file_and_line(tiny):
    path = tiny / celeba.ATTR_FILE
    fields = path.read_text().splitlines()[3].split()
    fields[7] = "0"
    edit_line(path, 4, " ".join(fields))
    with pytest.raises(UserError, match=r"list_attr_celeba\.txt:4: value 0 not in \[-1, 1\]"):
        celeba.read_celeba(tiny)


def test_bad_partition_value(tiny):
    edit_line(tiny / celeba.PARTITION_FILE, 2, "000002.jpg 7")
    with pytest.raises(UserError, match=r"list_eval_partition\.txt:2: value 7"):
        celeba.read_celeba(tiny)


def test_id_missing_from_one_file(tiny):
    path = tiny / celeba.PARTITION_FILE
    path.write_text("\n".join(path.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(UserError, match=r"image id 000030\.jpg is absent from .*list_eval_partition\.txt"):
        celeba.read_celeba(tiny)


def test_missing_image_is_named(tiny, tmp_path):
    (tiny / "img_align_celeba" / "000004.jpg").unlink()
    proc = run_tool("make_shards.py", "--celeba-root", tiny, "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tiny}/img_align_celeba/000004.jpg: image listed in "
                                                "list_attr_celeba.txt is missing"]


def test_undecodable_jpeg_stops_naming_file(tiny, tmp_path):
    (tiny / "img_align_celeba" / "000007.jpg").write_bytes(b"\xff\xd8not a jpeg")
    proc = run_tool("make_shards.py", "--celeba-root", tiny, "--out", tmp_path / "s", check=False)
    assert proc.returncode == 2
    assert "000007.jpg: cannot decode image" in proc.stderr and "--skip-corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "s" / "manifest.json").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))


def test_skip_corrupt_counts_and_lists(tiny, tmp_path):
    (tiny / "img_align_celeba" / "000007.jpg").write_bytes(b"\xff\xd8not a jpeg")
    run_tool("make_shards.py", "--celeba-root", tiny, "--out", tmp_path / "s", "--skip-corrupt")
    from dfcvae_dist.data.shards import read_manifest

    manifest = read_manifest(tmp_path / "s")
    assert [s["key"] for s in manifest["skipped"]] == ["000007"]
    assert sum(v["num_samples"] for v in manifest["splits"].values()) == 29


def test_landmark_box_is_square_and_centred():
    box = celeba.landmark_box([69, 111, 108, 111, 88, 134, 72, 152, 104, 152])
    assert box[2] - box[0] == box[3] - box[1]
    assert abs((box[0] + box[2]) / 2 - 88.25) <= 1 and abs((box[1] + box[3]) / 2 - 131.5) <= 1
