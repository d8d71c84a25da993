"""Resume, not recompute: the flow killed with SIGKILL in the middle of a student's training, then re-run, skips
every task that had finished (content-keyed cache, persisted results), resumes the student from its last epoch,
and ends with the same metrics as an uninterrupted run. And a shard that really fails fails the flow, named.

The flows run in subprocesses against the session's Prefect server (tests/conftest.py `prefect_server`);
`NST_EXECUTION_LOG` makes every task body that really executes append its run name to a file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import make_tiny_project
from prefect_api import client_for, run_for_params
from servers import running

ROOT = Path(__file__).resolve().parents[1]
STUDENT_EPOCHS = 8  # long enough to be killed in the middle
OVERRIDES = {"generations.0.student.epochs": STUDENT_EPOCHS}
FINISHED_BEFORE_THE_STUDENT = {"prepare", "g0/train-teacher", "g0/evaluate", "g0/label-shards-0-0",
                               "g0/label-shards-1-2", "g0/label", "g1/filter-balance"}
AFTER_THE_STUDENT = ["dvc-record", "g1/evaluate", "g1/label", "g1/label-shards-0-0", "g1/label-shards-1-2"]

pytestmark = pytest.mark.slow

_RUN = ("import json, sys\n"
        "from flows.noisy_student import noisy_student\n"
        "noisy_student(sys.argv[1], json.loads(sys.argv[2]))\n")


def _start(prefect_server, params: Path, exec_log: Path, overrides: dict | None, log: Path) -> subprocess.Popen:
    env = prefect_server.env(NST_EXECUTION_LOG=str(exec_log))
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-c", _RUN, str(params), json.dumps(overrides)], cwd=params.parent,
                                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # its own process group: kill -9 takes all of it


def _run(prefect_server, params: Path, exec_log: Path, overrides: dict | None, log: Path,
         timeout: float = 240) -> int:
    proc = _start(prefect_server, params, exec_log, overrides, log)
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _executed(exec_log: Path) -> list[str]:
    return [ln.split("\t")[0] for ln in exec_log.read_text().splitlines()] if exec_log.is_file() else []


def _stage_processes(project: Path) -> list[str]:
    """Live `nst` stage processes working on `project` (children the flow launched): fresh interpreters name it on
    their command line; the warm server (`python -m cli.warm`) and the stages it forks work in its folder."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if not running(proc.name):
            continue
        if (" cli " in f" {cmd} " and str(project) in cmd) or (" cli.warm " in f" {cmd} " and cwd == str(project)):
            out.append(f"{proc.name}: {cmd}")
    return out


def test_kill_9_mid_student_then_rerun_skips_finished_tasks_and_matches(prefect_server, tmp_path):
    # reference: the same pipeline, never interrupted, in its own project, walked without Prefect (the flow and
    # `nst run --no-prefect` write the same bytes: tests/test_dvc.py, tests/test_determinism.py)
    ref = make_tiny_project(tmp_path / "ref", generations=1)
    direct = subprocess.run([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(ref), "-S",
                             f"generations.0.student.epochs={STUDENT_EPOCHS}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=240)
    assert direct.returncode == 0, direct.stderr[-3000:]

    params = make_tiny_project(tmp_path / "proj", generations=1)
    out = params.parent / "outputs"
    state = out / "g1" / "model" / "train_state.pt"
    first_log = tmp_path / "first.exec"
    proc = _start(prefect_server, params, first_log, OVERRIDES, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while not state.is_file():  # the student has finished its first epoch
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the student never saved a checkpoint"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # kill -9 of the flow process alone: its stage child must not live on
        proc.wait(timeout=30)
        deadline = time.monotonic() + 20
        while _stage_processes(params.parent) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _stage_processes(params.parent) == [], "the killed flow left a training process running"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    import torch

    epochs_done = torch.load(state, map_location="cpu", weights_only=True)["epoch"] + 1
    assert 1 <= epochs_done < STUDENT_EPOCHS, "killed too late: no middle to resume from"
    assert not (out / "g1" / "model" / "model.json").exists()
    assert set(_executed(first_log)) == FINISHED_BEFORE_THE_STUDENT | {"g1/train-student"}

    second_log = tmp_path / "second.exec"
    assert _run(prefect_server, params, second_log, OVERRIDES, tmp_path / "second.log") == 0, \
        (tmp_path / "second.log").read_text()[-3000:]
    rerun = _executed(second_log)
    assert not set(rerun) & FINISHED_BEFORE_THE_STUDENT, f"finished tasks ran again: {rerun}"
    assert sorted(rerun) == sorted(AFTER_THE_STUDENT + ["g1/train-student"]), rerun
    assert f"resuming at epoch {epochs_done + 1}/{STUDENT_EPOCHS}" in (tmp_path / "second.log").read_text()

    got = json.loads((out / "g1" / "eval" / "metrics.json").read_text())
    want = json.loads((ref.parent / "outputs" / "g1" / "eval" / "metrics.json").read_text())
    assert got == want
    with client_for(prefect_server.api_url) as client:
        assert run_for_params(client, str(params)).state.is_completed()

    # a cached result never stands in for deleted outputs: that stage (only) runs again
    import shutil

    shutil.rmtree(out / "g1" / "eval")
    third_log = tmp_path / "third.exec"
    assert _run(prefect_server, params, third_log, OVERRIDES, tmp_path / "third.log") == 0, \
        (tmp_path / "third.log").read_text()[-3000:]
    assert sorted(_executed(third_log)) == ["dvc-record", "g1/evaluate"]  # the label stage's inputs are unchanged
    assert json.loads((out / "g1" / "eval" / "metrics.json").read_text()) == want


def test_a_failing_shard_fails_the_flow_and_names_the_shard(prefect_server, tiny_trained, tmp_path):
    import shutil

    from nst.config import load_config
    from tasks.prepare import PREPARE
    from tasks.spec import execute

    params = tiny_trained.copy(tmp_path / "proj")
    execute(PREPARE, load_config(params))  # the scan of the copy's own folder, so the damage below stays unseen
    for gone in ("g0/labels", "g1", "g2"):  # the teacher labels again, now with a damaged image
        shutil.rmtree(params.parent / "outputs" / gone)

    # A real fault: bit rot in one unlabeled image of shard 1 (size and mtime kept, so nothing upstream notices).
    out = params.parent / "outputs"
    manifest = pq.read_table(out / "data" / "unlabeled.parquet")
    victim = params.parent / manifest.column("path")[40].as_py()  # shard_size 40: row 40 opens shard 1
    st = victim.stat()
    victim.write_bytes(b"\0not an image\0".ljust(st.st_size, b"\0"))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))

    log = tmp_path / "b.log"
    assert _run(prefect_server, params, tmp_path / "b.exec", None, log) != 0
    text = log.read_text()
    assert "ShardFailure" in text and "g0/label-shard-1" in text
    assert "g0/label-shard-0" not in text and "g0/label-shard-2" not in text.split("ShardFailure")[-1]
    assert victim.name in text  # the child's error names the image
    executed = _executed(tmp_path / "b.exec")
    # the stages before the labels ran only their skip check (up to date); both shard groups ran; nothing after them
    assert sorted(executed) == ["g0/evaluate", "g0/label-shards-0-0", "g0/label-shards-1-2", "g0/train-teacher",
                                "prepare"]
    assert "g0/train-teacher: up to date, skipping" in text and "g0/evaluate: up to date, skipping" in text
    labels = out / "g0" / "labels"
    assert sorted(p.name for p in labels.glob("shard-*.parquet")) == ["shard-00000-of-00003.parquet"]
    assert not (out / "g1").exists()  # nothing downstream ran
    with client_for(prefect_server.api_url) as client:
        run = run_for_params(client, str(params))
        assert run.state.is_failed(), run.state
        assert "g0/label-shard-1" in run.state.message, run.state.message


def test_an_invalid_config_fails_the_flow_with_the_one_line_error(prefect_server, tmp_path):
    params = make_tiny_project(tmp_path / "proj", generations=1)
    log = tmp_path / "run.log"
    assert _run(prefect_server, params, tmp_path / "x.exec", {"filter.threshold": 2}, log) != 0
    assert not _executed(tmp_path / "x.exec")  # nothing ran
    with client_for(prefect_server.api_url) as client:
        run = run_for_params(client, str(params))
    assert run.state.is_failed()
    assert "filter.threshold = 2: Input should be less than or equal to 1" in run.state.message, run.state.message
