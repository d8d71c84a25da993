"""Image sources, manifests and datasets.

A source is an ImageFolder directory (class sub-folders; a flat folder for unlabeled images) or a CSV/Parquet
manifest with `path` and optional `label`. `prepare` turns every source into a Parquet manifest once
(unreadable images skipped and listed); all later stages read only those manifests.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from torch.utils.data import Dataset

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it still works and is what this project
# pins, so the per-call warning is silenced here rather than in every caller.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MANIFEST_SCHEMA = pa.schema([("image_id", pa.string()), ("path", pa.string()), ("label", pa.int32())])


class DataError(ValueError):
    """Bad input data, phrased for the user (names the file and the problem)."""


@dataclass(frozen=True)
class Item:
    path: str
    label_name: str | None


def _image_id(path: str) -> str:
    return hashlib.sha1(path.encode()).hexdigest()[:16]


def scan_source(src: Path) -> list[Item]:
    """List the images of an ImageFolder directory or a CSV/Parquet manifest (paths relative to it)."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: data source does not exist")
    if src.is_dir():
        items = []
        for p in sorted(src.rglob("*")):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                rel = p.relative_to(src)
                items.append(Item(str(p), rel.parts[0] if len(rel.parts) > 1 else None))
        if not items:
            raise DataError(f"{src}: no images found (expected {sorted(IMAGE_EXTS)})")
        return items
    if src.suffix.lower() == ".csv":
        table = pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(column_types={"label": pa.string()}))
    elif src.suffix.lower() in (".parquet", ".pq"):
        table = pq.read_table(src)
    else:
        raise DataError(f"{src}: not a directory, .csv or .parquet manifest")
    if "path" not in table.column_names:
        raise DataError(f"{src}: manifest has no 'path' column (columns: {table.column_names})")
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    out = []
    for i, (p, lab) in enumerate(zip(paths, labels)):
        if not p:
            raise DataError(f"{src}: row {i + 1}: empty path")
        full = Path(p) if Path(p).is_absolute() else src.parent / p
        out.append(Item(str(full), None if lab is None or lab == "" else str(lab)))
    return out


def infer_classes(items: list[Item], source: Path) -> list[str]:
    names = sorted({it.label_name for it in items if it.label_name is not None})
    if len(names) < 2:
        raise DataError(f"{source}: labeled source needs at least 2 classes, found {names}")
    return names


def decode(path: str) -> torch.Tensor:
    """uint8 C×H×W RGB via torchvision.io (grayscale and alpha are converted)."""
    return tvio.decode_image(tvio.read_file(path), mode=tvio.ImageReadMode.RGB)


def relpath(path: str, root: Path) -> str:
    """Inside the project, paths are stored relative to it (portable outputs); outside, absolute."""
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def build_manifest(items: list[Item], classes: list[str], source: Path, *, labeled: bool,
                   max_bad_fraction: float, root: Path) -> tuple[pa.Table, list[dict]]:
    """Check every image decodes; unknown labels are errors, unreadable files are skipped and listed."""
    index = {c: i for i, c in enumerate(classes)}
    ids, paths, labels, bad = [], [], [], []
    for it in items:
        if it.label_name is not None and it.label_name not in index:
            if labeled:
                raise DataError(f"{source}: {it.path}: label {it.label_name!r} is not one of the classes {classes}")
        try:
            decode(it.path)
        except Exception as e:  # noqa: BLE001 - any decode failure makes the file unusable
            bad.append({"path": it.path, "error": str(e).splitlines()[0][:200]})
            continue
        rel = relpath(it.path, root)
        ids.append(_image_id(rel))
        paths.append(rel)
        labels.append(index.get(it.label_name, -1) if it.label_name is not None else -1)
    if labeled and any(lab < 0 for lab in labels):
        missing = next(p for p, lab in zip(paths, labels) if lab < 0)
        raise DataError(f"{source}: {missing}: labeled image without a label")
    if items and len(bad) / len(items) > max_bad_fraction:
        raise DataError(
            f"{source}: {len(bad)} of {len(items)} images unreadable (> data.max_bad_fraction = {max_bad_fraction}); "
            f"first: {bad[0]['path']}: {bad[0]['error']}"
        )
    table = pa.table({"image_id": ids, "path": paths, "label": pa.array(labels, pa.int32())}, schema=MANIFEST_SCHEMA)
    return table, bad


def read_manifest(path: Path) -> pa.Table:
    return pq.read_table(path)


# ---- datasets -------------------------------------------------------------------------------------

def normalize(x: torch.Tensor) -> torch.Tensor:
    """uint8 (or [0,255] float) images -> the float input every model here expects."""
    x = x.float().div_(255.0)
    mean = torch.tensor(MEAN, device=x.device).view(-1, 1, 1)
    std = torch.tensor(STD, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


class ImageDataset(Dataset):
    """Decodes with torchvision.io and resizes to `image_size`; small sets are decoded once and kept in memory.

    Returns (uint8 image after `transform`, index). Targets are looked up by index by the caller's collate, so the
    same dataset serves labels, soft pseudo-labels and unlabeled images.
    """

    def __init__(self, paths: list[str], image_size: int, transform: Callable | None = None,
                 cache_bytes: int = 2 << 30):
        self.paths = list(paths)
        self.image_size = image_size
        self.transform = transform
        self._cache: torch.Tensor | None = None
        if len(self.paths) * 3 * image_size * image_size <= cache_bytes:
            self._cache = torch.stack([self._load(p) for p in self.paths]) if self.paths else None

    def _load(self, path: str) -> torch.Tensor:
        try:
            img = decode(path)
        except RuntimeError as e:  # e.g. a file corrupted after `prepare` checked it: name the culprit
            raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0][:200]})") from None
        if img.shape[-2:] != (self.image_size, self.image_size):
            img = TF.resize(img, [self.image_size, self.image_size], antialias=True)
        return img

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, i: int) -> torch.Tensor:
        return self._cache[i] if self._cache is not None else self._load(self.paths[i])

    def all_raw(self) -> torch.Tensor:
        return self._cache if self._cache is not None else torch.stack([self._load(p) for p in self.paths])

    def __getitem__(self, i: int):
        img = self.raw(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, i


class TrainTransform:
    """Crop-with-padding (+ flip) always; RandAugment (timm, magnitude unclipped via `mmax`) when configured.

    Works on uint8 C×H×W tensors; RandAugment's ops are PIL-based, so images round-trip through PIL for it.
    """

    def __init__(self, image_size: int, hflip: bool, randaugment: str | None):
        self.image_size, self.hflip = image_size, hflip
        self.pad = max(1, image_size // 8)
        self.randaugment = None
        if randaugment:
            from timm.data.auto_augment import rand_augment_transform

            hparams = {"translate_const": max(1, int(image_size * 0.45)),
                       "img_mean": tuple(round(255 * m) for m in MEAN)}
            self.randaugment = rand_augment_transform(randaugment, hparams)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        size, pad = self.image_size, self.pad
        img = TF.pad(img, [pad], padding_mode="reflect")
        top, left = random.randint(0, 2 * pad), random.randint(0, 2 * pad)
        img = img[:, top:top + size, left:left + size]
        if self.hflip and random.random() < 0.5:
            img = img.flip(-1)
        if self.randaugment is not None:
            img = TF.pil_to_tensor(self.randaugment(TF.to_pil_image(img)))
        return img


def seed_worker(worker_id: int) -> None:
    """DataLoader workers inherit torch's seed; give `random` (RandAugment) and numpy the same determinism."""
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


# ---- prepared splits ------------------------------------------------------------------------------

SPLITS = ("labeled", "unlabeled", "val", "test")


def prepared_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "data"


def read_classes(out_dir: Path) -> list[str]:
    import json

    f = prepared_dir(out_dir) / "classes.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: data not prepared; run `nst prepare` first")
    return json.loads(f.read_text())


def resolve_paths(paths: list[str], root: Path) -> list[str]:
    return [p if Path(p).is_absolute() else str(root / p) for p in paths]


def open_split(out_dir: Path, root: Path, split: str, image_size: int, transform: Callable | None = None
               ) -> tuple[ImageDataset, torch.Tensor, pa.Table] | None:
    """(dataset, labels, manifest) of a prepared split, or None for an absent optional split."""
    f = prepared_dir(out_dir) / f"{split}.parquet"
    if not f.is_file():
        if split == "val":
            return None
        raise FileNotFoundError(f"{f}: data not prepared; run `nst prepare` first")
    table = read_manifest(f)
    ds = ImageDataset(resolve_paths(table.column("path").to_pylist(), root), image_size, transform)
    labels = torch.tensor(table.column("label").to_numpy(), dtype=torch.long)
    return ds, labels, table
