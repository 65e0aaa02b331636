"""Reader of the official CelebA layout (and torchvision's `ROOT/celeba/` copy of it), and the two crops.

Text files are parsed by whitespace, so CRLF copies and the padded columns of `list_attr_celeba.txt` read the
same. Every malformed line is reported with its file and line number.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from dfcvae_dist.errors import UserError

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
BBOX_FILE = "list_bbox_celeba.txt"
IDENTITY_FILE = "identity_CelebA.txt"
IMAGE_DIR = "img_align_celeba"
LANDMARK_NAMES = ["lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                  "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y"]
SPLITS = {0: "train", 1: "val", 2: "test"}
ALIGNED_SIZE = (178, 218)
PAPER_BOX = (30, 40, 168, 178)  # released Torch code: x 30..168, y 40..178 of the aligned image
LANDMARK_BOX_FACTOR = 3.2  # square side = 3.2 x eye-to-mouth distance (about the paper box on CelebA)


@dataclass
class CelebARecord:
    image_id: str  # "000001.jpg"
    path: Path
    attrs: list[int]  # 40 values, 0/1
    landmarks: list[int]  # 10 values, aligned-image coordinates
    partition: int  # 0 train, 1 val, 2 test
    identity: int

    @property
    def key(self) -> str:
        return self.image_id.rsplit(".", 1)[0]


def find_root(root: Path) -> Path:
    """The directory holding the CelebA files: ROOT itself, or ROOT/celeba (torchvision's layout)."""
    for candidate in (root, root / "celeba"):
        if (candidate / ATTR_FILE).exists() or (candidate / IMAGE_DIR).is_dir():
            return candidate
    raise UserError(f"{root}: no CelebA layout found (expected {ATTR_FILE} and {IMAGE_DIR}/ in {root} "
                    f"or in {root / 'celeba'})")


def _lines(path: Path) -> list[list[str]]:
    if not path.exists():
        raise UserError(f"{path}: missing CelebA file")
    try:
        return [line.split() for line in path.read_text().splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read: {err}") from None


def _rows(path: Path, header_lines: int) -> list[tuple[int, list[str]]]:
    """(line number, fields) of each non-empty data line after `header_lines` header lines."""
    return [(i + 1, f) for i, f in enumerate(_lines(path)) if i >= header_lines and f]


def _ints(path: Path, lineno: int, fields: list[str], count: int, allowed: set[int] | None = None) -> list[int]:
    if len(fields) != count + 1:
        raise UserError(f"{path}:{lineno}: expected {count + 1} fields (image id and {count} values), "
                        f"got {len(fields)}")
    try:
        values = [int(v) for v in fields[1:]]
    except ValueError:
        raise UserError(f"{path}:{lineno}: non-integer value in {' '.join(fields[1:])!r}") from None
    if allowed is not None and any(v not in allowed for v in values):
        bad = next(v for v in values if v not in allowed)
        raise UserError(f"{path}:{lineno}: value {bad} not in {sorted(allowed)}")
    return values


def read_attributes(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    """Attribute names and {image id: 40 values as 0/1} from list_attr_celeba.txt."""
    lines = _lines(path)
    if len(lines) < 2:
        raise UserError(f"{path}: expected a count line and a header line")
    names = lines[1]
    if len(names) != 40:
        raise UserError(f"{path}:2: expected 40 attribute names, got {len(names)}")
    table = {}
    for lineno, fields in _rows(path, 2):
        values = _ints(path, lineno, fields, len(names), allowed={-1, 1})
        table[fields[0]] = [(v + 1) // 2 for v in values]
    return names, table


def read_table(path: Path, header_lines: int, count: int) -> dict[str, list[int]]:
    return {f[0]: _ints(path, n, f, count) for n, f in _rows(path, header_lines)}


def read_partition(path: Path) -> dict[str, int]:
    return {f[0]: _ints(path, n, f, 1, allowed={0, 1, 2})[0] for n, f in _rows(path, 0)}


def read_celeba(root: Path) -> tuple[list[str], list[CelebARecord]]:
    """Attribute names and one record per image, in image-id order; ids must agree across the files."""
    root = find_root(Path(root))
    names, attrs = read_attributes(root / ATTR_FILE)
    partition = read_partition(root / PARTITION_FILE)
    landmarks = read_table(root / LANDMARK_FILE, 2, 10)
    identity = {k: v[0] for k, v in read_table(root / IDENTITY_FILE, 0, 1).items()}
    tables = {ATTR_FILE: attrs, PARTITION_FILE: partition, LANDMARK_FILE: landmarks, IDENTITY_FILE: identity}
    reference = set(attrs)
    for filename, table in tables.items():
        missing = reference - set(table)
        extra = set(table) - reference
        if missing or extra:
            image_id = min(missing or extra)
            where = (f"absent from {root / filename}" if missing else f"in {root / filename} but absent from "
                     f"{root / ATTR_FILE}")
            raise UserError(f"image id {image_id} is {where}")
    records = [
        CelebARecord(i, root / IMAGE_DIR / i, attrs[i], landmarks[i], partition[i], identity[i])
        for i in sorted(attrs)
    ]
    return names, records


def paper_crop(image: Image.Image) -> Image.Image:
    return image.crop(PAPER_BOX)


def landmark_box(landmarks: list[int]) -> tuple[int, int, int, int]:
    """Square face box: centred between eye midpoint and mouth midpoint, side 3.2 x their distance."""
    lx, ly, rx, ry, _nx, _ny, mlx, mly, mrx, mry = landmarks
    eye_x, eye_y = (lx + rx) / 2, (ly + ry) / 2
    mouth_x, mouth_y = (mlx + mrx) / 2, (mly + mry) / 2
    dist = max(((mouth_x - eye_x) ** 2 + (mouth_y - eye_y) ** 2) ** 0.5, 1.0)
    cx, cy = (eye_x + mouth_x) / 2, (eye_y + mouth_y) / 2
    half = LANDMARK_BOX_FACTOR * dist / 2
    return round(cx - half), round(cy - half), round(cx + half), round(cy + half)


def landmark_crop(image: Image.Image, landmarks: list[int]) -> Image.Image:
    return image.crop(landmark_box(landmarks))  # PIL pads with black where the box leaves the image


def center_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))
