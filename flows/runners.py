"""Task runners for the flow, chosen per run by environment variables of the worker or deployment:
`NST_TASK_RUNNER=thread` (default) or `dask` (prefect-dask; `NST_DASK_ADDRESS=tcp://host:8786` for an existing
cluster, else a local one), with `NST_MAX_WORKERS` workers (default: CPU count, at most 4).

Model stages run as child processes either way, so threads are enough to run them side by side; Dask sends
them to other machines (every worker must see `out_dir` and the project on a shared filesystem)."""

from __future__ import annotations

import os

from nst.errors import ConfigError


def max_workers() -> int:
    return int(os.environ.get("NST_MAX_WORKERS") or min(4, os.cpu_count() or 1))


def runner_kind() -> str:
    """`thread` or `dask` (NST_TASK_RUNNER). With Dask the stages run on its workers, so the devices of the
    machine that starts the flow do not matter (the device check is left to the workers)."""
    kind = os.environ.get("NST_TASK_RUNNER", "thread").strip().lower()
    if kind not in ("thread", "dask"):
        raise ConfigError(f"NST_TASK_RUNNER={kind!r}: expected 'thread' or 'dask'")
    return kind


def task_runner_from_env():
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner_kind() == "thread":
        return ThreadPoolTaskRunner(max_workers=max_workers())
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("NST_TASK_RUNNER=dask needs prefect-dask (in the project's dependencies)") from None
    address = os.environ.get("NST_DASK_ADDRESS")
    return DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": max_workers(), "processes": True, "threads_per_worker": 1})
