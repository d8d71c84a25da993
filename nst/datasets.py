"""Two built-in datasets, made offline and deterministically, in the layout users bring their own data in.

`toy`: procedurally drawn shapes in clutter and noise (10 classes). Few labels give a clearly imperfect teacher;
the many unlabeled images carry the variation the labeled ones miss.
`digits`: scikit-learn's bundled 8×8 digits, K labeled per class, the rest of a fixed train split unlabeled.

Layout written: labeled/<class>/*.png, val/<class>/*.png (toy only), test/<class>/*.png, unlabeled/*.png (flat, as
unlabeled data comes) and unlabeled_truth.csv (the hidden labels, used only to report pseudo-label accuracy).
"""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from nst.errors import DataError
from nst.io import atomic_write_json, atomic_write_text, file_lock

TOY_CLASSES = ["circle", "square", "triangle", "plus", "ring", "hstripes", "vstripes", "cross", "dots", "ell"]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, cx: float, cy: float, r: float, ang: float, fill, width: int):
    def rot(pts):
        c, s = math.cos(ang), math.sin(ang)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]

    if cls == 0:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif cls == 1:
        draw.polygon(rot([(-r, -r), (r, -r), (r, r), (-r, r)]), fill=fill)
    elif cls == 2:
        draw.polygon(rot([(0, -r), (r * 0.95, r * 0.8), (-r * 0.95, r * 0.8)]), fill=fill)
    elif cls == 3:
        for pts in ([(-r, 0), (r, 0)], [(0, -r), (0, r)]):
            draw.line(rot(pts), fill=fill, width=width)
    elif cls == 4:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=width)
    elif cls in (5, 6):
        for k in (-1, 0, 1):
            off = k * r * 0.7
            pts = [(-r, off), (r, off)] if cls == 5 else [(off, -r), (off, r)]
            draw.line([(cx + x, cy + y) for x, y in pts], fill=fill, width=max(1, width - 1))  # unrotated: h vs v
    elif cls == 7:
        for pts in ([(-r, -r), (r, r)], [(-r, r), (r, -r)]):
            draw.line(rot(pts), fill=fill, width=width)
    elif cls == 8:
        for dx in (-0.55, 0.55):
            x, y = rot([(dx * r, 0)])[0]
            draw.ellipse([x - r * 0.35, y - r * 0.35, x + r * 0.35, y + r * 0.35], fill=fill)
    elif cls == 9:
        draw.line(rot([(-r * 0.6, -r), (-r * 0.6, r), (r * 0.8, r)]), fill=fill, width=width, joint="curve")


def toy_image(cls: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """One toy image: a shape of class `cls` with random colour, pose, clutter, blur and noise."""
    ss = 4 * size  # supersample for anti-aliasing
    bg = tuple(int(v) for v in rng.integers(0, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    while sum(abs(a - b) for a, b in zip(bg, fg)) < 240:  # keep the shape visible
        fg = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (ss, ss), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 3))):  # clutter: random thin strokes in a third colour
        c = tuple(int(v) for v in rng.integers(0, 256, 3))
        p = rng.uniform(0, ss, 4)
        d.line([tuple(p[:2]), tuple(p[2:])], fill=c, width=int(rng.integers(2, max(3, ss // 32))))
    r = rng.uniform(0.25, 0.4) * ss
    cx, cy = rng.uniform(r, ss - r, 2)
    _draw_shape(d, cls, cx, cy, r, rng.uniform(-0.5, 0.5), fg, width=int(max(4, r * rng.uniform(0.18, 0.35))))
    img = img.resize((size, size), Image.BILINEAR)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(3, 15), (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


MARKER = "dataset.json"
PARTIAL = ".nst-partial"
KINDS = ("toy", "digits")


def _ours(folder: Path) -> bool:
    """Made by this module: its marker holds one of our specs. `dataset.json` alone is a common name (nnU-Net and
    the Medical Segmentation Decathlon put one at a dataset's root), so the name proves nothing."""
    import json

    try:
        spec = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(spec, dict) and spec.get("kind") in KINDS and "seed" in spec


def _remove(folder: Path, marker: str) -> None:
    """Delete a folder of ours with its marker last, so a crash midway leaves it still marked ours (the next
    build deletes it) rather than half a folder nobody may touch."""
    for child in folder.iterdir():
        if child.name != marker:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    (folder / marker).unlink()
    folder.rmdir()


def _lock_file(out: Path) -> Path:
    """Outside the user's folders: a lock per dataset path in the machine's temp dir."""
    import hashlib
    import tempfile

    key = hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "nst-locks" / f"dataset-{key}.lock"


def _build(out: Path, spec: dict, force: bool, write: Callable[[Path], None]) -> Path:
    """Build a dataset folder once. `write` fills a temp folder that is swapped into place whole, so a crash never
    leaves half a dataset; a lock makes two processes asking at once (a flow and a `dvc repro`) build it once.

    Only folders this module made (they hold `dataset.json`) are ever replaced: an existing folder without the
    marker - a user's data, a project - stops the build with an error and is left untouched."""
    if out.exists() and not _ours(out) and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and was not made by `nst data` (no {MARKER}); refusing to overwrite it - "
                        "move it away or generate the built-in set elsewhere")
    if _up_to_date(out, spec) and not force:
        return out
    with file_lock(_lock_file(out)):
        if _up_to_date(out, spec) and not force:
            return out
        tmp, old = out.with_name(f".{out.name}.partial"), out.with_name(f".{out.name}.old")
        for leftover in (tmp, old):  # of a build that crashed
            if leftover.exists():
                if (leftover / PARTIAL).is_file():
                    _remove(leftover, PARTIAL)
                elif _ours(leftover):
                    _remove(leftover, MARKER)
                else:
                    raise DataError(f"{leftover}: exists and was not made by `nst data`; refusing to delete it")
        tmp.mkdir(parents=True)
        (tmp / PARTIAL).touch()
        write(tmp)
        atomic_write_json(tmp / MARKER, spec)
        (tmp / PARTIAL).unlink()
        if out.exists():
            if not _ours(out) and any(out.iterdir()):  # appeared meanwhile: still never delete foreign data
                raise DataError(f"{out}: exists and was not made by `nst data`; refusing to overwrite it")
            out.rename(old)  # the swap is two renames; the old copy is deleted after it, marker last
        tmp.rename(out)
        if old.exists():
            _remove(old, MARKER) if _ours(old) else old.rmdir()
    return out


def _write_split(tmp: Path, split: str, imgs: list[tuple[Image.Image, str]], truth: list | None = None) -> None:
    for i, (img, cls) in enumerate(imgs):
        if split == "unlabeled":
            name = f"{i:06d}.png"
            _save_png(img, tmp / split / name)
            truth.append((f"unlabeled/{name}", cls))
        else:
            _save_png(img, tmp / split / cls / f"{i:06d}.png")


def _write_truth(tmp: Path, truth: list) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label"])
    w.writerows(truth)
    atomic_write_text(tmp / "unlabeled_truth.csv", buf.getvalue())


def make_toy(out: Path, *, seed: int = 0, size: int = 32, labeled_per_class: int = 20, val_per_class: int = 10,
             unlabeled_per_class: int = 150, test_per_class: int = 50, force: bool = False) -> Path:
    out = Path(out)
    spec = dict(seed=seed, size=size, labeled_per_class=labeled_per_class, val_per_class=val_per_class,
                unlabeled_per_class=unlabeled_per_class, test_per_class=test_per_class, kind="toy")

    def write(tmp: Path) -> None:
        truth: list = []
        splits = [("labeled", labeled_per_class), ("val", val_per_class), ("unlabeled", unlabeled_per_class),
                  ("test", test_per_class)]
        for s_idx, (split, n) in enumerate(splits):
            rng = np.random.default_rng([seed, s_idx])
            order = [c for c in range(len(TOY_CLASSES)) for _ in range(n)]
            if split == "unlabeled":
                order = list(rng.permutation(order))
            imgs = [(toy_image(int(c), rng, size), TOY_CLASSES[int(c)]) for c in order]
            _write_split(tmp, split, imgs, truth)
        _write_truth(tmp, truth)

    return _build(out, spec, force, write)


def make_digits(out: Path, *, labels_per_class: int = 10, seed: int = 0, force: bool = False) -> Path:
    """Digits: a fixed 30% stratified test split (random_state 0, independent of `seed`); from the rest, `seed`
    picks K labeled images per class, and the remainder is the unlabeled pool."""
    out = Path(out)
    spec = dict(kind="digits", labels_per_class=labels_per_class, seed=seed)

    def write(tmp: Path) -> None:  # sklearn and the split only when (re)building, not on every up-to-date check
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        x, y = load_digits(return_X_y=True)
        imgs = (x.reshape(-1, 8, 8) * (255.0 / 16.0)).round().astype(np.uint8)
        idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.3, stratify=y, random_state=0)
        rng = np.random.default_rng(seed)
        labeled = []
        for c in range(10):
            pool = idx_train[y[idx_train] == c]
            if labels_per_class > len(pool):
                raise DataError(f"--labels-per-class {labels_per_class}: class {c} has only {len(pool)} training "
                                 "images")
            labeled.extend(rng.choice(pool, labels_per_class, replace=False).tolist())
        lab_set = set(labeled)
        unlabeled = rng.permutation([i for i in idx_train if i not in lab_set])
        name = [str(c) for c in range(10)]
        truth: list = []
        for split, ids in [("labeled", sorted(labeled)), ("unlabeled", unlabeled), ("test", sorted(idx_test))]:
            _write_split(tmp, split, [(Image.fromarray(imgs[i], "L"), name[y[i]]) for i in ids], truth)
        _write_truth(tmp, truth)

    return _build(out, spec, force, write)


def _up_to_date(out: Path, spec: dict) -> bool:
    import json

    f = out / MARKER
    try:
        return f.is_file() and json.loads(f.read_text()) == spec
    except ValueError:
        return False
