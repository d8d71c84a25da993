"""Filter + balance over compact label shards: the streaming two-pass `nst.labels.filter_balance` vs. plain pandas.

Generates synthetic label shards on disk (top-k classes, Dirichlet-like probabilities, the compact format), then
runs each implementation in a fresh child process (peak RSS is the child's own `ru_maxrss`, so one cannot inflate
the other's), checks that both selected the same rows with the same copies, and prints time, peak RSS, the
pandas/ours ratios against the goals (at the default 10M rows: <= 15 s, <= 2 GB, >= 5x), the shards' bytes per
image vs. dense float32, and the memory of sparse training targets vs. dense N x classes float32.

    python benchmarks/bench_labels.py                               # 10M rows, 1,000 classes, top-5, 1M-row shards
    python benchmarks/bench_labels.py --rows 1000000                # a quick check
    python benchmarks/bench_labels.py --rows 100000000 --skip-pandas --workdir /data/bench-labels

The pandas baseline is what one would write first: read every shard (all columns, since the output needs the soft
labels) into one DataFrame, sort_values + groupby.cumcount, the same seeded duplicates, to_parquet.
With --workdir the shards are kept and reused by a later run with the same sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_TIME_S, GOAL_RSS_MB, GOAL_RATIO = 15.0, 2048.0, 5.0


def generate(shard_dir: Path, rows: int, classes: int, top_k: int, shard_rows: int, seed: int) -> list[Path]:
    from nst.labels import synthetic_labels, write_label_shard

    spec = {"rows": rows, "classes": classes, "top_k": top_k, "shard_rows": shard_rows, "seed": seed, "version": 1}
    spec_file = shard_dir / "spec.json"
    starts = list(range(0, rows, shard_rows))
    paths = [shard_dir / f"labels-{i:05d}.parquet" for i in range(len(starts))]
    if spec_file.is_file() and json.loads(spec_file.read_text()) == spec and all(p.is_file() for p in paths):
        print(f"reusing {len(paths)} shards in {shard_dir}")
        return paths
    shutil.rmtree(shard_dir, ignore_errors=True)
    shard_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    for i, (start, path) in enumerate(zip(starts, paths)):
        a = synthetic_labels(min(shard_rows, rows - start), classes, top_k, seed=seed + i, row_start=start)
        write_label_shard(path, a["row"], a["pred"], a["conf"], a["classes"], a["probs"], classes,
                          {"mode": "soft", "model": "synthetic", "fingerprint": json.dumps(spec)})
    spec_file.write_text(json.dumps(spec))
    print(f"generated {rows:,} rows in {len(paths)} shards in {time.perf_counter() - t0:.1f} s")
    return paths


WORKDIR_MARKER = ".nst-bench-labels"


def claim_workdir(work: Path) -> None:
    """The benchmark deletes and rewrites folders inside --workdir, so it only works in a new or empty folder, or
    one it marked as its own on an earlier run: a mistyped --workdir never reaches a user's files."""
    if work.exists() and any(work.iterdir()) and not (work / WORKDIR_MARKER).is_file():
        raise SystemExit(f"error: --workdir {work}: not empty and not made by this benchmark (no {WORKDIR_MARKER}); "
                         "give a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORKDIR_MARKER).touch()

# ---------------------------------------------------------------------------------------------- the two children

def run_ours(cfg: dict) -> dict:
    from nst.labels import filter_balance

    t0 = time.perf_counter()
    stats = filter_balance(cfg["shards"], cfg["out"], num_classes=cfg["classes"], threshold=cfg["threshold"],
                           target=cfg["target"], duplicate=cfg["duplicate"], seed=cfg["seed"],
                           workdir=cfg["work"], workers=cfg["workers"])
    return {"seconds": time.perf_counter() - t0, "final": stats["final"], "kept": stats["kept"],
            "target_per_class": stats["target_per_class"]}


def run_pandas(cfg: dict) -> dict:
    import numpy as np
    import pandas as pd

    t0 = time.perf_counter()
    df = pd.concat([pd.read_parquet(p) for p in cfg["shards"]], ignore_index=True)
    c_n, threshold, target = cfg["classes"], cfg["threshold"], cfg["target"]
    df["conf64"] = df["conf"].astype("float64")
    kept = df[df["conf64"] >= threshold]
    del df
    k = target if target is not None else max(1, len(kept) // c_n)
    kept = kept.sort_values(["pred", "conf64", "row"], ascending=[True, False, True])
    sizes = kept.groupby("pred").size()
    sel = kept[kept.groupby("pred").cumcount() < k].copy()
    del kept
    sel["copies"] = 1
    if cfg["duplicate"]:
        small = sizes[(sizes > 0) & (sizes < k)]
        sel = sel.sort_values(["pred", "row"])
        sel["pos"] = sel.groupby("pred").cumcount()
        sel["copies"] = sel["pred"].map(k // small).fillna(1).astype("int64")
        rem = (k % small)[lambda r: r > 0]
        extra = [pd.DataFrame({"pred": c, "pos": np.random.default_rng([cfg["seed"], int(c)]).choice(
            int(small[c]), int(r), replace=False), "extra": 1}) for c, r in rem.items()]
        if extra:
            sel = sel.merge(pd.concat(extra).astype({"pred": sel["pred"].dtype}), on=["pred", "pos"], how="left")
            sel["copies"] += sel["extra"].fillna(0).astype("int64")
    sel["copies"] = sel["copies"].astype("uint32")
    out = sel.sort_values("row")[["row", "pred", "conf", "classes", "probs", "copies"]]
    out.to_parquet(cfg["out"], index=False, compression="zstd")
    return {"seconds": time.perf_counter() - t0, "final": int(out["copies"].sum()), "kept": int(sizes.sum()),
            "target_per_class": int(k)}


def child(kind: str, cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    result = (run_ours if kind == "ours" else run_pandas)(cfg)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(result))
    return 0


def spawn(kind: str, cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(cfg)],
                          capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{kind} child failed (rc {proc.returncode})")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


# ------------------------------------------------------------------------------------------------------- report

def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        return child(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--shard-rows", type=int, default=1_000_000)
    ap.add_argument("--threshold", type=float, default=0.3)
    ap.add_argument("--target", type=int, default=None, help="images per class (default: kept / classes)")
    ap.add_argument("--no-duplicate", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None, help="ours: shards in flight (default min(4, CPUs))")
    ap.add_argument("--workdir", default=None, help="keep shards and outputs here (default: a temporary folder)")
    ap.add_argument("--skip-pandas", action="store_true", help="only ours (the pandas baseline needs ~N x 300 B)")
    args = ap.parse_args()

    import numpy as np
    import pyarrow.parquet as pq

    from nst.labels import class_dtype, read_targets

    tmp = None if args.workdir else tempfile.mkdtemp(prefix="nst-bench-labels-")
    work = Path(args.workdir or tmp)
    if args.workdir:
        claim_workdir(work)
    try:
        shards = generate(work / "shards", args.rows, args.classes, args.top_k, args.shard_rows, args.seed)
        base = {"shards": [str(p) for p in shards], "classes": args.classes, "threshold": args.threshold,
                "target": args.target, "duplicate": not args.no_duplicate, "seed": args.seed}
        shutil.rmtree(work / "ours-work", ignore_errors=True)
        ours = spawn("ours", base | {"out": str(work / "balanced-ours.parquet"), "work": str(work / "ours-work"),
                                     "workers": args.workers})
        pandas = None
        if not args.skip_pandas:
            pandas = spawn("pandas", base | {"out": str(work / "balanced-pandas.parquet")})

        print(f"\nfilter + balance: {args.rows:,} rows, {args.classes} classes, top-{args.top_k}, "
              f"{len(shards)} shards, threshold {args.threshold}, K={ours['target_per_class']} per class, "
              f"kept {ours['kept']:,}, final {ours['final']:,} (sum of copies)")
        workers = args.workers or min(4, os.cpu_count() or 1)
        print(f"{'':26}{'time (s)':>10}{'peak RSS (MB)':>16}")
        print(f"{f'ours ({workers} workers)':26}{ours['seconds']:>10.2f}{ours['peak_rss_mb']:>16.0f}")
        if pandas:
            print(f"{'pandas (all in memory)':26}{pandas['seconds']:>10.2f}{pandas['peak_rss_mb']:>16.0f}")
            t_ratio, m_ratio = pandas["seconds"] / ours["seconds"], pandas["peak_rss_mb"] / ours["peak_rss_mb"]
            print(f"{'pandas / ours':26}{t_ratio:>9.1f}x{m_ratio:>15.1f}x")
            a = pq.read_table(work / "balanced-ours.parquet", columns=["row", "copies"])
            b = pq.read_table(work / "balanced-pandas.parquet", columns=["row", "copies"])
            same = (np.array_equal(a.column("row").to_numpy(), b.column("row").to_numpy())
                    and np.array_equal(a.column("copies").to_numpy(), b.column("copies").to_numpy()))
            print(f"identical rows and copies: {'yes' if same else 'NO'}")
            if not same:
                return 1
        note = "" if args.rows == 10_000_000 else f"  (goals are for 10M rows; this run has {args.rows:,})"
        checks = [f"time {ours['seconds']:.1f} s <= {GOAL_TIME_S:.0f} s: "
                  f"{'ok' if ours['seconds'] <= GOAL_TIME_S else 'MISSED'}",
                  f"peak RSS {ours['peak_rss_mb']:.0f} MB <= {GOAL_RSS_MB:.0f} MB: "
                  f"{'ok' if ours['peak_rss_mb'] <= GOAL_RSS_MB else 'MISSED'}"]
        if pandas:
            checks.append(f"pandas/ours time {t_ratio:.1f}x >= {GOAL_RATIO:.0f}x: "
                          f"{'ok' if t_ratio >= GOAL_RATIO else 'MISSED'}")
        print("goals: " + "; ".join(checks) + note)

        shard_bytes = sum(p.stat().st_size for p in shards)
        dense = 4 * args.classes
        print(f"\nlabel shards: {shard_bytes / args.rows:.1f} B/image ({shard_bytes / 2**20:.0f} MiB) vs. dense "
              f"float32 {dense:,} B/image: {dense * args.rows / shard_bytes:.0f}x smaller")
        n = pq.ParquetFile(work / "balanced-ours.parquet").metadata.num_rows
        per_row = 8 + 4 + args.top_k * (class_dtype(args.classes).itemsize + 2)
        measured = ""
        if n <= 20_000_000:
            t0 = time.perf_counter()
            tg = read_targets(work / "balanced-ours.parquet")
            measured = f" (read_targets: {tg.nbytes / 2**20:.0f} MiB in {time.perf_counter() - t0:.2f} s)"
        print(f"training targets: {n:,} unique rows x {per_row} B = {n * per_row / 2**20:.0f} MiB sparse{measured} "
              f"vs. dense {n:,} x {args.classes} float32 = {n * dense / 2**30:.1f} GiB "
              f"({ours['final'] * dense / 2**30:.1f} GiB with duplicates materialised)")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
