"""What a second node costs on CPU (gloo), side by side in one run: the tiny teacher stage trained by one torchrun
with 2 processes (`--standalone`) vs. by two torchrun agents joining a c10d rendezvous on 127.0.0.1 (what srun or
a PyTorchJob starts), same world size, same bytes. The difference is the rendezvous and the second agent's
start-up; the compute is the same.

    python benchmarks/bench_multinode.py --repeats 3
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from conftest import make_tiny_project
    from servers import free_port

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-nodes-") as d:
        params = make_tiny_project(Path(d) / "proj", generations=0)
        subprocess.run([sys.executable, "-m", "cli", "prepare", "-q", "-p", str(params)], cwd=ROOT, check=True)
        model = params.parent / "outputs" / "g0" / "model"
        times: dict[str, list[float]] = {"1 node x 2 processes": [], "2 nodes x 1 process": []}
        digests = set()
        for _ in range(args.repeats):
            for kind in times:
                shutil.rmtree(model, ignore_errors=True)
                base = [sys.executable, "-m", "cli", "train-teacher", "-q", "-p", str(params)]
                t = time.perf_counter()
                if kind.startswith("1 node"):
                    subprocess.run(base + ["-S", "distributed.nproc_per_node=2"], cwd=ROOT, check=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                else:
                    port = free_port()
                    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=b{port}",
                           "--max-restarts=0", *base[1:], "-S", "distributed.nnodes=2"]
                    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                             for _ in range(2)]
                    assert [p.wait() for p in procs] == [0, 0]
                times[kind].append(time.perf_counter() - t)
                digests.add(hashlib.sha256((model / "model.safetensors").read_bytes()).hexdigest())
        one, two = (statistics.median(v) for v in times.values())
        print(f"tiny teacher (2 epochs), medians of {args.repeats}:")
        for k, v in times.items():
            print(f"  {k:<22} {statistics.median(v):6.2f} s   ({', '.join(f'{x:.2f}' for x in v)})")
        print(f"  a second node costs {two - one:+.2f} s ({two / one:.2f}x); same weights every time: {len(digests) == 1}")


if __name__ == "__main__":
    main()
