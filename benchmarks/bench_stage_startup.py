"""What starting a stage costs: an up-to-date `nst evaluate g0` (nothing to do but load the config, fingerprint its
inputs and find the stamp), as a fresh interpreter and forked from the warm server (nst/warm.py), next to a bare
`python -c "import torch"` measured in the same run. Goal: warm start <= 1.5x the bare torch import.

    python benchmarks/bench_stage_startup.py [--repeats 5]

Builds the tests' tiny toy project in a temporary folder and trains it once (`nst run --no-prefect`, ~30 s).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_project

    from nst import warm
    from nst.proc import run_child

    work = Path(tempfile.mkdtemp(prefix="nst-bench-startup-"))
    (work / ".nst-bench").write_text("made by benchmarks/bench_stage_startup.py\n")  # what the cleanup removes
    try:
        params = make_tiny_project(work / "proj", generations=1)
        subprocess.run([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(params)], check=True,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        stage = [sys.executable, "-m", "cli", "evaluate", "g0", "-q", "-p", str(params)]

        def timed(fn) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def bare() -> None:
            subprocess.run([sys.executable, "-c", "import torch"], check=True)

        lines: list[str] = []

        def launch() -> None:
            run_child(stage, on_line=lines.append, cwd=ROOT)

        cold = [timed(launch) for _ in range(args.repeats)]
        warm.start()
        first_warm = timed(launch)  # waits for the server's own imports
        hot = [timed(launch) for _ in range(args.repeats)]
        torch_only = [timed(bare) for _ in range(args.repeats)]
        if not any("up to date" in line for line in lines):
            print("warning: the stage was not up to date; the times include its work", file=sys.stderr)
        b, c, w = statistics.median(torch_only), statistics.median(cold), statistics.median(hot)
        print(f"median of {args.repeats}: bare `import torch` {b:.2f} s | up-to-date `nst evaluate g0`: "
              f"fresh interpreter {c:.2f} s ({c / b:.2f}x), warm server {w:.2f} s ({w / b:.2f}x; goal <= 1.5x) | "
              f"first warm launch (server still importing) {first_warm:.2f} s")
    finally:
        if (work / ".nst-bench").is_file():
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
