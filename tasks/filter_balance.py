"""Stage `filter-balance`: the paper's rule over all shards of a generation.

Drop pseudo-labels whose max probability is below the threshold; then per predicted class with target K: a class
with more than K keeps its K most confident images, a class with fewer is duplicated (seeded) up to K.
"""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nst.config import Config, write_effective_config
from nst.data import read_classes
from nst.io import atomic_path, atomic_write_json
from tasks.pseudo_label import num_shards, shard_path

log = logging.getLogger("nst.filter_balance")


def balance(pred: np.ndarray, max_prob: np.ndarray, num_classes: int, threshold: float, target: int | None,
            duplicate: bool, seed: int, image_ids: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Row indices of the balanced set (with repeats for duplicates) and per-class statistics.

    Ties in confidence break on image id (then row), so the result does not depend on shard order.
    `target=None` means K = kept / num_classes (the balanced set keeps the filtered set's size).
    """
    pred = np.asarray(pred)
    max_prob = np.asarray(max_prob)
    keep = max_prob >= threshold
    kept_total = int(keep.sum())
    k = target if target is not None else max(1, kept_total // num_classes)
    rng = np.random.default_rng(seed)
    tiebreak = np.asarray(image_ids) if image_ids is not None else np.arange(len(pred))
    out, per_class = [], {}
    for c in range(num_classes):
        in_class = pred == c
        idx = np.flatnonzero(in_class & keep)
        order = np.lexsort((tiebreak[idx], -max_prob[idx]))  # most confident first
        idx = idx[order]
        n = len(idx)
        if n > k:
            chosen = idx[:k]
        elif n < k and n > 0 and duplicate:
            # copy factor K/n: every image floor(K/n - 1) extra times, the remainder drawn without replacement
            need = k - n
            extra = np.concatenate([np.tile(idx, need // n), rng.choice(idx, need % n, replace=False)])
            chosen = np.concatenate([idx, np.sort(extra)])
        else:
            chosen = idx
        out.append(chosen)
        per_class[c] = {"predicted": int(in_class.sum()), "below_threshold": int((in_class & ~keep).sum()),
                        "kept": n, "capped": max(0, n - k), "duplicated": max(0, len(chosen) - n),
                        "final": int(len(chosen)), "unique": int(min(n, k))}
    rows = np.concatenate(out) if out else np.array([], dtype=np.int64)
    stats = {"target_per_class": int(k), "threshold": threshold, "total": int(len(pred)),
             "dropped": int((~keep).sum()), "kept": kept_total, "final": int(len(rows)),
             "duplicated": int(sum(v["duplicated"] for v in per_class.values())),
             "capped": int(sum(v["capped"] for v in per_class.values())), "per_class": per_class}
    return rows.astype(np.int64), stats


def filter_balance(cfg: Config, gen: str) -> dict:
    g = cfg.generation(gen)
    classes = read_classes(cfg.out_dir)
    n = num_shards(cfg)
    files = [shard_path(cfg, gen, s, n) for s in range(n)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{gen}: {len(missing)} pseudo-label shards missing (first: {missing[0]}); "
                                f"run `nst pseudo-label {gen}` first")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    fc = cfg.filter
    pred = table.column("pred").to_numpy()
    conf = table.column("max_prob").to_numpy()
    rows, stats = balance(pred, conf, len(classes), fc.threshold, fc.target_per_class, fc.duplicate,
                          seed=cfg.seed + g.index, image_ids=table.column("image_id").to_numpy(zero_copy_only=False))
    out_dir = cfg.gen_dir(gen) / "balanced"
    balanced = table.take(pa.array(rows))
    stats["per_class"] = {classes[c]: v for c, v in stats["per_class"].items()}
    stats["mean_confidence_all"] = float(conf.mean()) if len(conf) else 0.0
    stats["mean_confidence_final"] = float(balanced.column("max_prob").to_numpy().mean()) if len(rows) else 0.0
    stats["kept_fraction"] = stats["kept"] / max(1, stats["total"])
    truth = table.column("true_label").to_numpy()
    if (truth >= 0).any():  # hidden labels known (toy/digits): how right are the pseudo-labels?
        has = truth >= 0
        stats["pseudo_label_acc_all"] = float((pred[has] == truth[has]).mean())
        kept = has & (conf >= fc.threshold)
        stats["pseudo_label_acc_kept"] = float((pred[kept] == truth[kept]).mean()) if kept.any() else 0.0
    stats["confidence_histogram"] = np.histogram(conf, bins=20, range=(0.0, 1.0))[0].tolist()
    with atomic_path(out_dir / "balanced.parquet") as tmp:
        pq.write_table(balanced, tmp)
    atomic_write_json(out_dir / "stats.json", stats)
    write_effective_config(cfg, out_dir, "filter-balance", {"generation": gen})
    log.info("%s/filter-balance: %d labelled, %d below %.2f dropped, %d capped, %d duplicated -> %d (K=%d)", gen,
             stats["total"], stats["dropped"], fc.threshold, stats["capped"], stats["duplicated"], stats["final"],
             stats["target_per_class"])
    metrics = {k: stats[k] for k in ("total", "dropped", "kept", "final", "duplicated", "capped",
                                     "kept_fraction", "mean_confidence_final")}
    metrics |= {k: stats[k] for k in ("pseudo_label_acc_all", "pseudo_label_acc_kept") if k in stats}
    return {"out_dir": str(out_dir), "path": str(out_dir / "balanced.parquet"), "stats": str(out_dir / "stats.json"),
            "metrics": metrics}
