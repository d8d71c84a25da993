"""Start real server processes on 127.0.0.1 for tests, and always stop them by PID.

`ServerProcess` is generic: give it a command, a port and a readiness URL. Each server runs in its own
session (process group), so `stop()` kills the server and any children it spawned, and nothing else.
Add new servers (Prefect, MLflow, ...) as small `start_*` functions built on it, like `start_moto_server`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping, Sequence

HOST = "127.0.0.1"
# Readiness probes go straight to 127.0.0.1, never through an HTTP(S)_PROXY from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it; tiny race accepted for tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def venv_executable(name: str) -> str:
    """A console script installed next to the running interpreter, so tests never pick one off PATH."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found next to {sys.executable}; is the test extra installed?")
    return str(path)


def _tail(path: Path, n_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return "<no log>"
    return data[-n_bytes:].decode("utf-8", errors="replace")


class ServerProcess:
    """A server started with Popen(start_new_session=True); ready once GET `ready_url` answers < 500.

    Use as a context manager, or call `stop()` (idempotent: SIGTERM to the process group, up to 10 s,
    then SIGKILL). Output goes to `log_path`; a failed start raises with the tail of that log.
    """

    def __init__(
        self,
        cmd: Sequence[str],
        *,
        port: int,
        log_path: str | os.PathLike,
        ready_path: str = "/",
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        ready_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        self.cmd = [str(c) for c in cmd]
        self.port = port
        self.url = f"http://{HOST}:{port}"
        self.ready_url = self.url + ready_path
        self.log_path = Path(log_path)
        self.name = name or Path(self.cmd[0]).name
        self._proc: subprocess.Popen | None = None
        self._log = None
        self._stopped = False
        self._start(env, cwd)
        try:
            self._wait_ready(ready_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _start(self, env: Mapping[str, str] | None, cwd) -> None:
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            self.cmd,
            env=full_env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_err: object = None
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {rc} before it was ready; log tail:\n{_tail(self.log_path)}"
                )
            try:
                with _DIRECT.open(self.ready_url, timeout=2) as resp:
                    if resp.status < 500:
                        return
                    last_err = f"HTTP {resp.status}"
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    return
                last_err = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:
                last_err = e
            time.sleep(0.1)
        raise TimeoutError(
            f"{self.name} not ready at {self.ready_url} after {timeout:.0f}s (last: {last_err}); "
            f"log tail:\n{_tail(self.log_path)}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        proc = self._proc
        try:
            if proc is not None and proc.poll() is None:
                # The server is its own session leader, so its process group id is its PID.
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=timeout)
            elif proc is not None:
                # Leader is gone; reap children it may have left in its group.
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"ServerProcess({self.name!r}, pid={pid}, url={self.url!r})"


def start_moto_server(tmpdir: str | os.PathLike, *, ready_timeout: float = 30.0) -> ServerProcess:
    """moto's S3-compatible server (REFERENCE §7), on a free port, with dummy credentials in its env."""
    tmpdir = Path(tmpdir)
    port = free_port()
    return ServerProcess(
        [venv_executable("moto_server"), "-H", HOST, "-p", str(port)],
        port=port,
        log_path=tmpdir / "moto_server.log",
        ready_path="/moto-api/",
        env={
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        cwd=tmpdir,
        ready_timeout=ready_timeout,
        name="moto_server",
    )
