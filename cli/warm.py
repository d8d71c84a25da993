"""The warm server (`python -m cli.warm FD`, started by nst.warm.start()): imports what a stage command imports,
once, then forks one child per request, which runs `nst ARGS` with the caller's environment, folder and output.
The protocol is described in nst/warm.py, the orchestrator's side."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from nst.warm import STATUS

# torch, torchvision, timm, our models and stages; and pyarrow's dataset reader (with pandas, which it imports), which
# every stage's first Parquet read imports otherwise: 0.3 s of each stage's start (a py-spy profile of the flow).
PRELOAD = ("cli.main", "tasks.pipeline", "pyarrow.dataset")


def _serve(ctrl: socket.socket):
    """Fork one child per request until the control socket closes. Returns only in a child: (request, out_fd)."""
    import importlib
    import selectors

    for name in PRELOAD:
        importlib.import_module(name)
    sel = selectors.DefaultSelector()
    sel.register(ctrl, selectors.EVENT_READ, None)
    while True:
        for key, _ in sel.select():
            if key.data is not None:  # a child exited: its pidfd is readable
                pid, status_fd = key.data
                sel.unregister(key.fd)
                os.close(key.fd)
                _, wstatus = os.waitpid(pid, 0)
                _write_int(status_fd, os.waitstatus_to_exitcode(wstatus))
                os.close(status_fd)
                continue
            try:
                msg, fds, _, _ = socket.recv_fds(ctrl, 1 << 20, 2)
            except OSError:
                msg, fds = b"", []
            if not msg:
                return None  # the orchestrator is gone
            out_fd, status_fd = fds
            pid = os.fork()
            if pid == 0:
                for k in list(sel.get_map().values()):
                    if k.data is not None:
                        os.close(k.fd)
                        os.close(k.data[1])
                sel.close()
                ctrl.close()
                os.close(status_fd)
                return json.loads(msg), out_fd
            os.close(out_fd)
            _write_int(status_fd, pid)
            sel.register(os.pidfd_open(pid), selectors.EVENT_READ, (pid, status_fd))


def _write_int(fd: int, n: int) -> None:
    try:
        os.write(fd, STATUS.pack(n))
    except OSError:  # the caller is gone
        pass


def _child(req: dict, out_fd: int) -> int:
    """In the forked child: die with the server, take the caller's environment, folder and output, run `nst`."""
    from nst.proc import PARENT_ENV, die_with_parent

    os.environ.clear()
    os.environ.update(req["env"])
    os.environ[PARENT_ENV] = str(os.getppid())
    die_with_parent()  # the server: it dies with the orchestrator
    os.environ[PARENT_ENV] = str(os.getpid())  # we are the launched command (torchrun's ranks check against us)
    os.chdir(req["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.close(out_fd)
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False)
    sys.argv = [sys.executable, *req["args"]]
    from cli.main import main

    return main(req["args"])


def _leave(code: int) -> None:
    """Exit as a normal interpreter would - other threads joined, atexit handlers run, output flushed - but without
    tearing down torch's modules one by one (~1 s here, and nothing is written by it)."""
    import atexit
    import traceback

    try:
        for t in threading.enumerate():
            if t is not threading.main_thread() and not t.daemon:
                t.join()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - still leave
        traceback.print_exc()
        code = code or 1
    os._exit(code)


if __name__ == "__main__":
    from nst.proc import die_with_parent

    die_with_parent()
    job = _serve(socket.socket(fileno=int(sys.argv[1])))
    if job is None:
        sys.exit(0)
    code = 1
    try:
        code = _child(*job)
    except SystemExit as e:  # argparse (--help, bad arguments)
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - printed as an uncaught exception would be
        import traceback

        traceback.print_exc()
    finally:
        _leave(code)
