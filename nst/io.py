"""Atomic file writes, locks and content hashes.

Every output a later stage trusts is written to a temp file in the same folder and renamed into place,
so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterator

from nst.errors import Busy

RUN_TOKEN_ENV = "NST_RUN_TOKEN"


def _temp_name(path: Path) -> Path:
    """Hidden, unique and short: a file name may be 255 bytes, so a target named near that limit (an S3 key's
    last part) must not get a longer temp name. Its first 32 characters (at most 128 bytes) tell a leftover's
    origin; the pid and random part make it unique."""
    return path.with_name(f".{path.name[:32]}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds.

    The temp file is created with mode 0666 filtered by the process umask (what a plain open() gives), so
    outputs get the usual permissions without reading the umask (which can only be read by changing it)."""
    path = Path(path)
    if path.is_dir():  # a file cannot replace it; say so naming it, before a temp file is made next to it
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True, what: str = "") -> Iterator[Any]:
    """An exclusive advisory lock (flock) on `path`: serialises our own processes on one resource. The kernel drops
    it when the holder dies, so a killed run never leaves a stale lock. `wait=False` raises `Busy` instead."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{path}: {what or 'locked'} (held by another process)") from None
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _lock_path(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / ".nst" / "run.lock"


def _busy_message(out_dir) -> str:
    return f"another pipeline run is writing {out_dir}; wait for it, or set out_dir elsewhere"


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike) -> Iterator[str]:
    """Held for a whole pipeline run: two runs writing one out_dir would interleave each other's stages.

    Yields the run's token; while held, `$NST_RUN_TOKEN` carries it to the stage commands this run launches, and
    `stage_lock` lets exactly those in (any other writer is refused)."""
    token = secrets.token_hex(16)
    with file_lock(_lock_path(out_dir), wait=False, what=_busy_message(out_dir)) as f:
        f.seek(0)
        f.truncate()
        f.write(f"{token} {os.getpid()}\n")
        f.flush()
        old = os.environ.get(RUN_TOKEN_ENV)
        os.environ[RUN_TOKEN_ENV] = token
        try:
            yield token
        finally:
            if old is None:
                os.environ.pop(RUN_TOKEN_ENV, None)
            else:
                os.environ[RUN_TOKEN_ENV] = old
            f.seek(0)
            f.truncate()


@contextlib.contextmanager
def stage_lock(out_dir: str | os.PathLike) -> Iterator[None]:
    """Taken by every command that writes into out_dir: inside the pipeline run that launched it (its token
    matches the lock holder's) it proceeds; otherwise it takes the run lock itself (handing its own token to the
    processes it starts, e.g. torchrun's ranks), or stops at once when another run holds it. Under torchrun only
    rank 0 takes it: the ranks of a stage started on several nodes by their own launcher share no token."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and os.environ["RANK"] != "0":
        yield  # a rank other than 0 of a training stage writes nothing; rank 0 holds the lock for the stage
        return
    token = os.environ.get(RUN_TOKEN_ENV)
    lock = _lock_path(out_dir)
    if token and lock.is_file():
        held = lock.read_text().split()
        if held and held[0] == token:
            yield
            return
    with run_lock(out_dir):
        yield


# ---- writes -------------------------------------------------------------------------------------------------

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps(obj: Any) -> str:
    """The one JSON format of our outputs: sorted keys, indented, stable across runs."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, dumps(obj))


def prepared(path: str | os.PathLike) -> Path:
    """A file `nst prepare` writes, checked before it is read: pyarrow names a missing file by its bare path."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing, the data is not prepared; run `nst prepare` first")
    return Path(path)


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file we (or a user) wrote; a malformed one is a one-line DataError naming it."""
    from nst.errors import DataError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({str(e).splitlines()[0][:120]})") from None


# ---- hashes ---------------------------------------------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@functools.lru_cache(maxsize=65536)
def _stat_memo_sha256(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_sha256(path)


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime, inode) within this process, so checking
    the same model weights for several shards hashes them once."""
    st = os.stat(path)
    return _stat_memo_sha256(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
