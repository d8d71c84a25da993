"""Reproducible flows: the Prefect flow with DataLoader workers writes the bytes `nst run --no-prefect` writes
without them. Model stages run as their own processes (no Prefect thread shares their RNGs) and augmentation is
seeded per sample (independent of workers). The flow and `nst run --no-prefect`, both without workers, are each
compared with `dvc repro` file by file in tests/test_dvc.py (so with each other)."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_project

pytestmark = pytest.mark.slow

_RUN = ("import json, sys\n"
        "from flows.noisy_student import noisy_student\n"
        "noisy_student(sys.argv[1], json.loads(sys.argv[2]))\n")
MODELS = ["g0/model/model.safetensors", "g1/model/model.safetensors", "g1/model/train_state.pt",
          "g2/model/model.safetensors", "g0/labels/shard-00000-of-00003.parquet", "g1/balanced/balanced.parquet",
          "g2/labels/shard-00002-of-00003.parquet"]


def _digests(project: Path) -> dict[str, str]:
    return {m: hashlib.sha256((project / "outputs" / m).read_bytes()).hexdigest() for m in MODELS}


def _flow(prefect_server, params: Path, overrides: dict, log: Path) -> None:
    import json

    with open(log, "wb") as out:
        p = subprocess.run([sys.executable, "-c", _RUN, str(params), json.dumps(overrides)], cwd=params.parent,
                           env=prefect_server.env(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                           timeout=420, check=False)
    text = log.read_text()
    assert p.returncode == 0, text[-4000:]
    assert "Traceback" not in text and "| ERROR" not in text, text[-4000:]


def test_the_flow_with_dataloader_workers_writes_the_bytes_of_a_direct_run_without(prefect_server, tiny_trained,
                                                                                  tmp_path):
    params = make_tiny_project(tmp_path / "a")  # the shared trained project's params and data
    _flow(prefect_server, params, {"data.num_workers": 2}, tmp_path / "a.log")  # forked workers in the flow's stages
    assert _digests(params.parent) == _digests(tiny_trained.root), \
        "the flow with 2 DataLoader workers trained different weights than `nst run --no-prefect` without"
