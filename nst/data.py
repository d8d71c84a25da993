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

import functools
import hashlib
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

from nst.errors import DataError, NstError
from nst.scan import IMAGE_EXTS  # re-exported: one list, shared with the shard reader (which has no torch)
from nst.shards import SEP

if TYPE_CHECKING:
    from nst.config import Config

# torchvision 0.29 deprecates torchvision.io decoding in favour of TorchCodec; it still works and is what this project
# pins, so the per-call warning is silenced for our calls only. TorchCodec (nst/gpu_decode.py's batched decoder) gives
# the same pixels but always applies a JPEG's EXIF orientation, which no decode here does: moving this one to it would
# turn such photos in training and evaluation, a change of the data, not of the library.
_TV_DEPRECATION = "The image decoding and encoding capabilities of TorchVision"

JPEG_EXTS = {".jpg", ".jpeg"}
MANIFEST_SUFFIXES = (".csv", ".parquet", ".pq")
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
MANIFEST_SCHEMA = pa.schema([("path", pa.string()), ("label", pa.int32()), ("digest", pa.binary(16)),
                             ("width", pa.int32()), ("height", pa.int32())])
# A split read from image shards: `path` is the sample's address <shard>#<member>, offset and size locate its bytes.
SHARD_MANIFEST_SCHEMA = MANIFEST_SCHEMA.append(pa.field("offset", pa.int64())).append(pa.field("size", pa.int64()))


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
    """The images of an ImageFolder directory (symlinked class folders included) or a CSV/Parquet manifest (paths
    relative to it)."""
    from nst.scan import walk_files

    src = Path(src)
    if not src.exists():
        raise DataError(f"{src}: {what} does not exist")
    if src.is_dir():
        items = []
        for p in walk_files(src):
            if p.suffix.lower() in IMAGE_EXTS:
                rel = p.relative_to(src)
                items.append(Item(str(p), rel.parts[0] if len(rel.parts) > 1 else None))
        return items
    if src.suffix.lower() not in MANIFEST_SUFFIXES:
        raise DataError(f"{src}: not a directory, .csv or .parquet manifest")
    return _manifest_items(src, _read_table(src))


def _manifest_items(src: Path, table: pa.Table) -> list[Item]:
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


def manifest_images(src: Path) -> list[tuple[str, str]] | None:
    """(path as the manifest writes it, path to read) of every image a CSV/Parquet manifest of images lists; None
    for any other file: not a readable table, no `path` column, or a `digest` column (prepare's own manifests:
    they pin their images' content themselves). The listed images are such a manifest's data, so a stage's
    fingerprint digests their content along with the manifest's bytes (tasks/spec.py: path_digest)."""
    src = Path(src)
    if src.suffix.lower() not in MANIFEST_SUFFIXES:
        return None
    try:
        if src.suffix.lower() != ".csv":  # the footer alone first: a large Parquet output is not read for nothing
            names = pq.read_schema(src).names
            if "path" not in names or "digest" in names:
                return None
        table = _read_table(src)
    except (DataError, pa.ArrowException, OSError):
        return None  # digested as bytes; prepare names what is wrong with it
    if "path" not in table.column_names or "digest" in table.column_names:
        return None
    written = table.column("path").to_pylist()
    return [(str(w), it.path) for w, it in zip(written, _manifest_items(src, table))]


def infer_classes(items: list[Item], source: Path) -> list[str]:
    names = sorted({it.label_name for it in items if it.label_name is not None})
    if len(names) < 2:
        raise DataError(f"{source}: labeled source needs at least 2 classes, found {names}")
    return names


def relpath(path: str, root: Path) -> str:
    """Inside the project, paths are stored relative to it (portable outputs); outside, absolute; S3 as it is."""
    if path.startswith("s3://"):
        return path
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(Path(path).resolve())


def resolve_paths(paths: Sequence[str], root: Path) -> list[str]:
    return [p if p.startswith(("/", "s3://")) or Path(p).is_absolute() else str(root / p) for p in paths]


class Blobs:
    """The encoded bytes of a split's images by row: loose files by path, or shard members by (shard, offset,
    size), each checked against the digest prepare recorded (a shard replaced since is refused, not trained on).
    Arrow/numpy columns only, so forked DataLoader workers share them copy-on-write."""

    def __init__(self, paths: pa.Array, offsets: np.ndarray | None = None, sizes: np.ndarray | None = None,
                 digests: pa.Array | None = None, reader=None):
        self.paths, self.offsets, self.sizes, self.digests, self.reader = paths, offsets, sizes, digests, reader

    @classmethod
    def from_manifest(cls, table: pa.Table, cfg: Config, rows: Sequence[int] | None = None, reader=None) -> "Blobs":
        """`reader`: one shard_reader(cfg) shared by several Blobs of the same manifest (made here if not given)."""
        if rows is not None:
            table = table.take(pa.array(rows, pa.int64()))
        paths = pa.array(resolve_paths(table.column("path").to_pylist(), cfg.root), pa.string())
        if "offset" not in table.column_names:
            return cls(paths)
        return cls(paths, table.column("offset").to_numpy(), table.column("size").to_numpy(),
                   table.column("digest").combine_chunks(), reader or shard_reader(cfg))

    @classmethod
    def of(cls, paths: Sequence[str] | pa.Array | "Blobs") -> "Blobs":
        """Loose files by path (as given), or Blobs as they are."""
        if isinstance(paths, Blobs):
            return paths
        return cls(paths if isinstance(paths, pa.Array) else pa.array(list(paths), pa.string()))

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, row: int) -> str:
        return self.paths[row].as_py()

    def shards(self) -> list[str]:
        """The shards these rows lie in, in order (none for loose files)."""
        if self.offsets is None:
            return []
        return list(dict.fromkeys(p.rsplit(SEP, 1)[0] for p in self.paths.to_pylist()))

    def read(self, row: int) -> bytes:
        path = self.name(row)
        if self.offsets is None:
            return read_bytes(path)
        data = self.reader.read(path.rsplit(SEP, 1)[0], int(self.offsets[row]), int(self.sizes[row]))
        if hashlib.sha256(data).digest()[:16] != self.digests[row].as_py():
            raise DataError(f"{path}: bytes differ from those `nst prepare` recorded: the shard changed since; "
                            "run `nst prepare` again")
        return data


def shard_reader(cfg: Config):
    """The reader of the prepared shards: S3 shards through the bounded cache, with the sizes and ETags prepare
    recorded (data/shards.json)."""
    import json

    from nst.io import prepared
    from nst.shards import ShardCache, ShardReader

    f = cfg.data_dir / "shards.json"
    known = json.loads(prepared(f).read_text()) if f.is_file() else {}
    etags = {s["url"]: (s["size"], s.get("etag")) for split in known.values() for s in split}
    return ShardReader(ShardCache(cfg.shard_cache_dir, cfg.data.cache_limit_mb, etags))


def read_manifest(path: Path, columns: list[str] | None = None) -> pa.Table:
    from nst.io import prepared

    return pq.read_table(prepared(path), columns=columns)


def read_classes(cfg: Config) -> list[str]:
    import json

    from nst.io import prepared

    return json.loads(prepared(cfg.data_dir / "classes.json").read_text())


# ---- decoding --------------------------------------------------------------------------------------

# 8-bit RGB and grey JPEGs and PNGs, the common case, are decoded by torchvision (its JPEG decoder is twice as fast as
# PIL's, same pixels); every other image by PIL through to_rgb8. Either way: uint8 RGB.
PLAIN_MODES = ("RGB", "L")
_TORCHVISION_FORMATS = ("JPEG", "PNG")


def converts(mode: str | None) -> bool:
    """Whether decoding changes what an image of this pixel mode (nst.scan.pixel_mode) holds to make it 8-bit RGB:
    what prepare counts as converted (grey to RGB is not: the same values, thrice)."""
    return mode is not None and mode not in PLAIN_MODES


def open_image(data: bytes, path: str, max_pixels: int):
    """The first step of every decode: the header parsed (no pixel decoded) and held to the pixel limit, since
    torchvision's decoders do not honour PIL's MAX_IMAGE_PIXELS and a tiny PNG can otherwise cost gigabytes. PIL's
    own bomb guard is bypassed so that our configured limit, with its clear message, is the one that applies."""
    from nst.scan import ImageError, open_header

    try:
        im = open_header(data)
    except ImageError as e:
        raise DataError(f"{path}: {e}") from None
    check_pixels(*im.size, max_pixels, path)
    return im


def check_pixels(width: int, height: int, max_pixels: int, path: str) -> None:
    """The scan's limit (one rule, one message), as an error naming the file."""
    from nst.scan import ImageError, check_pixels as within_limit

    try:
        within_limit(width, height, max_pixels)
    except ImageError as e:
        raise DataError(f"{path}: {e} (a decompression bomb, or raise the limit)") from None


def to_rgb8(im):
    """Any PIL image as 8-bit RGB, the one rule of every decode path. 16-bit integer samples ("I;16*", and "I",
    Pillow's mode for 16-bit grey in TIFFs) keep their high byte, as PIL itself does with 16-bit RGB PNGs (its
    convert() would clip them at 255 and turn a 16-bit photo white); every other mode by PIL's own conversion, as
    torchvision's and timm's image loaders do: alpha dropped (the colour under it kept), palettes (transparent ones
    too) and CMYK mapped to their RGB colours, 1-bit to 0/255, floats clipped to 0-255."""
    from PIL import Image

    if im.mode == "RGB":
        im.load()
        return im
    if im.mode.startswith("I"):
        a = np.clip(np.asarray(im).astype(np.int32), 0, 65535) >> 8
        return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")
    if im.mode == "PA" or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # PIL warns when a palette's transparency goes straight to RGB
    return im.convert("RGB")


def _pil_rgb8(im, path: str):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decoder chatter; the verdict is the exception
            return to_rgb8(im)
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on these bytes, the file cannot be used
        if isinstance(e, MemoryError):
            raise
        raise DataError(f"{path}: cannot decode image ({_first_line(e)}): damaged, or changed since `nst prepare` "
                        f"(data.verify: decode has prepare decode every image)") from None


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def decode_bytes(data: bytes, path: str, max_pixels: int) -> torch.Tensor:
    """uint8 3×H×W RGB, whatever the file holds: the one decode of training, evaluation, the robustness suite and
    labelling (the GPU path's non-JPEGs included)."""
    im = open_image(data, path, max_pixels)
    if im.format in _TORCHVISION_FORMATS and im.mode in PLAIN_MODES:
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
                x = tvio.decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                      mode=tvio.ImageReadMode.RGB)
            if x.dtype == torch.uint8:
                return x
            # 16 bits per sample (PIL calls such a PNG "RGB"): PIL's decoder below keeps the high bytes
        except RuntimeError:
            pass  # PIL's decoder below gives the verdict (and the reason)
    return TF.pil_to_tensor(_pil_rgb8(im, path))


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read image ({e.strerror})") from None


def decode(path: str, max_pixels: int = 89_478_485) -> torch.Tensor:
    return decode_bytes(read_bytes(path), path, max_pixels)


def open_pil(path: str, max_pixels: int, draft_size: int | None = None, data: bytes | None = None):
    """8-bit RGB PIL image (for timm's PIL-based training transforms), by the same steps as decode_bytes; JPEGs are
    decoded at a reduced scale (DCT scaling) when much larger than needed."""
    im = open_image(read_bytes(path) if data is None else data, path, max_pixels)
    if draft_size and im.format == "JPEG":
        im.draft("RGB", (draft_size, draft_size))
    return _pil_rgb8(im, path)


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

    def __init__(self, paths: Sequence[str] | pa.Array | Blobs, image_size: int, *, kind: str = "pad_crop",
                 crop_pct: float = 0.875, transform: Callable | None = None, max_pixels: int = 89_478_485,
                 cache_mb: int = 0, rows: np.ndarray | None = None):
        self.blobs = paths = Blobs.of(paths)
        self.paths = paths.paths
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
        img = decode_bytes(self.blobs.read(row), self._path(row), self.max_pixels)
        return eval_resize(img, self.image_size, self.kind, self.crop_pct)

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
            # The bytes are read before the sample's RNGs are seeded: a read may fetch a shard from S3, and botocore
            # draws from Python's `random` (retry jitter), which would shift this sample's augmentation.
            if self.kind == "rrc" and self.transform is not None:
                data = self.blobs.read(r)
                seed_sample(s)
                img = self.transform(open_pil(self._path(r), self.max_pixels, 2 * self.image_size, data))
            else:
                img = self._image(r)
                seed_sample(s)
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


def open_split(cfg: Config, split: str, transform: Callable | None = None, image_size: int | None = None
               ) -> tuple[ImageDataset, torch.Tensor] | None:
    """(dataset, labels) of a prepared split, or None for an absent optional split; `image_size` other than
    data.image_size: the same geometry at another resolution (a fine-tune's, a test resolution)."""
    f = cfg.data_dir / f"{split}.parquet"
    if not f.is_file() and split == "val":
        return None
    table = read_manifest(f)
    data = cfg.data if image_size in (None, cfg.data.image_size) else cfg.data.model_copy(update={"image_size": image_size})
    ds = dataset_for(data, Blobs.from_manifest(table, cfg), transform=transform)
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
        self.rank, self.world, self.epoch, self.take = rank, world, 0, steps

    def set_epoch(self, epoch: int, steps: int | None = None) -> None:
        """`steps` < the epoch's: an epoch cut short (a run of fractional epochs ends with one) walks the first
        `steps` batches of the whole epoch, the same images with the same seeds."""
        self.epoch, self.take = epoch, self.steps if steps is None else steps

    def __len__(self) -> int:
        return self.take

    def __iter__(self):
        gen = torch.Generator().manual_seed(mix64(self.seed, self.epoch, self.stream) & 0x7FFFFFFFFFFFFFFF)
        need, chunks, have = self.steps * self.batch, [], 0
        while have < need:
            chunks.append(torch.randperm(self.n, generator=gen))
            have += self.n
        flat = torch.cat(chunks)[:need].tolist()
        for s in range(self.take):
            lo = s * self.batch
            yield [(flat[lo + j], mix64(self.seed, self.epoch, self.stream, lo + j))
                   for j in range(self.rank, self.batch, self.world)]


def collate_images(batch):
    imgs, rows = zip(*batch)
    return torch.stack(imgs), torch.tensor(rows, dtype=torch.long)


class Loader(DataLoader):
    """A DataLoader whose workers' errors read as in one process: PyTorch re-raises a worker's exception with the
    worker's whole traceback as its message, so a DataError naming a bad image would no longer be one line."""

    def __iter__(self):
        return _one_line_errors(super().__iter__())  # started now, as DataLoader's own iterator is


def _one_line_errors(it):
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except NstError as e:
            raise type(e)(_worker_message(e)) from None
        yield batch


def _worker_message(e: BaseException) -> str:
    """The original message inside PyTorch's "Caught X in DataLoader worker process N. Original Traceback ..."."""
    text = str(e)
    if "\n" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(e).__module__}.{type(e).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


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
        return Loader(ds, batch_sampler=batch_sampler, **kw)
    return Loader(ds, batch_size=batch_size, shuffle=False, **kw)


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy to the device that does not make the host wait for the GPU: out of pinned memory, non-blocking (a
    blocking copy first waits for all the GPU's queued work). The pinning is the one CUDA-only line; on the CPU
    the copy is a no-op."""
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


@functools.cache
def _normalisation(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) on the device, made once: made per batch they would be a blocking copy every step. Normal
    tensors even when first asked for under inference mode (inference tensors are unusable outside it)."""
    with torch.inference_mode(False):
        scale = torch.tensor([1.0 / (255.0 * s) for s in STD], device=device).view(1, -1, 1, 1)
        shift = torch.tensor([m / s for m, s in zip(MEAN, STD)], device=device).view(1, -1, 1, 1)
    return scale, shift


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 batch -> normalised float on the device: the uint8 copy crosses (non-blocking from pinned memory on
    CUDA) and is laid out NHWC first, then one float conversion and one in-place multiply-add, no temporaries."""
    x = host_to_device(x, device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    scale, shift = _normalisation(device)
    return x.float().mul_(scale).sub_(shift)
