"""Starting a stage: what a stage process imports (the import budget), and the warm server (nst/warm.py,
cli/warm.py) that forks stage commands from an interpreter that has imported them already - the same command, the
same output, the same exit codes, no process left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from nst import warm
from nst.proc import ChildFailed, run_child
from servers import running
from tasks.spec import REPO

# Never in a stage process: the orchestrator's and the tracker's libraries, and what only optional stages use.
# (pandas is allowed: pyarrow's to_numpy imports it whenever it is installed.)
NOT_IN_A_STAGE = ("prefect", "mlflow", "dvc", "dask", "distributed", "sklearn", "matplotlib", "boto3",
                  "botocore", "rich", "imagecorruptions", "torchattacks", "torchcodec")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return {m.split(".")[0] for m in json.loads(out.splitlines()[-1])}


def test_the_warm_servers_preload_stays_within_the_import_budget():
    """What the server imports is what every forked stage has: torch and timm, none of the orchestration."""
    from cli.warm import PRELOAD

    loaded = _modules_after("; ".join(f"import {m}" for m in PRELOAD))
    assert {"torch", "timm", "torchvision", "models"} <= loaded
    assert not loaded & set(NOT_IN_A_STAGE), sorted(loaded & set(NOT_IN_A_STAGE))


def test_a_training_stage_imports_no_orchestration_or_tracking(tiny_trained):
    """A real stage command that does its work (the last student, trained again; tracking off) stays within the
    budget too."""
    import shutil

    proj = tiny_trained.copy()
    shutil.rmtree(proj.parent / "outputs" / "g2" / "model")
    loaded = _modules_after("from cli.main import main\n"
                            f"rc = main(['train-student', 'g2', '-q', '-p', {str(proj)!r}])\n"
                            "assert rc == 0, rc")
    assert (proj.parent / "outputs" / "g2" / "model" / "model.safetensors").is_file()
    assert "torch" in loaded
    assert not loaded & set(NOT_IN_A_STAGE), sorted(loaded & set(NOT_IN_A_STAGE))


@pytest.fixture
def server():
    assert warm.start()
    yield warm.pid()
    warm.stop()


def _stage(params, *args):
    return [sys.executable, "-m", "cli", *args, "-q", "-p", str(params)]


def test_a_warm_stage_is_the_same_command_with_the_same_output_and_exit_codes(tiny_trained, server):
    proj = tiny_trained.copy()
    cold, hot = [], []
    run_child(_stage(proj, "evaluate", "g0"), on_line=cold.append, env={**os.environ, "NST_WARM_START": "0", "X": "1"})
    run_child(_stage(proj, "evaluate", "g0"), on_line=hot.append)
    strip = lambda lines: [line[9:] for line in lines]  # noqa: E731 - without the HH:MM:SS stamp
    assert strip(hot) == strip(cold) and any("up to date" in line for line in hot)
    with pytest.raises(ChildFailed) as e:
        run_child(_stage(proj, "evaluate", "g0") + ["-S", "pseudo_label.batch_size=0"], on_line=lambda line: None)
    assert e.value.returncode == 2 and e.value.last_error.startswith("error:") and "batch_size" in e.value.last_error
    with pytest.raises(ChildFailed) as e:
        run_child([sys.executable, "-m", "cli", "no-such-command"], on_line=lambda line: None)
    assert e.value.returncode == 2  # argparse's exit code, as from a fresh interpreter


def test_a_stage_forked_from_the_warm_server_runs_in_its_own_process_and_folder(tiny_trained, server, tmp_path):
    """The child is the server's, not ours, with the caller's environment and working folder."""
    proj = tiny_trained.copy()
    lines: list[str] = []
    (tmp_path / "elsewhere").mkdir()
    rel = os.path.relpath(proj, tmp_path / "elsewhere")
    run_child([sys.executable, "-m", "cli", "evaluate", "g0", "-p", rel], on_line=lines.append,
              cwd=tmp_path / "elsewhere", env={**os.environ, "NST_PROGRESS": "plain"})
    assert any("up to date" in line for line in lines)
    out = subprocess.run(["ps", "-o", "pid=,args=", "--ppid", str(os.getpid())], capture_output=True, text=True).stdout
    assert f"{server} " in out and "cli.warm" in out  # the server is a fresh interpreter we started by exec


def test_killing_the_orchestrator_stops_the_warm_server_and_its_running_stage(tiny_trained, tmp_path):
    """kill -9 of the process that owns the server: the server sees its control socket close and exits, and the
    stage it forked dies with it (PR_SET_PDEATHSIG); nothing is left running."""
    import shutil

    tiny_project = tiny_trained.copy(tmp_path / "proj")
    shutil.rmtree(tmp_path / "proj" / "outputs" / "g0" / "model")
    script = tmp_path / "orchestrator.py"
    script.write_text(
        "import os, sys\n"
        "from nst import warm\nfrom nst.proc import run_child\n"
        "warm.start()\n"
        f"run_child([sys.executable, '-m', 'cli', 'train-teacher', '-p', {str(tiny_project)!r}, '-S', 'teacher.epochs=500'],"
        " on_line=lambda l: print(l, flush=True))\n")
    orch = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert orch.stdout is not None
        for line in orch.stdout:
            if " epoch 1/500 " in line:
                break
        kids = subprocess.run(["pgrep", "-P", str(orch.pid)], capture_output=True, text=True).stdout.split()
        assert kids, "no warm server under the orchestrator"
        stages = [p for k in kids for p in subprocess.run(["pgrep", "-P", k], capture_output=True, text=True).stdout.split()]
        assert stages, "no stage under the warm server"
        orch.send_signal(signal.SIGKILL)
        orch.wait(10)
        deadline = time.monotonic() + 20
        alive = kids + stages
        while alive and time.monotonic() < deadline:
            alive = [p for p in alive if running(p)]
            time.sleep(0.2)
        assert not alive, f"left running: {alive}"
    finally:
        if orch.poll() is None:
            orch.kill()
            orch.wait()



def test_a_stage_runs_as_a_fresh_interpreter_when_the_warm_server_is_gone(tiny_trained, server):
    proj = tiny_trained.copy()
    os.kill(server, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    lines: list[str] = []
    run_child(_stage(proj, "evaluate", "g0"), on_line=lines.append)
    assert any("up to date" in line for line in lines)
    assert not warm.can_run(_stage(proj, "evaluate", "g0"), dict(os.environ))  # retired: later commands start cold
