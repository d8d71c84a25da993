"""Failure behaviour: each test causes a fault for real (a typo, changed pixels, a concurrent writer, a password in
a URI, a decompression bomb, damaged files, S3 misconfiguration) and checks the promise in README "Failure
behaviour": nothing of the user's is lost, the error is one line naming the culprit, exit code 2, no traceback.
Mocks only for faults that cannot be caused here (a full disk, a read-only file system)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import main
from conftest import make_tiny_project
from nst.config import load_config
from nst.errors import DataError
from tasks.prepare import PREPARE
from tasks.spec import execute, fingerprint
from tasks.train import TRAIN_TEACHER
from test_scan import bilevel_png

REPO = Path(__file__).resolve().parents[1]


def _err(capsys) -> str:
    """The one `error:` line a failed command ends with (log lines of work done before it may precede it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    errors = [ln for ln in err.splitlines() if ln.startswith(("error:", "internal error:"))]
    assert len(errors) == 1 and err.endswith(errors[0]), err
    return errors[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. a data-path typo destroys nothing -------------------------------------------------------------------

def test_a_typo_in_a_data_path_is_one_line_and_deletes_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    params = make_tiny_project(project, generations=1)
    (project / ".git").mkdir()
    (project / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (project / "NOTES.md").write_text("my notes\n")
    raw = yaml.safe_load(params.read_text())
    raw["data"]["labeled"] = "data/toy/labelled"  # the typo
    params.write_text(yaml.safe_dump(raw))
    before = _tree(project)
    for argv in (["run", "--no-prefect"], ["prepare"]):
        assert main([*argv, "-p", str(params)]) == 2
        err = _err(capsys)
        assert err == "error: " + f"{params}: data.labeled = 'data/toy/labelled': does not exist", err
    # absolute typo: /data/labelled must not make anything happen to /data
    raw["data"]["labeled"] = str(tmp_path / "data" / "labelled")
    params.write_text(yaml.safe_dump(raw))
    assert main(["run", "--no-prefect", "-p", str(params)]) == 2 and "does not exist" in _err(capsys)
    assert not (tmp_path / "data").exists()
    assert _tree(project) == before | {"params.yaml": params.read_bytes()}


def test_a_builtin_set_never_overwrites_a_folder_it_did_not_make(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "data" / "toy").mkdir(parents=True)
    (project / "data" / "toy" / "my_photo.jpg").write_bytes(b"precious")
    (project / "params.yaml").write_text(yaml.safe_dump({"data": {"builtin": "toy"}, "tracking": {"enabled": False}}))
    before = _tree(project)
    assert main(["run", "--no-prefect", "-p", str(project / "params.yaml")]) == 2
    err = _err(capsys)
    assert "data/toy: exists and was not made by `nst data` (no dataset.json); refusing to overwrite it" in err
    assert {k: v for k, v in _tree(project).items() if not k.startswith("outputs/")} == before



def test_a_foreign_dataset_json_does_not_make_a_folder_ours(tmp_path):
    """nnU-Net and the Decathlon put a dataset.json at a dataset's root: only a spec we write marks a folder ours."""
    from nst.datasets import make_toy

    folder = tmp_path / "Dataset001_Heart"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "imagesTr" / "la_003.nii.gz").write_bytes(b"scan")
    (folder / "dataset.json").write_text('{"channel_names": {"0": "MRI"}, "labels": {"background": 0}, '
                                         '"numTraining": 20, "file_ending": ".nii.gz"}')
    before = _tree(folder)
    with pytest.raises(DataError, match="Dataset001_Heart: exists and was not made by `nst data`"):
        make_toy(folder, labeled_per_class=1, val_per_class=1, unlabeled_per_class=1, test_per_class=1)
    assert _tree(folder) == before


def test_a_build_killed_while_swapping_folders_is_cleaned_up_by_the_next(tmp_path):
    """Crash leftovers of our own (a temp folder, the old copy half deleted, marker still there) are deleted by
    the next build; the set it writes equals a clean build's."""
    from nst.datasets import make_toy

    small = dict(labeled_per_class=1, val_per_class=1, unlabeled_per_class=2, test_per_class=1)
    clean = _tree(make_toy(tmp_path / "clean" / "toy", **small))
    out = tmp_path / "data" / "toy"
    make_toy(out, **{**small, "seed": 1})
    (tmp_path / "data" / ".toy.old").mkdir()
    (out / "dataset.json").rename(tmp_path / "data" / ".toy.old" / "dataset.json")  # old copy: only its marker
    shutil.copytree(out, tmp_path / "data" / ".toy.partial")
    (tmp_path / "data" / ".toy.partial" / ".nst-partial").touch()  # a temp folder never finished
    shutil.copy(tmp_path / "data" / ".toy.old" / "dataset.json", out / "dataset.json")
    assert _tree(make_toy(out, **small)) == clean
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["toy"]


# ---- 2. changed pixels re-run exactly what depends on them -------------------------------------------------------

def test_changed_image_content_reruns_what_depends_on_it(tiny_project):
    from PIL import Image

    cfg = load_config(tiny_project)
    execute(PREPARE, cfg)
    execute(TRAIN_TEACHER, cfg, "g0")
    teacher_fp = fingerprint(TRAIN_TEACHER, cfg, "g0")
    assert execute(PREPARE, cfg).get("skipped") and execute(TRAIN_TEACHER, cfg, "g0").get("skipped")

    # an unlabeled image gets other pixels (same path): prepare re-runs, the teacher does not depend on it
    victim = sorted((tiny_project.parent / "data/toy/unlabeled").glob("*.png"))[3]
    Image.new("RGB", (16, 16), (255, 0, 0)).save(victim)
    assert not execute(PREPARE, cfg).get("skipped")
    assert fingerprint(TRAIN_TEACHER, cfg, "g0") == teacher_fp
    # a labeled image gets other pixels: the teacher (and the flow's cache key, the same fingerprint) changes
    victim = sorted((tiny_project.parent / "data/toy/labeled").rglob("*.png"))[0]
    Image.new("RGB", (16, 16), (0, 255, 0)).save(victim)
    assert not execute(PREPARE, cfg).get("skipped")
    assert fingerprint(TRAIN_TEACHER, cfg, "g0") != teacher_fp
    assert not execute(TRAIN_TEACHER, cfg, "g0").get("skipped")
    # a fresh clone of the same data (new paths, mtimes, inodes) has the same fingerprints: nothing re-runs there
    clone = tiny_project.parent.parent / "clone"
    shutil.copytree(tiny_project.parent, clone)
    os.utime(clone / "data/toy/labeled", None)
    ccfg = load_config(clone / "params.yaml")
    assert fingerprint(PREPARE, ccfg, "") == fingerprint(PREPARE, cfg, "")
    assert execute(PREPARE, ccfg).get("skipped") and execute(TRAIN_TEACHER, ccfg, "g0").get("skipped")


# ---- 3. stage commands respect a running pipeline -------------------------------------------------------------

def test_a_stage_command_refuses_while_a_pipeline_run_writes_the_same_out_dir(tiny_project, capsys):
    hold = ("import sys, time\nfrom nst.io import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)\n")
    cfg = load_config(tiny_project)
    p = subprocess.Popen([sys.executable, "-c", hold, str(cfg.out_dir)], stdout=subprocess.PIPE, text=True,
                         env={k: v for k, v in os.environ.items() if k != "NST_RUN_TOKEN"})
    try:
        assert p.stdout.readline().strip() == "held"
        for argv in (["prepare"], ["train-teacher"], ["label", "g0"], ["filter-balance", "g1"]):
            assert main([*argv, "-p", str(tiny_project)]) == 2, argv
            assert f"another pipeline run is writing {cfg.out_dir}" in _err(capsys)
    finally:
        p.kill()
        p.wait()
    assert not (cfg.out_dir / "data").exists()


# ---- 4. secrets never leave the process ----------------------------------------------------------------------------

def test_a_password_in_the_tracking_uri_is_written_nowhere(mlflow_server, prefect_server, tmp_path):
    """Through the Prefect flow (parameters, task logs, artifacts), stage processes, effective configs, MLflow
    params and tags, and the error file of a second, failing run."""
    from mlflow import MlflowClient

    from prefect_api import artifacts, client_for, logs, run_for_params, subflow_runs, task_runs

    secret = "s3cr3t-P4ss"
    host = mlflow_server.url.split("://")[1]
    params = make_tiny_project(tmp_path / "proj", generations=0, extra="tracking: {enabled: true, experiment: sec}")
    env = prefect_server.env()
    out = subprocess.run([sys.executable, "-m", "cli", "run", "-p", str(params), "-S",
                          f"tracking.tracking_uri=http://alice:{secret}@{host}"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    # a server that refuses connections: the failure is reported, with the URI redacted
    dead = subprocess.run([sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(params), "-S",
                           f"tracking.tracking_uri=http://alice:{secret}@127.0.0.1:9"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=400)
    assert dead.returncode == 3 and "tracking incomplete" in dead.stderr
    texts = [out.stdout, out.stderr, dead.stdout, dead.stderr]
    texts += [p.read_bytes().decode(errors="replace") for p in (tmp_path / "proj").rglob("*") if p.is_file()
              and p.suffix in (".json", ".yaml", ".md", ".log", ".csv", ".txt")]
    assert (tmp_path / "proj/outputs/tracking_errors.json").is_file()
    with client_for(prefect_server.api_url) as client:
        fr = run_for_params(client, str(params))
        ids = [fr.id] + [s.id for s in subflow_runs(client, fr.id)]
        texts += [json.dumps(fr.parameters)] + [json.dumps(t.task_inputs, default=str) + t.name
                                                 for t in task_runs(client, ids)]
        texts += [lg.message for lg in logs(client, ids)] + [str(a.data) for a in artifacts(client, ids)]
    ml = MlflowClient(mlflow_server.url)
    for run in ml.search_runs([ml.get_experiment_by_name("sec").experiment_id]):
        texts += [json.dumps(run.data.params), json.dumps(run.data.tags)]
    leaks = [t[max(0, t.find(secret) - 80):t.find(secret) + 20] for t in texts if secret in t]
    assert leaks == [], leaks
    errors = json.loads((tmp_path / "proj/outputs/tracking_errors.json").read_text())
    assert errors[0]["tracking_uri"] == "http://127.0.0.1:9"  # the URI still says where, without the credentials


def test_redaction_of_uris_and_keys():
    from nst.secrets import redact, split_credentials

    assert redact("see http://bob:pw@host:5000/api and s3://key:sec@b") == "see http://***@host:5000/api and s3://***@b"
    assert redact("aws_secret_access_key=AbC123 token: xyz") == "aws_secret_access_key=*** token: ***"
    assert split_credentials("https://bob:p%40ss@host:5000/x") == ("https://host:5000/x", "bob", "p@ss")


# ---- 6. decompression bombs ------------------------------------------------------------------------------------

def test_a_decompression_bomb_is_rejected_from_its_header_and_listed(tiny_project):
    from nst.data import decode
    from nst.errors import DataError

    bomb = tiny_project.parent / "data/toy/unlabeled/zzz_bomb.png"
    bomb.write_bytes(bilevel_png(20000, 20000))
    assert bomb.stat().st_size < 100_000
    cfg = load_config(tiny_project, ["data.max_bad_fraction=0.05"])
    res = execute(PREPARE, cfg)
    bad = json.loads((cfg.data_dir / "bad_images.json").read_text())["unlabeled"]
    assert [(Path(b["path"]).name, b["error"]) for b in bad] == [
        ("zzz_bomb.png", "image is 20000x20000 = 400,000,000 pixels > data.max_image_pixels = 89,478,485")]
    assert res["metrics"]["n_unlabeled"] == 120
    with pytest.raises(DataError, match="zzz_bomb.png: image is 20000x20000"):  # swapped in after prepare
        decode(str(bomb), 89_478_485)


# ---- 7. late failures become early one-line errors -------------------------------------------------------------

@pytest.mark.parametrize("override, expect", [
    ("seed=18446744073709551616", "seed = 18446744073709551616"),
    ("generations.0.name=g99999999999", "generations.0.name = 'g99999999999'"),
    ("generations.0.init=teacher", "generations[0].init = 'teacher' needs the teacher's architecture"),
    ("teacher.model=hf-hub:timm/resnet18.a1_in1k", "teacher.model = 'hf-hub:timm/resnet18.a1_in1k'"),
    ("device=cuda", "device = 'cuda': CUDA is not available on this machine"),
    ("out_dir=params.yaml", "out_dir = 'params.yaml': exists and is not a folder"),
    ("teacher.epochs=[1,", "value: not valid YAML"),
    ("data.labeled=" + "x" * 5000, "data.labeled = 'xxxxxxxx"),
])
def test_a_bad_setting_is_one_line_before_any_compute(tiny_project, capsys, override, expect):
    raw = yaml.safe_load(tiny_project.read_text())
    raw["generations"][0]["student"]["model"] = "nst_cnn_s"  # init: teacher then has another architecture
    tiny_project.write_text(yaml.safe_dump(raw))
    assert main(["run", "--no-prefect", "-p", str(tiny_project), "-S", override]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and expect in err, err
    assert len(err) < 600  # a huge bad value is quoted, not dumped
    assert not (tiny_project.parent / "outputs" / "data").exists()


def test_empty_splits_stop_before_training(tiny_project, capsys):
    (tiny_project.parent / "data" / "unl.csv").write_text("path,label\n")
    assert main(["run", "--no-prefect", "-p", str(tiny_project), "-S", "data.unlabeled=data/unl.csv"]) == 2
    assert "data/unl.csv: data.unlabeled has no images" in _err(capsys)
    assert not (tiny_project.parent / "outputs" / "g0" / "model").exists()


def test_a_filter_that_keeps_nothing_stops_naming_the_threshold(tiny_project, capsys):
    rc = main(["run", "--no-prefect", "-p", str(tiny_project), "-S", "filter.threshold=1.0"])
    err = _err(capsys)
    assert rc == 2 and "g1/filter-balance: filter.threshold = 1.0 keeps 0 of 120 pseudo-labels" in err
    assert not (tiny_project.parent / "outputs" / "g1" / "model").exists()


# ---- 8. damaged files: one line, never a traceback ------------------------------------------------------------

def _trained(tiny_project):
    cfg = load_config(tiny_project)
    execute(PREPARE, cfg)
    execute(TRAIN_TEACHER, cfg, "g0")
    return cfg


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_resume_file_is_set_aside_and_training_restarts(tiny_project, caplog, damage):
    cfg = load_config(tiny_project, ["teacher.epochs=3"])
    execute(PREPARE, cfg)
    state = cfg.model_dir("g0") / "train_state.pt"
    state.parent.mkdir(parents=True)
    state.write_bytes(b"" if damage == "empty" else b"PK\x03\x04" + b"\0" * 100)
    execute(TRAIN_TEACHER, cfg, "g0")
    assert (cfg.model_dir("g0") / "model.json").is_file()
    assert (cfg.model_dir("g0") / "train_state.pt.corrupt-0").is_file()
    msgs = " ".join(r.getMessage() for r in caplog.records)
    assert "not a valid training-state file" in msgs and "training starts over" in msgs
    assert "weights_only" not in msgs


@pytest.mark.parametrize("damage, expect", [
    (lambda d: (d / "model.safetensors").write_bytes(b"not safetensors at all"), "model.safetensors: not a valid safetensors file"),
    (lambda d: __import__("safetensors.torch").torch.save_file({"x": __import__("torch").zeros(2)}, str(d / "model.safetensors")),
     "model.safetensors: does not fit the model"),
    (lambda d: (d / "model.json").write_text("{not json"), "model.json: not valid JSON"),
    (lambda d: (d / "model.json").write_text(json.dumps(json.loads((d / "model.json").read_text())
                                                        | {"model": "hf-hub:evil/model"})),
     "model.json: model = 'hf-hub:evil/model' is not a model registered in timm"),
])
def test_damaged_model_files_are_one_line_errors(tiny_project, capsys, damage, expect):
    cfg = _trained(tiny_project)
    damage(cfg.model_dir("g0"))
    assert main(["evaluate", "g0", "-p", str(tiny_project)]) == 2
    err = _err(capsys)
    assert err.count("\n") == 0 and expect in err and "weights_only" not in err, err


def test_a_malformed_csv_manifest_is_one_line(tiny_project, capsys):
    (tiny_project.parent / "data" / "bad.csv").write_text('path,label\n"a.png,1\nb.png,2,3,4\n')
    assert main(["prepare", "-p", str(tiny_project), "-S", "data.unlabeled=data/bad.csv"]) == 2
    err = _err(capsys)
    assert err.startswith("error: ") and "bad.csv: not a readable CSV manifest" in err and err.count("\n") == 0


@pytest.mark.parametrize("code, expect", [(errno.ENOSPC, "disk full"), (errno.EROFS, "read-only file system")])
def test_disk_full_or_read_only_out_dir_is_one_line(tiny_project, capsys, monkeypatch, code, expect):
    """Mocked: a full disk or a read-only file system cannot be made for real without privileges."""
    import nst.io

    real = nst.io.atomic_write_bytes

    def failing(path, data):
        if str(path).endswith("classes.json"):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, data)

    monkeypatch.setattr(nst.io, "atomic_write_bytes", failing)
    assert main(["prepare", "-p", str(tiny_project)]) == 2
    assert _err(capsys) == f"error: {tiny_project.parent / 'outputs/data/classes.json'}: {expect}"


def test_s3_misconfiguration_is_one_line(moto_s3, s3_bucket, tmp_path, capsys, monkeypatch):
    from servers import free_port

    dest = str(tmp_path / "raw")
    cases = [([f"s3://{s3_bucket}-missing/x", "--endpoint-url", moto_s3.endpoint_url], "NoSuchBucket"),
             ([f"s3://{s3_bucket}/x", "--endpoint-url", f"http://127.0.0.1:{free_port()}"], "cannot list objects"),
             ([f"s3://{s3_bucket}/nothing-here", "--endpoint-url", moto_s3.endpoint_url], "no objects under")]
    for args, expect in cases:
        assert main(["data", "pull", *args, "--dest", dest]) == 2, args
        err = _err(capsys)
        assert err.count("\n") == 0 and expect in err, err
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    assert main(["data", "pull", f"s3://{s3_bucket}/x", "--endpoint-url", moto_s3.endpoint_url, "--dest", dest]) == 2
    assert "no credentials" in _err(capsys)


def test_an_internal_error_is_one_line_with_the_traceback_behind_debug(tiny_project, capsys, monkeypatch):
    import tasks.prepare

    monkeypatch.setattr(tasks.prepare, "infer_classes", lambda *a: 1 / 0)
    assert main(["prepare", "-p", str(tiny_project)]) == 1
    err = _err(capsys)
    assert err == "internal error: ZeroDivisionError: division by zero (run with --debug for the traceback)"
    assert main(["--debug", "prepare", "-p", str(tiny_project)]) == 1
    assert "Traceback" in capsys.readouterr().err


# ---- 9. what a model name may load -----------------------------------------------------------------------------

def test_only_registered_timm_models_are_built():
    from nst.config import NoiseConfig, TrainConfig
    from pydantic import ValidationError

    for bad in ("hf-hub:timm/resnet18.a1_in1k", "local-dir:/tmp/evil", "../evil"):
        with pytest.raises(ValidationError, match="only model names registered in timm"):
            TrainConfig(model=bad, noise=NoiseConfig())
