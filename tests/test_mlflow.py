"""MLflow tracking (nst/tracking.py): a real `mlflow server` with artifacts proxied to S3 (moto), the SQLite default,
and tracking failures that must neither fail the pipeline nor lose a model."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import make_tiny_project
from servers import free_port, start_mlflow_server

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch):
    """No tracking URI leaking in from the environment or from another test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def mlflow_server(moto_s3, tmp_path_factory):
    """A real tracking server: SQLite backend, artifacts proxied to s3://<bucket>/mlflow on the moto server."""
    bucket = f"nst-mlflow-{uuid.uuid4().hex[:12]}"
    s3 = moto_s3.client()
    s3.create_bucket(Bucket=bucket)
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"), artifacts_destination=f"s3://{bucket}/mlflow",
                                 s3_endpoint_url=moto_s3.endpoint_url)
    try:
        yield SimpleNamespace(url=server.url, bucket=bucket, s3=s3)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """A tiny project (teacher + 1 student) already trained with tracking off; re-running `run_direct` on it
    skips training, so tracking tests cost little more than the tracking itself."""
    from nst.config import load_config
    from nst.pipeline import run_direct

    params = make_tiny_project(tmp_path_factory.mktemp("trained") / "proj", generations=1)
    run_direct(load_config(params))
    return params


def _s3_keys(srv) -> set[str]:
    keys, token = set(), None
    while True:
        kw = {"Bucket": srv.bucket, "Prefix": "mlflow/"} | ({"ContinuationToken": token} if token else {})
        page = srv.s3.list_objects_v2(**kw)
        keys |= {o["Key"] for o in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def _runs(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("kind") == "pipeline"]
    children = {r.data.tags["generation"]: r for r in runs if r.data.tags.get("kind") == "generation"}
    return exp, parents, children


def _champion_rule(versions):
    return min(versions, key=lambda v: (-float(v.tags["test_top1"]), float(v.tags["test_nll"]), int(v.version)))


def test_pipeline_on_tracking_server_with_s3_artifacts(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    from nst.checkpoint import load_model
    from nst.cli import main
    from nst.config import load_config
    from nst.io import file_sha256, read_json
    from nst.pipeline import run_direct
    from nst.report import generation_rows, markdown_table
    from nst.tracking import load_registered

    params = make_tiny_project(tmp_path / "proj", generations=2, extra=(
        f"tracking: {{enabled: true, tracking_uri: '{mlflow_server.url}', experiment: nst-ci, registered_model: nst-tiny}}"))
    cfg = load_config(params)
    run_direct(cfg)
    assert not (cfg.out_dir / "tracking_errors.json").exists()

    client = MlflowClient(mlflow_server.url)
    exp, parents, children = _runs(client, "nst-ci")
    # one parent, three children with the run-structure tags
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["config_hash"] == cfg.section_hash()
    assert parent.data.tags["pipeline_id"]
    assert sorted(children) == ["g0", "g1", "g2"]
    names = {g: r.info.run_name for g, r in children.items()}
    assert names == {"g0": "g0-teacher", "g1": "g1-student", "g2": "g2-student"}
    for gen, run in children.items():
        t = run.data.tags
        assert run.info.status == "FINISHED"
        assert t["mlflow.parentRunId"] == parent.info.run_id
        assert t["generation"] == gen and t["role"] == ("teacher" if gen == "g0" else "student")
        assert t["model"] == read_json(cfg.model_dir(gen) / "model.json")["model"]
        assert t["pipeline_id"] == parent.data.tags["pipeline_id"]
    assert "teacher_run_id" not in children["g0"].data.tags
    assert children["g1"].data.tags["teacher_run_id"] == children["g0"].info.run_id
    assert children["g2"].data.tags["teacher_run_id"] == children["g1"].info.run_id

    # the same metric keys in every generation, per-epoch histories with steps
    keysets = {g: set(r.data.metrics) for g, r in children.items()}
    assert keysets["g0"] == keysets["g1"] == keysets["g2"]
    assert {"test/top1", "test/top5", "test/ece", "test/nll", "train/loss", "train/acc", "val/acc",
            "labeler/kept_fraction", "labeler/dropped", "labeler/duplicated", "labeler/mean_confidence_all",
            "labeler/pseudo_label_acc_all", "model/params"} <= keysets["g0"]
    for gen, run in children.items():
        epochs = cfg.train_config(gen).epochs
        for key in ("train/loss", "train/acc", "val/acc"):
            hist = client.get_metric_history(run.info.run_id, key)
            assert sorted(m.step for m in hist) == list(range(1, epochs + 1)), (gen, key)
        assert run.data.metrics["test/top1"] == pytest.approx(read_json(cfg.gen_dir(gen) / "eval" / "metrics.json")["test/top1"])
        assert run.data.params["train.model"] == run.data.tags["model"]
    assert children["g1"].data.params["generation.ratio"] == "2.0"

    # labeler/* is honest: a student's training pseudo-labels ARE its teacher's labeler numbers
    for gen, teacher in (("g1", "g0"), ("g2", "g1")):
        on_disk = read_json(cfg.gen_dir(gen) / "balanced" / "stats.json")
        tm = children[teacher].data.metrics
        for k in ("kept_fraction", "dropped", "duplicated", "capped", "mean_confidence_all", "pseudo_label_acc_all"):
            assert tm[f"labeler/{k}"] == pytest.approx(on_disk[k]), (gen, k)
        dl = Path(client.download_artifacts(children[gen].info.run_id, "train_data/stats.json", str(tmp_path)))
        assert json.loads(dl.read_text())["kept_fraction"] == on_disk["kept_fraction"]

    # artifacts: listed by the server AND stored in the S3 bucket behind its proxy
    s3_keys = _s3_keys(mlflow_server)
    for gen, run in children.items():
        paths = _artifact_paths(client, run.info.run_id)
        want = {"plots/training_curves.png", "plots/confusion.png", "plots/reliability.png",
                "labeler/class_counts.png", "labeler/confidence_histogram.png", "labeler/stats.json",
                "config/effective_config.json"}
        if gen != "g0":
            want |= {"train_data/class_counts.png", "train_data/confidence_histogram.png", "train_data/stats.json"}
        assert want <= paths, (gen, want - paths)
        for p in want:
            assert any(k.endswith(f"{run.info.run_id}/artifacts/{p}") for k in s3_keys), (gen, p)
        # datasets with content hashes
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert {"labeled", "unlabeled", "test"} <= set(inputs)
        labeled = cfg.out_dir / "data" / "labeled.parquet"
        assert json.loads(inputs["labeled"].dataset.profile)["sha256"] == file_sha256(labeled)
        if gen != "g0":
            pseudo = inputs[f"{gen}-pseudo-labels"]
            balanced = cfg.gen_dir(gen) / "balanced" / "balanced.parquet"
            assert json.loads(pseudo.dataset.profile)["sha256"] == file_sha256(balanced)
            assert {t.key: t.value for t in pseudo.tags}["mlflow.data.context"] == "training"
    assert any(k.endswith("/MLmodel") and "/models/" in k for k in s3_keys), "logged models are in S3 too"

    # registry: versions 1..3 (g0, g1, g2), champion = best test top-1
    versions = client.search_model_versions("name='nst-tiny'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert {str(v.version): v.tags["generation"] for v in versions} == {"1": "g0", "2": "g1", "3": "g2"}
    assert {v.run_id for v in versions} == {r.info.run_id for r in children.values()}
    champion = client.get_model_version_by_alias("nst-tiny", "champion")
    assert str(champion.version) == str(_champion_rule(versions).version)
    best = max(r.data.metrics["test/top1"] for r in children.values())
    assert float(champion.tags["test_top1"]) == pytest.approx(best)

    # the next generation's teacher, loaded back by alias and by version URI, predicts like the on-disk model
    x = torch.randn(5, 3, 16, 16)
    for ref, gen in (("champion", champion.tags["generation"]), (2, "g1"), ("models:/nst-tiny/1", "g0")):
        ref_model, _ = load_model(cfg.model_dir(gen))
        with torch.no_grad():
            assert torch.allclose(load_registered(cfg, ref)(x), ref_model(x), atol=1e-5), ref

    # `nst compare` reads the same table from the server as `nst table` builds from disk
    csv_path, md_path = tmp_path / "cmp.csv", tmp_path / "cmp.md"
    assert main(["compare", "-p", str(params), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    out = capsys.readouterr().out
    assert parent.info.run_id in out and "g2" in out
    assert md_path.read_text() == markdown_table(generation_rows(cfg))
    assert csv_path.read_text().splitlines()[0].startswith("generation,role,model,params,test_top1")
    assert main(["compare", "-p", str(params), "--run-id", parent.info.run_id]) == 0


def test_sqlite_default_without_server(trained_project, tmp_path, monkeypatch):
    """No tracking_uri, no $MLFLOW_TRACKING_URI: outputs/mlflow.db + outputs/mlartifacts, nothing in the cwd."""
    from mlflow import MlflowClient

    from nst.config import load_config
    from nst.pipeline import run_direct
    from nst.tracking import load_registered

    monkeypatch.chdir(tmp_path)
    cfg = load_config(trained_project, ["tracking.enabled=true"])
    run_direct(cfg)
    db = cfg.out_dir / "mlflow.db"
    assert db.is_file()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (cfg.root / "mlruns").exists() and not (cfg.root / "mlflow.db").exists()

    # what `mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db` opens
    client = MlflowClient(f"sqlite:///{db}")
    exp, parents, children = _runs(client, "noisy-student")
    assert exp.artifact_location == (cfg.out_dir / "mlartifacts").resolve().as_uri()
    assert len(parents) == 1 and sorted(children) == ["g0", "g1"]
    run = children["g1"]
    png = cfg.out_dir / "mlartifacts" / run.info.run_id / "artifacts" / "plots" / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {str(v.version) for v in client.search_model_versions("name='noisy-student'")} == {"1", "2"}
    model = load_registered(cfg, "champion")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_tracking_outage_keeps_models_reports_and_can_backfill(trained_project, tmp_path, monkeypatch, caplog):
    """Tracking server down (a closed port): the pipeline finishes, models are on disk, the failure is reported in
    the log and in outputs/tracking_errors.json, and `nst track` logs the outputs once a store is reachable."""
    from mlflow import MlflowClient

    import nst.tracking as T
    from nst.checkpoint import is_complete
    from nst.cli import main
    from nst.config import load_config
    from nst.pipeline import run_direct

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(T, "BACKOFF_S", 0.05)
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(trained_project, ["tracking.enabled=true", f"tracking.tracking_uri={dead}"])
    (cfg.out_dir / "tracking_errors.json").unlink(missing_ok=True)
    caplog.set_level("WARNING", logger="nst.tracking")

    rows = run_direct(cfg)
    assert [r["generation"] for r in rows] == ["g0", "g1"]
    assert is_complete(cfg.model_dir("g0")) and is_complete(cfg.model_dir("g1"))
    errors = json.loads((cfg.out_dir / "tracking_errors.json").read_text())
    assert [e["operation"] for e in errors] == ["start_pipeline"]
    assert errors[0]["tracking_uri"] == dead and "after 3 attempts" in errors[0]["error"]
    assert any("tracking: start_pipeline failed" in r.getMessage() for r in caplog.records)

    store = f"sqlite:///{tmp_path / 'backfill.db'}"
    assert main(["track", "-p", str(trained_project), "-S", "tracking.enabled=true",
                 "-S", f"tracking.tracking_uri={store}"]) == 0
    _, parents, children = _runs(MlflowClient(store), "noisy-student")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == ["g0", "g1"] and all(r.info.status == "FINISHED" for r in children.values())


def test_flaky_call_is_retried_and_a_failing_one_is_contained(trained_project, tmp_path, monkeypatch):
    """One transient error is retried away; a call that keeps failing marks that child FAILED and is reported,
    the next generation and the pipeline go on."""
    from mlflow import MlflowClient

    import nst.tracking as T
    from nst.config import load_config
    from nst.pipeline import run_direct

    monkeypatch.setattr(T, "BACKOFF_S", 0.01)
    calls = {"log_artifacts": 0, "log_inputs": 0}
    real_artifacts, real_inputs = MlflowClient.log_artifacts, MlflowClient.log_inputs

    def flaky_artifacts(self, *a, **k):
        calls["log_artifacts"] += 1
        if calls["log_artifacts"] == 1:
            raise ConnectionError("connection reset by peer")
        return real_artifacts(self, *a, **k)

    def g0_inputs_down(self, run_id, *a, **k):  # the first generation's dataset logging always fails
        calls["log_inputs"] += 1
        if self.get_run(run_id).data.tags.get("generation") == "g0":
            raise ConnectionError("S3 unavailable")
        return real_inputs(self, run_id, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_artifacts", flaky_artifacts)
    monkeypatch.setattr(MlflowClient, "log_inputs", g0_inputs_down)
    store = f"sqlite:///{tmp_path / 'flaky.db'}"
    cfg = load_config(trained_project, ["tracking.enabled=true", f"tracking.tracking_uri={store}"])
    (cfg.out_dir / "tracking_errors.json").unlink(missing_ok=True)

    rows = run_direct(cfg)
    assert len(rows) == 2
    _, parents, children = _runs(MlflowClient(store), "noisy-student")
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["tracking_errors"] == "1"
    assert children["g0"].info.status == "FAILED" and children["g0"].data.tags["tracking_incomplete"] == "true"
    assert children["g1"].info.status == "FINISHED"
    assert children["g1"].data.tags["teacher_run_id"] == children["g0"].info.run_id
    errors = json.loads((cfg.out_dir / "tracking_errors.json").read_text())
    assert [(e["operation"], e["generation"]) for e in errors] == [("track_generation", "g0")]
    assert calls["log_artifacts"] >= 3 and calls["log_inputs"] == T.ATTEMPTS + 1  # 3 tries for g0, 1 for g1


def test_parent_run_tags_git_commit_and_prefect_flow_run(trained_project, tmp_path):
    from mlflow import MlflowClient

    from nst.config import load_config
    from nst.tracking import finish_pipeline, start_pipeline

    store = f"sqlite:///{tmp_path / 'tags.db'}"
    cfg = load_config(trained_project, ["tracking.enabled=true", f"tracking.tracking_uri={store}"])
    cfg._root = REPO  # the repository checkout: the git commit is recorded when there is one
    run_id = start_pipeline(cfg, flow_run_id="0b5c-flow-run")
    finish_pipeline(cfg, run_id, "KILLED")
    run = MlflowClient(store).get_run(run_id)
    assert run.data.tags["prefect_flow_run_id"] == "0b5c-flow-run"
    assert run.info.status == "KILLED"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["git_commit"] == head.stdout.strip()
    else:
        assert "git_commit" not in run.data.tags
    assert start_pipeline(load_config(trained_project)) is None  # tracking.enabled false: no run at all


def test_dataset_inputs_carry_content_hashes_and_dvc_lock_agreement(tmp_path):
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from nst.io import file_sha256
    from nst.tracking import _dataset_input, _dvc_lock_hashes

    f = tmp_path / "outputs" / "data" / "labeled.parquet"
    f.parent.mkdir(parents=True)
    pq.write_table(pa.table({"path": ["a.png", "b.png"], "label": pa.array([0, 1], pa.int32()),
                             "probs": [[0.5, 0.5], [1.0]]}), f)
    md5 = hashlib.md5(f.read_bytes()).hexdigest()
    cfg = SimpleNamespace(root=tmp_path)
    for lock_md5, current in ((md5, True), ("0" * 32, False)):
        (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train-teacher": {
            "cmd": "nst train-teacher", "deps": [{"path": "outputs/data/labeled.parquet", "hash": "md5",
                                                  "md5": lock_md5, "size": f.stat().st_size}]}}}))
        di = _dataset_input(cfg, f, "labeled", "training", _dvc_lock_hashes(tmp_path))
        profile = json.loads(di.dataset.profile)
        assert di.dataset.digest == md5 and profile["sha256"] == file_sha256(f) and profile["num_rows"] == 2
        assert profile["path"] == "outputs/data/labeled.parquet"
        assert profile["dvc_lock_md5"] == lock_md5 and profile["dvc_lock_current"] is current
        assert {t.key: t.value for t in di.tags}["mlflow.data.context"] == "training"
        assert "mlflow_colspec" in json.loads(di.dataset.schema)
