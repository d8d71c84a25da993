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


def running(pid: int | str) -> bool:
    """A process that exists and is not a zombie (one that exited and waits to be reaped is not running)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


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


def stop_group(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started with start_new_session=True and everything in its group (its group id is its PID):
    SIGTERM, up to `timeout` s, then SIGKILL. A leader already gone may have left children: they get SIGKILL."""
    if proc.poll() is None:
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
    else:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


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
        try:
            if self._proc is not None:
                stop_group(self._proc, timeout)
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


def start_mlflow_server(
    tmpdir: str | os.PathLike,
    *,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    s3_endpoint_url: str | None = None,
    ready_timeout: float = 90.0,
) -> ServerProcess:
    """`mlflow server` (REFERENCE §5) on a free port: SQLite backend in `tmpdir` unless given, artifacts proxied by
    the server (clients get `mlflow-artifacts:/` URIs and need no S3 credentials) to `artifacts_destination`, e.g.
    `s3://bucket/prefix` on the moto server at `s3_endpoint_url`. One worker, no job runner (else ~10 processes)."""
    tmpdir = Path(tmpdir)
    port = free_port()
    cmd = [venv_executable("mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_store_uri or f"sqlite:///{tmpdir / 'mlflow.db'}",
           "--artifacts-destination", artifacts_destination or str(tmpdir / "mlartifacts")]
    env = {
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }
    if s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = s3_endpoint_url
    return ServerProcess(cmd, port=port, log_path=tmpdir / "mlflow_server.log", ready_path="/health", env=env,
                         cwd=tmpdir, ready_timeout=ready_timeout, name="mlflow_server")


def prefect_env(api_url: str, home: str | os.PathLike, tmpdir: str | os.PathLike | None = None) -> dict[str, str]:
    """Environment for Prefect clients (CLI, workers, flow processes) of a test server: its API URL, its own
    PREFECT_HOME, no telemetry, and a private TMPDIR (the runner writes `$TMPDIR/runner_storage`)."""
    env = {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    }
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    return env


def start_prefect_server(tmpdir: str | os.PathLike, *, ready_timeout: float = 180.0) -> ServerProcess:
    """`prefect server start` (REFERENCE §4) on a free port with a fresh PREFECT_HOME (SQLite) in `tmpdir`:
    ~25 s cold (database migrations), so share one per test session. The UI is off (not needed by tests).
    The returned server has `.api_url` and `.home`; `prefect_env(server.api_url, server.home)` configures clients."""
    tmpdir = Path(tmpdir)
    home = tmpdir / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = prefect_env(f"http://{HOST}:{port}/api", home, tmpdir)
    env["PREFECT_UI_ENABLED"] = "false"
    server = ServerProcess(
        [venv_executable("prefect"), "server", "start", "--host", HOST, "--port", str(port)],
        port=port,
        log_path=tmpdir / "prefect_server.log",
        ready_path="/api/health",
        env=env,
        cwd=tmpdir,
        ready_timeout=ready_timeout,
        name="prefect_server",
    )
    server.api_url = f"{server.url}/api"
    server.home = home
    return server


def start_prefect_worker(
    tmpdir: str | os.PathLike,
    api_url: str,
    home: str | os.PathLike,
    pool: str,
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout: float = 60.0,
) -> ServerProcess:
    """`prefect worker start --pool POOL --with-healthcheck`: ready once its health endpoint (on a free port)
    answers. It polls every second. Stop it (by PID, via `stop()`) before the server."""
    tmpdir = Path(tmpdir)
    port = free_port()
    full_env = prefect_env(api_url, home, tmpdir)
    full_env.update({
        "PREFECT_WORKER_WEBSERVER_HOST": HOST,
        "PREFECT_WORKER_WEBSERVER_PORT": str(port),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    })
    if env:
        full_env.update(env)
    return ServerProcess(
        [venv_executable("prefect"), "worker", "start", "--pool", pool, "--with-healthcheck"],
        port=port,
        log_path=tmpdir / f"prefect_worker_{pool}.log",
        ready_path="/health",
        env=full_env,
        cwd=cwd or tmpdir,
        ready_timeout=ready_timeout,
        name=f"prefect_worker[{pool}]",
    )


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a real server, injecting real faults into the first `times` requests
    whose path (without query) matches `path_part`: `mode="status"` answers `status` (e.g. 503) instead of
    forwarding; `mode="cut"` forwards a GET but closes the connection after half of the body (headers promise the
    full Content-Length): a dropped download. `times` and `failed` may be changed between requests. Runs in a
    thread; `stop()` shuts it down."""

    def __init__(self, upstream: str, path_part: str, times: int = 1, mode: str = "status", status: int = 503,
                 exact: bool = False):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        host, port = upstream.split("://", 1)[1].rstrip("/").split(":")
        self.times, self.hits, self.failed, lock = times, 0, 0, threading.Lock()
        proxy = self

        def matches(path: str) -> bool:
            path = path.split("?")[0]
            return path == path_part if exact else path_part in path

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hit = matches(self.path) and (mode != "cut" or self.command == "GET")
                with lock:
                    fail = hit and proxy.failed < proxy.times
                    proxy.failed += fail
                    proxy.hits += hit
                if fail and mode == "status":
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data[: len(data) // 2] if fail else data)
                if fail:  # mode "cut"
                    self.wfile.flush()
                    self.close_connection = True
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = do_PATCH = _forward

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


class DaskCluster:
    """`dask scheduler` and `dask worker` (`nworkers` worker processes) on 127.0.0.1, stopped by PID."""

    def __init__(self, tmp: Path, env: dict[str, str], nworkers: int = 2):
        bin_ = Path(sys.executable).parent
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = [subprocess.Popen([str(bin_ / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                        str(self.port), "--no-dashboard"], cwd=tmp, stdout=open(tmp / "sched.log", "wb"),
                                       stderr=subprocess.STDOUT, start_new_session=True)]
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, (tmp / "sched.log").read_text()
                time.sleep(0.2)
        self.procs.append(subprocess.Popen([str(bin_ / "dask"), "worker", self.address, "--nworkers", str(nworkers),
                                            "--nthreads", "1", "--no-dashboard", "--memory-limit", "0"], cwd=tmp,
                                           stdout=open(tmp / "workers.log", "wb"), stderr=subprocess.STDOUT,
                                           start_new_session=True, env=env))
        from distributed import Client

        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(nworkers, timeout=90)
            self.worker_pids = set(c.run(os.getpid).values())

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_group(p, 15)
