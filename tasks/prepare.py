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
    from nst.shards import is_shard_source

    out = cfg.data_dir
    counts, bad_all, converted, shards = {}, {}, {}, {}
    indexed: dict[str, tuple] = {}
    if is_shard_source(cfg.data.labeled):
        indexed["labeled"] = index_split(cfg, "labeled", cfg.data.labeled)
        classes = cfg.data.classes or _shard_classes(cfg, indexed["labeled"][0])
    else:
        labeled_items = scan_source(cfg.data.labeled, "data.labeled")
        classes = cfg.data.classes or infer_classes(labeled_items, cfg.data.labeled)
    with HashCache.for_out_dir(cfg.out_dir) as cache:
        for split, src in _splits(cfg):
            if is_shard_source(src):
                raw, pre_bad, shards[split] = indexed.pop(split, None) or index_split(cfg, split, src)
                table, bad, modes = shard_manifest(raw, pre_bad, classes, src, split=split,
                                                   max_bad_fraction=cfg.data.max_bad_fraction)
                del raw
            else:
                items = labeled_items if split == "labeled" else scan_source(src, f"data.{split}")
                checks = _check(items, cfg, split, cache)
                table, bad = build_manifest(items, checks, classes, src, split=split,
                                            max_bad_fraction=cfg.data.max_bad_fraction, root=cfg.root)
                modes = _converted(checks)
            if split == "unlabeled" and cfg.data.unlabeled_truth is not None:
                table = _attach_truth(table, cfg.data.unlabeled_truth, classes, cfg.root)
            with atomic_path(out / f"{split}.parquet") as tmp:
                pq.write_table(table, tmp, compression="zstd")
            counts[split], bad_all[split] = table.num_rows, bad
            if bad:
                log.warning("%s: skipped %d unreadable images (listed in bad_images.json)", src, len(bad))
            if modes:
                converted[split] = modes
                log.info("%s: %d images are decoded with conversion to 8-bit RGB (%s)", src, sum(modes.values()),
                         ", ".join(f"{m}: {n}" for m, n in modes.items()))
    atomic_write_json(out / "shards.json", shards)
    atomic_write_json(out / "classes.json", classes)
    atomic_write_json(out / "bad_images.json", bad_all)
    n_bad, n_converted = sum(len(b) for b in bad_all.values()), sum(sum(m.values()) for m in converted.values())
    return {"classes": classes, "converted": converted,  # per split and pixel mode
            "metrics": {f"n_{k}": v for k, v in counts.items()} | {"n_bad": n_bad, "n_converted": n_converted}}


# ---- shard sources ----------------------------------------------------------------------------------------------

def index_split(cfg: Config, split: str, src) -> tuple[pa.Table, list[dict], list[dict]]:
    """Every shard of a source streamed once, in parallel over shards (nst.shards.index_shard), into one Arrow
    table: path = <shard>#<member>, the label as the shard gives it (a class index from `.cls`, or the sidecar's
    label), the check's facts. Also the samples a sidecar and its tar disagree on (named, counted as bad) and the
    shard list prepare records (with S3 ETags). Columns throughout: a million samples cost about their manifest."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from nst.settings import s3_endpoint
    from nst.shards import index_shard, list_shards

    listed = list_shards(src, f"data.{split}")
    tables, bad = [], []
    workers = min(cfg.data.scan_workers, len(listed))
    args = (cfg.data.verify, cfg.data.max_image_pixels, s3_endpoint())
    with Progress(f"prepare/{split}", total=len(listed), unit="shards", logger=log) as bar:
        if workers > 1:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as ex:
                for sh, t in zip(listed, ex.map(index_shard, listed, *[[a] * len(listed) for a in args])):
                    tables.append(_with_sidecar(cfg, sh, t, bad))
                    bar.advance(1)
        else:
            for sh in listed:
                tables.append(_with_sidecar(cfg, sh, index_shard(sh, *args), bad))
                bar.advance(1)
    if bad:
        log.warning("%s: %d samples where a sidecar and its tar disagree (listed in bad_images.json)", src, len(bad))
    record = [{"url": _shard_name(cfg, sh.url), "size": sh.size, "etag": sh.etag} for sh in listed]
    return pa.concat_tables(tables), bad, record


def _shard_name(cfg: Config, url: str) -> str:
    return url if url.startswith("s3://") else relpath(url, cfg.root)


def _with_sidecar(cfg: Config, sh, t: pa.Table, bad: list[dict]) -> pa.Table:
    """One shard's samples as manifest rows to be: addressed <shard>#<member>; with a sidecar, only the keys it
    lists as downloaded (the rest named in `bad`), its labels where the tar has no `.cls`."""
    import pyarrow.compute as pc

    from nst.shards import SEP, sidecar

    name = _shard_name(cfg, sh.url)
    side = sidecar(sh)
    if side is not None:
        keys = t.column("key")
        listed = pc.is_in(keys, value_set=pa.array(list(side), pa.string()))
        bad += [{"path": f"{name}{SEP}{m}", "error": "in the tar, not in the sidecar"}
                for m in t.filter(pc.invert(listed)).column("name").to_pylist()]
        bad += [{"path": f"{name}{SEP}{k}", "error": "listed in the sidecar, not in the tar"}
                for k in sorted(set(side) - set(keys.to_pylist()))]
        t = t.filter(listed)
        side_labels = pa.array([side[k] for k in t.column("key").to_pylist()], pa.string())
        t = t.set_column(t.schema.get_field_index("label"), "label", pc.coalesce(t.column("label"), side_labels))
    paths = pa.array([f"{name}{SEP}{m}" for m in t.column("name").to_pylist()], pa.string())
    return t.append_column("path", paths).drop_columns(["key", "name"])


def _shard_classes(cfg: Config, raw: pa.Table) -> list[str]:
    """Class names of a shard source: classes.json beside it, else its label names (class indexes need names)."""
    import pyarrow.compute as pc

    from nst.shards import source_classes

    names = source_classes(cfg.data.labeled)
    if names is not None:
        return names
    labels = pc.unique(raw.column("label").drop_null()).to_pylist()
    if any(lab.isdigit() for lab in labels):
        raise DataError(f"{cfg.data.labeled}: labels are class indexes (.cls members): name the classes in "
                        "data.classes or a classes.json beside the shards")
    return infer_classes([Item("", lab) for lab in labels], cfg.data.labeled)


def shard_manifest(raw: pa.Table, pre_bad: list[dict], classes: list[str], source, *, split: str,
                   max_bad_fraction: float) -> tuple[pa.Table, list[dict], dict[str, int]]:
    """The manifest of a shard source, by the rules build_manifest applies to files, on columns: unusable samples
    skipped and listed (within max_bad_fraction), labels as class indexes, every labeled sample labeled."""
    import pyarrow.compute as pc

    n_all = raw.num_rows + len(pre_bad)
    if not n_all:
        raise DataError(f"{source}: data.{split} has no images (shards without image members)")
    ok = pc.is_null(raw.column("error"))
    bad = pre_bad + raw.filter(pc.invert(ok)).select(["path", "error"]).to_pylist()
    if len(bad) / n_all > max_bad_fraction:
        raise DataError(f"{source}: {len(bad)} of {n_all} images unreadable (> data.max_bad_fraction = "
                        f"{max_bad_fraction}); first: {bad[0]['path']}: {bad[0]['error']}")
    t = raw.filter(ok)
    text = t.column("label")
    named = pc.index_in(text, value_set=pa.array(classes, pa.string()))
    digits = pc.fill_null(pc.match_substring_regex(text, r"^[0-9]+$"), False)
    index = pc.coalesce(named, pc.cast(pc.if_else(digits, text, pa.scalar(None, pa.string())), pa.int32()))
    labeled = split != "unlabeled"

    def first(mask) -> str:
        return t.filter(mask).column("path")[0].as_py()

    if labeled and pc.any(pc.is_null(text)).as_py():
        raise DataError(f"{source}: {first(pc.is_null(text))}: labeled image without a label")
    if pc.any(pc.greater_equal(pc.fill_null(index, 0), len(classes))).as_py():
        row = first(pc.greater_equal(pc.fill_null(index, 0), len(classes)))
        raise DataError(f"{source}: {row}: class index out of range for {len(classes)} classes (data.classes or "
                        "classes.json beside the shards)")
    unknown = pc.and_(pc.is_valid(text), pc.is_null(index))
    if labeled and pc.any(unknown).as_py():
        row = t.filter(unknown)
        raise DataError(f"{source}: {row.column('path')[0].as_py()}: label {row.column('label')[0].as_py()!r} is not "
                        f"one of the classes {classes}")
    table = pa.table({"path": t.column("path"), "label": pc.fill_null(index, -1).cast(pa.int32()),
                      "digest": t.column("digest"), "width": t.column("width"), "height": t.column("height"),
                      "offset": t.column("offset"), "size": t.column("size")}, schema=SHARD_MANIFEST_SCHEMA)
    modes = {m["values"]: m["counts"] for m in pc.value_counts(t.column("mode").drop_null()).to_pylist()
             if converts(m["values"])}
    return table, bad, dict(sorted(modes.items()))


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
