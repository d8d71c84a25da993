"""`nst study`: arms x seeds from one file, each seed's teacher trained once and shared, one MLflow parent run with
the pipeline runs as children (tags arm, seed), and the report (mean ± std table, CSV, plot) - through processes
(`--no-prefect`) and through the Prefect flow, with the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_project

pytestmark = pytest.mark.slow


def _study(tmp_path: Path, seeds: list[int]) -> Path:
    make_tiny_project(tmp_path / "p", generations=1, extra="tracking: {enabled: true}")
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({
        "name": "tiny", "params": "p/params.yaml", "out_dir": "p/study", "report_dir": "report", "seeds": seeds,
        "arms": {"noised": {}, "no-noise": {"student.noise.randaugment_n": 0, "student.noise.dropout": 0.0,
                                            "student.noise.drop_path": 0.0}}, "jobs": 2}))
    return f


def _run(args: list[str], cwd: Path, env=None) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                       env=env)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_study_without_prefect_shares_teachers_and_reports(tmp_path):
    from mlflow import MlflowClient

    f = _study(tmp_path, [0, 1])
    out = _run(["study", str(f), "--no-prefect"], tmp_path)
    assert "| g1 | nst_cnn_xs |" in out.stdout
    root = tmp_path / "p" / "study"
    for seed in (0, 1):  # the arms hold the seed's teacher itself (hard links), never a retrained one
        teacher = (root / f"seed{seed}/teacher/g0/model/model.safetensors").stat().st_ino
        for arm in ("noised", "no-noise"):
            assert (root / f"seed{seed}/{arm}/g0/model/model.safetensors").stat().st_ino == teacher
    rows = json.loads((tmp_path / "report/tiny.json").read_text())
    assert {(r["arm"], r["seed"], r["generation"]) for r in rows} == {
        (a, s, g) for a in ("noised", "no-noise") for s in (0, 1) for g in ("g0", "g1")}
    csv = (tmp_path / "report/tiny.csv").read_text().splitlines()
    assert csv[0].startswith("generation,model,arm,mean_top1,std_top1,n_seeds,seed0,seed1") and len(csv) == 5
    g1 = [r["test_top1"] * 100 for r in rows if r["arm"] == "noised" and r["generation"] == "g1"]
    mean = sum(g1) / 2
    assert any(ln.startswith(f"g1,nst_cnn_xs,noised,{mean:.4f},") for ln in csv)
    assert (tmp_path / "report/tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("noisy-student").experiment_id], max_results=100)
    study = [r for r in runs if r.data.tags.get("kind") == "study"]
    assert len(study) == 1 and study[0].info.status == "FINISHED"
    pipelines = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    assert {(r.data.tags["arm"], r.data.tags["seed"]) for r in pipelines} == {
        ("teacher", "0"), ("teacher", "1")} | {(a, s) for a in ("noised", "no-noise") for s in ("0", "1")}
    assert all(r.data.tags["mlflow.parentRunId"] == study[0].info.run_id for r in pipelines)
    gens = [r for r in runs if r.data.tags.get("kind") == "generation" and r.data.tags.get("arm") == "no-noise"]
    assert sorted((r.data.tags["seed"], r.data.tags["generation"]) for r in gens) == [
        ("0", "g0"), ("0", "g1"), ("1", "g0"), ("1", "g1")]
    assert {"md", "csv", "json", "png"} <= {Path(a.path).suffix[1:] for a in
                                           client.list_artifacts(study[0].info.run_id, "report")}


def test_study_as_a_prefect_flow_gives_the_same_numbers(prefect_server, tmp_path):
    f = _study(tmp_path / "flow", [0])
    _run(["study", str(f)], tmp_path / "flow", env=prefect_server.env())
    g = _study(tmp_path / "direct", [0])
    _run(["study", str(g), "--no-prefect"], tmp_path / "direct")
    key = lambda p: sorted((r["arm"], r["generation"], r["test_top1"]) for r in json.loads(p.read_text()))  # noqa
    assert key(tmp_path / "flow/report/tiny.json") == key(tmp_path / "direct/report/tiny.json")
    assert os.path.getsize(tmp_path / "flow/report/tiny.png") > 1000
