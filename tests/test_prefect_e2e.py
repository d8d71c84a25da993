"""The README's deployment path, for real: a Prefect server, a process work pool, `prefect deploy` of this
repository's prefect.yaml (deployment `local`), a worker, and `prefect deployment run ... --watch` on the tiny
toy project (1 generation), with a `gpu` concurrency limit on the server as the README suggests. Then the Prefect
API must show a Completed run with the expected subflow and task runs (the model stages tagged `gpu`, no other),
artifacts and `nst` logs, and the outputs must be on disk. Every process is stopped by PID.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from conftest import make_tiny_project
from prefect_api import artifacts, client_for, logs, run_for_params, subflow_runs, task_runs
from servers import start_prefect_worker, venv_executable

ROOT = Path(__file__).resolve().parents[1]
POOL = "local-process"  # what prefect.yaml's `local` deployment names

pytestmark = pytest.mark.slow


def _prefect(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([venv_executable("prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, f"prefect {' '.join(args)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def test_deployment_runs_the_flow_end_to_end(prefect_server, tmp_path, request):
    params = make_tiny_project(tmp_path / "proj", generations=1)
    tmpdir = tmp_path / "tmp"  # the runner writes $TMPDIR/runner_storage
    tmpdir.mkdir()
    # `{{ $PWD }}` in prefect.yaml is resolved by `prefect deploy` from the deploying shell's PWD: the checkout
    env = prefect_server.env(TMPDIR=str(tmpdir), PWD=str(ROOT), PREFECT_CLI_PROMPT="false")
    exec_log = tmp_path / "executions.log"

    _prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    _prefect(["--no-prompt", "deploy", "--name", "local"], env)
    from flows.noisy_student import GPU_TAG, gpu_tags

    with client_for(prefect_server.api_url):
        assert gpu_tags() == []  # no limit: no tag, so no slot to ask the server for before each model stage
    _prefect(["concurrency-limit", "create", GPU_TAG, "2"], env)  # 2: the two label shard groups side by side
    # the server is shared by the whole session: the limit goes when this test ends, passed or failed
    request.addfinalizer(lambda: _prefect(["--no-prompt", "concurrency-limit", "delete", GPU_TAG], env))
    with client_for(prefect_server.api_url):
        assert gpu_tags() == [GPU_TAG]

    worker = start_prefect_worker(tmpdir, prefect_server.api_url, prefect_server.home, POOL, cwd=tmp_path,
                                  env={"NST_EXECUTION_LOG": str(exec_log)})
    try:
        run = _prefect(["deployment", "run", "noisy-student/local",
                        "--param", f"params_path={params}",
                        "--param", "overrides=" + json.dumps({"generations.0.student.epochs": 1}),
                        "--job-variable", "env=" + json.dumps({"NST_MAX_WORKERS": "2"}),
                        "--watch", "--watch-timeout", "240"], env, timeout=300)
    finally:
        worker.stop()  # before the server (session fixture)
    assert "Completed" in run.stdout, run.stdout

    with client_for(prefect_server.api_url) as client:
        fr = run_for_params(client, str(params))
        assert fr.state.is_completed(), fr.state
        assert fr.deployment_id is not None and fr.parameters["overrides"] == {"generations.0.student.epochs": 1}
        subs = subflow_runs(client, fr.id)
        assert sorted(s.name for s in subs) == ["g0/generation", "g1/generation"]
        assert all(s.state.is_completed() for s in subs)
        run_ids = [fr.id] + [s.id for s in subs]
        wrappers = {s.parent_task_run_id for s in subs}  # the task run that stands for a subflow in its parent
        trs = [t for t in task_runs(client, run_ids) if t.id not in wrappers]
        names = sorted(t.name for t in trs)
        assert names == sorted(["prepare", "g0/train-teacher", "g0/evaluate", "g0/label-shards-0-0",
                                "g0/label-shards-1-2", "g0/label", "g1/filter-balance", "g1/train-student",
                                "g1/evaluate", "g1/label-shards-0-0", "g1/label-shards-1-2", "g1/label",
                                "dvc-record"]), names
        assert all(t.state.is_completed() for t in trs), [(t.name, t.state.name) for t in trs if not t.state.is_completed()]
        model = {"g0/train-teacher", "g0/evaluate", "g1/train-student", "g1/evaluate"}
        tagged = sorted(t.name for t in trs if GPU_TAG in t.tags)
        assert tagged == sorted(model | {n for n in names if "/label-shards-" in n}), tagged
        arts = {a.key: a for a in artifacts(client, run_ids) if a.key}
        assert {"g0-summary", "g1-summary", "g1-label-progress", "generation-table"} <= set(arts), sorted(arts)
        assert float(arts["g1-label-progress"].data) == 100.0
        summary = arts["g1-summary"].data
        assert "test top-1" in summary and "change vs teacher" in summary and "| duplicated |" in summary
        messages = [lg.message for lg in logs(client, run_ids)]
        assert any(msg.startswith("nst.evaluate: g1/evaluate: top1=") for msg in messages), \
            "the stage process's log lines did not reach its task run's log"

    out = params.parent / "outputs"
    for f in ("g0/model/model.json", "g1/model/model.json", "g1/balanced/stats.json", "g1/eval/metrics.json",
              "g1/labels/stats.json", "summary.md"):
        assert (out / f).is_file(), f
    assert sorted(ln.split("\t")[0] for ln in exec_log.read_text().splitlines()) == names  # each ran once
