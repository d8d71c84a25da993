"""channels_last (NHWC) vs. contiguous (NCHW) for our CNN ladder: one SGD train step and one eval forward.

`channels_last` (default true, per teacher/student) applies on CPU too, because oneDNN's convolutions run faster in
NHWC; this measures that claim on the machine at hand. Both layouts are timed alternately in the same process, several
rounds, and the minimum per (model, layout, mode) is kept, so that a noisy (shared, virtualised) CPU hurts both
alike. Prints the times and the NHWC/NCHW ratio (< 1 = channels_last is faster).

    python benchmarks/bench_channels_last.py                          # toy sizes: 16 px, batch 32 + 3 x 32
    python benchmarks/bench_channels_last.py --size 16 --models nst_cnn_s nst_cnn_m nst_cnn_l --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402,F401 - registers nst_cnn_* in timm


def step_time(name: str, channels_last: bool, train: bool, size: int, batch: int, device: torch.device,
              iters: int) -> float:
    torch.manual_seed(0)
    m = timm.create_model(name, num_classes=10, drop_rate=0.3, drop_path_rate=0.1).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
        m, x = m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    m.train(train)
    times = []
    for _ in range(iters + 2):  # the first two calls pay for oneDNN primitive creation
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if train:
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                m(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["nst_cnn_s", "nst_cnn_m"])
    ap.add_argument("--size", type=int, default=16, help="image side in px (the shipped toy config: 16)")
    ap.add_argument("--batch", type=int, default=128,
                    help="images per step (the toy student step: 32 labeled + 3 x 32 pseudo-labeled = 128)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    best: dict[tuple, float] = {}
    for _ in range(a.rounds):
        for name in a.models:
            for mode in (True, False):
                for cl in (True, False):
                    k = (name, mode, cl)
                    best[k] = min(best.get(k, float("inf")),
                                  step_time(name, cl, mode, a.size, a.batch, device, a.iters))
    print(f"device={device} threads={torch.get_num_threads()} size={a.size} batch={a.batch} "
          f"(best of {a.rounds} rounds x {a.iters} iterations)")
    print(f"{'model':<12} {'mode':<6} {'NCHW ms':>9} {'NHWC ms':>9} {'NHWC/NCHW':>10}")
    for name in a.models:
        for mode in (True, False):
            nchw, nhwc = best[(name, mode, False)], best[(name, mode, True)]
            print(f"{name:<12} {'train' if mode else 'eval':<6} {1e3 * nchw:>9.1f} {1e3 * nhwc:>9.1f} "
                  f"{nhwc / nchw:>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
