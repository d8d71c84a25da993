"""Reproducible flows: the Prefect flow (twice, once with DataLoader workers) and `nst run --no-prefect` write
byte-identical models from the same params. Model stages run as their own processes (no Prefect thread shares
their RNGs) and augmentation is seeded per sample (independent of workers). `dvc repro` is compared with the flow
file by file in tests/test_dvc.py."""

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
          "g0/labels/shard-00000-of-00003.parquet", "g1/balanced/balanced.parquet"]


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


def test_flow_twice_and_direct_give_identical_weights_with_or_without_workers(prefect_server, tmp_path):
    a = make_tiny_project(tmp_path / "a", generations=1)
    b = make_tiny_project(tmp_path / "b", generations=1)
    c = make_tiny_project(tmp_path / "c", generations=1)
    _flow(prefect_server, a, {}, tmp_path / "a.log")
    _flow(prefect_server, b, {"data.num_workers": 2}, tmp_path / "b.log")  # forked workers inside the flow's stages
    direct = subprocess.run([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(c)], cwd=c.parent,
                            capture_output=True, text=True, timeout=420, check=False)
    assert direct.returncode == 0, direct.stderr[-4000:]
    da, db, dc = _digests(a.parent), _digests(b.parent), _digests(c.parent)
    assert da == db, "the flow with 2 DataLoader workers trained different weights than with none"
    assert da == dc, "the flow and `nst run --no-prefect` trained different weights"
