"""Stage `prepare`: every data source becomes a Parquet manifest once (one row per readable image with its content
digest); unreadable images and decompression bombs are skipped and listed."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nst.config import Config
from nst.data import MANIFEST_SCHEMA, Item, converts, infer_classes, relpath, scan_source
from nst.errors import DataError
from nst.io import atomic_path, atomic_write_json
from nst.progress import Progress
from tasks.spec import CORE, Stage

log = logging.getLogger("nst.prepare")

# ---- prepare --------------------------------------------------------------------------------------------------

def _splits(cfg: Config) -> list[tuple[str, Path]]:
    d = cfg.data
    return [(s, p) for s, p in (("labeled", d.labeled), ("val", d.val), ("test", d.test), ("unlabeled", d.unlabeled))
            if p is not None]


def _check(items: list[Item], cfg: Config, split: str, cache) -> list:
    from nst.scan import check_files

    with Progress(f"prepare/{split}", total=len(items), unit="files", logger=log) as bar:
        return check_files([it.path for it in items], max_pixels=cfg.data.max_image_pixels, verify=cfg.data.verify,
                           workers=cfg.data.scan_workers, cache=cache,
                           on_progress=lambda done, total: bar.advance(done - bar.done))


def build_manifest(items: list[Item], checks: list, classes: list[str], source: Path, *, split: str,
                   max_bad_fraction: float, root: Path) -> tuple[pa.Table, list[dict]]:
    index = {c: i for i, c in enumerate(classes)}
    labeled = split != "unlabeled"
    paths, labels, digests, widths, heights, bad = [], [], [], [], [], []
    for it, ck in zip(items, checks):
        if it.label_name is not None and it.label_name not in index and labeled:
            raise DataError(f"{source}: {it.path}: label {it.label_name!r} is not one of the classes {classes}")
        if ck.error is not None:
            bad.append({"path": relpath(it.path, root), "error": ck.error})
            continue
        if labeled and it.label_name is None:
            raise DataError(f"{source}: {it.path}: labeled image without a label")
        paths.append(relpath(it.path, root))
        labels.append(index.get(it.label_name, -1) if it.label_name is not None else -1)
        digests.append(bytes.fromhex(ck.digest[:32]))
        widths.append(ck.width)
        heights.append(ck.height)
    if not items:
        raise DataError(f"{source}: data.{split} has no images (an empty folder or a manifest without rows)")
    if len(bad) / len(items) > max_bad_fraction:
        raise DataError(f"{source}: {len(bad)} of {len(items)} images unreadable (> data.max_bad_fraction = "
                        f"{max_bad_fraction}); first: {bad[0]['path']}: {bad[0]['error']}")
    table = pa.table({"path": paths, "label": pa.array(labels, pa.int32()), "digest": pa.array(digests, pa.binary(16)),
                      "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32())},
                     schema=MANIFEST_SCHEMA)
    return table, bad


def prepare(cfg: Config, gen: str = "", fingerprint: str = "") -> dict:
    from nst.scan import HashCache

    out = cfg.data_dir
    labeled_items = scan_source(cfg.data.labeled, "data.labeled")
    classes = cfg.data.classes or infer_classes(labeled_items, cfg.data.labeled)
    counts, bad_all, converted = {}, {}, {}
    with HashCache.for_out_dir(cfg.out_dir) as cache:
        for split, src in _splits(cfg):
            items = labeled_items if split == "labeled" else scan_source(src, f"data.{split}")
            checks = _check(items, cfg, split, cache)
            table, bad = build_manifest(items, checks, classes, src, split=split,
                                        max_bad_fraction=cfg.data.max_bad_fraction, root=cfg.root)
            if split == "unlabeled" and cfg.data.unlabeled_truth is not None:
                table = _attach_truth(table, cfg.data.unlabeled_truth, classes, cfg.root)
            with atomic_path(out / f"{split}.parquet") as tmp:
                pq.write_table(table, tmp, compression="zstd")
            counts[split], bad_all[split] = table.num_rows, bad
            if bad:
                log.warning("%s: skipped %d unreadable images (listed in bad_images.json)", src, len(bad))
            if modes := _converted(checks):
                converted[split] = modes
                log.info("%s: %d images are decoded with conversion to 8-bit RGB (%s)", src, sum(modes.values()),
                         ", ".join(f"{m}: {n}" for m, n in modes.items()))
    atomic_write_json(out / "classes.json", classes)
    atomic_write_json(out / "bad_images.json", bad_all)
    n_bad, n_converted = sum(len(b) for b in bad_all.values()), sum(sum(m.values()) for m in converted.values())
    return {"classes": classes, "converted": converted,  # per split and pixel mode
            "metrics": {f"n_{k}": v for k, v in counts.items()} | {"n_bad": n_bad, "n_converted": n_converted}}


def _converted(checks: list) -> dict[str, int]:
    """Usable images per pixel mode that decoding converts (16-bit, palette, alpha, CMYK, ...; nst.data.to_rgb8)."""
    modes = Counter(ck.mode for ck in checks if ck.error is None and converts(ck.mode))
    return dict(sorted(modes.items()))


def _attach_truth(table: pa.Table, truth_path: Path, classes: list[str], root: Path) -> pa.Table:
    """Hidden labels of the unlabeled set (toy/digits), kept only to report pseudo-label accuracy."""
    index = {c: i for i, c in enumerate(classes)}
    truth = {relpath(it.path, root): index.get(it.label_name, -1)
             for it in scan_source(truth_path, "data.unlabeled_truth")}
    labels = [truth.get(p, -1) for p in table.column("path").to_pylist()]
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))


SOURCE_KEYS = ["data.builtin", "data.labeled", "data.unlabeled", "data.val", "data.test", "data.unlabeled_truth",
               "data.classes", "data.max_bad_fraction", "data.max_image_pixels", "data.verify"]


def manifest_outs(cfg: Config) -> list[Path]:
    d = cfg.data_dir
    return [d / f"{s}.parquet" for s, _ in _splits(cfg)] + [d / "classes.json", d / "bad_images.json", d / "config.json"]


PREPARE = Stage(
    name="prepare", fn=prepare, scope="project",
    params=lambda c, g: SOURCE_KEYS,
    deps=lambda c, g: [p for _, p in _splits(c)] + ([c.data.unlabeled_truth] if c.data.unlabeled_truth else []),
    outs=lambda c, g: manifest_outs(c),
    code=CORE + ("nst/data.py", "nst/scan.py", "tasks/prepare.py"),
)
