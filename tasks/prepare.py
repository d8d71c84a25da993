"""Stage `prepare`: every data source becomes a Parquet manifest once (one row per readable image with its content
digest); unreadable images and decompression bombs are skipped and listed."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from nst.config import Config
from nst.data import MANIFEST_SCHEMA, SHARD_MANIFEST_SCHEMA, Item, converts, infer_classes, relpath, scan_source
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
                   max_bad_fraction: float, root: Path, locs: list[tuple[int, int]] | None = None,
                   bad: list[dict] | None = None) -> tuple[pa.Table, list[dict]]:
    """`locs`: (offset, size) of each item in its shard (a shard source); `bad`: samples already found unusable."""
    index = {c: i for i, c in enumerate(classes)}
    labeled = split != "unlabeled"
    paths, labels, digests, widths, heights, offsets, sizes = [], [], [], [], [], [], []
    bad = list(bad or [])
    n_all = len(items) + len(bad)
    for k, (it, ck) in enumerate(zip(items, checks)):
        if it.label_name is not None and it.label_name not in index and labeled:
            raise DataError(f"{source}: {it.path}: label {it.label_name!r} is not one of the classes {classes}")
        if ck.error is not None:
            bad.append({"path": relpath(it.path, root), "error": ck.error})
            continue
        if labeled and it.label_name is None:
            raise DataError(f"{source}: {it.path}: labeled image without a label")
        if locs is not None:
            offsets.append(locs[k][0])
            sizes.append(locs[k][1])
        paths.append(relpath(it.path, root))
        labels.append(index.get(it.label_name, -1) if it.label_name is not None else -1)
        digests.append(bytes.fromhex(ck.digest[:32]))
        widths.append(ck.width)
        heights.append(ck.height)
    if not n_all:
        raise DataError(f"{source}: data.{split} has no images (an empty folder or a manifest without rows)")
    if len(bad) / n_all > max_bad_fraction:
        raise DataError(f"{source}: {len(bad)} of {n_all} images unreadable (> data.max_bad_fraction = "
                        f"{max_bad_fraction}); first: {bad[0]['path']}: {bad[0]['error']}")
    cols = {"path": paths, "label": pa.array(labels, pa.int32()), "digest": pa.array(digests, pa.binary(16)),
            "width": pa.array(widths, pa.int32()), "height": pa.array(heights, pa.int32())}
    if locs is None:
        return pa.table(cols, schema=MANIFEST_SCHEMA), bad
    cols |= {"offset": pa.array(offsets, pa.int64()), "size": pa.array(sizes, pa.int64())}
    return pa.table(cols, schema=SHARD_MANIFEST_SCHEMA), bad


class _Read:
    """A source as prepare reads it: items and their checks (and, for shards, where each lies and which shards)."""

    def __init__(self, cfg: Config, split: str, src, cache):
        from nst.shards import is_shard_source

        self.locs = self.shards = self.pre_bad = None
        if is_shard_source(src):
            self.items, self.checks, self.locs, self.shards, self.pre_bad = read_shard_source(cfg, split, src)
        else:
            self.items = scan_source(src, f"data.{split}")
            self.checks = _check(self.items, cfg, split, cache)


def prepare(cfg: Config, gen: str = "", fingerprint: str = "") -> dict:
    from nst.scan import HashCache
    out = cfg.data_dir
    counts, bad_all, converted, shards = {}, {}, {}, {}
    with HashCache.for_out_dir(cfg.out_dir) as cache:
        labeled = _Read(cfg, "labeled", cfg.data.labeled, cache)
        classes = cfg.data.classes or _shard_classes(cfg, labeled) or infer_classes(labeled.items, cfg.data.labeled)
        for split, src in _splits(cfg):
            r = labeled if split == "labeled" else _Read(cfg, split, src, cache)
            items, checks = r.items, r.checks
            if r.locs is not None:
                items = _named(items, classes, src, split)
                shards[split] = r.shards
            table, bad = build_manifest(items, checks, classes, src, split=split,
                                        max_bad_fraction=cfg.data.max_bad_fraction, root=cfg.root, locs=r.locs,
                                        bad=r.pre_bad)
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
    atomic_write_json(out / "shards.json", shards)
    atomic_write_json(out / "classes.json", classes)
    atomic_write_json(out / "bad_images.json", bad_all)
    n_bad, n_converted = sum(len(b) for b in bad_all.values()), sum(sum(m.values()) for m in converted.values())
    return {"classes": classes, "converted": converted,  # per split and pixel mode
            "metrics": {f"n_{k}": v for k, v in counts.items()} | {"n_bad": n_bad, "n_converted": n_converted}}


def read_shard_source(cfg: Config, split: str, src) -> tuple:
    """Every shard of a source streamed once, in parallel over shards: its samples (labels as the shard gives them:
    a class index from `.cls`, or the sidecar's label), their checks, (offset, size) in the shard, the shard list
    prepare records (with S3 ETags) and the samples its sidecar and tar disagree on (named, counted as bad)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from nst.settings import s3_endpoint
    from nst.shards import SEP, index_shard, list_shards, sidecar

    what = f"data.{split}"
    listed = list_shards(src, what)
    items, checks, locs, bad = [], [], [], []
    workers = min(cfg.data.scan_workers, len(listed))
    with Progress(f"prepare/{split}", total=len(listed), unit="shards", logger=log) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as ex:
                futs = [ex.submit(index_shard, sh, cfg.data.verify, cfg.data.max_image_pixels, s3_endpoint())
                        for sh in listed]
                results = []
                for f in futs:
                    results.append(f.result())
                    bar.advance(1)
        else:
            results = []
            for sh in listed:
                results.append(index_shard(sh, cfg.data.verify, cfg.data.max_image_pixels, s3_endpoint()))
                bar.advance(1)
    for sh, members in zip(listed, results):
        side = sidecar(sh)
        name = sh.url if sh.url.startswith("s3://") else relpath(sh.url, cfg.root)
        if side is not None:
            in_tar = {m.key for m in members}
            for key in sorted(set(side) - in_tar):
                bad.append({"path": f"{name}{SEP}{key}", "error": "listed in the sidecar, not in the tar"})
        for m in members:
            if side is not None:
                if m.key not in side:
                    bad.append({"path": f"{name}{SEP}{m.name}", "error": "in the tar, not in the sidecar"})
                    continue
                if m.label is None:
                    m.label = side[m.key]
            items.append(Item(f"{sh.url}{SEP}{m.name}", m.label))  # made relative with the rest by build_manifest
            checks.append(m.check)
            locs.append((m.offset, m.size))
    if bad:
        log.warning("%s: %d samples where a sidecar and its tar disagree (listed in bad_images.json)", src, len(bad))
    record = [{"url": sh.url if sh.url.startswith("s3://") else relpath(sh.url, cfg.root), "size": sh.size,
               "etag": sh.etag} for sh in listed]
    return items, checks, locs, record, bad


def _shard_classes(cfg: Config, labeled: "_Read") -> list[str] | None:
    from nst.shards import source_classes

    if labeled.locs is None:
        return None
    names = source_classes(cfg.data.labeled)
    if names is None and any(it.label_name is not None and it.label_name.isdigit() for it in labeled.items):
        raise DataError(f"{cfg.data.labeled}: labels are class indexes (.cls members): name the classes in "
                        "data.classes or a classes.json beside the shards")
    return names


def _named(items: list[Item], classes: list[str], src, split: str) -> list[Item]:
    """Shard labels as class names: a `.cls` member holds the class index (WebDataset's convention)."""
    out = []
    for it in items:
        lab = it.label_name
        if lab is not None and lab.lstrip("-").isdigit() and lab not in classes:
            k = int(lab)
            if not 0 <= k < len(classes):
                raise DataError(f"{src}: {it.path}: class index {k} out of range for {len(classes)} classes "
                                f"(data.classes or classes.json beside the shards)")
            lab = classes[k]
        out.append(Item(it.path, lab))
    return out


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
    return [d / f"{s}.parquet" for s, _ in _splits(cfg)] + [d / "classes.json", d / "bad_images.json", d / "shards.json",
                                                            d / "config.json"]


PREPARE = Stage(
    name="prepare", fn=prepare, scope="project",
    params=lambda c, g: SOURCE_KEYS,
    deps=lambda c, g: [p for _, p in _splits(c)] + ([c.data.unlabeled_truth] if c.data.unlabeled_truth else []),
    outs=lambda c, g: manifest_outs(c),
    code=CORE + ("nst/data.py", "nst/scan.py", "nst/shards.py", "tasks/prepare.py"),
)
