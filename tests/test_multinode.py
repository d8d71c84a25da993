"""Training across nodes, on CPU with gloo: two torchrun node agents on 127.0.0.1 (a c10d rendezvous, what srun or
a PyTorchJob starts) write the same model bytes as one node with two processes, and their stage has the same
fingerprint; a launch of another size is refused; a node killed mid-epoch fails the stage with no process left
and a re-run resumes to the bytes of an uninterrupted run; the flow on a local Dask cluster of 2 worker processes
runs a generation's tasks in both and starts the agents there, and with fewer workers than nodes it fails within its
timeout, saying how many joined.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from servers import DaskCluster, free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _stop_agents():
    """Every agent a test started is stopped by its process group at the test's end, passed or failed."""
    yield
    while _STARTED:
        p = _STARTED.pop()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _agents(params: Path, log_dir: Path, stage: list[str], sets: list[str], nnodes: int = 2) -> list[subprocess.Popen]:
    """`nnodes` torchrun agents of one stage, as a cluster's launcher starts them (one per node), each in its own
    process group with its log in a file."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
           "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test-{port}",
           "--max-restarts=0", "-m", "cli", *stage, "-q", "-p", str(params), *sum((["-S", s] for s in sets), [])]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = [subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=open(log_dir / f"node{i}.log", "wb"), stderr=subprocess.STDOUT)
             for i in range(nnodes)]
    _STARTED.extend(procs)
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 180) -> list[int]:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.wait(max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def _left(params: Path) -> list[str]:
    """Processes still running the stage of this project: the agents and their workers (torchrun starts each
    worker in a session of its own, so no process group covers both)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().split()[2]
            except OSError:
                continue
            if str(params) in cmd and state != "Z":
                out.append(f"{d.name}: {cmd[:200]}")
    return out


def _logs(d: Path) -> str:
    return "\n".join(f.read_text(errors="replace") for f in sorted(d.glob("*.log")))


def test_two_node_agents_train_what_one_node_with_two_processes_trains(tiny_trained_ddp, tmp_path):
    import shutil

    params = tiny_trained_ddp.copy(tmp_path / "proj")  # its teacher: trained by one node with 2 processes
    model = params.parent / "outputs" / "g0" / "model"
    want, fp = _sha(model / "model.safetensors"), json.loads((model / "config.json").read_text())["fingerprint"]

    shutil.rmtree(model)
    nodes = _agents(params, tmp_path / "logs", ["train-teacher"], ["distributed.nnodes=2",
                                                                    "distributed.nproc_per_node=1"])
    assert _wait(nodes) == [0, 0], _logs(tmp_path / "logs")
    assert _sha(model / "model.safetensors") == want
    assert json.loads((model / "config.json").read_text())["fingerprint"] == fp  # the world size, not its split

    # launched with 2 processes while the config says 1: refused before training, one line each
    shutil.rmtree(model)
    wrong = _agents(params, tmp_path / "wrong", ["train-teacher"], ["distributed.nproc_per_node=1"])
    assert _wait(wrong) != [0, 0]
    assert ("error: torchrun started WORLD_SIZE=2 processes, but distributed.nnodes x nproc_per_node = 1 x 1 = 1"
            in _logs(tmp_path / "wrong"))
    assert not model.exists() or not (model / "model.safetensors").exists()


def test_a_node_killed_mid_epoch_fails_the_stage_and_a_rerun_resumes_to_the_same_bytes(tiny_trained, tmp_path):
    import shutil

    params = tiny_trained.copy(tmp_path / "proj")
    model = params.parent / "outputs" / "g0" / "model"
    sets = ["distributed.nnodes=2", "teacher.epochs=20"]
    shutil.rmtree(model)
    ref = _agents(params, tmp_path / "ref", ["train-teacher"], sets)
    assert _wait(ref) == [0, 0], _logs(tmp_path / "ref")
    want = _sha(model / "model.safetensors")

    shutil.rmtree(model)
    nodes = _agents(params, tmp_path / "killed", ["train-teacher"], sets)
    deadline = time.monotonic() + 240
    while True:  # until some epochs are checkpointed
        try:
            if len(json.loads((model / "history.json").read_text())) >= 3:
                break
        except (OSError, ValueError):
            pass
        assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), _logs(tmp_path / "killed")
        time.sleep(0.05)
    os.killpg(nodes[1].pid, signal.SIGKILL)  # the node is gone: its agent and its worker
    t0 = time.monotonic()
    assert nodes[0].wait(120) != 0
    assert time.monotonic() - t0 < 120
    time.sleep(2)
    assert _left(params) == [], "a process of the killed stage is still running"
    assert not (model / "model.safetensors").exists()

    again = _agents(params, tmp_path / "again", ["train-teacher"], sets)
    assert _wait(again) == [0, 0], _logs(tmp_path / "again")
    assert "resum" in _logs(tmp_path / "again").lower()
    assert _sha(model / "model.safetensors") == want


def test_a_node_that_cannot_reach_the_rendezvous_names_the_endpoint():
    from flows.runners import _node_agent
    from nst.proc import ChildFailed

    port = free_port()  # nothing listens there
    with pytest.raises(ChildFailed) as ei:
        _node_agent(["true"], 1, f"127.0.0.1:{port}", dict(os.environ), str(ROOT), 1.0)
    assert ei.value.last_error.startswith(f"error: node 1 cannot reach the rendezvous at 127.0.0.1:{port} (")


# ---- the flow on Dask ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dask_cluster(prefect_server, tmp_path_factory):
    """2 worker processes; every task body that runs on them appends `name<TAB>pid` to `cluster.exec_log`."""
    d = tmp_path_factory.mktemp("dask")
    cluster = DaskCluster(d, prefect_server.env(NST_EXECUTION_LOG=str(d / "exec.log")))
    cluster.exec_log = d / "exec.log"
    try:
        yield cluster
    finally:
        cluster.stop()


def _flow(params: Path, prefect_server, cluster, timeout: float) -> subprocess.CompletedProcess:
    env = prefect_server.env(NST_TASK_RUNNER="dask", NST_DASK_ADDRESS=cluster.address, NST_MAX_WORKERS="2",
                             NST_EXECUTION_LOG=str(cluster.exec_log))
    code = "import sys\nfrom flows.noisy_student import noisy_student\nnoisy_student(sys.argv[1])\n"
    return subprocess.run([sys.executable, "-c", code, str(params)], cwd=params.parent, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_the_flow_sends_a_generations_tasks_to_dask_and_starts_the_node_agents_there(prefect_server, dask_cluster,
                                                                                     tiny_trained_ddp, tmp_path):
    """The flow on a Dask cluster: a generation's tasks (filter, training, evaluation, label shard groups) run in
    the workers' processes, spread over both, and a 2-node training stage there writes what one node with 2
    processes writes."""
    import shutil

    import yaml

    two = tiny_trained_ddp.copy(tmp_path / "two")
    raw = yaml.safe_load(two.read_text())
    raw["distributed"] = {"nnodes": 2}  # the same world of 2, over 2 nodes: g0 stays up to date, g1 runs again
    two.write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.rmtree(two.parent / "outputs" / "g1")
    dask_cluster.exec_log.unlink(missing_ok=True)
    p = _flow(two, prefect_server, dask_cluster, 600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ran = dict(line.split("\t") for line in dask_cluster.exec_log.read_text().splitlines())
    g1 = {name: int(pid) for name, pid in ran.items() if name.startswith("g1/")}
    assert {"g1/filter-balance", "g1/train-student", "g1/evaluate", "g1/label-shards-0-0",
            "g1/label-shards-1-2"} <= set(g1), ran
    assert set(g1.values()) <= dask_cluster.worker_pids, (g1, dask_cluster.worker_pids)  # ran in Dask's workers
    assert len(set(g1.values())) == 2  # ... spread over both
    assert (two.parent / "outputs/g1/eval/metrics.json").is_file()
    for g in ("g0", "g1"):
        assert _sha(two.parent / "outputs" / g / "model" / "model.safetensors") == \
            _sha(tiny_trained_ddp.root / "outputs" / g / "model" / "model.safetensors"), g


def test_too_few_dask_workers_fail_the_stage_within_its_timeout(prefect_server, dask_cluster, tmp_path):
    from conftest import make_tiny_project

    params = make_tiny_project(tmp_path / "p", generations=1, extra="distributed: {nnodes: 4, rdzv_timeout_s: 5}")
    t0 = time.monotonic()
    p = _flow(params, prefect_server, dask_cluster, 300)
    assert p.returncode != 0
    assert "g0/train-teacher: 2 of 4 nodes joined (Dask workers) within distributed.rdzv_timeout_s = 5 s" in \
        p.stdout + p.stderr, p.stdout[-3000:] + p.stderr[-3000:]
    assert time.monotonic() - t0 < 200
    assert not (params.parent / "outputs" / "g0" / "model" / "train_state.pt").exists()  # no agent ever started
