"""Stage `filter-balance`: the paper's rule over the teacher's label shards, exact and streaming (nst/labels.py).

Drop pseudo-labels whose max probability is below the threshold; then per predicted class with target K: a class
with more than K keeps its K most confident images (ties: the earlier manifest row), a class with fewer is
duplicated (seeded) up to K. Memory is bounded by one shard and the per-class histograms, not by the rows.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from nst.config import Config
from nst.errors import StageError
from nst.io import atomic_write_json, prepared
from tasks.shards import shard_paths, truth
from tasks.spec import CORE, Stage

log = logging.getLogger("nst.filter_balance")


def filter_balance(cfg: Config, gen: str, fingerprint: str = "") -> dict:
    from nst.labels import filter_balance as balance

    g = cfg.generation(gen)
    # read here, not by nst.data.read_classes: nst/data.py is not this stage's code (editing it re-runs nothing here)
    classes = json.loads(prepared(cfg.data_dir / "classes.json").read_text())
    shards = shard_paths(cfg, g.teacher)
    missing = [p for p in shards if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: {len(missing)} label shards of {g.teacher} missing; run "
                                f"`nst label {g.teacher}` first")
    out = cfg.balanced_dir(gen)
    fc = cfg.filter
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"filter-balance-{gen}-", dir=cfg.state_dir) as work:  # not in outs
        stats = balance(shards, out / "balanced.parquet", num_classes=len(classes), threshold=fc.threshold,
                        target=fc.target_per_class, duplicate=fc.duplicate, seed=cfg.seed + g.index,
                        truth=truth(cfg), workdir=work)
    if stats["final"] == 0:
        (out / "balanced.parquet").unlink(missing_ok=True)
        raise StageError(f"{gen}/filter-balance: filter.threshold = {fc.threshold} keeps 0 of {stats['total']} "
                         f"pseudo-labels (highest confidence below it); lower filter.threshold")
    stats["per_class"] = {classes[int(c)]: v for c, v in stats["per_class"].items()}
    atomic_write_json(out / "stats.json", stats)
    log.info("%s/filter-balance: %d labelled, %d below %.2f dropped, %d capped, %d duplicated -> %d (K=%d)", gen,
             stats["total"], stats["dropped"], fc.threshold, stats["capped"], stats["duplicated"], stats["final"],
             stats["target_per_class"])
    keys = ("total", "dropped", "kept", "final", "duplicated", "capped", "kept_fraction", "mean_confidence_final",
            "pseudo_label_acc_all", "pseudo_label_acc_kept")
    return {"metrics": {k: stats[k] for k in keys if k in stats}}


def balanced_outs(cfg: Config, gen: str) -> list[Path]:
    d = cfg.balanced_dir(gen)
    return [d / "balanced.parquet", d / "stats.json", d / "config.json"]


FILTER_BALANCE = Stage(
    name="filter-balance", fn=filter_balance, scope="student",
    params=lambda c, g: ["seed", "filter"],
    deps=lambda c, g: [c.labels_dir(c.generation(g).teacher), c.data_dir / "unlabeled.parquet",
                       c.data_dir / "classes.json"],
    outs=balanced_outs,
    code=CORE + ("nst/labels.py", "tasks/filter_balance.py", "tasks/shards.py"),
)
