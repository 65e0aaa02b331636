"""Write CelebA (or a plain image folder) as WebDataset tar shards with a manifest, and verify them.

Each shard is written as `.NAME.tar.tmp`, then its record `.parts/NAME.json` (count, sha256, skipped
images) and only then renamed to `NAME.tar`: a file under a final name is always whole, and a re-run
writes only the shards that are missing. `manifest.json` is written last, the same way.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing as mp
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from dfcvae_dist.data import celeba
from dfcvae_dist.errors import UserError
from dfcvae_dist.rundir import atomic_path, atomic_write, temp_name

MANIFEST = "manifest.json"
FORMAT = "dfcvae-shards/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
BACKGROUND = (255, 255, 255, 255)  # white: what transparent pixels become


@dataclass
class ShardSettings:
    image_size: int = 64
    crop: str = "paper"  # paper | landmarks | center
    image_format: str = "npy"  # npy (uint8 H x W x 3, nothing to decode) | png (lossless) | jpg
    shard_size: int = 1000
    source: str = ""


@dataclass
class Sample:
    key: str
    path: Path
    attrs: list[int] | None
    landmarks: list[int] | None
    partition: int
    identity: int


@dataclass
class ShardJob:
    split: str
    name: str
    samples: list[Sample] = field(default_factory=list)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def celeba_samples(root: Path) -> tuple[list[str], list[Sample]]:
    names, records = celeba.read_celeba(root)
    samples = [Sample(r.key, r.path, r.attrs, r.landmarks, r.partition, r.identity) for r in records]
    missing = next((s.path for s in samples if not s.path.is_file()), None)
    if missing is not None:
        raise UserError(f"{missing}: image listed in {celeba.ATTR_FILE} is missing")
    return names, samples


def folder_samples(folder: Path, attributes_csv: Path | None, holdout: float) -> tuple[list[str], list[Sample]]:
    """Every image below `folder`; labels from a CSV (`image,<attr>...`, values 0/1 or -1/1) when given.

    Split by a hash of the key: `holdout` of the images go to val and as many to test.
    """
    if not folder.is_dir():
        raise UserError(f"{folder}: image folder does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise UserError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found")
    names, labels = _read_attribute_csv(attributes_csv) if attributes_csv else ([], {})
    samples, seen = [], {}
    for path in paths:
        rel = path.relative_to(folder).with_suffix("").as_posix()
        key = rel.replace("/", "_").replace(".", "_")
        if key in seen:
            raise UserError(f"{path}: key '{key}' collides with {seen[key]}")
        seen[key] = path
        attrs = labels.get(path.relative_to(folder).as_posix(), labels.get(path.name)) if labels else None
        if labels and attrs is None:
            raise UserError(f"{attributes_csv}: no row for image {path.relative_to(folder).as_posix()}")
        bucket = zlib.crc32(key.encode()) / 2**32
        partition = 1 if bucket < holdout else 2 if bucket < 2 * holdout else 0
        samples.append(Sample(key, path, attrs, None, partition, -1))
    return names, samples


def _read_attribute_csv(path: Path) -> tuple[list[str], dict[str, list[int]]]:
    try:
        rows = list(csv.reader(path.read_text().splitlines()))
    except OSError as err:
        raise UserError(f"{path}: cannot read: {err.strerror}") from None
    if not rows or len(rows[0]) < 2:
        raise UserError(f"{path}:1: header must be 'image,<attribute>,...'")
    names, labels = [n.strip() for n in rows[0][1:]], {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(names) + 1:
            raise UserError(f"{path}:{lineno}: expected {len(names) + 1} fields, got {len(row)}")
        try:
            values = [int(v) for v in row[1:]]
        except ValueError:
            raise UserError(f"{path}:{lineno}: values must be 0/1 or -1/1") from None
        if any(v not in (-1, 0, 1) for v in values):
            raise UserError(f"{path}:{lineno}: values must be 0/1 or -1/1")
        labels[row[0].strip()] = [int(v > 0) for v in values]
    return names, labels


def plan_shards(samples: list[Sample], shard_size: int) -> list[ShardJob]:
    jobs = []
    for partition, split in celeba.SPLITS.items():
        members = [s for s in samples if s.partition == partition]
        for i in range(0, len(members), shard_size):
            jobs.append(ShardJob(split, f"{split}-{i // shard_size:06d}.tar", members[i:i + shard_size]))
    return jobs


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB as the image is meant to be seen: EXIF orientation applied; 16-bit images (modes I;16* and I,
    which is how Pillow opens 16-bit PNG and TIFF) scaled to 8 bits, where `convert` would clip them to white;
    transparency (alpha, or a palette's or tRNS transparent colour) composited over white, BACKGROUND;
    CMYK, palette and grayscale images converted by Pillow."""
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        background = Image.new("RGBA", img.size, BACKGROUND)
        img = Image.alpha_composite(background, img.convert("RGBA"))
    return img.convert("RGB")


def prepare_image(sample: Sample, settings: ShardSettings) -> Image.Image:
    with Image.open(sample.path) as img:
        img = to_rgb(img)
    if settings.crop == "paper":
        img = celeba.paper_crop(img)
    elif settings.crop == "landmarks":
        img = celeba.landmark_crop(img, sample.landmarks)
    else:
        img = celeba.center_square(img)
    return img.resize((settings.image_size,) * 2, Image.Resampling.BICUBIC, reducing_gap=None)


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "npy":
        np.save(buf, np.asarray(img, dtype=np.uint8), allow_pickle=False)
    else:
        img.save(buf, format="PNG", compress_level=1) if fmt == "png" else img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_shard(job: ShardJob, out: Path, settings: ShardSettings, names: list[str],
                skip_corrupt: bool) -> dict:
    """Write one shard atomically; return its record (also saved under .parts/)."""
    skipped, count = [], 0
    with atomic_path(out / job.name) as tmp:
        with open(tmp, "wb") as stream, wds.TarWriter(stream, mtime=0) as sink:
            for sample in job.samples:
                try:
                    image = prepare_image(sample, settings)
                except (OSError, SyntaxError, ValueError) as err:
                    if not skip_corrupt:
                        raise UserError(f"{sample.path}: cannot decode image ({err}); "
                                        "rerun with --skip-corrupt to skip it") from None
                    skipped.append({"key": sample.key, "file": str(sample.path), "error": str(err)})
                    continue
                meta = {
                    "attrs": dict(zip(names, sample.attrs, strict=True)) if sample.attrs is not None else {},
                    "landmarks": sample.landmarks or [],
                    "partition": sample.partition,
                    "identity": sample.identity,
                }
                sink.write({"__key__": sample.key, settings.image_format: _encode(image, settings.image_format),
                            "json": json.dumps(meta).encode()})
                count += 1
        record = {"name": job.name, "split": job.split, "num_samples": count, "sha256": sha256_file(tmp),
                  "skipped": skipped}
        atomic_write(out / ".parts" / (job.name + ".json"), json.dumps(record))
    return record


def _write_shard_star(args: tuple) -> dict:
    return write_shard(*args)


def make_shards(names: list[str], samples: list[Sample], out: Path, settings: ShardSettings,
                workers: int = 1, skip_corrupt: bool = False,
                progress: Callable[[int], None] | None = None, synthetic: bool = False) -> dict:
    """Write every missing shard (in parallel), then the manifest. Returns the manifest. `synthetic`: the
    source was drawn by the synthetic generator (the manifest says so, and so does every run trained on it)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / ".parts").mkdir(exist_ok=True)
    _check_settings(out, settings)
    jobs = plan_shards(samples, settings.shard_size)
    records = {}
    todo = []
    for job in jobs:
        part = out / ".parts" / (job.name + ".json")
        if (out / job.name).exists() and part.exists():
            records[job.name] = json.loads(part.read_text())
            if progress:
                progress(len(job.samples))
        else:
            todo.append((job, out, settings, names, skip_corrupt))
    if todo:
        try:
            with mp.get_context("fork").Pool(max(1, workers)) as pool:
                for record in pool.imap_unordered(_write_shard_star, todo):
                    records[record["name"]] = record
                    if progress:
                        progress(record["num_samples"] + len(record["skipped"]))
        except BaseException:  # the pool's workers were stopped mid-shard: their temporary files stay behind
            for job, *_ in todo:
                temp_name(out / job.name).unlink(missing_ok=True)
            raise
    manifest = build_manifest(names, [records[j.name] for j in jobs], settings, synthetic)
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _check_settings(out: Path, settings: ShardSettings) -> None:
    """Refuse to mix shards made with other settings in one directory."""
    path = out / ".parts" / "settings.json"
    if path.exists():
        before = json.loads(path.read_text())
        if before != asdict(settings):
            diff = {k: (before.get(k), v) for k, v in asdict(settings).items() if before.get(k) != v}
            raise UserError(f"{out}: holds shards made with other settings {diff} (was, now); "
                            "choose another --out or delete it")
    else:
        atomic_write(path, json.dumps(asdict(settings)))


def build_manifest(names: list[str], records: list[dict], settings: ShardSettings, synthetic: bool = False) -> dict:
    splits = {}
    for split in celeba.SPLITS.values():
        shards = [{k: r[k] for k in ("name", "num_samples", "sha256")} for r in records if r["split"] == split]
        splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards}
    return {
        "format": FORMAT,
        **asdict(settings),
        "attributes": names,
        "synthetic": synthetic,
        "splits": splits,
        "skipped": [s for r in records for s in r["skipped"]],
    }


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no manifest (write shards with tools/make_shards.py)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: unreadable manifest: {err}") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a {FORMAT} manifest (format={manifest.get('format')!r})")
    manifest.setdefault("synthetic", False)  # written before the manifest recorded it
    return manifest


def manifest_of(shards: str | Path) -> dict | None:
    """The manifest of `shards` (`data.shards`): a manifest directory's, or None for a WebDataset URL pattern."""
    return read_manifest(Path(shards)) if Path(shards).is_dir() else None


def manifest_digest(manifest: dict) -> str:
    """A short digest of the data a manifest describes: every shard's split, name and sha256."""
    shards = [(split, s["name"], s["sha256"]) for split, info in sorted(manifest["splits"].items())
              for s in info["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]


def verify_shards(directory: Path) -> list[str]:
    """Re-read every shard against the manifest; return one line per problem (empty: all good)."""
    manifest = read_manifest(directory)
    problems = []
    for info in manifest["splits"].values():
        for shard in info["shards"]:
            path = Path(directory) / shard["name"]
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            if sha256_file(path) != shard["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest")
            try:
                count = sum(1 for _ in iter_shard(str(path)))
            except UserError as err:
                problems.append(str(err))
                continue
            if count != shard["num_samples"]:
                problems.append(f"{path}: {count} samples, manifest says {shard['num_samples']}")
    return problems


def iter_shard(url: str):
    """Raw samples of one shard, with the shard named in every error and unsafe member names refused."""
    seen = set()
    try:
        for sample in wds.tarfile_to_samples()(iter([{"url": url}])):
            key = sample["__key__"]
            if key.startswith("/") or ".." in key.split("/"):
                raise UserError(f"{url}: unsafe member name '{key}' (absolute or '..')")
            if key in seen:
                raise UserError(f"{url}: duplicate key '{key}'")
            seen.add(key)
            yield sample
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - tarfile, gzip, webdataset and I/O errors from a damaged shard
        raise UserError(f"{url}: damaged shard ({type(err).__name__}: {err})") from None
