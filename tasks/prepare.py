"""Stage `prepare`: every data source becomes a Parquet manifest once; unreadable images are skipped and listed."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from nst.config import Config, write_effective_config
from nst.data import build_manifest, infer_classes, prepared_dir, scan_source
from nst.io import atomic_path, atomic_write_json, file_sha256, read_json, text_sha256

log = logging.getLogger("nst.prepare")


def source_fingerprint(path: Path | None) -> str:
    """A data source: file content for a manifest; for an image folder the list of (relative path, size, mtime),
    which keeps the check cheap for millions of images (prepare's outputs are content-hashed downstream)."""
    if path is None:
        return "none"
    if path.is_file():
        return file_sha256(path)
    if not path.is_dir():
        return f"missing:{path}"
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        st = p.stat()
        h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def fingerprint(cfg: Config) -> str:
    """Identity of prepare's inputs: the data config + every source. Unchanged => nothing to redo (and the flow's
    cache key for the stage)."""
    d = cfg.data
    parts = [d.model_dump_json()] + [source_fingerprint(p) for p in (d.labeled, d.unlabeled, d.val, d.test,
                                                                      d.unlabeled_truth)]
    return text_sha256("\n".join(parts))


def prepare(cfg: Config) -> dict:
    import pyarrow.parquet as pq

    out = prepared_dir(cfg.out_dir)
    fp = fingerprint(cfg)
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
