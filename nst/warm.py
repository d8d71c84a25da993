"""The warm server: stage commands forked from an interpreter that has already imported them.

A fresh `python -m cli <stage>` spends seconds importing torch, torchvision and timm before it reads its config, and
the flow starts a dozen of them. An orchestrator that calls `start()` gets one server process: a new interpreter
(started by exec, so it holds nothing of the orchestrator's - no Prefect, no thread) that imports the stage code
once, then forks one child per command, `nst ARGS` with the caller's environment, folder and output. Each stage is
still a process of its own, as reproducible as a fresh one (the tests compare the bytes), minus the imports.

multiprocessing's forkserver does this too, but re-imports the orchestrator's `__main__` in every child (all of
Prefect under a deployment's `python -m prefect.engine`), so this is the part of it we need.

This module is the orchestrator's side; the server is `python -m cli.warm` (cli/warm.py). Protocol: one
SOCK_SEQPACKET control socket; a request is JSON {args, env, cwd} with two file descriptors (the
child's stdout+stderr, and a status pipe on which the server writes the child's pid, then its exit code). The
server exits when the control socket closes (its orchestrator is gone); its children die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence

# Variables a forked command may see differently from the server: read when used, never at import time by what the
# server imported. A command whose environment differs in anything else runs as a fresh interpreter instead.
PER_LAUNCH_ENV = re.compile(r"(NST_|MLFLOW_|AWS_|PREFECT_|DVC_)\w*|CUDA_VISIBLE_DEVICES|PYTHONUNBUFFERED")
STATUS = struct.Struct("<q")  # the status pipe's words: the child's pid, then its exit code


class _Server:
    def __init__(self) -> None:
        from nst.proc import PARENT_ENV

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.env = dict(os.environ)
        self.proc = subprocess.Popen([sys.executable, "-m", "cli.warm", str(theirs.fileno())],
                                     pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     env={**self.env, PARENT_ENV: str(os.getpid())})
        theirs.close()
        self.ctrl, self.lock, self.alive = ours, threading.Lock(), True


_server: _Server | None = None
_start_lock = threading.Lock()


def start() -> bool:
    """Start the warm server (idempotent; it imports in the background while the caller goes on). Off with
    NST_WARM_START=0; False where it is off."""
    global _server
    from nst.settings import warm_start

    if not warm_start() or not hasattr(os, "pidfd_open"):  # Linux >= 5.3
        return False
    with _start_lock:
        if _server is None:
            _server = _Server()
    return True


def stop() -> None:
    """Close the server (it exits when its control socket closes; its running children with it) and reap it."""
    global _server
    with _start_lock:
        s, _server = _server, None
    if s is not None:
        s.ctrl.close()
        try:
            s.proc.wait(10)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


def pid() -> int | None:
    return _server.proc.pid if _server is not None else None


def can_run(argv: Sequence[str], env: dict[str, str]) -> bool:
    """A `python -m cli ...` command whose environment the server's imports cannot have seen differently."""
    s = _server
    if s is None or not s.alive or list(argv[:3]) != [sys.executable, "-m", "cli"]:
        return False
    changed = {k for k in env.keys() | s.env.keys() if env.get(k) != s.env.get(k)}
    return all(PER_LAUNCH_ENV.fullmatch(k) for k in changed)


def run(args: list[str], env: dict[str, str], cwd: str, stream: Callable) -> int | None:
    """`nst ARGS` forked from the server; `stream` reads its output lines; returns its exit code (negative: killed
    by that signal, as subprocess reports it), or None when the server is gone (it is retired; the caller runs the
    command the cold way)."""
    s = _server
    assert s is not None
    out_r, out_w = os.pipe()
    st_r, st_w = os.pipe()
    try:
        with s.lock:
            socket.send_fds(s.ctrl, [json.dumps({"args": args, "env": env, "cwd": cwd}).encode()], [out_w, st_w])
    except OSError:
        pass  # the status pipe reads EOF below
    finally:
        os.close(out_w)
        os.close(st_w)
    with os.fdopen(st_r, "rb", buffering=0) as status, os.fdopen(out_r, "r", encoding="utf-8", errors="replace") as out:
        pid = _read_int(status)
        if pid is None:
            s.alive = False
            return None
        try:
            stream(out)
            rc = _read_int(status)
        except BaseException:
            _stop(pid, status)
            raise
    return 1 if rc is None else rc


def _read_int(f) -> int | None:
    b = f.read(STATUS.size)
    return STATUS.unpack(b)[0] if len(b) == STATUS.size else None


def _stop(pid: int, status, grace: float = 10.0) -> None:
    import select

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if select.select([status], [], [], grace)[0]:
            return
