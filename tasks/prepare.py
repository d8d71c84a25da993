"""Stage `prepare`: every data source becomes a Parquet manifest once; unreadable images are skipped and listed."""

from __future__ import annotations

import logging
import os

from nst.config import Config, write_effective_config
from nst.data import build_manifest, infer_classes, prepared_dir, scan_source
from nst.io import atomic_path, atomic_write_json, read_json, text_sha256

log = logging.getLogger("nst.prepare")


def _fingerprint(cfg: Config) -> str:
    """Cheap identity of the sources (paths, sizes, mtimes) + data config: unchanged => nothing to redo."""
    parts = [cfg.data.model_dump_json()]
    for src in (cfg.data.labeled, cfg.data.unlabeled, cfg.data.val, cfg.data.test):
        if src is None:
            continue
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
        parts += [f"{p}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in files]
    return text_sha256("\n".join(parts))


def prepare(cfg: Config) -> dict:
    import pyarrow.parquet as pq

    out = prepared_dir(cfg.out_dir)
    fp = _fingerprint(cfg)
    done = out / "prepare.json"
    if done.is_file() and read_json(done).get("fingerprint") == fp:
        log.info("data already prepared in %s", out)
        return read_json(done)

    labeled_items = scan_source(cfg.data.labeled)
    classes = cfg.data.classes or infer_classes(labeled_items, cfg.data.labeled)
    counts, bad_all, paths = {}, {}, {}
    for split, src in (("labeled", cfg.data.labeled), ("val", cfg.data.val), ("test", cfg.data.test),
                       ("unlabeled", cfg.data.unlabeled)):
        if src is None:
            (out / f"{split}.parquet").unlink(missing_ok=True)
            continue
        items = labeled_items if split == "labeled" else scan_source(src)
        table, bad = build_manifest(items, classes, src, labeled=split != "unlabeled",
                                    max_bad_fraction=cfg.data.max_bad_fraction, root=cfg.root)
        if split == "unlabeled" and cfg.data.unlabeled_truth is not None:
            table = _attach_truth(table, cfg.data.unlabeled_truth, classes, cfg.root)
        with atomic_path(out / f"{split}.parquet") as tmp:
            pq.write_table(table, tmp)
        counts[split], bad_all[split], paths[split] = table.num_rows, bad, str(out / f"{split}.parquet")
        if bad:
            log.warning("%s: skipped %d unreadable images (listed in bad_images.json)", src, len(bad))
    atomic_write_json(out / "classes.json", classes)
    atomic_write_json(out / "bad_images.json", bad_all)
    write_effective_config(cfg, out, "prepare")
    result = {"fingerprint": fp, "out_dir": str(out), "paths": paths, "classes": classes,
              "metrics": {f"n_{k}": v for k, v in counts.items()} | {"n_bad": sum(len(b) for b in bad_all.values())}}
    atomic_write_json(done, result)
    return result


def _attach_truth(table, truth_path, classes, root):
    """Hidden labels of the unlabeled set (toy/digits), kept only to report pseudo-label accuracy."""
    import pyarrow as pa

    from nst.data import relpath

    index = {c: i for i, c in enumerate(classes)}
    truth = {relpath(it.path, root): index.get(it.label_name, -1) for it in scan_source(truth_path)}
    labels = [truth.get(p, -1) for p in table.column("path").to_pylist()]
    return table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
