"""Shared fixtures. Real servers run as child processes on 127.0.0.1 (see tests/servers.py)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import pytest

# Dummy credentials so boto3 never reaches for real ones; no Hub downloads in tests.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from servers import (  # noqa: E402  (tests/ is on sys.path via rootdir conftest)
    ServerProcess,
    prefect_env,
    start_mlflow_server,
    start_moto_server,
    start_prefect_server,
)


# `make test` runs two pytest-xdist workers, each taking a whole file at a time (`--dist loadfile`: a module's
# shared fixtures are built once), in collection order. The longest files go first, so that none of them starts
# last while the other worker sits idle (measured alone on 2 cores, 2026-12-03: each 60-170 s); the rest keep
# their order, and so does every file's own.
LONGEST_FIRST = ["test_engine.py", "test_multinode.py", "test_dvc.py", "test_scale.py", "test_study.py",
                 "test_prefect_resume.py", "test_shards.py", "test_failures.py", "test_mlflow.py"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(autouse=True)
def _torch_threads():
    """A stage called in this process (`main([...])`) sets torch's thread count from its config (1 here): each test
    gets the count back, so no test's speed or float rounding depends on the tests that ran before it."""
    import torch

    n = torch.get_num_threads()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two test processes on 2 cores: one thread each
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class MotoS3:
    server: ServerProcess
    endpoint_url: str

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory):
    """One moto S3 server per session (starting one takes ~1 s); stopped by PID at teardown."""
    server = start_moto_server(tmp_path_factory.mktemp("moto"))
    try:
        yield MotoS3(server=server, endpoint_url=server.url)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_s3):
    """A fresh bucket per test, so tests sharing the session server never see each other's objects."""
    name = f"nst-test-{uuid.uuid4().hex[:16]}"
    moto_s3.client().create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def mlflow_server(moto_s3, tmp_path_factory):
    """A real tracking server: SQLite backend, artifacts proxied to s3://<bucket>/mlflow on the moto server."""
    from types import SimpleNamespace

    bucket = f"nst-mlflow-{uuid.uuid4().hex[:12]}"
    s3 = moto_s3.client()
    s3.create_bucket(Bucket=bucket)
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), artifacts_destination=f"s3://{bucket}/mlflow",
                                 s3_endpoint_url=moto_s3.endpoint_url)
    try:
        yield SimpleNamespace(url=server.url, bucket=bucket, s3=s3)
    finally:
        server.stop()


@dataclass
class PrefectServer:
    server: ServerProcess
    api_url: str
    home: "os.PathLike"
    tmpdir: "os.PathLike"

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ + what a Prefect client of this server needs (API URL, PREFECT_HOME, TMPDIR) + `extra`."""
        return {**os.environ, **prefect_env(self.api_url, self.home, self.tmpdir), **extra}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real `prefect server start` per session (~25 s cold: migrations on a fresh PREFECT_HOME); by PID."""
    tmp = tmp_path_factory.mktemp("prefect")
    server = start_prefect_server(tmp)
    try:
        yield PrefectServer(server=server, api_url=server.api_url, home=server.home, tmpdir=tmp)
    finally:
        server.stop()


# ---- a tiny, fast Noisy Student project (toy data, 16 px, 1-2 epochs) ---------------------------------

TINY_PARAMS = """
seed: 0
device: cpu
out_dir: outputs
threads: 1   # the stage processes the tests start often run side by side on 2 cores: 2 threads each oversubscribe
data:
  labeled: data/toy/labeled
  unlabeled: data/toy/unlabeled
  val: data/toy/val
  test: data/toy/test
  unlabeled_truth: data/toy/unlabeled_truth.csv
  image_size: 16
teacher:
  model: nst_cnn_xs
  epochs: 2
  batch_size: 16
  warmup_epochs: 0
  noise: {randaugment_n: 0, dropout: 0.0, drop_path: 0.0}
pseudo_label: {shard_size: 40, batch_size: 64}
filter: {threshold: 0.0}
generations:
  - name: g1
    teacher: g0
    ratio: 2
    student:
      model: nst_cnn_xs
      epochs: 2
      batch_size: 16
      warmup_epochs: 0
      noise: {randaugment_n: 2, randaugment_m: 9, dropout: 0.3, drop_path: 0.1}
  - name: g2
    teacher: g1
    ratio: 2
    student:
      model: nst_cnn_s
      epochs: 1
      batch_size: 16
      warmup_epochs: 0
      noise: {randaugment_n: 2, randaugment_m: 9, dropout: 0.3, drop_path: 0.1}
tracking: {enabled: false}
"""


def make_tiny_project(root, generations: int = 2, extra: str = ""):
    """Write a tiny project (params.yaml + toy data) into `root`; returns the params.yaml path."""
    from pathlib import Path

    import yaml

    from nst.datasets import make_toy

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    make_toy(root / "data" / "toy", size=16, labeled_per_class=4, val_per_class=2, unlabeled_per_class=12,
             test_per_class=4)
    params = yaml.safe_load(TINY_PARAMS)
    params["generations"] = params["generations"][:generations]
    if extra:
        params.update(yaml.safe_load(extra))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root / "params.yaml"


@pytest.fixture
def tiny_project(tmp_path):
    """A fresh tiny project folder: 40 labeled, 120 unlabeled (3 shards of 40), 40 test images."""
    return make_tiny_project(tmp_path / "proj")


# ---- trained once per test run, shared over copies -------------------------------------------------------------

def _tree_state(root) -> dict:
    from pathlib import Path

    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in Path(root).rglob("*") if p.is_file()}


@dataclass
class TrainedProject:
    """A tiny project whose whole pipeline ran once (`nst run --no-prefect`: g0, g1, g2 trained, evaluated and
    labelled). Tests never touch the master: each takes its own copy, whose stages are all up to date; the session
    checks at its end that the master is unchanged (the tests run as root, so file modes would not stop a write)."""

    root: "os.PathLike"
    _n: int = 0

    def copy(self, dest=None):
        """A copy of the project (mtimes kept, so the scan cache still knows its files); its params.yaml."""
        import shutil
        from pathlib import Path

        self._n += 1
        dest = Path(dest) if dest is not None else Path(self.root).parent / f"copy-{self._n}"
        shutil.copytree(self.root, dest, symlinks=True)
        return dest / "params.yaml"


def _trained_once(tmp_path_factory, name: str, **project):
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path_factory.mktemp(name) / "proj"
    params = make_tiny_project(root, **project)
    subprocess.run([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(params)], check=True,
                   cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    before = _tree_state(root)
    yield TrainedProject(root)
    assert _tree_state(root) == before, "a test wrote into the shared trained project instead of its copy"


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory):
    yield from _trained_once(tmp_path_factory, "trained")


@pytest.fixture(scope="session")
def tiny_trained_ddp(tmp_path_factory):
    """The tiny project with g1 only, its training stages under torchrun as 2 gloo processes on one node: what a
    launch of the same world over 2 nodes must write, byte for byte."""
    yield from _trained_once(tmp_path_factory, "trained-ddp", generations=1,
                             extra="distributed: {nproc_per_node: 2}")


class Crash(Exception):
    """Raised by `crash_after_first_epoch`: a training stage dying after its first epoch's checkpoint."""


def crash_after_first_epoch(run):
    """Call `run()` with training made to crash right after epoch 1 (its checkpoint written); expects the Crash."""
    import tasks.train as tt

    real_fit = tt.fit

    def crashing_fit(**kw):
        def on_epoch(row):
            if row["epoch"] == 1:
                raise Crash()
        return real_fit(**(kw | {"on_epoch": on_epoch}))

    tt.fit = crashing_fit
    try:
        with pytest.raises(Crash):
            run()
    finally:
        tt.fit = real_fit
