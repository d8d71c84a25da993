"""Run a stage command as a child process: stream its output lines to a callback, die with the parent.

The orchestrator (a Prefect task thread, or `nst run`) starts `nst <stage> ...` (or `torchrun ... -m cli ...`) as a
child, so nothing of the orchestrator's threads leaks into training. If the orchestrator is killed (even
`kill -9`), the kernel signals the child (PR_SET_PDEATHSIG, set by `python -m nst.proc` just before it execs the
command, and kept across exec), so a killed flow never leaves a training process running. An orchestrator that
started the warm server (nst.warm) gets its stage commands forked from it instead: the same command, without the
seconds a fresh interpreter spends importing torch.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence

PR_SET_PDEATHSIG = 1
PARENT_ENV = "NST_PARENT_PID"


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` when our parent dies (Linux); exit at once if it is already gone.

    $NST_PARENT_PID names the process that launched us. The trampoline below is that launched process (it execs
    the command in place, keeping its pid) and hands its own pid on, so the command's children - torchrun's
    ranks - check against it in turn."""
    parent = os.environ.get(PARENT_ENV)
    if parent == str(os.getpid()):
        return  # we are the launched command itself: the trampoline already did this
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: best effort only
        return
    if parent and os.getppid() != int(parent):
        os._exit(1)


class ChildFailed(RuntimeError):
    """A child command exited non-zero; the message is its last error line."""

    def __init__(self, argv: Sequence[str], returncode: int, last_error: str):
        self.argv, self.returncode, self.last_error = list(argv), returncode, last_error
        super().__init__(last_error or f"exited with code {returncode}")


def _last_error(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        s = line.strip()
        if s.startswith("error:") or s.startswith("internal error:"):
            return s
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return ""


def run_child(argv: Sequence[str], *, on_line: Callable[[str], None], env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None) -> None:
    """Run `argv` to completion, calling `on_line` for every line of its stdout+stderr; raise ChildFailed (with
    the child's last `error:` line) when it exits non-zero. The child gets PR_SET_PDEATHSIG through a tiny
    `python -m nst.proc` trampoline, and is terminated if this call is interrupted."""
    from nst import warm

    full_env = dict(os.environ if env is None else env)
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    tail: collections.deque[str] = collections.deque(maxlen=50)

    def stream(lines) -> None:
        for line in lines:
            line = line.rstrip("\n")
            tail.append(line)
            on_line(line)

    rc = None
    if warm.can_run(argv, full_env):  # forked from the warm server: the same command without its imports
        rc = warm.run(argv[3:], full_env, os.fspath(cwd or os.getcwd()), stream)
    if rc is None:  # a fresh interpreter (no warm server, another environment, or the server is gone)
        full_env[PARENT_ENV] = str(os.getpid())
        cmd = [sys.executable, "-m", "nst.proc", *argv]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=full_env, cwd=cwd, text=True, errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            stream(proc.stdout)
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
    if rc != 0:
        raise ChildFailed(argv, rc, _last_error(list(tail)))


def _stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":  # the trampoline: python -m nst.proc CMD ARGS...
    die_with_parent()
    os.environ[PARENT_ENV] = str(os.getpid())  # for the command's own children (it keeps this pid)
    os.execvp(sys.argv[1], sys.argv[1:])
