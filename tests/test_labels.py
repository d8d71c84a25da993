"""Compact label shards and the exact streaming filter + balance (nst/labels.py).

The streaming two-pass version must select exactly what the plain in-memory oracle selects, on tables built to hit
the edge cases (ties, empty and tiny classes, conf 1.0, uneven and empty shards), so most tests compare the two.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nst import labels as L

F16 = np.float16


def _write_hard_shards(folder, row, pred, conf, num_classes, cuts):
    """Shards of hard labels (k = 1) split at `cuts`; empty shards allowed."""
    bounds = [0, *cuts, len(row)]
    paths = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        paths.append(L.write_label_shard(folder / f"shard-{i:03d}.parquet", row[a:b], pred[a:b], conf[a:b],
                                         pred[a:b], np.ones(b - a, np.float32), num_classes, {"mode": "hard"}))
    return paths


def _balanced(path):
    t = pq.read_table(path, columns=["row", "copies"])
    return t.column("row").to_numpy(), t.column("copies").to_numpy()


# ----------------------------------------------------------------------------------------------- exact selection

def test_hand_made_example(tmp_path):
    # class 0: six kept rows, K=5 -> the two 0.9s, the 0.7, then two of the three 0.5 ties by smaller row (1, 5:
    #          the tie spans three shards, row 9 loses); row 3 is below the threshold.
    # class 1: rows 4, 8, 10 kept (0.3 rounds UP to float16 0.30005; row 11's 0.2998 is below 0.3): K=5 -> one copy
    #          each + 2 extra, at positions default_rng([7, 1]).choice(3, 2) = [1, 2] -> rows 8 and 10.
    # class 2: its only row is below the threshold.
    row = np.arange(12)
    pred = np.array([0, 0, 0, 0, 1, 0, 2, 0, 1, 0, 1, 1])
    conf = np.array([.9, .5, .9, .2, .6, .5, .25, .7, .4, .5, .3, 0], dtype=F16)
    conf[11] = np.uint16(0x34CC).view(F16)  # 0.2998, the float16 just below 0.3
    paths = _write_hard_shards(tmp_path, row, pred, conf, 3, cuts=[5, 9])
    stats = L.filter_balance(paths, tmp_path / "out.parquet", num_classes=3, threshold=0.3, target=5,
                             duplicate=True, seed=7)
    rows, copies = _balanced(tmp_path / "out.parquet")
    assert rows.tolist() == [0, 1, 2, 4, 5, 7, 8, 10]
    assert copies.tolist() == [1, 1, 1, 1, 1, 1, 2, 2]
    assert {k: stats[k] for k in ("total", "dropped", "kept", "final", "capped", "duplicated", "target_per_class")} \
        == {"total": 12, "dropped": 3, "kept": 9, "final": 10, "capped": 1, "duplicated": 2, "target_per_class": 5}
    assert stats["per_class"][0] == {"predicted": 7, "below_threshold": 1, "kept": 6, "capped": 1, "duplicated": 0,
                                     "final": 5, "unique": 5}
    assert stats["per_class"][1] == {"predicted": 4, "below_threshold": 1, "kept": 3, "capped": 0, "duplicated": 2,
                                     "final": 5, "unique": 3}
    assert stats["per_class"][2]["final"] == 0 and stats["per_class"][2]["below_threshold"] == 1
    c = conf.astype(np.float64)
    assert stats["mean_confidence_final"] == pytest.approx((c[[0, 1, 2, 4, 5, 7]].sum() + 2 * c[[8, 10]].sum()) / 10)
    assert stats["mean_confidence_all"] == pytest.approx(c.mean())
    assert sum(stats["confidence_histogram"]) == 12 and stats["confidence_histogram"][-3] == 2  # the two 0.9s
    assert L.reference_balance(row, pred, conf, 3, 0.3, 5, True, 7)[0].tolist() == rows.tolist()


def test_threshold_is_compared_in_float64_not_float16(tmp_path):
    # float16(0.2999) == 0.2998: numpy's float16 comparison would keep a conf of 0.2998; the rule drops it
    assert L.threshold_bits(0.2999) == 0x34CD
    assert L.threshold_bits(0.3) == 0x34CD and L.threshold_bits(0.300048828125) == 0x34CD
    assert L.threshold_bits(0.30004883) == 0x34CE  # a hair above float16's 0.300048828125
    assert L.threshold_bits(0) == 0 and L.threshold_bits(-1) == 0 and L.threshold_bits(1.0) == L.ONE_BITS
    conf = np.array([np.uint16(0x34CC).view(F16), np.uint16(0x34CD).view(F16)])
    rows, _ = L.reference_balance([0, 1], [0, 0], conf, 1, 0.2999, None, False, 0)
    assert rows.tolist() == [1]
    paths = _write_hard_shards(tmp_path, np.arange(2), np.zeros(2, int), conf, 1, cuts=[1])
    L.filter_balance(paths, tmp_path / "out.parquet", num_classes=1, threshold=0.2999)
    assert _balanced(tmp_path / "out.parquet")[0].tolist() == [1]
    stats = L.filter_balance(paths, tmp_path / "none.parquet", num_classes=1, threshold=1.5)  # nothing can pass
    assert stats["kept"] == 0 and stats["final"] == 0 and pq.read_metadata(tmp_path / "none.parquet").num_rows == 0


def _random_case(rng):
    c = int(rng.integers(1, 9))
    n = int(rng.integers(0, 300))
    row = np.sort(rng.choice(3 * n + 5, n, replace=False)).astype(np.int64)  # gaps: rows are not positions
    weights = rng.dirichlet(np.full(c, 0.4))  # skewed: tiny classes
    if c > 2:
        weights[rng.integers(c)] = 0  # and an empty one
        weights /= weights.sum()
    pred = rng.choice(c, n, p=weights)
    if rng.random() < 0.5:  # a handful of values: lots of ties, some exactly at the threshold's neighbours
        pool = np.array([0.0, 0.1, np.uint16(0x34CC).view(F16), 0.3, 0.5, 0.75, 1.0], dtype=F16)
        conf = rng.choice(pool, n)
    else:
        conf = rng.random(n).astype(F16)
    if n and rng.random() < 0.5:
        conf[pred == pred[0]] = 1.0  # a class whose rows all have conf 1.0
    threshold = float(rng.choice([0.0, 0.3, 0.3, 0.2999, 0.5, 1.0]))
    target = None if rng.random() < 0.4 else int(rng.integers(1, max(2, n // 2)))
    if target is not None and rng.random() < 0.3:
        target = n + 10  # larger than any class
    s = int(rng.integers(1, 6))
    cuts = sorted(rng.integers(0, n + 1, s - 1).tolist())  # uneven, possibly empty shards
    return dict(c=c, row=row, pred=pred, conf=conf, threshold=threshold, target=target,
                duplicate=bool(rng.random() < 0.6), seed=int(rng.integers(0, 1000)), cuts=cuts)


@pytest.mark.parametrize("block", range(4))
def test_streaming_equals_reference_on_random_tables(tmp_path, block):
    rng = np.random.default_rng(1000 + block)
    for i in range(30):
        case = _random_case(rng)
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        paths = _write_hard_shards(folder, case["row"], case["pred"], case["conf"], case["c"], case["cuts"])
        args = dict(num_classes=case["c"], threshold=case["threshold"], target=case["target"],
                    duplicate=case["duplicate"], seed=case["seed"])
        stats = L.filter_balance(paths, folder / "out.parquet", workdir=folder / "work", workers=1 + i % 3, **args)
        rows, copies = _balanced(folder / "out.parquet")
        ref_rows, ref_copies = L.reference_balance(case["row"], case["pred"], case["conf"], case["c"],
                                                   case["threshold"], case["target"], case["duplicate"],
                                                   case["seed"])
        assert np.array_equal(rows, ref_rows), case
        assert np.array_equal(copies, ref_copies), case
        assert stats["final"] == int(copies.sum()) and stats["total"] == len(case["row"])
        sel_pred = case["pred"][np.searchsorted(case["row"], rows)]
        per_final = np.bincount(sel_pred, weights=copies, minlength=case["c"])
        assert [stats["per_class"][c]["final"] for c in range(case["c"])] == per_final.astype(int).tolist()
        assert [stats["per_class"][c]["unique"] for c in range(case["c"])] == \
            np.bincount(sel_pred, minlength=case["c"]).tolist()


@pytest.mark.parametrize("num_classes,threshold", [(1100, 0.0), (70_000, 0.3)])
def test_many_classes_take_the_sparse_histogram_path(tmp_path, num_classes, threshold):
    # [C, NB] above 2^24 cells: pass 1 counts by sorting instead of a dense bincount; 70k classes need uint32
    assert num_classes * (L.ONE_BITS - L.threshold_bits(threshold) + 1) > L._DENSE_CELLS
    rng = np.random.default_rng(num_classes)
    n = 3000
    row = np.arange(n) + 7
    pred = np.minimum(rng.geometric(0.01, n) - 1, num_classes - 1)  # a few big classes, a long tail of tiny ones
    pred[:5] = num_classes - 1
    conf = rng.choice(np.array([0.1, 0.3, 0.5, 0.9, 1.0], dtype=F16), n)
    paths = _write_hard_shards(tmp_path, row, pred, conf, num_classes, cuts=[1000, 2000])
    assert pq.read_schema(paths[0]).field("pred").type == pa.from_numpy_dtype(L.class_dtype(num_classes))
    L.filter_balance(paths, tmp_path / "out.parquet", num_classes=num_classes, threshold=threshold, target=4,
                     seed=1)
    rows, copies = _balanced(tmp_path / "out.parquet")
    ref_rows, ref_copies = L.reference_balance(row, pred, conf, num_classes, threshold, 4, True, 1)
    assert np.array_equal(rows, ref_rows) and np.array_equal(copies, ref_copies)


def test_passes_are_mappable_in_any_order_with_a_json_plan(tmp_path):
    rng = np.random.default_rng(5)
    n, c = 2000, 7
    row = np.arange(n) * 2
    pred = rng.choice(c, n, p=[.3, .3, .2, .1, .05, .04, .01])  # big classes get capped, small ones duplicated
    conf = rng.choice(np.array([0.2, 0.4, 0.6, 0.8, 1.0], dtype=F16), n)
    paths = _write_hard_shards(tmp_path, row, pred, conf, c, cuts=[100, 900, 1000, 1500])
    hists = [L.pass1_shard(p, tmp_path / f"h{i}.npz", c, 0.3) for i, p in enumerate(paths)]
    plan = L.Plan.from_json(L.make_plan(hists, c, 0.3, 150, True, 3).to_json())
    parts = {i: L.pass2_shard(paths[i], plan, i) for i in reversed(range(len(paths)))}  # any order, fresh plan
    rows = np.concatenate([parts[i].column("row").to_numpy() for i in range(len(paths))])
    copies = np.concatenate([parts[i].column("copies").to_numpy() for i in range(len(paths))])
    ref_rows, ref_copies = L.reference_balance(row, pred, conf, c, 0.3, 150, True, 3)
    assert np.array_equal(rows, ref_rows) and np.array_equal(copies, ref_copies)
    assert (plan.cut >= 0).any() and (plan.remainder() > 0).any()  # both capping and seeded extras happened


def test_truth_gives_pseudo_label_accuracy(tmp_path):
    rng = np.random.default_rng(2)
    n, c = 500, 4
    row = np.arange(n)
    pred = rng.integers(0, c, n)
    conf = rng.random(n).astype(F16)
    truth = np.where(rng.random(n) < 0.7, pred, (pred + 1) % c)
    truth[rng.random(n) < 0.2] = -1  # unknown
    paths = _write_hard_shards(tmp_path, row, pred, conf, c, cuts=[200])
    stats = L.filter_balance(paths, tmp_path / "out.parquet", num_classes=c, threshold=0.3, truth=truth)
    known = truth >= 0
    kept = known & (conf.astype(np.float64) >= 0.3)
    assert stats["pseudo_label_acc_all"] == pytest.approx((pred[known] == truth[known]).mean())
    assert stats["pseudo_label_acc_kept"] == pytest.approx((pred[kept] == truth[kept]).mean())
    m = known & (pred == 2)
    assert stats["per_class"][2]["pseudo_label_acc"] == pytest.approx((truth[m] == 2).mean())
    assert "pseudo_label_acc_all" not in L.filter_balance(paths, tmp_path / "o2.parquet", num_classes=c,
                                                          threshold=0.3)


def test_a_shard_changed_after_pass1_is_refused(tmp_path):
    row, pred = np.arange(100), np.arange(100) % 3
    conf = np.full(100, 0.9, dtype=F16)
    paths = _write_hard_shards(tmp_path, row, pred, conf, 3, cuts=[50])
    hists = [L.pass1_shard(p, tmp_path / f"h{i}.npz", 3, 0.3) for i, p in enumerate(paths)]
    plan = L.make_plan(hists, 3, 0.3, 10, False, 0)
    conf[60] = 0.1
    _write_hard_shards(tmp_path, row, pred, conf, 3, cuts=[50])
    with pytest.raises(RuntimeError, match="changed"):
        L.pass2_shard(paths[1], plan, 1)


def test_shards_must_cover_ascending_disjoint_rows(tmp_path):
    a = L.write_label_shard(tmp_path / "a.parquet", [10, 11], [0, 1], [.5, .5], [0, 1], [1, 1], 2)
    b = L.write_label_shard(tmp_path / "b.parquet", [5, 6], [0, 1], [.5, .5], [0, 1], [1, 1], 2)
    with pytest.raises(ValueError, match="ascending"):
        L.filter_balance([a, b], tmp_path / "out.parquet", num_classes=2, threshold=0.3)
    with pytest.raises(ValueError, match="ascending"):
        L.write_label_shard(tmp_path / "c.parquet", [3, 2], [0, 1], [.5, .5], [0, 1], [1, 1], 2)
    assert not (tmp_path / "out.parquet").exists() and not (tmp_path / "c.parquet").exists()


def test_foreign_shards_with_nan_or_negative_zero_follow_the_rule(tmp_path):
    # write_label_shard refuses such conf; a shard from another writer may still hold them
    def shard(name, conf):
        n = len(conf)
        schema = L.label_schema(2, 1)
        t = pa.Table.from_arrays([pa.array(np.arange(n, dtype=np.int64)), pa.array(np.zeros(n, np.uint8)),
                                  pa.array(np.array(conf, dtype=F16)),
                                  pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n, np.uint8)), 1),
                                  pa.FixedSizeListArray.from_arrays(pa.array(np.ones(n, F16)), 1)], schema=schema)
        pq.write_table(t, tmp_path / name)
        return tmp_path / name

    p = shard("a.parquet", [-0.0, np.nan, 0.5, 0.0])
    stats = L.filter_balance([p], tmp_path / "out.parquet", num_classes=2, threshold=0.0, target=3, duplicate=False)
    assert _balanced(tmp_path / "out.parquet")[0].tolist() == [0, 2, 3]  # -0.0 >= 0 holds, NaN >= 0 does not
    assert stats["dropped"] == 1 and stats["per_class"][0]["kept"] == 3
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L.filter_balance([shard("b.parquet", [0.5, 1.5])], tmp_path / "o2.parquet", num_classes=2, threshold=0.3)


# ---------------------------------------------------------------------------------------------------- the format

def test_class_dtype():
    assert L.class_dtype(1) == np.uint8 and L.class_dtype(256) == np.uint8
    assert L.class_dtype(257) == np.uint16 and L.class_dtype(65536) == np.uint16
    assert L.class_dtype(65537) == np.uint32
    with pytest.raises(ValueError):
        L.class_dtype(0)


def test_written_shard_schema_size_and_probs(tmp_path):
    n, c, k = 100_000, 1000, 5
    a = L.synthetic_labels(n, c, k, seed=0)
    path = L.write_label_shard(tmp_path / "s.parquet", a["row"], a["pred"], a["conf"], a["classes"], a["probs"], c,
                               {"fingerprint": "abc", "mode": "soft", "classes": json.dumps(["x"] * 3)})
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temp file left behind
    t = pq.read_table(path)
    assert t.schema.names == ["row", "pred", "conf", "classes", "probs"]
    assert t.schema.field("row").type == pa.int64() and t.schema.field("pred").type == pa.uint16()
    assert t.schema.field("conf").type == pa.float16()
    assert t.schema.field("classes").type == pa.list_(pa.field("element", pa.uint16(), nullable=False), k)
    assert t.schema.field("probs").type == pa.list_(pa.field("element", pa.float16(), nullable=False), k)
    meta = L.read_shard_metadata(path)
    assert meta == {"fingerprint": "abc", "mode": "soft", "classes": '["x", "x", "x"]', "num_classes": "1000",
                    "top_k": "5"}
    col = pq.ParquetFile(path).metadata.row_group(0).column(0)
    assert col.path_in_schema == "row" and "DELTA_BINARY_PACKED" in col.encodings and col.compression == "ZSTD"
    probs = t.column("probs").combine_chunks().flatten().to_numpy().reshape(n, k)
    assert np.abs(probs.astype(np.float64).sum(axis=1) - 1).max() <= 1e-3
    assert np.array_equal(t.column("classes").combine_chunks().flatten().to_numpy().reshape(n, k), a["classes"])
    assert np.array_equal(t.column("conf").to_numpy(), a["conf"])
    per_image = path.stat().st_size / n
    assert per_image <= 40, f"{per_image:.1f} B/image"


def test_quantize_probs_rows_sum_to_one():
    rng = np.random.default_rng(0)
    for k in (1, 2, 5, 10):
        p = rng.dirichlet(np.full(k + 20, 0.05), 20_000)[:, :k].astype(np.float32)  # top-k mass far from 1
        p[:, 0] += 1e-3
        q = L.quantize_probs(p)
        assert q.dtype == np.float16 and q.shape == p.shape
        assert np.abs(q.astype(np.float64).sum(axis=1) - 1).max() <= 1e-3
    with pytest.raises(ValueError):
        L.quantize_probs(np.zeros((2, 3), np.float32))


def test_bad_inputs_are_refused_and_leave_no_file_metadata_follows_the_data(tmp_path):
    with pytest.raises(ValueError, match="class outside"):
        L.write_label_shard(tmp_path / "a.parquet", [0, 1], [0, 3], [.5, .5], [0, 3], [1, 1], 3)
    with pytest.raises(ValueError, match="conf"):
        L.write_label_shard(tmp_path / "a.parquet", [0, 1], [0, 1], [.5, 1.5], [0, 1], [1, 1], 3)
    assert list(tmp_path.iterdir()) == []
    # the columns' own num_classes/top_k win over a caller's configured ones (hard labels: k = 1 whatever top_k)
    p = L.write_label_shard(tmp_path / "h.parquet", [0], [0], [.5], [0], [1], 3, {"top_k": "5", "mode": "hard"})
    assert L.read_shard_metadata(p) == {"top_k": "1", "mode": "hard", "num_classes": "3"}


# ---------------------------------------------------------------------------------------------------- training

def test_read_targets_and_stream_positions(tmp_path):
    n, c, k = 3000, 50, 3
    a = L.synthetic_labels(n, c, k, seed=1)
    p = L.write_label_shard(tmp_path / "s.parquet", a["row"], a["pred"], a["conf"], a["classes"], a["probs"], c)
    L.filter_balance([p], tmp_path / "b.parquet", num_classes=c, threshold=0.3, target=40, seed=1)
    tg = L.read_targets(tmp_path / "b.parquet", batch_rows=256)  # several batches
    t = pq.read_table(tmp_path / "b.parquet")
    assert tg.rows.dtype == np.int64 and tg.copies.dtype == np.uint32
    assert tg.classes.dtype == np.uint8 and tg.classes.shape == (len(t), k) and tg.probs.dtype == np.float16
    assert np.array_equal(tg.rows, t.column("row").to_numpy())
    assert np.array_equal(tg.classes, t.column("classes").combine_chunks().flatten().to_numpy().reshape(-1, k))
    assert tg.stream_length == c * 40
    expected = np.repeat(np.arange(len(tg)), tg.copies)  # the duplicated stream, materialised (small here)
    assert np.array_equal(tg.stream_index(np.arange(tg.stream_length)), expected)
    assert L.stream_to_index(np.cumsum([2, 1, 3]), np.arange(6)).tolist() == [0, 0, 1, 2, 2, 2]
    with pytest.raises(IndexError):
        tg.stream_index([tg.stream_length])


def test_densify_equals_a_dense_reference():
    rng = np.random.default_rng(3)
    b, c, k = 64, 37, 4
    classes = np.stack([rng.choice(c, k, replace=False) for _ in range(b)]).astype(np.uint8)
    probs = L.quantize_probs(rng.dirichlet(np.ones(k), b))
    dense = np.zeros((b, c), np.float32)
    for i in range(b):
        for j in range(k):
            dense[i, classes[i, j]] += np.float32(probs[i, j])
    out = L.densify(classes, probs, c)
    assert out.dtype == torch.float32 and out.shape == (b, c)
    assert torch.equal(out, torch.from_numpy(dense))
    assert torch.equal(L.densify(torch.from_numpy(classes[:, :1].astype(np.int64)), torch.ones(b, 1), c,
                                 device="cpu").argmax(1), torch.from_numpy(classes[:, 0].astype(np.int64)))
