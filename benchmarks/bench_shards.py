"""Data at scale, measured side by side in one run: loose files vs `nst pack` shards (local and on a moto S3 server).

    python benchmarks/bench_shards.py dvc      --images 100000   # dvc add / status / push: folder vs shards
    python benchmarks/bench_shards.py label    --images 20000    # labelling: loose vs local shards vs S3 shards
    python benchmarks/bench_shards.py student  --images 20000    # the student's balanced stream: loose vs shards
    python benchmarks/bench_shards.py prepare  --images 1000000  # prepare from shards: time, peak memory
    python benchmarks/bench_shards.py all

Ratios: the loose-file (or local-shard) time is the baseline, measured in the same run, same threads. Images are
small 32 px PNGs (the toy's kind), the case where per-file costs dominate.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
BIN = Path(sys.executable).parent


def pngs(n: int, distinct: int = 512) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(min(n, distinct)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def make_folder(folder: Path, n: int, classes: int = 10) -> Path:
    """n PNG files in class folders (distinct bytes: the 512 base images with a per-file trailer PNG ignores)."""
    base = pngs(n)
    for c in range(classes):
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"c{i % classes}" / f"{i:07d}.png").write_bytes(base[i % len(base)] + i.to_bytes(8, "little"))
    return folder


def timed(fn, *a, **kw) -> tuple[float, object]:
    t = time.perf_counter()
    r = fn(*a, **kw)
    return time.perf_counter() - t, r


def sh(cmd: list, cwd: Path, env: dict | None = None) -> None:
    subprocess.run([str(c) for c in cmd], cwd=cwd, check=True, env=os.environ | (env or {}), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def row(name: str, base: float, other: float, unit: str = "s", higher_better: bool = False) -> dict:
    ratio = (other / base) if higher_better else (base / other)
    print(f"  {name:<34} {base:10.2f} {other:10.2f} {unit:<6} ratio {ratio:6.2f}x", flush=True)
    return {"what": name, "baseline": round(base, 3), "other": round(other, 3), "unit": unit, "ratio": round(ratio, 3)}


# ---- DVC --------------------------------------------------------------------------------------------------------

def bench_dvc(n: int, tmp: Path) -> list[dict]:
    from nst.pack import pack

    dvc = BIN / "dvc"
    env = {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp / "site"), "GIT_CONFIG_NOSYSTEM": "1"}
    out = {}
    for kind in ("folder", "shards"):
        repo = tmp / f"dvc-{kind}"
        repo.mkdir(parents=True)
        sh(["git", "init", "-q"], repo)
        sh([dvc, "init", "-q"], repo, env)
        sh([dvc, "remote", "add", "-d", "local", tmp / f"remote-{kind}"], repo, env)
        if kind == "folder":
            make_folder(repo / "images", n)
        else:
            make_folder(tmp / "src", n)
            pack(str(tmp / "src"), str(repo / "images"), shard_size="64MB")
            shutil.rmtree(tmp / "src")
        out[kind] = {step: timed(sh, [dvc, *args], repo, env)[0]
                     for step, args in (("add", ["add", "-q", "images"]), ("status", ["status", "-q"]),
                                        ("push", ["push", "-q"]))}
    n_files = sum(1 for _ in (tmp / "dvc-shards" / "images").iterdir())
    print(f"DVC on {n} images: folder of {n} files vs {n_files} files of shards (seconds; ratio = folder / shards)")
    return [row(f"dvc {step}", out["folder"][step], out["shards"][step]) for step in ("add", "status", "push")]


# ---- reading: labelling and the student's stream -------------------------------------------------------------------

def _prepared(n: int, tmp: Path, moto) -> dict:
    """One image set as loose files, local shards and S3 shards, each prepared into its own out_dir."""
    from nst.config import config_from_dict
    from nst.pack import pack
    from tasks.prepare import prepare

    make_folder(tmp / "loose", n)
    pack(str(tmp / "loose"), str(tmp / "shards"), shard_size="64MB")
    moto.client().create_bucket(Bucket="bench")
    pack(str(tmp / "loose"), "s3://bench/shards", shard_size="64MB")
    cfgs = {}
    for kind, src in (("loose", tmp / "loose"), ("shards", tmp / "shards"), ("s3", "s3://bench/shards/")):
        raw = {"device": "cpu", "threads": 2, "out_dir": str(tmp / f"out-{kind}"), "tracking": {"enabled": False},
               "data": {"labeled": str(src), "unlabeled": str(src), "test": str(src), "cache_mb": 0}}
        cfg = config_from_dict(raw, base=tmp, check_models=False)
        prepare(cfg)
        cfgs[kind] = cfg
    return cfgs


def _label_rate(cfg) -> float:
    import torch

    from nst.data import Blobs, dataset_for, read_manifest
    from nst.train import predict_logits
    import timm

    import models  # noqa: F401 - registers nst_cnn_*

    shutil.rmtree(cfg.shard_cache_dir, ignore_errors=True)  # S3: every shard fetched, as a first labelling does
    torch.manual_seed(0)
    model = timm.create_model("nst_cnn_s", num_classes=10)
    man = read_manifest(cfg.data_dir / "unlabeled.parquet")
    ds = dataset_for(cfg.data, Blobs.from_manifest(man, cfg), cache=False)
    t, _ = timed(predict_logits, model, ds, torch.device("cpu"), 256, 0, amp=False, channels_last=False)
    return len(ds) / t


def _fetch_seconds(cfg) -> tuple[float, int, int]:
    """The S3 part of a cold read: every shard into an empty cache, nothing decoded."""
    from nst.data import shard_reader

    shutil.rmtree(cfg.shard_cache_dir, ignore_errors=True)
    reader = shard_reader(cfg)
    urls = sorted(reader.cache.etags)
    t, _ = timed(lambda: [reader.cache.path(u) for u in urls])
    return t, len(urls), sum(reader.cache.etags[u][0] for u in urls)


def _student_rate(cfg, n: int) -> float:
    """The student's data path alone: a balanced, duplicated stream (rows drawn with copies, seeded) of augmented
    images through the DataLoader, as train-student builds it."""
    from nst.config import NoiseConfig
    from nst.data import Blobs, EpochBatches, build_train_transform, dataset_for, make_loader, read_manifest

    man = read_manifest(cfg.data_dir / "unlabeled.parquet")
    rows = np.random.default_rng(0).integers(0, man.num_rows, n)  # with copies, as the balanced set has
    ds = dataset_for(cfg.data, Blobs.from_manifest(man, cfg, rows),
                     transform=build_train_transform(cfg.data, NoiseConfig(randaugment_n=2, randaugment_m=9)),
                     cache=False)
    loader = make_loader(ds, batch_sampler=EpochBatches(len(ds), 64, len(ds) // 64, 0, 1), workers=0)
    t, k = timed(lambda: sum(len(x) for x, _ in loader))
    return k / t


def bench_read(n: int, tmp: Path, which: str) -> list[dict]:
    import torch

    from servers import start_moto_server

    torch.set_num_threads(2)
    (tmp / "moto").mkdir(parents=True)
    server = start_moto_server(tmp / "moto")
    os.environ |= {"NST_S3_ENDPOINT_URL": server.url, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                   "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        from conftest import MotoS3

        cfgs = _prepared(n, tmp, MotoS3(server, server.url))
        rows = []
        if which in ("label", "all"):
            r = {k: _label_rate(c) for k, c in cfgs.items()}
            fetch = _fetch_seconds(cfgs["s3"])
            print(f"  (S3: fetching its {fetch[1]} shard(s), {fetch[2] / 2**20:.1f} MiB, into the empty cache alone "
                  f"takes {fetch[0]:.2f} s)")
            print(f"labelling {n} images with nst_cnn_s, batch 256, 2 threads (img/s; ratio = other / baseline)")
            rows += [row("label: local shards vs loose", r["loose"], r["shards"], "img/s", True),
                     row("label: S3 shards vs local shards", r["shards"], r["s3"], "img/s", True)]
        if which in ("student", "all"):
            r = {k: _student_rate(c, n) for k, c in cfgs.items()}
            print(f"student data path: {n} augmented samples of a duplicated stream (img/s)")
            rows += [row("student: local shards vs loose", r["loose"], r["shards"], "img/s", True),
                     row("student: S3 shards vs loose", r["loose"], r["s3"], "img/s", True)]
        return rows
    finally:
        server.stop()


# ---- prepare at a million ------------------------------------------------------------------------------------------

def bench_prepare(n: int, tmp: Path) -> list[dict]:
    """Shards written directly (no loose files: a million files is not what is measured), then `nst prepare` in a
    fresh process: wall time and its peak RSS, at n/4 and n images."""
    import tarfile

    base = pngs(n)
    rows = []
    for k in (n // 4, n):
        src = tmp / f"shards-{k}"
        src.mkdir(parents=True)
        per = 100_000
        for s in range(0, k, per):
            with tarfile.open(src / f"{s // per:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tf:
                for i in range(s, min(k, s + per)):
                    data = base[i % len(base)] + i.to_bytes(8, "little")
                    ti = tarfile.TarInfo(f"{i:09d}.png")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        params = tmp / f"params-{k}.yaml"
        params.write_text(json.dumps({"device": "cpu", "out_dir": str(tmp / f"out-{k}"), "tracking": {"enabled": False},
                                      "data": {"labeled": str(tmp / "lab"), "unlabeled": str(src),
                                               "test": str(tmp / "lab")}}))
        if not (tmp / "lab").exists():
            make_folder(tmp / "lab", 20, classes=2)
        # VmHWM (this process's peak RSS), not ru_maxrss: that one carries over exec from the forked parent
        code = ("import re, time, sys; from nst.config import load_config; from tasks.prepare import prepare; "
                "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]); "
                "r0 = hwm(); t = time.perf_counter(); prepare(load_config(sys.argv[1], check_models=False)); "
                "print(time.perf_counter() - t, hwm(), r0)")
        p = subprocess.run([sys.executable, "-c", code, str(params)], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-2000:]
        out = p.stdout.split()
        secs, rss_mb, base_mb = float(out[0]), int(out[1]) / 1024, int(out[2]) / 1024
        man = tmp / f"out-{k}" / "data" / "unlabeled.parquet"
        print(f"  prepare {k:>9} images from shards: {secs:7.1f} s, {k / secs:8.0f} img/s, peak RSS {rss_mb:7.0f} MB "
              f"({rss_mb - base_mb:+.0f} MB over the imports), manifest {man.stat().st_size / 2**20:.1f} MB", flush=True)
        rows.append({"what": f"prepare {k} from shards", "seconds": round(secs, 1), "img_per_s": round(k / secs),
                     "peak_rss_mb": round(rss_mb), "over_imports_mb": round(rss_mb - base_mb),
                     "manifest_mb": round(man.stat().st_size / 2**20, 1)})
        shutil.rmtree(src)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["dvc", "label", "student", "prepare", "all"])
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as d:
        tmp = Path(d)
        if args.what in ("dvc", "all"):
            rows += bench_dvc(args.images or 100_000, tmp / "dvc")
        if args.what in ("label", "student", "all"):
            rows += bench_read(args.images or 20_000, tmp / "read", "all" if args.what == "all" else args.what)
        if args.what in ("prepare", "all"):
            rows += bench_prepare(args.images or 1_000_000, tmp / "prep")
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
