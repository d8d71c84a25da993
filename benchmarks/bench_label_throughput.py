"""Labelling throughput: the real `label` stage on JPEG files vs. the raw forward pass of the same model on preloaded
tensors, same batch size and threads, side by side in one run.

The baseline is the model's forward pass over the same number of images already decoded, resized and normalised in
memory (distinct tensors per batch). The stage does everything a real run does per shard: read the manifest, read and decode each JPEG (CPU workers,
or nvjpeg on CUDA), resize + centre crop (crop_pct), normalise on the device, bf16 autocast and channels_last on
CUDA, softmax + top-k, and write the compact Parquet shard. Ratio = stage images/s / forward images/s (targets: >= 0.90 on CPU, >= 0.70 on an H100 for efficientnet_b0
in bf16).

    python benchmarks/bench_label_throughput.py                       # efficientnet_b0 and resnet18, CPU
    python benchmarks/bench_label_throughput.py --images 4096 --batch 256 --workers 8 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_jpegs(folder: Path, n: int, size: tuple[int, int] = (320, 240)) -> None:
    """Photo-like JPEGs (smooth gradients, shapes, noise; quality 90), so decode cost is realistic."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        base = np.stack([(xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], -1)
        img = Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))
        d = ImageDraw.Draw(img)
        for _ in range(4):
            x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
            d.ellipse([x0, y0, x0 + rng.integers(20, 120), y0 + rng.integers(20, 120)],
                      fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        img.save(folder / f"{i:06d}.jpg", quality=90)


@contextlib.contextmanager
def peak_memory(device: torch.device, into: dict, key: str):
    """The most GPU memory allocated while the block ran, into `into[key]` (the largest over repeats); CUDA only."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    yield
    torch.cuda.synchronize(device)
    into[key] = max(into.get(key) or 0, torch.cuda.max_memory_allocated(device))


def project(work: Path, model: str, images: int, batch: int, workers: int, device: str) -> Path:
    labeled = work / "labeled"
    for c in ("a", "b"):
        make_jpegs(labeled / c, 2)
    params = {
        "device": device, "out_dir": "outputs",
        "data": {"labeled": "labeled", "unlabeled": "unlabeled", "test": "labeled", "image_size": 224,
                 "transform": "rrc", "crop_pct": 0.875, "num_workers": workers, "cache_mb": 0},
        "teacher": {"model": model, "epochs": 1, "warmup_epochs": 0},
        "pseudo_label": {"batch_size": batch, "shard_size": images},
        "tracking": {"enabled": False},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work / "params.yaml"


def bench(model_name: str, args, jpegs: Path) -> dict:
    from nst.checkpoint import build_model, finish_model
    from nst.config import load_config
    from tasks.label import label_shards
    from tasks.prepare import PREPARE
    from tasks.spec import execute

    work = Path(tempfile.mkdtemp(prefix=f"nst-label-{model_name}-"))
    try:
        params = project(work, model_name, args.images, args.batch, args.workers, args.device)
        (work / "unlabeled").symlink_to(jpegs)
        cfg = load_config(params)
        execute(PREPARE, cfg)
        device = torch.device("cuda" if args.device in ("cuda", "auto") and torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = build_model(model_name, 2).eval().to(device)  # the project's 2 classes; same model for both
        finish_model(cfg.model_dir("g0"), model.state_dict(),
                     {"model": model_name, "num_classes": 2, "classes": ["a", "b"], "generation": "g0",
                      "image_size": 224, "mean": [0.5] * 3, "std": [0.5] * 3})
        cl = True
        model = model.to(memory_format=torch.channels_last)
        # the images already decoded, resized and normalised in memory: distinct tensors, as data would be
        g = torch.Generator().manual_seed(0)
        batches = [torch.randn(args.batch, 3, 224, 224, generator=g).to(device).contiguous(
            memory_format=torch.channels_last) for _ in range(0, args.images, args.batch)]
        amp = device.type == "cuda"

        @torch.inference_mode()
        def forward_pass(n: int) -> float:
            t = time.perf_counter()
            for i in range(0, n, args.batch):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    model(batches[(i // args.batch) % len(batches)]).float().softmax(1)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        forward_pass(args.batch * 2)  # warm-up (oneDNN/cuDNN kernel choice)
        shard = cfg.labels_dir("g0")
        results = {"forward": [], "stage": []}
        peak = {"forward": None, "stage": None}  # bytes of GPU memory at most, beyond the preloaded batches
        for r in range(args.repeats):  # alternate, so drifting load hits both
            with peak_memory(device, peak, "forward"):
                results["forward"].append(args.images / forward_pass(args.images))
            shutil.rmtree(shard, ignore_errors=True)
            with peak_memory(device, peak, "stage"):
                t = time.perf_counter()
                label_shards(cfg, "g0", [0])
                results["stage"].append(args.images / (time.perf_counter() - t))
        fwd, stg = max(results["forward"]), max(results["stage"])
        return {"model": model_name, "device": str(device), "threads": torch.get_num_threads(), "batch": args.batch,
                "workers": args.workers, "forward_img_s": fwd, "stage_img_s": stg, "ratio": stg / fwd,
                "channels_last": cl, "bf16": amp, "forward_peak_bytes": peak["forward"],
                "stage_peak_bytes": peak["stage"]}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["efficientnet_b0", "resnet18"])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1, help="DataLoader workers decoding JPEGs (data.num_workers)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    jpegs = Path(tempfile.mkdtemp(prefix="nst-jpegs-"))
    make_jpegs(jpegs, args.images)
    rows = [bench(m, args, jpegs) for m in args.models]
    shutil.rmtree(jpegs, ignore_errors=True)
    target = 0.90 if rows[0]["device"] == "cpu" else 0.70
    print(f"labelling {args.images} JPEGs (320x240 -> resize 256 -> centre crop 224), batch {args.batch}, "
          f"{args.workers} decode worker(s), {rows[0]['threads']} torch threads, {rows[0]['device']}")
    print(f"{'model':<18}{'forward img/s':>15}{'stage img/s':>14}{'ratio':>8}  target")
    for r in rows:
        print(f"{r['model']:<18}{r['forward_img_s']:>15.1f}{r['stage_img_s']:>14.1f}{r['ratio']:>8.3f}  >= {target:.2f}"
              f"  {'ok' if r['ratio'] >= target else 'MISSED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
