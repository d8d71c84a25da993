"""Prefect's overhead: the `noisy-student` flow vs. the same pipeline walked in one process (`run_direct`).

The flow runs each model stage as its own `nst` process (reproducibility, DataLoader workers, kill -9 safety),
forked from the warm server (nst/warm.py) unless NST_WARM_START=0, when each pays a fresh Python + torch + timm
start-up; the benchmark measures that start-up separately and counts the processes, so the ratio can be read.

Both run the same config into fresh, separate out_dirs (shared input data), alternating, after one warm-up run of
each (torch's first-call costs, and Prefect's server start). Prints wall times, medians and the flow/direct ratio
(goal <= 1.10 with an existing Prefect database), and separately the one-time cold start: Prefect's ephemeral
server on a brand-new PREFECT_HOME (database migrations).

    python benchmarks/bench_flow_overhead.py                      # the tiny test project (worst case: ~5 s runs)
    python benchmarks/bench_flow_overhead.py --params params.yaml -S teacher.epochs=20 --repeats 2

Without PREFECT_API_URL the flow runs in ephemeral mode (a temporary local server in this process), as `nst run`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tiny_project(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_project  # the tests' tiny toy project: 40 labeled, 120 unlabeled images

    return make_tiny_project(root, generations=2)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=None, help="params.yaml to benchmark (default: the tiny test project)")
    ap.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up runs (long pipelines)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = ap.parse_args()

    for k, v in {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "HF_HUB_OFFLINE": "1"}.items():
        os.environ.setdefault(k, v)  # what `nst` sets: no network
    work = Path(tempfile.mkdtemp(prefix="nst-bench-"))
    if not os.environ.get("PREFECT_API_URL"):
        os.environ.setdefault("PREFECT_HOME", str(work / "prefect-home"))  # fresh: measures the cold start
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # console logging is not what we measure
    import logging

    logging.getLogger("nst").setLevel(logging.WARNING)

    params = Path(args.params).resolve() if args.params else _tiny_project(work / "proj")
    from nst.config import load_config, parse_overrides

    base = parse_overrides(args.overrides) | {"tracking.enabled": False}
    cfg0 = load_config(params, base)
    if cfg0.threads:
        import torch

        torch.set_num_threads(cfg0.threads)

    from tasks.pipeline import LABEL, run_direct, steps

    import subprocess

    t = time.perf_counter()
    for _ in range(3):
        subprocess.run([sys.executable, "-c", "import cli.main, tasks.pipeline, tasks.train, tasks.label, "
                        "tasks.evaluate"], check=True, cwd=ROOT)
    startup = (time.perf_counter() - t) / 3
    groups = min(int(os.environ.get("NST_MAX_WORKERS") or min(4, os.cpu_count() or 1)), 10**9)
    children = sum((1 if s.stage is not LABEL else groups) for s in steps(cfg0) if s.stage is not None and s.stage.model)

    cpu: dict[str, float] = {}

    def _cpu() -> float:
        t = os.times()  # this process and its finished children (the flow's stage processes)
        return t.user + t.system + t.children_user + t.children_system

    def direct(tag: str) -> float:
        cfg = load_config(params, base | {"out_dir": str(work / tag)})
        t, c = time.perf_counter(), _cpu()
        run_direct(cfg, str(params), base | {"out_dir": str(work / tag)})
        cpu[tag] = _cpu() - c
        return time.perf_counter() - t

    t = time.perf_counter()
    from prefect import flow

    @flow(name="bench-noop")
    def noop() -> int:
        return 1

    noop()
    cold = time.perf_counter() - t
    from flows.noisy_student import noisy_student

    def with_prefect(tag: str) -> float:
        t, c = time.perf_counter(), _cpu()
        noisy_student(str(params), base | {"out_dir": str(work / tag)})
        cpu[tag] = _cpu() - c
        return time.perf_counter() - t

    print(f"config: {params} {base or ''}  ({len(cfg0.generations)} generations)")
    print(f"cold start (import prefect + first flow run, {'server ' + os.environ['PREFECT_API_URL'] if os.environ.get('PREFECT_API_URL') else 'ephemeral server, new PREFECT_HOME'}): {cold:.1f} s")
    if not args.no_warmup:
        print(f"warm-up: direct {direct('warm-direct'):.1f} s, flow {with_prefect('warm-flow'):.1f} s")
    d, f = [], []
    for i in range(args.repeats):
        d.append(direct(f"direct-{i}"))
        f.append(with_prefect(f"flow-{i}"))
        print(f"run {i + 1}: direct {d[-1]:.2f} s  flow {f[-1]:.2f} s  ratio {f[-1] / d[-1]:.3f}   "
              f"(CPU time of this process: direct {cpu[f'direct-{i}']:.2f} s, flow {cpu[f'flow-{i}']:.2f} s)")
    md, mf = statistics.median(d), statistics.median(f)
    print(f"median: direct {md:.2f} s  flow {mf:.2f} s  overhead {mf - md:+.2f} s  ratio {mf / md:.3f} "
          f"(goal <= 1.10)")
    from nst.settings import warm_start

    if warm_start():  # the stages are the warm server's children, not ours: their CPU time is not counted here
        print(f"stage processes the flow starts: {children} (model stages + label shard groups), forked from the warm "
              f"server (nst/warm.py; bench_stage_startup.py measures that start); a fresh interpreter's start-up "
              f"measured alone: {startup:.2f} s. NST_WARM_START=0 runs the flow the fresh-interpreter way")
    else:
        cd = statistics.median(cpu[f"direct-{i}"] for i in range(args.repeats))
        cf = statistics.median(cpu[f"flow-{i}"] for i in range(args.repeats))
        print(f"median CPU time of this process and its children (less sensitive to other load; the ephemeral "
              f"server's own CPU is not in it): direct {cd:.2f} s  flow {cf:.2f} s  ratio {cf / cd:.3f}")
        print(f"stage processes the flow starts: {children} (model stages + label shard groups); one start-up "
              f"(Python, torch, timm, our modules) measured alone: {startup:.2f} s -> {children * startup:.1f} s of "
              f"the {mf - md:+.1f} s difference")
    if os.environ.get("NST_MAX_WORKERS") != "1":
        print("note: the flow labels shards concurrently (NST_MAX_WORKERS=1 for a like-for-like sequential run)")
    # Nothing left to do: the direct path's stage functions skip, the flow's tasks come from its cache.
    print(f"rerun of a finished out_dir: direct {direct('direct-0'):.2f} s, flow {with_prefect('flow-0'):.2f} s")
    if args.keep:
        print(f"kept {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
