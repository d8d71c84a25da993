"""DVC glue: one truth for Prefect and DVC.

`dvc.yaml` declares every stage as an `nst` subcommand, so `dvc repro` and the Prefect flow run the same stage
functions on the same params.yaml and write byte-identical files (training re-seeds per epoch; nothing records wall
time or absolute paths). What differs is only who ran them: after a flow run, `record_outputs(cfg)` runs
`dvc commit -f`, which hashes the flow's outputs, stores them in the DVC cache and writes `dvc.lock` exactly as if
`dvc repro` had made them. Afterwards `dvc status` is clean, `dvc repro` re-runs nothing and `dvc push` uploads the
run. See docs/dvc.md.

DVC holds one lock per workspace and fails at once when it is taken, so every call here goes through one file lock
(`.dvc/tmp/nst-dvc.lock`, serialising our own callers, e.g. two flows in one checkout) and `dvc --wait-for-lock`
(waiting for anyone else, e.g. a `dvc repro` in a terminal). DVC runs as a subprocess: it has no Python API for
commit/push, and its CLI configures global logging we do not want inside a Prefect worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from nst.config import Config, ConfigError, load_config
from nst.io import file_lock

log = logging.getLogger("nst.dvc")

PARAMS_FILE = "params.yaml"  # DVC's default params file; dvc.yaml reads every value from it


class DvcError(RuntimeError):
    """A DVC command failed; the message carries the command and the tail of its output."""


def dvc_executable() -> str:
    """The `dvc` installed next to the running interpreter (the project's venv), else the one on PATH."""
    here = Path(sys.executable).parent / "dvc"
    if here.exists():
        return str(here)
    found = shutil.which("dvc")
    if not found:
        raise DvcError("dvc is not installed (pip install 'dvc[s3]' or the project's venv)")
    return found


def dvc_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for DVC: the venv's bin first on PATH (stage commands call `nst`), no analytics, offline Studio."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env.setdefault("DVC_STUDIO_OFFLINE", "1")
    if extra:
        env.update(extra)
    return env


@contextlib.contextmanager
def workspace_lock(root: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on `root/.dvc/tmp/nst-dvc.lock`, held while one of our DVC commands runs."""
    with file_lock(Path(root) / ".dvc" / "tmp" / "nst-dvc.lock"):
        yield


def run_dvc(args: Sequence[str], root: str | os.PathLike = ".", *, timeout: float | None = None,
            env: dict[str, str] | None = None, lock: bool = True) -> str:
    """Run `dvc ARGS` in `root` (serialised per workspace); returns stdout, raises DvcError on failure."""
    cmd = [dvc_executable(), "--wait-for-lock", *map(str, args)]
    ctx = workspace_lock(root) if lock else contextlib.nullcontext()
    with ctx:
        log.debug("running %s in %s", " ".join(cmd), root)
        try:
            p = subprocess.run(cmd, cwd=root, env=dvc_env(env), capture_output=True, text=True, timeout=timeout,
                               check=False, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise DvcError(f"`dvc {' '.join(map(str, args))}` in {root} did not finish within {timeout:.0f}s") from None
    if p.returncode != 0:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise DvcError(f"`dvc {' '.join(map(str, args))}` in {root} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


def is_dvc_project(root: str | os.PathLike) -> bool:
    root = Path(root)
    return (root / "dvc.yaml").is_file() and (root / ".dvc").is_dir()


def _matches_params_file(cfg: Config) -> bool:
    """True when `cfg` is exactly what `<root>/params.yaml` says (no -S overrides, not another params file):
    only then do the outputs correspond to the params DVC would record in dvc.lock."""
    try:
        on_disk = load_config(cfg.root / PARAMS_FILE, check_models=False)
    except ConfigError as e:
        log.warning("cannot compare with %s: %s", cfg.root / PARAMS_FILE, e)
        return False
    return on_disk.model_dump(mode="json") == cfg.model_dump(mode="json")


def record_outputs(cfg: Config, *, timeout: float | None = None) -> None:
    """Record a finished flow's outputs in DVC (`dvc commit -f` for every stage), so that `dvc status` is clean
    and `dvc repro` re-runs nothing. A no-op where the project has no dvc.yaml (or no `.dvc/`), and - with a
    warning - when the run used a config that differs from params.yaml (overrides, another params file):
    dvc.lock must never claim params that did not make its outputs."""
    root = cfg.root
    if not (root / "dvc.yaml").is_file():
        log.debug("%s has no dvc.yaml: not recording outputs in DVC", root)
        return
    if not (root / ".dvc").is_dir():
        log.warning("%s has a dvc.yaml but no .dvc/ (run `dvc init`): outputs not recorded in DVC", root)
        return
    if not _matches_params_file(cfg):
        log.warning("this run's config differs from %s (overrides or another params file): its outputs are NOT "
                    "recorded in dvc.lock; write the values into params.yaml (or use `dvc exp run -S`) to version them",
                    root / PARAMS_FILE)
        return
    log.info("recording outputs in DVC: dvc commit -f (waits while another DVC command holds the workspace)")
    run_dvc(["commit", "--force", "--quiet"], root, timeout=timeout)
    log.info("dvc.lock updated; `dvc status` is clean and `dvc push` uploads this run")


def configure_remote(bucket: str, prefix: str = "", endpoint_url: str | None = None, *, name: str = "storage",
                     root: str | os.PathLike = ".", default: bool = True, region: str | None = None,
                     access_key_id: str | None = None, secret_access_key: str | None = None) -> str:
    """Point DVC at `s3://bucket/prefix` on any S3-compatible endpoint (AWS, MinIO, Ceph, moto, ...).

    Bucket, prefix and endpoint go to `.dvc/config` (committed, no secrets). Credentials come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an AWS profile) - or, when given here, are written with
    `--local` to `.dvc/config.local`, which is git-ignored. Returns the remote URL.
    """
    if not bucket or "/" in bucket:
        raise ValueError(f"bucket must be a bare bucket name (got {bucket!r})")
    url = f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"
    run_dvc(["remote", "add", "--force", *(["--default"] if default else []), name, url], root)
    if endpoint_url:
        run_dvc(["remote", "modify", name, "endpointurl", endpoint_url], root)
    if region:
        run_dvc(["remote", "modify", name, "region", region], root)
    if access_key_id:
        run_dvc(["remote", "modify", "--local", name, "access_key_id", access_key_id], root)
    if secret_access_key:
        run_dvc(["remote", "modify", "--local", name, "secret_access_key", secret_access_key], root)
    return url
