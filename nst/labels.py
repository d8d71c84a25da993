"""Compact pseudo-label shards and an exact, streaming filter + balance over them.

The paper labels 300M images; no machine should hold all their labels, let alone N x num_classes floats. So:

* a label shard is one Parquet file per shard of the unlabeled manifest: the manifest row, the argmax class, its
  confidence as float16, and the top-k classes with their (renormalised) float16 probabilities, ~18 B per image at
  top-5 of 1,000 classes instead of 4,000 B dense;
* filter + balance runs in two mappable passes over the shards. Confidence is float16, so a non-negative value and
  its bit pattern order the same way, and a dense per-class histogram over the bit patterns from the threshold up to
  1.0 is an *exact* summary of everything the rule needs: pass 1 histograms each shard, a reduce finds each capped
  class's cut-off value and how many rows at exactly that value still fit, plus per-shard prefix counts, and pass 2
  then selects rows in any shard independently. Memory is one shard + a few [C, NB] histograms + the shards'
  selections in flight (`workers` of them), never the number of rows;
* `read_targets` / `densify` give the student sparse targets and expand them to dense only one batch at a time.

`reference_balance` is the same rule written plainly in memory: the tests' oracle, not for production sizes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nst.io import atomic_path

__all__ = [
    "LABEL_COLUMNS", "Plan", "Targets", "class_dtype", "densify", "filter_balance", "label_schema", "make_plan",
    "pass1_shard", "pass2_shard", "plan_shards", "quantize_probs", "read_shard_metadata", "read_targets",
    "reference_balance", "stream_to_index", "synthetic_labels", "threshold_bits", "write_label_shard",
]

LABEL_COLUMNS = ("row", "pred", "conf", "classes", "probs")
ONE_BITS = 0x3C00  # float16 1.0: the largest confidence a probability can have
CONF_BINS = 20  # the stats' confidence histogram: 20 equal bins on [0, 1]
_DENSE_CELLS = 1 << 24  # up to this many histogram cells pass 1 counts with a dense bincount (fast), beyond by sorting
_PLAN_VERSION = 1

# Measured at top-5 of 1,000 classes: dictionary + zstd on pred, conf and the class ids ~18 B/image. A dictionary
# on probs saves only 0.2 B but makes reading a shard ~2x slower; BYTE_STREAM_SPLIT on probs saves ~0.4 B but older
# readers cannot read it for float16. `row` is ascending, so delta-encoded it costs ~0 bytes.
_DICT_COLUMNS = ["pred", "conf", "classes.list.element", "copies"]


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    names = set(schema.names)
    return {"compression": "zstd",
            "use_dictionary": [c for c in _DICT_COLUMNS if c.split(".")[0] in names],
            "column_encoding": {"row": "DELTA_BINARY_PACKED"}}


# --------------------------------------------------------------------------------------------------- label shards

def class_dtype(num_classes: int) -> np.dtype:
    """The smallest unsigned type that holds class indices 0 … num_classes-1: at top-5 the class ids are most of a
    shard's bytes, and ImageNet's 1,000 classes need 2 bytes, not 8."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if num_classes - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"num_classes={num_classes} does not fit uint32")


def label_schema(num_classes: int, top_k: int, *, copies: bool = False) -> pa.Schema:
    """Non-nullable fields: no definition levels to store, and a reader knows no value is missing."""
    ct = pa.from_numpy_dtype(class_dtype(num_classes))
    fields = [pa.field("row", pa.int64(), nullable=False),
              pa.field("pred", ct, nullable=False),
              pa.field("conf", pa.float16(), nullable=False),
              pa.field("classes", pa.list_(pa.field("element", ct, nullable=False), top_k), nullable=False),
              pa.field("probs", pa.list_(pa.field("element", pa.float16(), nullable=False), top_k),
                       nullable=False)]
    if copies:
        fields.append(pa.field("copies", pa.uint32(), nullable=False))
    return pa.schema(fields)


def quantize_probs(probs: np.ndarray) -> np.ndarray:
    """Round to float16, then renormalise and round again: the top-k mass is < 1 and float16 rounding moves each
    value by up to 2^-11 relative, so renormalising after rounding is what makes every row sum to 1 within 1e-3
    (the error left is at most 2^-11 of the row's sum)."""
    p = np.asarray(probs, dtype=np.float32)
    if p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2:
        raise ValueError(f"probs must be [N, k], got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probs must be finite and non-negative")
    p16 = p.astype(np.float16).astype(np.float32)
    s = p16.sum(axis=1, keepdims=True)
    if (s <= 0).any():
        raise ValueError("every row of probs needs a positive sum after rounding to float16")
    return (p16 / s).astype(np.float16)


def write_label_shard(path: str | os.PathLike, row, pred, conf, classes, probs, num_classes: int,
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Write one label shard atomically (a crashed labeller leaves no half shard that a later pass would trust).

    `probs` already float16 is written as given (assumed quantised); anything else goes through `quantize_probs`.
    `classes`/`probs` may be 1-D for hard labels (k = 1).
    """
    row = np.asarray(row)
    n = len(row)
    if row.ndim != 1 or (n and not np.issubdtype(row.dtype, np.integer)):
        raise ValueError("row must be a 1-D integer array")
    row = row.astype(np.int64, copy=False)
    if n and (row[0] < 0 or (np.diff(row) <= 0).any()):
        raise ValueError("row must be non-negative and strictly ascending (manifest order)")
    dt = class_dtype(num_classes)
    pred = _class_array(pred, num_classes, dt, "pred")
    classes = _class_array(classes, num_classes, dt, "classes")
    if classes.ndim == 1:
        classes = classes[:, None]
    probs = np.asarray(probs)
    probs = probs[:, None] if probs.ndim == 1 else probs
    if probs.dtype != np.float16:
        probs = quantize_probs(probs)
    conf = np.asarray(conf).astype(np.float16)
    k = classes.shape[1] if classes.ndim == 2 else 0
    if classes.ndim != 2 or probs.shape != classes.shape or k < 1:
        raise ValueError(f"classes and probs must both be [N, k>=1], got {classes.shape} and {probs.shape}")
    if not (len(pred) == len(conf) == len(classes) == n):
        raise ValueError("row, pred, conf, classes and probs must have the same length")
    if n and not ((conf >= 0) & (conf <= 1)).all():
        raise ValueError("conf must be a probability in [0, 1] (no NaN)")
    # num_classes/top_k describe the columns, so the data's values win over a caller's (a configured top_k of 5
    # means k = 1 in hard mode, and min(5, C) for tiny C): readers size arrays from them.
    meta = {str(key): str(value) for key, value in (metadata or {}).items()}
    meta |= {"num_classes": str(num_classes), "top_k": str(k)}
    schema = label_schema(num_classes, k).with_metadata(meta)
    table = pa.Table.from_arrays(
        [pa.array(row), pa.array(pred), pa.array(conf),
         pa.FixedSizeListArray.from_arrays(pa.array(classes.reshape(-1)), type=schema.field("classes").type),
         pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), type=schema.field("probs").type)],
        schema=schema)
    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **_parquet_options(schema))
    return path


def _class_array(a, num_classes: int, dt: np.dtype, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must hold integer class indices")
    if a.size and (a.min() < 0 or a.max() >= num_classes):
        raise ValueError(f"{name} holds a class outside 0 … {num_classes - 1}")
    return a.astype(dt, copy=False)


def read_shard_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The caller's metadata plus num_classes/top_k, without reading any data page."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k != b"ARROW:schema"}


def synthetic_labels(n: int, num_classes: int, top_k: int, seed: int, row_start: int = 0) -> dict[str, np.ndarray]:
    """Realistic-looking labels for tests and benchmarks without an N x num_classes softmax: distinct uniform top-k
    classes (incompressible, like a real model's), Dirichlet-like probabilities whose top-1 spans [0, 1], and the
    tail mass of the other classes lumped into one term so conf (the full softmax max) exceeds probs' top-1 share."""
    if top_k > num_classes:
        raise ValueError("top_k > num_classes")
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, num_classes, (n, top_k)).astype(class_dtype(num_classes))
    while top_k > 1:
        s = np.sort(classes, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1))
        if not len(bad):
            break
        classes[bad] = rng.integers(0, num_classes, (len(bad), top_k))
    alpha = np.linspace(2.0, 0.3, top_k) if top_k > 1 else np.array([2.0])
    g = rng.gamma(alpha, size=(n, top_k)).astype(np.float32)
    tail = (rng.gamma(3.0, size=n) * 0.6).astype(np.float32) if num_classes > top_k else np.zeros(n, np.float32)
    full = g / (g.sum(axis=1) + tail)[:, None]
    full = -np.sort(-full, axis=1)
    return {"row": np.arange(row_start, row_start + n, dtype=np.int64), "pred": classes[:, 0].copy(),
            "conf": full[:, 0].astype(np.float16), "classes": classes, "probs": full}


# ------------------------------------------------------------------------------------------ exact filter + balance

def threshold_bits(threshold: float) -> int:
    """The smallest non-negative float16 bit pattern whose value is >= threshold (ONE_BITS + 1 if none is <= 1).

    Comparing in float64 on purpose: numpy would compare a float16 array with a Python float *in float16*, rounding
    the threshold (0.3 -> 0.30005), which is not the rule `float(conf) >= threshold`."""
    t = float(threshold)
    if np.isnan(t):
        raise ValueError("threshold is NaN")
    values = np.arange(ONE_BITS + 1, dtype=np.uint16).view(np.float16).astype(np.float64)
    return int(np.searchsorted(values, t, side="left"))


def _buckets(conf: np.ndarray, threshold: float, lo: int, nb: int) -> np.ndarray:
    """Histogram bucket (bit pattern - lo) of every kept row, -1 for rows below the threshold (or NaN).

    When every conf is a float16 in [0, 1] (the shards' invariant) comparing bit patterns with `lo` is exact and
    several times faster; anything else (-0.0, NaN, out of range) takes the literal float64 comparison."""
    conf = np.asarray(conf, dtype=np.float16)
    bits = conf.view(np.uint16)
    if not len(bits) or int(bits.max()) <= ONE_BITS:
        b = bits.astype(np.int32) - lo
        b[b < 0] = -1
        return b
    keep = conf.astype(np.float64) >= float(threshold)
    bits = bits.astype(np.int32)
    bits[bits == 0x8000] = 0  # -0.0 == 0.0
    b = np.where(keep, bits - lo, -1)
    if keep.any() and (b[keep].min() < 0 or b[keep].max() >= nb):
        raise ValueError("conf must be a probability in [0, 1]")
    return b


def _conf_summary(conf: np.ndarray) -> tuple[float, np.ndarray]:
    """Sum and 20-bin histogram of all confidences via a count per float16 bit pattern: the same numbers as
    np.histogram over the rows, at the cost of a 65,536-bin bincount instead of a float64 copy of the shard."""
    count = np.bincount(np.asarray(conf, dtype=np.float16).view(np.uint16), minlength=1 << 16)
    values = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float64)
    ok = (count > 0) & ~np.isnan(values)
    hist = np.histogram(values[ok], bins=CONF_BINS, range=(0.0, 1.0), weights=count[ok])[0]
    return float(np.dot(values[ok], count[ok])), np.rint(hist).astype(np.int64)


def _row_order_ok(row: np.ndarray) -> bool:
    return len(row) < 2 or bool((np.diff(row) > 0).all())


def pass1_shard(shard_path: str | os.PathLike, hist_path: str | os.PathLike, num_classes: int, threshold: float,
                truth: np.ndarray | None = None) -> Path:
    """Summarise one shard into a small file: the per-class histogram of kept rows over float16 bit patterns plus
    the counts the stats need. Mappable; the files are what `make_plan` reduces."""
    t = pq.ParquetFile(shard_path).read(columns=["row", "pred", "conf"])
    row = t.column("row").to_numpy()
    pred = t.column("pred").to_numpy().astype(np.int64)
    conf = t.column("conf").to_numpy()
    del t
    n = len(row)
    if not _row_order_ok(row):
        raise ValueError(f"{shard_path}: rows are not strictly ascending")
    if n and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"{shard_path}: pred outside 0 … {num_classes - 1}")
    lo = threshold_bits(threshold)
    nb = max(0, ONE_BITS - lo + 1)
    bucket = _buckets(conf, threshold, lo, nb)
    keep = bucket >= 0
    predicted = np.bincount(pred, minlength=num_classes)
    cells = num_classes * nb
    if cells <= _DENSE_CELLS:  # flat index into the per-class histogram [C, NB]; dropped rows into one extra cell
        dense = np.bincount(np.where(keep, pred * nb + bucket, cells), minlength=cells + 1)[:-1]
        kept = dense.reshape(num_classes, nb).sum(axis=1)
        hist_index = np.flatnonzero(dense)
        hist_count = dense[hist_index].astype(np.uint32)
        del dense
    else:  # e.g. 20k classes at threshold 0: a dense bincount would be GBs; sort the (fewer) kept rows instead
        hist_index, hist_count = np.unique(pred[keep] * nb + bucket[keep], return_counts=True)
        hist_count = hist_count.astype(np.uint32)
        kept = np.bincount(pred[keep], minlength=num_classes)
    conf_sum, conf_hist = _conf_summary(conf)
    arrays: dict[str, Any] = {
        "num_classes": np.int64(num_classes), "lo": np.int64(lo), "nb": np.int64(nb),
        "threshold": np.float64(threshold), "total": np.int64(n),
        "row_min": np.int64(row[0] if n else -1), "row_max": np.int64(row[-1] if n else -1),
        "kept": kept.astype(np.int64), "predicted": predicted.astype(np.int64),
        "conf_sum": np.float64(conf_sum), "conf_hist": conf_hist,
        "has_truth": np.bool_(truth is not None),
    }
    if truth is not None:
        truth = np.asarray(truth)
        if n and row[-1] >= len(truth):
            raise ValueError(f"{shard_path}: truth has {len(truth)} rows, the shard reaches manifest row {row[-1]}")
        tr = truth[row]
        known, right = tr >= 0, tr == pred
        arrays |= {"known": np.bincount(pred[known], minlength=num_classes),
                   "correct": np.bincount(pred[known & right], minlength=num_classes),
                   "known_kept": np.bincount(pred[known & keep], minlength=num_classes),
                   "correct_kept": np.bincount(pred[known & keep & right], minlength=num_classes)}
    # The histogram is stored sparse (sorted flat cell index, count) and uncompressed: at most one cell per kept row
    # is non-zero, and zlib over a dense [C, NB] (7 MB at 1,000 classes, 61 MB at threshold 0) cost more than all
    # the rest of pass 1.
    arrays["hist_index"] = hist_index.astype(np.uint32 if cells < 2**32 else np.int64)
    arrays["hist_count"] = hist_count
    hist_path = Path(hist_path)
    with atomic_path(hist_path) as tmp, open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a name
        np.savez(f, **arrays)
    return hist_path


_SUMMED = ("predicted", "kept", "conf_hist", "known", "correct", "known_kept", "correct_kept")


@dataclass(eq=False)  # numpy fields: == would be ambiguous
class Plan:
    """Everything pass 2 needs, for every shard: JSON-serialisable so a flow can hand it to mapped tasks.

    `cut[c]` is the histogram bucket (float16 bits - lo_bits) of the lowest confidence class c keeps, -1 for a class
    that keeps all its rows; `quota[c]` how many rows at exactly that value fit (smallest row numbers first).
    `kept_prefix[s][c]` / `boundary_prefix[s][c]`: class c's kept / cut-valued rows in shards before s (row S holds
    the totals), which is what lets pass 2 rank a row globally while reading one shard.
    """

    num_classes: int
    threshold: float
    lo_bits: int
    nb: int
    target: int | None
    target_per_class: int
    duplicate: bool
    seed: int
    kept: np.ndarray
    cut: np.ndarray
    quota: np.ndarray
    kept_prefix: np.ndarray
    boundary_prefix: np.ndarray
    shard_rows: np.ndarray
    summary: dict[str, Any]
    _extras: dict[int, np.ndarray] = field(default_factory=dict, init=False, repr=False)  # packed extra_bits

    _ARRAYS = ("kept", "cut", "quota", "kept_prefix", "boundary_prefix", "shard_rows")

    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    def copies_base(self) -> np.ndarray:
        """Copies every selected row of a class gets before the seeded remainder (1 unless duplicated)."""
        k, kept = self.target_per_class, self.kept
        base = np.ones(self.num_classes, dtype=np.int64)
        if self.duplicate:
            small = (kept > 0) & (kept < k)
            base[small] = k // kept[small]
        return base

    def remainder(self) -> np.ndarray:
        k, kept = self.target_per_class, self.kept
        r = np.zeros(self.num_classes, dtype=np.int64)
        if self.duplicate:
            small = (kept > 0) & (kept < k)
            r[small] = k % kept[small]
        return r

    def extra_positions(self, c: int) -> np.ndarray:
        """Sorted positions (j-th kept row of class c in row order) that get one extra copy. Drawn from (seed, c)
        rather than stored, so the plan stays small however many rows are duplicated."""
        r = int(self.remainder()[int(c)])
        if not r:
            return np.empty(0, dtype=np.int64)
        return np.sort(np.random.default_rng([self.seed, int(c)]).choice(int(self.kept[c]), r, replace=False))

    def extra_bits(self, c: int) -> np.ndarray:
        """`extra_positions` as a packed bitmap over class c's kept rows, cached: a sequential run draws each class
        once, and all classes together cost (kept rows of duplicated classes) / 8 bytes, never 8 B per extra."""
        c = int(c)
        bits = self._extras.get(c)
        if bits is None:
            mask = np.zeros(int(self.kept[c]), dtype=bool)
            mask[self.extra_positions(c)] = True
            bits = self._extras[c] = np.packbits(mask)
        return bits

    def to_json(self) -> str:
        d = {k: getattr(self, k) for k in ("num_classes", "threshold", "lo_bits", "nb", "target", "target_per_class",
                                             "duplicate", "seed", "summary")}
        d |= {k: getattr(self, k).tolist() for k in self._ARRAYS}
        d["version"] = _PLAN_VERSION
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        if d.pop("version", None) != _PLAN_VERSION:
            raise ValueError("unknown plan version")
        for k in cls._ARRAYS:
            d[k] = np.asarray(d[k], dtype=np.int64)
        d["kept_prefix"] = d["kept_prefix"].reshape(-1, d["num_classes"])
        d["boundary_prefix"] = d["boundary_prefix"].reshape(-1, d["num_classes"])
        return cls(**d)

    def stats(self, conf_copies_sum: float | None = None) -> dict[str, Any]:
        """The stage's statistics, all derivable from pass 1 except the final mean confidence (pass 2's selection:
        pass the sum over selected rows of conf x copies)."""
        k, kept = self.target_per_class, self.kept
        s = self.summary
        predicted = np.asarray(s["predicted"], dtype=np.int64)
        unique = np.minimum(kept, k)
        final = np.where(kept > k, k, kept * self.copies_base() + self.remainder())
        per_class: dict[int, dict[str, Any]] = {}
        for c in range(self.num_classes):
            per_class[c] = {"predicted": int(predicted[c]), "below_threshold": int(predicted[c] - kept[c]),
                            "kept": int(kept[c]), "capped": int(max(0, kept[c] - k)),
                            "duplicated": int(final[c] - unique[c]), "final": int(final[c]),
                            "unique": int(unique[c])}
        total, n_kept, n_final = int(s["total"]), int(kept.sum()), int(final.sum())
        out: dict[str, Any] = {
            "total": total, "dropped": total - n_kept, "kept": n_kept, "final": n_final,
            "duplicated": int((final - unique).sum()), "capped": int(np.maximum(kept - k, 0).sum()),
            "target_per_class": int(k), "threshold": self.threshold, "kept_fraction": n_kept / max(1, total),
            "mean_confidence_all": float(s["conf_sum"]) / total if total else 0.0,
            "confidence_histogram": [int(v) for v in s["conf_hist"]],
        }
        if conf_copies_sum is not None:
            out["mean_confidence_final"] = float(conf_copies_sum) / n_final if n_final else 0.0
        if s.get("has_truth"):
            known, correct = np.asarray(s["known"]), np.asarray(s["correct"])
            known_kept, correct_kept = np.asarray(s["known_kept"]), np.asarray(s["correct_kept"])
            if known.sum() > 0:  # as the old stage: only when some hidden labels are known
                out["pseudo_label_acc_all"] = float(correct.sum() / known.sum())
                out["pseudo_label_acc_kept"] = float(correct_kept.sum() / known_kept.sum()) if known_kept.sum() else 0.0
            for c in range(self.num_classes):
                per_class[c]["pseudo_label_acc"] = float(correct[c] / known[c]) if known[c] else None
                per_class[c]["pseudo_label_acc_kept"] = (float(correct_kept[c] / known_kept[c]) if known_kept[c]
                                                         else None)
        out["per_class"] = per_class
        return out


def make_plan(hist_paths: Sequence[str | os.PathLike], num_classes: int, threshold: float, target: int | None,
              duplicate: bool, seed: int) -> Plan:
    """Reduce the pass-1 files into the plan, reading them one at a time (twice: the per-shard boundary counts
    depend on the cut-offs, which need the sum over all shards)."""
    if target is not None and (int(target) != target or target < 1):
        raise ValueError(f"target must be None or an integer >= 1, got {target!r}")
    if seed < 0:
        raise ValueError("seed must be >= 0 (numpy seeds are non-negative)")
    lo = threshold_bits(threshold)
    nb = max(0, ONE_BITS - lo + 1)
    total_hist = np.zeros((num_classes, nb), dtype=np.int64)
    summary: dict[str, Any] = {"total": 0, "conf_sum": 0.0}
    shard_rows, has_truth, last_row = [], None, -1
    for p in hist_paths:
        with np.load(p) as z:
            if (int(z["num_classes"]), int(z["lo"]), int(z["nb"])) != (num_classes, lo, nb):
                raise ValueError(f"{p}: pass 1 ran with num_classes={int(z['num_classes'])}, "
                                 f"threshold={float(z['threshold'])}; the plan asks {num_classes}, {threshold}")
            if has_truth is None:
                has_truth = bool(z["has_truth"])
            elif has_truth != bool(z["has_truth"]):
                raise ValueError("some pass-1 files have truth counts and some do not")
            n = int(z["total"])
            if n:
                if int(z["row_min"]) <= last_row:
                    raise ValueError(f"{p}: shard rows start at {int(z['row_min'])}, not after the previous "
                                     f"shard's last row {last_row}: shards must cover ascending, disjoint ranges")
                last_row = int(z["row_max"])
            shard_rows.append(n)
            total_hist.reshape(-1)[z["hist_index"]] += z["hist_count"]  # indices are unique within a shard
            summary["total"] += n
            summary["conf_sum"] += float(z["conf_sum"])
            for k in _SUMMED:
                if k in z.files:
                    summary[k] = summary.get(k, 0) + z[k].astype(np.int64)
    summary["has_truth"] = bool(has_truth)
    for k in _SUMMED:
        summary.setdefault(k, np.zeros(CONF_BINS if k == "conf_hist" else num_classes, dtype=np.int64))
        summary[k] = np.asarray(summary[k]).tolist()

    kept = total_hist.sum(axis=1)
    k = int(target) if target is not None else max(1, int(kept.sum()) // num_classes)
    cut = np.full(num_classes, -1, dtype=np.int64)
    quota = np.zeros(num_classes, dtype=np.int64)
    capped = np.flatnonzero(kept > k)
    for chunk in np.array_split(capped, max(1, len(capped) // 256)):  # chunks: temporaries stay << [C, NB]
        if not len(chunk):
            continue
        from_top = np.cumsum(total_hist[chunk, ::-1], axis=1)  # rows at or above each value, highest value first
        t = np.argmax(from_top >= k, axis=1)
        cut[chunk] = nb - 1 - t
        quota[chunk] = k - (from_top[np.arange(len(chunk)), t] - total_hist[chunk, cut[chunk]])
    del total_hist

    s = len(shard_rows)
    kept_prefix = np.zeros((s + 1, num_classes), dtype=np.int64)
    boundary_prefix = np.zeros((s + 1, num_classes), dtype=np.int64)
    for i, p in enumerate(hist_paths):
        with np.load(p) as z:
            kept_prefix[i + 1] = kept_prefix[i] + z["kept"]
            at_cut = np.zeros(num_classes, dtype=np.int64)
            index, count = z["hist_index"], z["hist_count"]
            if len(capped) and len(index):  # cell (c, cut[c]) of this shard's sparse histogram, 0 if absent
                want = capped * nb + cut[capped]
                j = np.minimum(np.searchsorted(index, want), len(index) - 1)
                at_cut[capped] = np.where(index[j] == want, count[j], 0)
            boundary_prefix[i + 1] = boundary_prefix[i] + at_cut
    return Plan(num_classes=num_classes, threshold=float(threshold), lo_bits=lo, nb=nb, target=target,
                target_per_class=k, duplicate=bool(duplicate), seed=int(seed), kept=kept, cut=cut, quota=quota,
                kept_prefix=kept_prefix, boundary_prefix=boundary_prefix,
                shard_rows=np.asarray(shard_rows, dtype=np.int64), summary=summary)


def pass2_shard(shard_path: str | os.PathLike, plan: Plan, shard_index: int, batch_rows: int = 1 << 17) -> pa.Table:
    """The selected rows of one shard with their copies, in row order. Needs only this shard and the plan, so
    shards can run in any order or in parallel; it re-checks the shard against pass 1's counts, because a shard
    rewritten in between would silently break exactness.

    Selecting needs only pred and conf; all columns are then streamed in batches keeping only the selected rows, so
    memory is the selection plus one batch, not the whole decoded shard (Arrow's whole-file read of list columns
    peaks at several times the table's size)."""
    s = int(shard_index)
    pf = pq.ParquetFile(shard_path)
    head = pf.read(columns=["pred", "conf"])
    n = head.num_rows
    if n != plan.shard_rows[s]:
        raise RuntimeError(f"{shard_path}: {n} rows, pass 1 saw {plan.shard_rows[s]}: the shard changed")
    c_n = plan.num_classes
    pred = head.column("pred").to_numpy()  # its small uint type: numpy radix-sorts 8/16-bit keys
    bucket = _buckets(head.column("conf").to_numpy(), plan.threshold, plan.lo_bits, plan.nb)
    del head
    kidx = np.flatnonzero(bucket >= 0)
    kp = pred[kidx]
    order = np.argsort(kp, kind="stable")  # kept rows grouped by class, each group still in row order
    sidx, sp = kidx[order], kp[order].astype(np.int64)
    counts = np.bincount(sp, minlength=c_n)
    if not np.array_equal(counts, plan.kept_prefix[s + 1] - plan.kept_prefix[s]):
        raise RuntimeError(f"{shard_path}: kept rows per class differ from pass 1: the shard changed")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    sb = bucket[sidx]
    cut = plan.cut[sp]
    sel = sb > cut  # a class that keeps all its rows has cut -1
    bnd = np.flatnonzero(sb == cut)  # rows at exactly the cut-off value: the first `quota` by row order survive
    bc = sp[bnd]
    bcounts = np.bincount(bc, minlength=c_n)
    if not np.array_equal(bcounts, plan.boundary_prefix[s + 1] - plan.boundary_prefix[s]):
        raise RuntimeError(f"{shard_path}: rows at the cut-off differ from pass 1: the shard changed")
    if len(bnd):
        bstarts = np.concatenate([[0], np.cumsum(bcounts)[:-1]])
        rank = plan.boundary_prefix[s][bc] + np.arange(len(bnd)) - bstarts[bc]
        sel[bnd] = rank < plan.quota[bc]
    copies = plan.copies_base()[sp].astype(np.uint32)
    rem = plan.remainder()
    for c in np.flatnonzero((rem > 0) & (counts > 0)):  # this shard's slice of the class's extra-copy bitmap
        first, cnt = int(plan.kept_prefix[s][c]), int(counts[c])
        lo_byte = first // 8
        bits = np.unpackbits(plan.extra_bits(c)[lo_byte:(first + cnt + 7) // 8])
        copies[starts[c]:starts[c] + cnt] += bits[first - 8 * lo_byte:first - 8 * lo_byte + cnt]
    full_copies = np.zeros(n, dtype=np.uint32)  # 0 = not selected
    full_copies[sidx[sel]] = copies[sel]
    idx = np.flatnonzero(full_copies)  # ascending = row order
    del pred, bucket, kidx, kp, order, sidx, sp, sb, cut, sel, copies
    parts, offset = [], 0
    for b in pf.iter_batches(batch_size=batch_rows, columns=list(LABEL_COLUMNS)):
        lo, hi = np.searchsorted(idx, [offset, offset + b.num_rows])
        parts.append(b.take(pa.array(idx[lo:hi] - offset)))
        offset += b.num_rows
    out = pa.Table.from_batches(parts, schema=pf.schema_arrow.remove_metadata()) if parts else \
        pf.schema_arrow.remove_metadata().empty_table()
    return out.append_column(pa.field("copies", pa.uint32(), nullable=False), pa.array(full_copies[idx]))


def plan_shards(shard_paths: list[Path], workdir: Path, num_classes: int, threshold: float, target: int | None = None,
                duplicate: bool = True, seed: int = 0, truth: np.ndarray | None = None, workers: int = 1) -> Plan:
    """Pass 1 over every shard (`workers` at once, their files in `workdir`) and the plan made from it: what
    filter-balance selects by, and what a labeler's statistics count."""
    def one(i: int) -> Path:
        return pass1_shard(shard_paths[i], Path(workdir) / f"pass1-{i:05d}.npz", num_classes, threshold, truth)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        hist_paths = list(pool.map(one, range(len(shard_paths))))
    return make_plan(hist_paths, num_classes, threshold, target, duplicate, seed)


def filter_balance(shard_paths: Sequence[str | os.PathLike], out_path: str | os.PathLike, *, num_classes: int,
                   threshold: float, target: int | None = None, duplicate: bool = True, seed: int = 0,
                   truth: np.ndarray | None = None, workdir: str | os.PathLike | None = None,
                   workers: int | None = None) -> dict[str, Any]:
    """Pass 1 over all shards, the plan, pass 2 streamed into one balanced Parquet (atomic), and the stats.

    `workdir` keeps the pass-1 files and plan.json (default: a temporary folder next to `out_path`, removed).
    `workers` shards are processed at once (default min(4, CPUs)): Arrow's reads and numpy release the GIL, so
    threads overlap pass 2's reading and selecting with the single writer. Memory is then `workers` shards'
    selections instead of one; `workers=1` is the strictly one-shard-at-a-time run."""
    shard_paths = [Path(p) for p in shard_paths]
    if not shard_paths:
        raise ValueError("no label shards")
    workers = max(1, int(workers or min(4, os.cpu_count() or 1)))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = None
    if workdir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix=".filter-balance-", dir=out_path.parent)
        workdir = tmpdir.name
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        plan = plan_shards(shard_paths, workdir, num_classes, threshold, target, duplicate, seed, truth, workers)
        (workdir / "plan.json").write_text(plan.to_json())
        with ThreadPoolExecutor(workers) as pool:
            for c in np.flatnonzero(plan.remainder()):
                plan.extra_bits(c)  # draw once, before the threads share the plan
            meta = read_shard_metadata(shard_paths[0])
            meta["balance"] = json.dumps({"threshold": plan.threshold, "target": target,
                                          "duplicate": plan.duplicate, "seed": plan.seed,
                                          "target_per_class": plan.target_per_class})
            top_k = pq.read_schema(shard_paths[0]).field("classes").type.list_size
            schema = label_schema(num_classes, top_k, copies=True).with_metadata(meta)
            conf_copies, final = 0.0, 0
            todo = iter(range(len(shard_paths)))
            pending: deque[Future] = deque()

            def submit_next() -> None:  # keep at most `workers` shards' selections in flight
                i = next(todo, None)
                if i is not None:
                    pending.append(pool.submit(pass2_shard, shard_paths[i], plan, i))

            for _ in range(workers):
                submit_next()
            with atomic_path(out_path) as tmp:
                with pq.ParquetWriter(tmp, schema, **_parquet_options(schema)) as writer:
                    while pending:
                        part = pending.popleft().result()
                        submit_next()
                        copies = part.column("copies").to_numpy()
                        conf_copies += float(np.dot(part.column("conf").to_numpy().astype(np.float64), copies))
                        final += int(copies.sum(dtype=np.int64))
                        writer.write_table(pa.Table.from_arrays(part.columns, schema=schema))
                        del part
                stats = plan.stats(conf_copies)
                if final != stats["final"]:  # only if the plan and pass 2 disagree: then publish nothing
                    raise RuntimeError(f"pass 2 wrote {final} copies, the plan promised {stats['final']}")
        return stats
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()


def reference_balance(row, pred, conf, num_classes: int, threshold: float, target: int | None, duplicate: bool,
                      seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rule, written as plainly as possible over all rows in memory: the oracle the streaming version must
    match exactly. Returns (selected manifest rows ascending, their copies)."""
    row = np.asarray(row, dtype=np.int64)
    pred = np.asarray(pred).astype(np.int64)
    conf64 = np.asarray(conf, dtype=np.float16).astype(np.float64)
    keep = conf64 >= float(threshold)
    kept_total = int(keep.sum())
    k = target if target is not None else max(1, kept_total // num_classes)
    out_rows, out_copies = [], []
    for c in range(num_classes):
        idx = np.flatnonzero(keep & (pred == c))
        idx = idx[np.argsort(row[idx])]  # the kept rows of class c in ascending row order
        n = len(idx)
        copies = np.ones(n, dtype=np.int64)
        if n > k:
            best = np.lexsort((row[idx], -conf64[idx]))[:k]  # largest conf first, then the smaller row
            idx, copies = idx[best], copies[:k]
        elif duplicate and 0 < n < k:
            copies[:] = k // n
            r = k % n
            if r:
                copies[np.random.default_rng([seed, c]).choice(n, r, replace=False)] += 1
        out_rows.append(row[idx])
        out_copies.append(copies)
    rows = np.concatenate(out_rows) if out_rows else np.empty(0, dtype=np.int64)
    copies = np.concatenate(out_copies) if out_copies else np.empty(0, dtype=np.int64)
    order = np.argsort(rows)
    return rows[order], copies[order].astype(np.uint32)


# ------------------------------------------------------------------------------------------- targets for training

@dataclass(eq=False)
class Targets:
    """The balanced set's sparse soft targets: N x k, never N x num_classes."""

    rows: np.ndarray  # int64 [N] manifest rows
    copies: np.ndarray  # uint32 [N]
    classes: np.ndarray  # uint [N, k]
    probs: np.ndarray  # float16 [N, k]
    num_classes: int
    _cum: np.ndarray | None = field(default=None, init=False, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.copies.nbytes + self.classes.nbytes + self.probs.nbytes

    @property
    def cum_copies(self) -> np.ndarray:
        if self._cum is None:
            self._cum = np.cumsum(self.copies, dtype=np.int64)
        return self._cum

    @property
    def stream_length(self) -> int:
        """Length of the duplicated stream the student iterates: sum of copies."""
        return int(self.cum_copies[-1]) if len(self.rows) else 0

    def stream_index(self, positions) -> np.ndarray:
        return stream_to_index(self.cum_copies, positions)


def stream_to_index(cum_copies: np.ndarray, positions) -> np.ndarray:
    """Index (into the Targets arrays) of each position 0 … sum(copies)-1 of the duplicated stream: duplicates are
    never materialised, a sampler permutes positions and maps them here."""
    pos = np.asarray(positions, dtype=np.int64)
    n = int(cum_copies[-1]) if len(cum_copies) else 0
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise IndexError(f"stream position out of range 0 … {n - 1}")
    return np.searchsorted(cum_copies, pos, side="right")


def read_targets(balanced_path: str | os.PathLike, batch_rows: int = 1 << 20) -> Targets:
    """Fill preallocated arrays batch by batch, so peak memory is the result plus one batch, not twice the result."""
    pf = pq.ParquetFile(balanced_path)
    n = pf.metadata.num_rows
    meta = read_shard_metadata(balanced_path)
    arrow = pf.schema_arrow
    k = arrow.field("classes").type.list_size
    num_classes = int(meta["num_classes"])
    rows = np.empty(n, dtype=np.int64)
    copies = np.empty(n, dtype=np.uint32)
    classes = np.empty((n, k), dtype=class_dtype(num_classes))
    probs = np.empty((n, k), dtype=np.float16)
    i = 0
    for b in pf.iter_batches(batch_size=batch_rows, columns=["row", "copies", "classes", "probs"]):
        m = b.num_rows
        rows[i:i + m] = b.column("row").to_numpy()
        copies[i:i + m] = b.column("copies").to_numpy()
        classes[i:i + m] = b.column("classes").flatten().to_numpy().reshape(m, k)
        probs[i:i + m] = b.column("probs").flatten().to_numpy().reshape(m, k)
        i += m
    return Targets(rows=rows, copies=copies, classes=classes, probs=probs, num_classes=num_classes)


def densify(classes, probs, num_classes: int, device=None):
    """One batch of dense float32 targets [B, num_classes] for the loss. The compact arrays (uint/float16) cross to
    the device and are scattered there, so host memory and the transfer stay B x k."""
    import torch

    cls = torch.as_tensor(np.asarray(classes).astype(np.int32, copy=False) if not torch.is_tensor(classes)
                          else classes).to(device)
    p = torch.as_tensor(probs).to(device)
    if cls.ndim == 1:
        cls, p = cls[:, None], p[:, None]
    out = torch.zeros((cls.shape[0], num_classes), dtype=torch.float32, device=cls.device)
    return out.scatter_add_(1, cls.long(), p.float())
