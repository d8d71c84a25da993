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


# ---- one training stage across machines --------------------------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_agent(argv: list[str], node: int, endpoint: str, env: dict[str, str], cwd: str, timeout_s: float) -> None:
    """One node's torchrun agent, run by a Dask task on that node's worker; a node that cannot reach the
    rendezvous fails with one line naming the endpoint (torchrun's own report is a traceback per agent)."""
    import socket
    import time

    from nst.proc import ChildFailed, run_child

    host, port = endpoint.rsplit(":", 1)
    if node > 0:  # the first node hosts the store; the others must reach it within the join timeout
        deadline, why = time.monotonic() + timeout_s, ""
        while True:
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
                break
            except OSError as e:
                why = e.strerror or str(e)
                if time.monotonic() > deadline:
                    raise ChildFailed(argv, 1, f"error: node {node} cannot reach the rendezvous at {endpoint} "
                                               f"({why})") from None
                time.sleep(0.5)
    run_child(argv, on_line=lambda line: print(f"[node {node}] {line}", flush=True), env=env, cwd=cwd)


def launch_nodes(cfg, argv: list[str], name: str, env: dict[str, str]) -> None:
    """The N node agents of one training stage as N concurrent tasks on N Dask workers (run one worker per
    machine, `dask worker --nworkers 1`), the c10d rendezvous on the first. Fewer workers than nodes within
    distributed.rdzv_timeout_s: one line saying how many joined, and no agent is started. Any agent failing fails
    the stage; the others stop with it (no restarts: their peers are gone), and a re-run resumes from the
    checkpoint the stage last wrote."""
    import uuid

    from distributed import worker_client

    from nst.proc import ChildFailed
    from tasks.pipeline import node_argv

    from distributed import get_worker

    d = cfg.distributed
    try:
        get_worker()  # this task runs on a Dask worker (the flow's NST_TASK_RUNNER is not this process's)
    except ValueError:
        raise ChildFailed(argv, 2, f"error: distributed.nnodes = {d.nnodes} needs the flow on Dask "
                                   "(NST_TASK_RUNNER=dask, one worker per machine) or your cluster's launcher") from None
    with worker_client(separate_thread=True) as client:  # this task's thread is given back while the agents run
        try:
            client.wait_for_workers(d.nnodes, timeout=d.rdzv_timeout_s)
        except TimeoutError:
            joined = len(client.scheduler_info()["workers"])
            raise ChildFailed(argv, 2, f"error: {joined} of {d.nnodes} nodes joined (Dask workers) within "
                                       f"distributed.rdzv_timeout_s = {d.rdzv_timeout_s:g} s; start "
                                       f"{d.nnodes - joined} more, one per machine") from None
        info = client.scheduler_info()["workers"]
        workers = sorted(info)[: d.nnodes]
        endpoint = d.rdzv_endpoint or (
            f"{info[workers[0]]['host']}:"
            f"{client.submit(_free_port, workers=[workers[0]], allow_other_workers=False, pure=False).result()}")
        rdzv_id = f"nst-{uuid.uuid4().hex[:12]}"
        futures = [client.submit(_node_agent, node_argv(cfg, argv, endpoint, rdzv_id), node, endpoint, env,
                                 str(cfg.root), d.rdzv_timeout_s, workers=[w], allow_other_workers=False, pure=False,
                                 key=f"{name.replace('/', '-')}-node{node}-{rdzv_id}")
                   for node, w in enumerate(workers)]
        errors = []
        for f in futures:  # every agent to its end: none is left behind when one fails
            try:
                f.result()
            except ChildFailed as e:
                errors.append(e)
            except Exception as e:  # noqa: BLE001 - a worker lost mid-stage: Dask's own error
                errors.append(ChildFailed(argv, 1, f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"))
        if errors:
            raise min(errors, key=lambda e: not e.last_error.startswith("error:"))
