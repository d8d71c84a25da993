"""MLflow tracking (nst/tracking.py) against a real `mlflow server` with artifacts proxied to S3 (moto): live
per-epoch curves while a model trains, the finished runs, the registry, the SQLite default, outages and transient
faults that must neither fail the pipeline nor lose a model, and class names MLflow would reject."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_project
from servers import FaultProxy, free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _tracking_env(monkeypatch):
    """No tracking URI or credentials leaking in from the environment or from another test."""
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
              "NST_MLFLOW_RUN_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("DO_NOT_TRACK", "true")


@pytest.fixture(scope="module")
def trained_project(tmp_path_factory):
    """A tiny project (teacher + 1 student) already trained with tracking off; re-running the pipeline on it skips
    every stage, so tracking tests cost little more than the tracking itself."""
    from nst.config import load_config
    from tasks.pipeline import run_direct

    params = make_tiny_project(tmp_path_factory.mktemp("trained") / "proj", generations=1)
    run_direct(load_config(params), str(params))
    return params


def _s3_keys(srv) -> set[str]:
    keys, token = set(), None
    while True:
        page = srv.s3.list_objects_v2(Bucket=srv.bucket, Prefix="mlflow/", **({"ContinuationToken": token} if token else {}))
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


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


# ---- live: the child run fills in while its model trains --------------------------------------------------------

def test_child_run_is_running_with_epoch_metrics_while_training_then_finished(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    exp_name = f"live-{uuid.uuid4().hex[:8]}"
    params = make_tiny_project(tmp_path / "proj", generations=0, extra=(
        f"tracking: {{enabled: true, tracking_uri: '{mlflow_server.url}', experiment: {exp_name}, "
        "registered_model: nst-live}\nteacher: {model: nst_cnn_xs, epochs: 150, batch_size: 16, warmup_epochs: 0,"
        " noise: {randaugment_n: 0, dropout: 0.0, drop_path: 0.0}}"))
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(params)], cwd=tmp_path,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    client = MlflowClient(mlflow_server.url)
    seen_live = None
    try:
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            exp = client.get_experiment_by_name(exp_name)
            runs = client.search_runs([exp.experiment_id], "tags.kind = 'generation'") if exp else []
            if runs and runs[0].info.status == "RUNNING":
                steps = _steps(client, runs[0].info.run_id, "train/loss")
                if steps and not (tmp_path / "proj/outputs/g0/model/model.json").exists():
                    seen_live = (runs[0].info.run_id, steps)
                    break
            time.sleep(0.2)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert seen_live, "the child run never showed epoch metrics while the model was still training"
    run_id, live_steps = seen_live
    assert live_steps == list(range(1, len(live_steps) + 1)) and len(live_steps) < 150
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "train/acc", "val/acc", "train/lr"):
        assert _steps(client, run_id, key) == list(range(1, 151)), key  # the full history, no step twice
    assert (run.info.end_time - run.info.start_time) / 1000 > 1.0  # the run spans the training, not a second
    assert len(_runs(client, exp_name)[2]) == 1  # one child run: live logging and the final logging are one run


# ---- the finished pipeline on a server ----------------------------------------------------------------------------

def test_pipeline_on_tracking_server_with_s3_artifacts(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    from cli.main import main
    from nst.checkpoint import load_model
    from nst.config import config_hash, load_config
    from nst.io import read_json
    from nst.report import generation_rows, markdown_table
    from nst.tracking import load_registered
    from tasks.pipeline import run_direct

    params = make_tiny_project(tmp_path / "proj", generations=2, extra=(
        f"tracking: {{enabled: true, tracking_uri: '{mlflow_server.url}', experiment: nst-ci, registered_model: nst-tiny}}"))
    cfg = load_config(params)
    run_direct(cfg, str(params))
    assert not (cfg.out_dir / "tracking_errors.json").exists()

    client = MlflowClient(mlflow_server.url)
    exp, parents, children = _runs(client, "nst-ci")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["config_hash"] == config_hash(cfg)
    assert sorted(children) == ["g0", "g1", "g2"]
    assert {g: r.info.run_name for g, r in children.items()} == {"g0": "g0-teacher", "g1": "g1-student",
                                                                 "g2": "g2-student"}
    for gen, run in children.items():
        t = run.data.tags
        assert run.info.status == "FINISHED" and t["mlflow.parentRunId"] == parent.info.run_id
        assert t["generation"] == gen and t["role"] == ("teacher" if gen == "g0" else "student")
        assert t["model"] == read_json(cfg.model_dir(gen) / "model.json")["model"]
        assert t["config_hash"] == parent.data.tags["config_hash"]  # one meaning, one value
        assert run.data.metrics["generation"] == int(gen[1:])  # an axis for the compare view
    assert children["g1"].data.tags["teacher_run_id"] == children["g0"].info.run_id
    assert children["g2"].data.tags["teacher_run_id"] == children["g1"].info.run_id
    # the parent's first look: accuracy, calibration and kept fraction by generation (step = the model's place)
    rows = generation_rows(cfg)
    for key in ("test_top1", "test_ece"):
        hist = client.get_metric_history(parent.info.run_id, f"generation/{key}")
        assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
            (i, pytest.approx(r[key])) for i, r in enumerate(rows)], key
    kept = client.get_metric_history(parent.info.run_id, "generation/kept_fraction")
    assert sorted(m.step for m in kept) == [1, 2]  # the students': the teacher trains on labels only

    keysets = {g: set(r.data.metrics) for g, r in children.items()}
    assert keysets["g0"] | {"train/loss_unlabeled"} == keysets["g1"] == keysets["g2"]  # students: + pseudo-label loss
    assert {"test/top1", "test/top5", "test/ece", "test/nll", "train/loss", "train/acc", "val/acc",
            "labeler/kept_fraction", "labeler/dropped", "labeler/duplicated", "labeler/mean_confidence_all",
            "labeler/pseudo_label_acc_all", "model/params", "class_acc/circle"} <= keysets["g0"]
    for gen, run in children.items():
        for key in ("train/loss", "train/acc", "val/acc"):
            assert _steps(client, run.info.run_id, key) == list(range(1, cfg.train_config(gen).epochs + 1)), (gen, key)
        assert run.data.metrics["test/top1"] == pytest.approx(read_json(cfg.eval_dir(gen) / "metrics.json")["test/top1"])
        assert run.data.params["train.model"] == run.data.tags["model"]
    assert children["g1"].data.params["generation.ratio"] == "2.0"

    # labeler/* comes from the model's own label shards; a student's training pseudo-labels ARE its teacher's
    for gen, teacher in (("g1", "g0"), ("g2", "g1")):
        on_disk = read_json(cfg.balanced_dir(gen) / "stats.json")
        tm = children[teacher].data.metrics
        for k in ("kept_fraction", "dropped", "duplicated", "capped", "mean_confidence_all", "pseudo_label_acc_all"):
            assert tm[f"labeler/{k}"] == pytest.approx(on_disk[k]), (gen, k)
        dl = Path(client.download_artifacts(children[gen].info.run_id, "train_data/stats.json", str(tmp_path)))
        assert json.loads(dl.read_text())["kept_fraction"] == on_disk["kept_fraction"]

    s3_keys = _s3_keys(mlflow_server)
    for gen, run in children.items():
        paths = _artifact_paths(client, run.info.run_id)
        want = {"plots/training_curves.png", "plots/confusion.png", "plots/reliability.png", "labeler/stats.json",
                "config/effective_config.json", "eval/class_keys.json", "eval/history.json"}
        want |= {"train_data/stats.json"} if gen != "g0" else set()
        assert want <= paths, (gen, want - paths)
        for p in want:
            assert any(k.endswith(f"{run.info.run_id}/artifacts/{p}") for k in s3_keys), (gen, p)
        inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
        assert {"labeled", "unlabeled", "test"} <= set(inputs)
        from nst.io import file_sha256

        assert json.loads(inputs["labeled"].dataset.profile)["sha256"] == file_sha256(cfg.data_dir / "labeled.parquet")
        if gen != "g0":
            assert json.loads(inputs[f"{gen}-pseudo-labels"].dataset.profile)["sha256"] == file_sha256(
                cfg.balanced_dir(gen) / "balanced.parquet")
    assert any(k.endswith("/MLmodel") and "/models/" in k for k in s3_keys), "logged models are in S3 too"

    versions = client.search_model_versions("name='nst-tiny'")
    assert {str(v.version): v.tags["generation"] for v in versions} == {"1": "g0", "2": "g1", "3": "g2"}
    champion = client.get_model_version_by_alias("nst-tiny", "champion")
    best = max(versions, key=lambda v: (float(v.tags["test_top1"]), -float(v.tags["test_nll"]), -int(v.version)))
    assert str(champion.version) == str(best.version)

    x = torch.randn(5, 3, 16, 16)
    for ref, gen in (("champion", champion.tags["generation"]), (2, "g1"), ("models:/nst-tiny/1", "g0")):
        ref_model, _ = load_model(cfg.model_dir(gen))
        with torch.no_grad():
            assert torch.allclose(load_registered(cfg, ref)(x), ref_model(x), atol=1e-5), ref

    csv_path, md_path = tmp_path / "cmp.csv", tmp_path / "cmp.md"
    assert main(["compare", "-p", str(params), "--csv", str(csv_path), "--markdown", str(md_path)]) == 0
    out = capsys.readouterr().out
    assert parent.info.run_id in out and "g2" in out
    assert md_path.read_text() == markdown_table(generation_rows(cfg))
    assert csv_path.read_text().splitlines()[0].startswith("generation,role,model,params,test_top1")


def test_sqlite_default_without_server(trained_project, tmp_path, monkeypatch):
    """No tracking_uri, no $MLFLOW_TRACKING_URI: outputs/mlflow.db + outputs/mlartifacts, nothing in the cwd."""
    from mlflow import MlflowClient

    from nst.config import load_config
    from nst.tracking import load_registered
    from tasks.pipeline import run_direct

    monkeypatch.chdir(tmp_path)
    cfg = load_config(trained_project, ["tracking.enabled=true"])
    run_direct(cfg, str(trained_project))
    db = cfg.out_dir / "mlflow.db"
    assert db.is_file() and not (tmp_path / "mlruns").exists() and not (cfg.root / "mlruns").exists()
    client = MlflowClient(f"sqlite:///{db}")
    exp, parents, children = _runs(client, "noisy-student")
    assert exp.artifact_location == (cfg.out_dir / "mlartifacts").resolve().as_uri()
    assert len(parents) == 1 and sorted(children) == ["g0", "g1"]
    png = cfg.out_dir / "mlartifacts" / children["g1"].info.run_id / "artifacts" / "plots" / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_registered(cfg, "champion")(torch.randn(2, 3, 16, 16)).shape == (2, 10)

    # the first look in MLflow's UI: the experiment tagged as model training (the UI's GenAI / Model training switch
    # itself is the browser's: README), and the parent run's own charts are the result, one point per generation
    # (step = its place in the pipeline)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = parents[0].info.run_id
    for key, metric in (("test_top1", "test/top1"), ("test_ece", "test/ece")):
        curve = sorted((m.step, m.value) for m in client.get_metric_history(parent, f"generation/{key}"))
        assert curve == [(i, json.loads((cfg.eval_dir(g) / "metrics.json").read_text())[metric])
                         for i, g in enumerate(("g0", "g1"))], key
    assert [m.step for m in client.get_metric_history(parent, "generation/kept_fraction")] == [1]  # students only
    sections = sorted({k.split("/")[0] for k in client.get_run(parent).data.metrics})
    assert sections[0] == "generation", sections  # the UI's first chart section (it sorts them by name)


# ---- faults -------------------------------------------------------------------------------------------------------

def test_tracking_outage_finishes_the_pipeline_says_tracking_incomplete_and_can_backfill(trained_project, tmp_path,
                                                                                         capsys):
    """Tracking server down (a closed port): the pipeline finishes and its models are on disk; the run says
    "tracking incomplete" and exits 3; the failures are in tracking_errors.json; `nst track` logs them later."""
    from mlflow import MlflowClient

    from cli.main import main
    from nst.checkpoint import is_complete
    from nst.config import load_config

    dead = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(trained_project, ["tracking.enabled=true", f"tracking.tracking_uri={dead}"])
    (cfg.out_dir / "tracking_errors.json").unlink(missing_ok=True)
    t0 = time.monotonic()
    rc = main(["run", "--no-prefect", "-p", str(trained_project), "-S", "tracking.enabled=true",
               "-S", f"tracking.tracking_uri={dead}"])
    err = capsys.readouterr().err
    assert rc == 3 and "tracking incomplete: 1 tracking operation(s) failed" in err
    assert time.monotonic() - t0 < 120  # MLflow's own retries are bounded
    assert is_complete(cfg.model_dir("g0")) and is_complete(cfg.model_dir("g1"))
    errors = json.loads((cfg.out_dir / "tracking_errors.json").read_text())
    assert [e["operation"] for e in errors] == ["start_pipeline"] and errors[0]["tracking_uri"] == dead

    store = f"sqlite:///{tmp_path / 'backfill.db'}"
    assert main(["track", "-p", str(trained_project), "-S", "tracking.enabled=true",
                 "-S", f"tracking.tracking_uri={store}"]) == 0
    _, parents, children = _runs(MlflowClient(store), "noisy-student")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(children) == ["g0", "g1"] and all(r.info.status == "FINISHED" for r in children.values())
    assert _steps(MlflowClient(store), children["g1"].info.run_id, "train/loss") == [1, 2]


def test_a_503_is_retried_by_mlflow_and_a_lost_generation_is_reported(mlflow_server, trained_project, tmp_path,
                                                                      monkeypatch, capsys):
    """A transient 503 from the server is retried away by MLflow's own HTTP retries (the only retry layer). A
    generation whose logging keeps failing is marked FAILED and tagged, the next one is logged, and the run
    summary says tracking is incomplete (exit code 3)."""
    from mlflow import MlflowClient

    from cli.main import main

    proxy = FaultProxy(mlflow_server.url, "/runs/create", times=1, status=503)
    real = MlflowClient.log_figure

    def g0_figures_fail(self, run_id, *a, **k):  # a fault we cannot cause for real: one generation's upload
        if self.get_run(run_id).data.tags.get("generation") == "g0":
            raise ConnectionError("upload failed")
        return real(self, run_id, *a, **k)

    monkeypatch.setattr(MlflowClient, "log_figure", g0_figures_fail)
    exp = f"flaky-{uuid.uuid4().hex[:8]}"
    try:
        rc = main(["run", "--no-prefect", "-p", str(trained_project), "-S", "tracking.enabled=true",
                   "-S", f"tracking.tracking_uri={proxy.url}", "-S", f"tracking.experiment={exp}"])
    finally:
        proxy.stop()
    assert proxy.failed == 1 and proxy.hits >= 2  # the 503 happened and the same call was made again
    assert rc == 3 and "tracking incomplete" in capsys.readouterr().err
    _, parents, children = _runs(MlflowClient(mlflow_server.url), exp)
    assert parents[0].info.status == "FINISHED"
    assert children["g0"].info.status == "FAILED" and children["g0"].data.tags["tracking_incomplete"] == "true"
    assert children["g1"].info.status == "FINISHED"
    assert children["g1"].data.tags["teacher_run_id"] == children["g0"].info.run_id


def test_non_ascii_class_names_are_tracked_with_a_key_map(tmp_path):
    """A class folder `círcle ☃` would make MLflow reject `class_acc/<name>`: keys are sanitised and the mapping
    logged, and nothing is lost."""
    from mlflow import MlflowClient

    from nst.config import load_config
    from tasks.pipeline import run_direct

    params = make_tiny_project(tmp_path / "proj", generations=0)
    lab = tmp_path / "proj" / "data" / "toy"
    for split in ("labeled", "val", "test"):
        (lab / split / "circle").rename(lab / split / "círcle ☃")
    truth = lab / "unlabeled_truth.csv"
    truth.write_text(truth.read_text().replace(",circle\n", ",círcle ☃\n"))
    store = f"sqlite:///{tmp_path / 'u.db'}"
    cfg = load_config(params, ["tracking.enabled=true", f"tracking.tracking_uri={store}"])
    run_direct(cfg, str(params))
    assert not (cfg.out_dir / "tracking_errors.json").exists()
    client = MlflowClient(store)
    _, _, children = _runs(client, "noisy-student")
    run = children["g0"]
    assert run.info.status == "FINISHED" and "class_acc/c_rcle _" in run.data.metrics
    keys = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/class_keys.json", str(tmp_path)))
                      .read_text())
    assert keys["c_rcle _"] == "círcle ☃"


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
    assert run.data.tags["prefect_flow_run_id"] == "0b5c-flow-run" and run.info.status == "KILLED"
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0:
        assert run.data.tags["git_commit"] == head.stdout.strip()
    assert start_pipeline(load_config(trained_project)) is None  # tracking.enabled false: no run at all
