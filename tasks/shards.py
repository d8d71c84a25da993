"""Where a model's label shards live and how many there are: shared by `label` and `filter-balance`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from nst.config import Config
from nst.io import prepared


def num_shards(cfg: Config) -> int:
    n = pq.ParquetFile(prepared(cfg.data_dir / "unlabeled.parquet")).metadata.num_rows
    return max(1, math.ceil(n / cfg.pseudo_label.shard_size))


def shard_path(cfg: Config, gen: str, shard: int, n: int) -> Path:
    return cfg.labels_dir(gen) / f"shard-{shard:05d}-of-{n:05d}.parquet"


def shard_paths(cfg: Config, gen: str) -> list[Path]:
    n = num_shards(cfg)
    return [shard_path(cfg, gen, s, n) for s in range(n)]


def truth(cfg: Config) -> np.ndarray | None:
    """The hidden labels of the unlabeled set by manifest row (-1 unknown), when the data has them."""
    lab = pq.read_table(prepared(cfg.data_dir / "unlabeled.parquet"), columns=["label"]).column("label").to_numpy()
    return lab if (lab >= 0).any() else None
