"""Task runners for the flow, chosen per run by environment variables of the worker or deployment:
`NST_TASK_RUNNER=thread` (default) or `dask` (prefect-dask; `NST_DASK_ADDRESS=tcp://host:8786` for an existing
cluster, else a local one), with `NST_MAX_WORKERS` workers (default: CPU count, at most 4).

Model stages run as child processes either way, so threads are enough to run them side by side; Dask sends
them to other machines (every worker must see `out_dir` and the project on a shared filesystem)."""

from __future__ import annotations

import os

from nst.errors import ConfigError, quote


from nst.settings import max_workers  # noqa: F401  (re-exported: the flow's mapping reads it from here)


def runner_kind() -> str:
    """`thread` or `dask` (NST_TASK_RUNNER). With Dask the stages run on its workers, so the devices of the
    machine that starts the flow do not matter (the device check is left to the workers)."""
    from nst.settings import task_runner

    return task_runner()


def check_scheduler(timeout_s: float = 3.0) -> None:
    """With NST_TASK_RUNNER=dask and NST_DASK_ADDRESS, a Dask scheduler must answer there, checked in seconds
    before the flow needs it (Dask itself waits 30 s, then fails the flow with a traceback per subflow after the
    data stages ran): a plain connection first, for the reason it fails (refused, unreachable), then Dask's own
    handshake, so a proxy or another server that accepts connections does not pass."""
    from nst.settings import dask_address

    address = dask_address()
    if runner_kind() != "dask" or address is None or address.startswith("inproc://"):
        return
    import asyncio
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect
    from distributed.comm.addressing import get_address_host_port
    from distributed.security import Security

    async def handshake() -> None:
        comm = await connect(address, timeout=timeout_s, **Security().get_connection_args("client"))
        await comm.close()

    try:
        socket.create_connection(get_address_host_port(address), timeout=timeout_s).close()
        with ThreadPoolExecutor(1) as pool:  # an event loop of its own, whether or not this thread runs one
            pool.submit(asyncio.run, handshake()).result()
        return
    except OSError as e:
        why = e.strerror or str(e).splitlines()[0][:160]
    except Exception as e:  # noqa: BLE001 - an answer Dask cannot read is not a scheduler's
        why = f"not Dask's answer: {type(e).__name__}"
    raise ConfigError(f"NST_DASK_ADDRESS={quote(address)}: no Dask scheduler answers there ({why}); start it, or "
                      "unset NST_DASK_ADDRESS for a local cluster")


def task_runner_from_env():
    from prefect.task_runners import ThreadPoolTaskRunner

    if runner_kind() == "thread":
        return ThreadPoolTaskRunner(max_workers=max_workers())
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("NST_TASK_RUNNER=dask needs prefect-dask (in the project's dependencies)") from None
    from nst.settings import dask_address

    address = dask_address()
    check_scheduler()
    return DaskTaskRunner(address=address) if address else DaskTaskRunner(
        cluster_kwargs={"n_workers": max_workers(), "processes": True, "threads_per_worker": 1})
