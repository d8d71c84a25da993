"""How fast `prepare` can vouch for image files: nst.scan.check_files vs. decoding every file with torchvision.

Generates N JPEGs of photo-like content (smooth gradients + shapes + sensor noise, quality 90) once into a work dir,
then measures, side by side in one run, files/s for:

    baseline   torchvision decode of every file, one process (what build_manifest did)
    header     check_files(verify="header"), 1 worker, cold cache      (read + sha256 + header per file)
    header     check_files(verify="header"), W workers, cold cache
    header     check_files(verify="header"), W workers, warm cache     (stat + sqlite lookup, no reads)
    decode     check_files(verify="decode"), W workers, cold cache     (read + sha256 + full PIL decode)

"Cold" means a fresh nst.scan cache; the files themselves sit in the OS page cache (just generated, or read by the
previous row), so disk speed is not measured: on a cold disk or network storage reads dominate and more workers help
more. Each row is the median of --repeats runs and includes starting the worker pool.

    python benchmarks/bench_prepare.py                         # 20,000 files, 2 workers
    python benchmarks/bench_prepare.py --files 1000 --workers 2 --no-baseline
    python benchmarks/bench_prepare.py --files 1000000 --size 500x375 --workers 16 --work-dir /scratch/nst-bench
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAX_PIXELS = 89_478_485


def _make_images(args: tuple[str, int, int, int, int]) -> int:
    """One block of images; deterministic per index so a rerun regenerates the same bytes."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder, start, stop, w, h = args
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(start, stop):
        rng = np.random.default_rng(i)
        c0, c1, c2 = (rng.uniform(0, 255, 3) for _ in range(3))
        ang = rng.uniform(0, np.pi)
        t = ((np.cos(ang) * xx + np.sin(ang) * yy) / (w + h) + 0.5)[..., None]
        r = (np.hypot(xx - rng.uniform(0, w), yy - rng.uniform(0, h)) / max(w, h))[..., None]
        img = (1 - t) * c0 + t * c1 + np.clip(1 - 2 * r, 0, 1) * (c2 - 128) * 0.5
        im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 9))):
            x0, y0 = rng.uniform(-0.2, 1.0) * w, rng.uniform(-0.2, 1.0) * h
            x1, y1 = x0 + rng.uniform(0.05, 0.6) * w, y0 + rng.uniform(0.05, 0.6) * h
            fill = tuple(int(v) for v in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
        im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0))))
        noisy = np.asarray(im, dtype=np.int16) + rng.normal(0, rng.uniform(2, 8), (h, w, 3)).astype(np.int16)
        sub = Path(folder) / f"{i // 1000:04d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(sub / f"{i:07d}.jpg", quality=90)
    return stop - start


def ensure_images(work: Path, n: int, w: int, h: int, procs: int) -> list[str]:
    """Generated once per (N, size); a marker records completion so an interrupted generation is redone."""
    folder = work / f"jpeg-{w}x{h}"
    marker = folder / f".complete-{n}"
    if not marker.exists():
        have = {int(p.stem) for p in folder.rglob("*.jpg")} if folder.exists() else set()
        blocks = [(str(folder), s, min(s + 200, n)) for s in range(0, n, 200)
                  if any(i not in have for i in range(s, min(s + 200, n)))]
        todo = sum(e - s for _, s, e in blocks)
        t0 = time.perf_counter()
        print(f"generating {todo:,} JPEGs ({w}x{h}, quality 90) in {folder} ...", flush=True)
        with ProcessPoolExecutor(max_workers=procs) as ex:
            done = 0
            for k in ex.map(_make_images, [(f, s, e, w, h) for f, s, e in blocks]):
                done += k
                print(f"\r  {done:,}/{todo:,}", end="", flush=True)
        print(f"\n  done in {time.perf_counter() - t0:.1f} s")
        marker.touch()
    return [str(folder / f"{i // 1000:04d}" / f"{i:07d}.jpg") for i in range(n)]


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--size", default="500x375", help="WxH of the generated JPEGs (e.g. 320x240)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "nst-bench-prepare",
                    help="where the images are generated (kept between runs)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the torchvision decode baseline (imports torch)")
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))

    from nst.scan import HashCache, check_files

    paths = ensure_images(args.work_dir, args.files, w, h, max(1, args.workers))
    mb = sum(os.path.getsize(p) for p in paths) / 1e6
    W = args.workers
    caches = Path(tempfile.mkdtemp(prefix="caches-", dir=args.work_dir))
    counter = iter(range(10**6))

    def fresh_cache() -> HashCache:
        return HashCache(caches / f"cold-{next(counter)}.sqlite")

    warm = HashCache(caches / "warm.sqlite")
    rows: list[tuple[str, float]] = []
    results = {}

    def run(label: str, fn) -> None:
        secs, out = _timed(fn, args.repeats)
        rows.append((label, secs))
        results[label] = out
        print(f"  {label:<44s} {secs:8.2f} s", flush=True)

    print(f"{len(paths):,} files, {mb:,.0f} MB, {w}x{h}; {os.cpu_count()} CPUs, --workers {W}, --chunk {args.chunk}")
    # warm the OS page cache so the first row is not charged for disk reads the others skip
    for p in paths:
        with open(p, "rb") as f:
            f.read()

    if not args.no_baseline:
        from nst.data import decode

        def baseline():
            for p in paths:
                decode(p)
        run("baseline: torchvision decode, 1 process", baseline)

    run("header, 1 worker, cold cache", lambda: check_files(
        paths, max_pixels=MAX_PIXELS, verify="header", workers=1, cache=fresh_cache(), chunk=args.chunk))
    run(f"header, {W} workers, cold cache", lambda: check_files(
        paths, max_pixels=MAX_PIXELS, verify="header", workers=W, cache=fresh_cache(), chunk=args.chunk))
    check_files(paths, max_pixels=MAX_PIXELS, verify="header", workers=W, cache=warm, chunk=args.chunk)  # fill it
    run(f"header, {W} workers, warm cache (no reads)", lambda: check_files(
        paths, max_pixels=MAX_PIXELS, verify="header", workers=W, cache=warm, chunk=args.chunk))
    run(f"decode, {W} workers, cold cache", lambda: check_files(
        paths, max_pixels=MAX_PIXELS, verify="decode", workers=W, cache=fresh_cache(), chunk=args.chunk))

    # What starting W worker processes costs one check_files call (forkserver children importing PIL): at small N
    # it dominates the W-worker rows, so the projection below takes it out of the per-file rate.
    few = paths[:2 * W]
    pooled, _ = _timed(lambda: check_files(few, max_pixels=MAX_PIXELS, workers=W, chunk=1), 3)
    inproc, _ = _timed(lambda: check_files(few, max_pixels=MAX_PIXELS, workers=1, chunk=1), 3)
    pool_start = max(0.0, pooled - inproc)

    checks = [v for k, v in results.items() if not k.startswith("baseline")]
    digests = [[c.digest for c in r] for r in checks]
    assert all(d == digests[0] for d in digests), "scenarios disagree on digests"
    bad = sum(not c.ok for c in checks[0])
    assert bad == 0, f"{bad} generated files failed the check"
    shutil.rmtree(caches, ignore_errors=True)

    ref = dict(rows)["header, 1 worker, cold cache"]
    base = dict(rows).get("baseline: torchvision decode, 1 process")
    print()
    print(f"{'scenario':<44s} {'files/s':>10s} {'MB/s':>8s} {'vs header w=1':>14s}"
          + (f" {'vs baseline':>12s}" if base else ""))
    for label, secs in rows:
        line = f"{label:<44s} {len(paths) / secs:>10,.0f} {mb / secs:>8,.0f} {ref / secs:>13.2f}x"
        if base:
            line += f" {base / secs:>11.2f}x"
        print(line)
    print(f"\nstarting {W} worker processes: {pool_start * 1e3:.0f} ms per call (included above)")
    for label in ("header, 1 worker, cold cache", f"header, {W} workers, cold cache",
                  f"header, {W} workers, warm cache (no reads)", f"decode, {W} workers, cold cache"):
        start = pool_start if "workers, cold" in label else 0.0  # a warm cache reads nothing: no pool
        per_file = max(dict(rows)[label] - start, 1e-9) / len(paths)
        t = start + 1e6 * per_file
        print(f"1,000,000 files projected, {label}: " + (f"{t:.0f} s" if t < 120 else f"{t / 60:.1f} min"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
