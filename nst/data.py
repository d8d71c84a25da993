"""Image sources, manifests, decoding, transforms and data loading.

A source is an ImageFolder directory (class sub-folders; a flat folder for unlabeled images) or a CSV/Parquet
manifest with `path` and optional `label`. `prepare` turns every source into a Parquet manifest once (one row
per readable image: path relative to params.yaml's folder, label, content digest, size); later stages read only
those manifests and address images by manifest row.

Augmentation randomness is per sample: each sample's transform runs under RNG states seeded from
(seed, epoch, stream, position in the epoch's stream), so the images a model sees depend on nothing else -
not on DataLoader workers, not on other threads drawing from Python's global `random`.
"""

from __future__ import annotations

import io
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch
import torchvision.io as tvio
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader, Dataset, Sampler

from nst.errors import DataError

if TYPE_CHECKING:
    from nst.config import Config

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it still works and is what this project
# pins, so the per-call warning is silenced for our calls only.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
JPEG_EXTS = {".jpg", ".jpeg"}
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MANIFEST_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int32()), ("digest", pa.binary(16)),
                             ("width", pa.int32()), ("height", pa.int32())])


@dataclass(frozen=True)
class Item:
    path: str
    label_name: str | None


# ---- sources -------------------------------------------------------------------------------------

def _read_table(src: Path) -> pa.Table:
    try:
        if src.suffix.lower() == ".csv":
            return pacsv.read_csv(src, convert_options=pacsv.ConvertOptions(column_types={"label": pa.string()}))
        return pq.read_table(src)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OSError) as e:
        kind = "CSV" if src.suffix.lower() == ".csv" else "Parquet"
        raise DataError(f"{src}: not a readable {kind} manifest ({str(e).splitlines()[0][:160]})") from None


def scan_source(src: Path, what: str = "data source") -> list[Item]:
    """The images of an ImageFolder directory or a CSV/Parquet manifest (paths relative to it)."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: {what} does not exist")
    if src.is_dir():
        items = []
        for p in sorted(src.rglob("*")):
            rel = p.relative_to(src)
            if p.suffix.lower() in IMAGE_EXTS and not any(part.startswith(".") for part in rel.parts) and p.is_file():
                items.append(Item(str(p), rel.parts[0] if len(rel.parts) > 1 else None))
        return items
    if src.suffix.lower() not in (".csv", ".parquet", ".pq"):
        raise DataError(f"{src}: not a directory, .csv or .parquet manifest")
    table = _read_table(src)
    if "path" not in table.column_names:
        raise DataError(f"{src}: manifest has no 'path' column (columns: {table.column_names})")
    paths = table.column("path").to_pylist()
    labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
    out = []
    for i, (p, lab) in enumerate(zip(paths, labels)):
        if not p:
            raise DataError(f"{src}: row {i + 2}: empty path")
        full = Path(p) if Path(p).is_absolute() else src.parent / p
        out.append(Item(str(full), None if lab is None or lab == "" else str(lab)))
    return out


def infer_classes(items: list[Item], source: Path) -> list[str]:
    names = sorted({it.label_name for it in items if it.label_name is not None})
    if len(names) < 2:
        raise DataError(f"{source}: labeled source needs at least 2 classes, found {names}")
    return names


def relpath(path: str, root: Path) -> str:
    """Inside the project, paths are stored relative to it (portable outputs); outside, absolute."""
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def resolve_paths(paths: Sequence[str], root: Path) -> list[str]:
    return [p if Path(p).is_absolute() else str(root / p) for p in paths]


def read_manifest(path: Path) -> pa.Table:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: data not prepared; run `nst prepare` first")
    return pq.read_table(path)


def read_classes(cfg: Config) -> list[str]:
    import json

    f = cfg.data_dir / "classes.json"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: data not prepared; run `nst prepare` first")
    return json.loads(f.read_text())


# ---- decoding --------------------------------------------------------------------------------------

def header_size(data: bytes, path: str) -> tuple[int, int]:
    """(width, height) from the image header only, before any pixel is decoded (PIL's own bomb guard is bypassed
    so that our configured limit, with its clear message, is the one that applies)."""
    from nst.scan import ImageError, image_size

    try:
        return image_size(data)
    except ImageError as e:
        raise DataError(f"{path}: {e}") from None


def check_pixels(width: int, height: int, max_pixels: int, path: str) -> None:
    """The scan's limit (one rule, one message), as an error naming the file."""
    from nst.scan import ImageError, check_pixels as within_limit

    try:
        within_limit(width, height, max_pixels)
    except ImageError as e:
        raise DataError(f"{path}: {e} (a decompression bomb, or raise the limit)") from None


def decode_bytes(data: bytes, path: str, max_pixels: int) -> torch.Tensor:
    """uint8 C×H×W RGB via torchvision.io (grayscale and alpha converted), after the header passed the pixel limit:
    torchvision's decoders do not honour PIL's MAX_IMAGE_PIXELS, so a tiny PNG can otherwise cost gigabytes."""
    w, h = header_size(data, path)
    check_pixels(w, h, max_pixels, path)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
            return tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=tvio.ImageReadMode.RGB)
    except RuntimeError as e:
        first = str(e).splitlines()[0][:160]
    try:  # formats torchvision does not decode (BMP, TIFF): PIL, which prepare's checks already accepted
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return TF.pil_to_tensor(im.convert("RGB"))
    except (OSError, ValueError):
        raise DataError(f"{path}: cannot decode image ({first})") from None


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror})") from None


def decode(path: str, max_pixels: int = 89_478_485) -> torch.Tensor:
    return decode_bytes(read_bytes(path), path, max_pixels)


def open_pil(path: str, max_pixels: int, draft_size: int | None = None):
    """RGB PIL image (for timm's PIL-based training transforms), header-checked first; JPEGs are decoded at a
    reduced scale (DCT scaling) when much larger than needed."""
    from PIL import Image

    data = read_bytes(path)
    check_pixels(*header_size(data, path), max_pixels, path)
    try:
        im = Image.open(io.BytesIO(data))
        if draft_size and im.format == "JPEG":
            im.draft("RGB", (draft_size, draft_size))
        return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot decode image ({str(e).splitlines()[0][:160]})") from None


# ---- transforms ----------------------------------------------------------------------------------------

def eval_resize(img: torch.Tensor, size: int, kind: str, crop_pct: float) -> torch.Tensor:
    """Evaluation/labelling geometry on a uint8 tensor (CPU or GPU): pad_crop resizes to size×size; rrc resizes the
    shorter side to size/crop_pct and crops the centre (timm's eval transform)."""
    if kind == "pad_crop":
        if img.shape[-2:] != (size, size):
            img = TF.resize(img, [size, size], antialias=True)
        return img
    scale = int(size / crop_pct)
    if min(img.shape[-2:]) != scale:
        img = TF.resize(img, [scale], antialias=True)
    return TF.center_crop(img, [size, size])


def _randaugment(spec: str | None, size: int):
    if not spec:
        return None
    from timm.data.auto_augment import rand_augment_transform

    hparams = {"translate_const": max(1, int(size * 0.45)), "img_mean": tuple(round(255 * m) for m in MEAN)}
    return rand_augment_transform(spec, hparams)


class TrainTransform:
    """pad_crop: crop-with-padding (+ flip) on the resized image; RandAugment (timm, magnitude unclipped via
    `mmax`) when configured. Works on uint8 C×H×W tensors; RandAugment's ops are PIL-based."""

    def __init__(self, image_size: int, hflip: bool, randaugment: str | None):
        self.image_size, self.hflip = image_size, hflip
        self.pad = max(1, image_size // 8)
        self.randaugment = _randaugment(randaugment, image_size)

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


class RRCTransform:
    """rrc (photos): timm's RandomResizedCrop (configurable scale), flip, RandAugment on the PIL image; uint8 out
    (normalisation happens on the device)."""

    def __init__(self, image_size: int, hflip: bool, randaugment: str | None, scale: tuple[float, float]):
        from timm.data.transforms import RandomResizedCropAndInterpolation

        self.rrc = RandomResizedCropAndInterpolation(image_size, scale=tuple(scale), interpolation="bilinear")
        self.hflip = hflip
        self.randaugment = _randaugment(randaugment, image_size)

    def __call__(self, im) -> torch.Tensor:
        im = self.rrc(im)
        if self.hflip and random.random() < 0.5:
            from PIL import Image

            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        if self.randaugment is not None:
            im = self.randaugment(im)
        return TF.pil_to_tensor(im)


def seed_sample(seed: int) -> None:
    """Seed the RNGs a sample's transform draws from (Python's `random` and numpy: timm's RandAugment and crops).
    In a DataLoader worker torch's too. In the training process torch's RNG is left alone: it drives dropout,
    which must not depend on whether workers load the data, and no transform here draws from it (the determinism
    test with 0 and 2 workers would catch one that did)."""
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    if torch.utils.data.get_worker_info() is not None:
        torch.default_generator.manual_seed(seed & 0x7FFFFFFFFFFFFFFF)


_M64 = (1 << 64) - 1


def mix64(*parts: int) -> int:
    """A 64-bit hash of small integers (splitmix64 steps): per-sample seeds from (seed, epoch, stream, position)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (p & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        x ^= x >> 31
        x = x * 0x94D049BB133111EB & _M64
        x ^= x >> 29
    return x


# ---- datasets -----------------------------------------------------------------------------------------

class ImageDataset(Dataset):
    """Images addressed by index; `__getitem__((index, sample_seed))` applies the training transform under that
    seed, `__getitem__(index)` gives the clean (evaluation-geometry) image.

    Paths are held in one Arrow string array (no per-path Python objects, so forked workers share it
    copy-on-write). A split whose decoded images fit in `cache_mb` is decoded once and kept in RAM; larger ones
    are read per access, so memory does not grow with the data set.
    """

    def __init__(self, paths: Sequence[str] | pa.Array, image_size: int, *, kind: str = "pad_crop",
                 crop_pct: float = 0.875, transform: Callable | None = None, max_pixels: int = 89_478_485,
                 cache_mb: int = 0, rows: np.ndarray | None = None):
        self.paths = paths if isinstance(paths, pa.Array) else pa.array(list(paths), pa.string())
        self.rows = rows  # index -> row of `paths` (e.g. the balanced set's duplicated stream); None = identity
        self.image_size, self.kind, self.crop_pct = image_size, kind, crop_pct
        self.transform, self.max_pixels = transform, max_pixels
        self._cache: torch.Tensor | None = None
        n = len(self.paths)
        if kind == "pad_crop" and 0 < n * 3 * image_size * image_size <= cache_mb * (1 << 20):
            self._cache = torch.stack([self._load(i) for i in range(n)])

    def _path(self, row: int) -> str:
        return self.paths[row].as_py()

    def _load(self, row: int) -> torch.Tensor:
        return eval_resize(decode(self._path(row), self.max_pixels), self.image_size, self.kind, self.crop_pct)

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.paths)

    def row(self, i: int) -> int:
        return int(self.rows[i]) if self.rows is not None else i

    def raw(self, i: int) -> torch.Tensor:
        return self._image(self.row(i))

    def _image(self, row: int) -> torch.Tensor:
        return self._cache[row] if self._cache is not None else self._load(row)

    def all_raw(self) -> torch.Tensor:
        return torch.stack([self.raw(i) for i in range(len(self))]) if len(self) else torch.empty(0)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            i, s = key
            r = self.row(i)
            seed_sample(s)
            if self.kind == "rrc" and self.transform is not None:
                img = self.transform(open_pil(self._path(r), self.max_pixels, 2 * self.image_size))
            else:
                img = self._image(r)
                if self.transform is not None:
                    img = self.transform(img)
            return img, r
        r = self.row(key)
        return self._image(r), r


def build_train_transform(data_cfg, noise) -> Callable:
    if data_cfg.transform == "rrc":
        return RRCTransform(data_cfg.image_size, data_cfg.hflip, noise.randaugment, data_cfg.rrc_scale)
    return TrainTransform(data_cfg.image_size, data_cfg.hflip, noise.randaugment)


def dataset_for(data_cfg, paths, *, transform=None, rows=None, cache: bool = True) -> ImageDataset:
    return ImageDataset(paths, data_cfg.image_size, kind=data_cfg.transform, crop_pct=data_cfg.crop_pct,
                        transform=transform, max_pixels=data_cfg.max_image_pixels,
                        cache_mb=data_cfg.cache_mb if cache else 0, rows=rows)


def open_split(cfg: Config, split: str, transform: Callable | None = None
               ) -> tuple[ImageDataset, torch.Tensor] | None:
    """(dataset, labels) of a prepared split, or None for an absent optional split."""
    f = cfg.data_dir / f"{split}.parquet"
    if not f.is_file() and split == "val":
        return None
    table = read_manifest(f)
    paths = pa.array(resolve_paths(table.column("path").to_pylist(), cfg.root), pa.string())
    ds = dataset_for(cfg.data, paths, transform=transform)
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return ds, labels


# ---- batches --------------------------------------------------------------------------------------------

class EpochBatches(Sampler):
    """`steps` batches of `batch` (index, sample_seed) pairs per epoch, walking fresh seeded permutations of
    range(n) (cycling small sets). Under DDP every rank walks the same global batches and takes the positions
    j ≡ rank (mod world): no overlap, and each sample keeps the seed it has in a single-process run.
    `set_epoch` before each epoch; the sampler runs in the main process, so persistent workers see it."""

    def __init__(self, n: int, batch: int, steps: int, seed: int, stream: int, rank: int = 0, world: int = 1):
        self.n, self.batch, self.steps, self.seed, self.stream = n, batch, steps, seed, stream
        self.rank, self.world, self.epoch = rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        gen = torch.Generator().manual_seed(mix64(self.seed, self.epoch, self.stream) & 0x7FFFFFFFFFFFFFFF)
        need, chunks, have = self.steps * self.batch, [], 0
        while have < need:
            chunks.append(torch.randperm(self.n, generator=gen))
            have += self.n
        flat = torch.cat(chunks)[:need].tolist()
        for s in range(self.steps):
            lo = s * self.batch
            yield [(flat[lo + j], mix64(self.seed, self.epoch, self.stream, lo + j))
                   for j in range(self.rank, self.batch, self.world)]


def collate_images(batch):
    imgs, rows = zip(*batch)
    return torch.stack(imgs), torch.tensor(rows, dtype=torch.long)


def make_loader(ds: Dataset, *, batch_sampler: Sampler | None = None, batch_size: int | None = None,
                workers: int = 0, pin: bool = False, persistent: bool = True) -> DataLoader:
    """Worker processes are persistent and prefetch; uint8 batches (normalised later, on the device). Workers are
    forked: stages run in their own `nst` process, where no orchestrator thread holds a lock at fork time."""
    # Its own generator: a DataLoader without one draws its workers' base seed from the global torch RNG at every
    # iter() (once with persistent workers, every epoch without), which would shift dropout's random stream.
    kw = dict(num_workers=workers, pin_memory=pin, collate_fn=collate_images, generator=torch.Generator())
    if workers > 0:
        kw |= dict(persistent_workers=persistent, prefetch_factor=4)
    if batch_sampler is not None:
        return DataLoader(ds, batch_sampler=batch_sampler, **kw)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, **kw)


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> normalised float on the device: the uint8 copy crosses (non-blocking from pinned memory on
    CUDA) and is laid out NHWC first, then one float conversion and one in-place multiply-add, no temporaries."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, -1, 1, 1)
    shift = torch.tensor([m / s for m, s in zip(MEAN, STD)], device=device).view(1, -1, 1, 1)
    return x.float().mul_(scale).sub_(shift)
