"""The environment settings `nst` reads, each parsed in one place and all checked when a command starts: a bad
value is one line naming the variable before any work, not a traceback after `prepare` has run.

Readers (the flow's runner, progress output, S3 clients) call these functions, never `os.environ` directly."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit

from nst.errors import ConfigError, quote


def _get(name: str) -> str | None:
    v = os.environ.get(name)
    return None if v is None or v.strip() == "" else v.strip()


def _int(name: str, default: int, lo: int, hi: int) -> int:
    v = _get(name)
    if v is None:
        return default
    try:
        n = int(v)
    except ValueError:
        raise ConfigError(f"{name}={quote(v)}: expected a whole number from {lo} to {hi}") from None
    if not lo <= n <= hi:
        raise ConfigError(f"{name}={quote(v)}: expected a whole number from {lo} to {hi}")
    return n


def max_workers() -> int:
    """Tasks the flow runs side by side (label shard groups, Dask workers): NST_MAX_WORKERS, default CPUs (max 4)."""
    return _int("NST_MAX_WORKERS", min(4, os.cpu_count() or 1), 1, 1024)


def task_runner() -> str:
    v = (_get("NST_TASK_RUNNER") or "thread").lower()
    if v not in ("thread", "dask"):
        raise ConfigError(f"NST_TASK_RUNNER={quote(v)}: expected 'thread' or 'dask'")
    return v


def dask_address() -> str | None:
    """NST_DASK_ADDRESS: an existing scheduler (tcp://host:port); None = a local cluster."""
    v = _get("NST_DASK_ADDRESS")
    if v is None:
        return None
    u = urlsplit(v if "://" in v else f"tcp://{v}")
    try:
        port = u.port
    except ValueError:
        port = None
    if u.scheme not in ("tcp", "tls", "ws", "wss", "inproc") or not u.hostname or (u.scheme != "inproc" and not port):
        raise ConfigError(f"NST_DASK_ADDRESS={quote(v)}: expected a scheduler address like tcp://host:8786")
    return v


def progress_every_s() -> float:
    v = _get("NST_PROGRESS_EVERY_S")
    if v is None:
        return 10.0
    try:
        s = float(v)
    except ValueError:
        s = -1.0
    if not 0 <= s <= 86_400:  # 0 = a line at every update
        raise ConfigError(f"NST_PROGRESS_EVERY_S={quote(v)}: expected seconds between progress lines (0 to 86400)")
    return s


def progress_mode() -> str:
    """NST_PROGRESS: auto (a bar in a terminal, lines elsewhere) or plain (always lines)."""
    v = (_get("NST_PROGRESS") or "auto").lower()
    if v in ("plain", "0", "off"):
        return "plain"
    if v in ("auto", "1", "on", "bar", "rich"):
        return "auto"
    raise ConfigError(f"NST_PROGRESS={quote(v)}: expected auto or plain")


ENDPOINT_ENV_VARS = ("NST_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")


def s3_endpoint() -> str | None:
    """$NST_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL, else None (real AWS)."""
    for var in ENDPOINT_ENV_VARS:
        v = _get(var)
        if v is None:
            continue
        if not re.fullmatch(r"https?://[^/\s]+(/\S*)?", v):
            from nst.secrets import redact

            raise ConfigError(redact(f"{var}={quote(v)}: expected an http(s):// endpoint URL"))
        return v
    return None


def warm_start() -> bool:
    """NST_WARM_START: orchestrators fork stage commands from a pre-imported server (1, default) or start each as a
    fresh interpreter (0): the same bytes either way, only the start-up differs."""
    v = (_get("NST_WARM_START") or "1").lower()
    if v not in ("0", "1", "true", "false", "on", "off"):
        raise ConfigError(f"NST_WARM_START={quote(v)}: expected 1 or 0")
    return v in ("1", "true", "on")


def check_environment() -> None:
    """Every setting at once, at the start of a command."""
    for read in (max_workers, task_runner, dask_address, progress_every_s, progress_mode, s3_endpoint, warm_start):
        read()
