"""Synthetic faces in the exact official CelebA layout: the offline default data set.

Each image is drawn from its attribute row. VISIBLE_ATTRIBUTES are the ones the drawing is meant to
show; eight more change it in smaller or hidden ways (a pixel or less in a 32-px landmark crop, under a
beard, or below the crop: nose and lip size, narrow eyes, arched brows, chubby, goatee, necktie,
necklace), and the other twelve are only sampled. All follow CelebA's marginal frequencies with the
obvious exclusions (hair colours, beards on women, bald with bangs). Pose (shift and scale), skin tone
and background vary. The landmarks written are the points actually drawn. Deterministic for a seed:
image i uses its own generator (seed, i).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dfcvae_dist.data import celeba

# Left in the output directory, so that shards written from it record `synthetic: true` in their manifest.
SYNTHETIC_MARKER = "SYNTHETIC.json"

# CelebA's 40 attributes in file order, with their approximate positive rate on the real data set.
CELEBA_ATTRIBUTE_RATES = {
    "5_o_Clock_Shadow": 0.11, "Arched_Eyebrows": 0.27, "Attractive": 0.51, "Bags_Under_Eyes": 0.20,
    "Bald": 0.022, "Bangs": 0.15, "Big_Lips": 0.24, "Big_Nose": 0.23, "Black_Hair": 0.24,
    "Blond_Hair": 0.15, "Blurry": 0.05, "Brown_Hair": 0.21, "Bushy_Eyebrows": 0.14, "Chubby": 0.06,
    "Double_Chin": 0.05, "Eyeglasses": 0.065, "Goatee": 0.06, "Gray_Hair": 0.04, "Heavy_Makeup": 0.39,
    "High_Cheekbones": 0.45, "Male": 0.42, "Mouth_Slightly_Open": 0.48, "Mustache": 0.04,
    "Narrow_Eyes": 0.12, "No_Beard": 0.83, "Oval_Face": 0.28, "Pale_Skin": 0.04, "Pointy_Nose": 0.28,
    "Receding_Hairline": 0.08, "Rosy_Cheeks": 0.07, "Sideburns": 0.06, "Smiling": 0.48,
    "Straight_Hair": 0.21, "Wavy_Hair": 0.32, "Wearing_Earrings": 0.19, "Wearing_Hat": 0.05,
    "Wearing_Lipstick": 0.47, "Wearing_Necklace": 0.12, "Wearing_Necktie": 0.07, "Young": 0.77,
}
ATTRIBUTE_NAMES = list(CELEBA_ATTRIBUTE_RATES)
VISIBLE_ATTRIBUTES = [
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair", "Eyeglasses", "Male",
    "Mouth_Slightly_Open", "Mustache", "No_Beard", "Pale_Skin", "Smiling", "Wearing_Hat",
    "Wearing_Lipstick", "Heavy_Makeup", "Rosy_Cheeks", "Blurry", "Wearing_Earrings", "Bushy_Eyebrows",
]
HAIR_COLOURS = {"Black_Hair": (25, 20, 18), "Blond_Hair": (225, 195, 110), "Brown_Hair": (110, 70, 40),
                "Gray_Hair": (170, 170, 172)}
PARTITION_FRACTIONS = (162770 / 202599, 19867 / 202599)  # train, val; the rest is test


def sample_attributes(rng: np.random.Generator) -> dict[str, int]:
    a = {name: int(rng.random() < rate) for name, rate in CELEBA_ATTRIBUTE_RATES.items()}
    male = a["Male"]
    # Hair colour: at most one; bald heads have none.
    colour = rng.choice(list(HAIR_COLOURS) + ["other"], p=[0.25, 0.16, 0.22, 0.05, 0.32])
    for name in HAIR_COLOURS:
        a[name] = int(name == colour)
    if a["Bald"]:
        a.update({n: 0 for n in HAIR_COLOURS}, Bangs=0, Wavy_Hair=0, Straight_Hair=0)
    beard = int(male and rng.random() < 0.35)
    a["No_Beard"] = 1 - beard
    for name in ("Goatee", "Mustache", "Sideburns", "5_o_Clock_Shadow"):
        a[name] = a[name] if male else 0
    a["Mustache"] = int(male and rng.random() < 0.10)
    if not male:
        a["Bald"] = 0
    if male:
        a["Wearing_Lipstick"] = int(rng.random() < 0.02)
        a["Heavy_Makeup"] = int(rng.random() < 0.01)
    else:
        a["Wearing_Lipstick"] = int(rng.random() < 0.80)
        a["Heavy_Makeup"] = int(rng.random() < 0.66)
        a["Wearing_Necktie"] = 0
    if a["Gray_Hair"]:
        a["Young"] = 0
    return a


def _scale(p: tuple[float, float], c: tuple[float, float], s: float, d: tuple[float, float]):
    return c[0] + (p[0] - 89) * s + d[0], c[1] + (p[1] - 125) * s + d[1]


def _draw_eyes(draw, a: dict[str, int], P, box, hair) -> list[tuple[float, float]]:
    """Eyes, brows, makeup, cheeks and glasses; the eye centres (landmarks) in the aligned template."""
    eyes = [(69.0, 111.0), (108.0, 111.0)]
    eye_h = 2 if a["Narrow_Eyes"] else 4
    for ex, ey in eyes:
        if a["Heavy_Makeup"]:
            draw.ellipse(box(ex - 9, ey - 7, ex + 9, ey + 5), fill=(120, 60, 130))
        draw.ellipse(box(ex - 7, ey - eye_h, ex + 7, ey + eye_h), fill=(245, 245, 245))
        draw.ellipse(box(ex - 3, ey - 3, ex + 3, ey + 3), fill=(40, 30, 20))
        brow_w = 4 if a["Bushy_Eyebrows"] else 2
        draw.line([P(ex - 9, ey - 10), P(ex, ey - 13 if a["Arched_Eyebrows"] else ey - 11),
                   P(ex + 9, ey - 10)], fill=hair if not a["Bald"] else (60, 50, 40), width=brow_w)
        if a["Rosy_Cheeks"]:
            draw.ellipse(box(ex - 8, ey + 20, ex + 8, ey + 30), fill=(225, 110, 120))
    if a["Eyeglasses"]:
        for ex, ey in eyes:
            draw.ellipse(box(ex - 11, ey - 9, ex + 11, ey + 9), fill=(20, 20, 25))
        draw.line([P(80, 109), P(97, 109)], fill=(20, 20, 25), width=3)
    return eyes


def _draw_mouth(draw, a: dict[str, int], P, box, skin, hair, face_w: int) -> tuple[tuple[float, float], ...]:
    """Mouth, lips, mustache, beard and goatee; the mouth corners (landmarks) in the aligned template."""
    mouth_l, mouth_r = (72.0, 152.0), (104.0, 152.0)
    if a["Smiling"]:
        mouth_l, mouth_r = (70.0, 149.0), (106.0, 149.0)
    lip = (190, 25, 45) if a["Wearing_Lipstick"] else tuple(int(v) for v in skin * 0.6)
    lip_w = 5 if a["Big_Lips"] else 3
    if a["Mouth_Slightly_Open"]:
        draw.ellipse(box(mouth_l[0] + 4, 149, mouth_r[0] - 4, 160), fill=(60, 15, 20))
    if a["Smiling"]:
        draw.arc(box(mouth_l[0], 134, mouth_r[0], mouth_r[1] + 12), 20, 160, fill=lip, width=lip_w)
    else:
        draw.line([P(*mouth_l), P(*mouth_r)], fill=lip, width=lip_w)
    beard_c = hair if a["Male"] and not a["Bald"] else (50, 40, 35)
    if a["Mustache"]:
        draw.rectangle(box(74, 141, 102, 146), fill=beard_c)
    if not a["No_Beard"]:
        draw.chord(box(89 - face_w, 120, 89 + face_w, 182), 20, 160, fill=beard_c)
        draw.line([P(*mouth_l), P(*mouth_r)], fill=lip, width=lip_w)
    if a["Goatee"]:
        draw.ellipse(box(80, 164, 98, 178), fill=beard_c)
    return mouth_l, mouth_r


def draw_face(a: dict[str, int], rng: np.random.Generator) -> tuple[Image.Image, list[int]]:
    """Draw one 178x218 aligned face for attribute row `a`; return it with its 5 landmarks."""
    w, h = celeba.ALIGNED_SIZE
    bg = rng.integers(40, 230, size=3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(img)
    for _ in range(3):  # background clutter
        x, y, r = rng.integers(0, w), rng.integers(0, h), rng.integers(10, 40)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(v) for v in rng.integers(30, 240, 3)))
    s = rng.uniform(0.92, 1.08)  # scale
    d = (rng.uniform(-4, 4), rng.uniform(-4, 4))  # shift
    c = (89.0, 125.0)
    P = lambda x, y: _scale((x, y), c, s, d)  # noqa: E731 (aligned template -> this face)
    box = lambda x0, y0, x1, y1: [*P(x0, y0), *P(x1, y1)]  # noqa: E731

    skin = np.array([230, 215, 200]) if a["Pale_Skin"] else np.array(
        [rng.integers(140, 215), rng.integers(95, 160), rng.integers(70, 125)])
    skin_t = tuple(int(v) for v in skin)
    hair = HAIR_COLOURS.get(next((n for n in HAIR_COLOURS if a[n]), ""), None)
    if hair is None:
        hair = (int(rng.integers(90, 150)), int(rng.integers(30, 60)), int(rng.integers(15, 35)))
    face_w = 40 if (a["Male"] or a["Chubby"]) else 35

    if not a["Bald"] and not a["Male"]:  # long hair behind the head
        draw.rectangle(box(89 - face_w - 10, 85, 89 + face_w + 10, 200), fill=hair)
    draw.rectangle(box(75, 160, 103, 218), fill=skin_t)  # neck
    if a["Wearing_Necktie"]:
        draw.polygon([P(86, 185), P(92, 185), P(95, 218), P(83, 218)], fill=(150, 20, 30))
    if a["Wearing_Necklace"]:
        draw.arc(box(72, 165, 106, 195), 20, 160, fill=(230, 210, 90), width=3)
    draw.ellipse(box(89 - face_w, 70, 89 + face_w, 180), fill=skin_t)  # face
    if not a["Bald"]:
        draw.chord(box(89 - face_w - 4, 58, 89 + face_w + 4, 130), 180, 360, fill=hair)  # hair top
        if a["Bangs"]:
            draw.rectangle(box(89 - face_w + 4, 84, 89 + face_w - 4, 100), fill=hair)
    if a["Wearing_Hat"]:
        hat = tuple(int(v) for v in rng.integers(20, 255, 3))
        draw.rectangle(box(89 - face_w - 12, 78, 89 + face_w + 12, 88), fill=hat)
        draw.rectangle(box(89 - face_w + 2, 45, 89 + face_w - 2, 80), fill=hat)
    if a["Wearing_Earrings"]:
        for ex in (89 - face_w - 2, 89 + face_w + 2):
            draw.ellipse(box(ex - 3, 140, ex + 3, 146), fill=(240, 200, 40))

    eyes = _draw_eyes(draw, a, P, box, hair)

    nose = (88.0, 134.0)
    nose_w = 7 if a["Big_Nose"] else 4
    darker = tuple(int(v) for v in skin * 0.75)
    draw.polygon([P(nose[0], 118), P(nose[0] - nose_w, nose[1]), P(nose[0] + nose_w, nose[1])], fill=darker)

    mouth_l, mouth_r = _draw_mouth(draw, a, P, box, skin, hair, face_w)
    if a["Blurry"]:
        img = img.filter(ImageFilter.GaussianBlur(2.5))
    landmarks = [P(*eyes[0]), P(*eyes[1]), P(*nose), P(*mouth_l), P(*mouth_r)]
    return img, [int(round(v)) for point in landmarks for v in point]


def _render(job: tuple[Path, int, int]) -> tuple[dict[str, int], list[int], int]:
    out, seed, index = job
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    image, landmarks = draw_face(attrs, rng)
    image.save(out / celeba.IMAGE_DIR / f"{index:06d}.jpg", quality=92)
    return attrs, landmarks, int(rng.integers(1, max(2, index // 20 + 2)))


def make_synthetic_celeba(out: Path, num: int, seed: int = 0, workers: int = 2, progress=None) -> None:
    """Write `num` synthetic images and the five CelebA text files under `out`."""
    out = Path(out)
    (out / celeba.IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    jobs = [(out, seed, i) for i in range(1, num + 1)]
    with mp.get_context("fork").Pool(workers) as pool:
        rows = []
        for row in pool.imap(_render, jobs, chunksize=64):
            rows.append(row)
            if progress:
                progress()
    ids = [f"{i:06d}.jpg" for i in range(1, num + 1)]
    n_train = int(round(num * PARTITION_FRACTIONS[0]))
    n_val = int(round(num * PARTITION_FRACTIONS[1]))
    attr_lines = [str(num), " ".join(ATTRIBUTE_NAMES) + " "]
    attr_lines += [f"{i} " + " ".join(f"{2 * r[0][n] - 1:2d}" for n in ATTRIBUTE_NAMES)
                   for i, r in zip(ids, rows, strict=True)]
    _write(out / celeba.ATTR_FILE, attr_lines)
    _write(out / celeba.PARTITION_FILE,
           [f"{i} {0 if k < n_train else 1 if k < n_train + n_val else 2}" for k, i in enumerate(ids)])
    _write(out / celeba.LANDMARK_FILE, [str(num), " ".join(celeba.LANDMARK_NAMES)] +
           [f"{i} " + " ".join(f"{v:4d}" for v in r[1]) for i, r in zip(ids, rows, strict=True)])
    _write(out / celeba.BBOX_FILE, [str(num), "image_id x_1 y_1 width height"] +
           [f"{i} {_bbox(r[1])}" for i, r in zip(ids, rows, strict=True)])
    _write(out / celeba.IDENTITY_FILE, [f"{i} {r[2]}" for i, r in zip(ids, rows, strict=True)])
    _write(out / SYNTHETIC_MARKER, [json.dumps({"generator": __name__, "num": num, "seed": seed})])


def is_synthetic(root: Path) -> bool:
    """Whether a CelebA-layout directory (ROOT or ROOT/celeba) was drawn by `make_synthetic_celeba`."""
    return any((Path(root) / sub / SYNTHETIC_MARKER).is_file() for sub in (".", "celeba"))


def _bbox(landmarks: list[int]) -> str:
    x0, y0, x1, y1 = celeba.landmark_box(landmarks)
    return f"{x0} {y0} {x1 - x0} {y1 - y0}"


def _write(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")
