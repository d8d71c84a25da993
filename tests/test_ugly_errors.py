"""Faults that used to end in an internal error (exit 1 and a traceback), a message naming the wrong thing, or a
read-only command writing files: each is caused for real here (a mistyped out_dir, an edited metrics.json, a
deleted Parquet file, a folder given as --csv, an S3 key near the file-name limit, malformed S3 URIs, a closed
port or a server that is not Dask as the Dask scheduler) and must end in ONE `error:` line naming the culprit,
exit code 2, and nothing written that was not asked for."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import yaml

from cli.main import main
from conftest import make_tiny_project
from servers import free_port
from test_failures import _err


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and every folder under `folder`: a command that creates anything changes it."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny project (teacher + 1 student) trained once, tracking off; tests damage copies of it."""
    from nst.config import load_config
    from tasks.pipeline import run_direct

    params = make_tiny_project(tmp_path_factory.mktemp("trained") / "proj", generations=1)
    run_direct(load_config(params), str(params))
    return params


@pytest.fixture
def project(trained, tmp_path) -> Path:
    """A fresh copy of the trained project; returns its params.yaml."""
    shutil.copytree(trained.parent, tmp_path / "proj")
    return tmp_path / "proj" / "params.yaml"


# ---- 1. read-only commands write nothing ------------------------------------------------------------------

def test_read_only_commands_create_nothing_under_a_missing_out_dir(tmp_path, capsys, monkeypatch):
    """`nst table`, `nst track`, `nst compare` with out_dir pointing nowhere (in params.yaml or by -S): one line
    naming the out_dir, exit 2, and no folder, MLflow store or summary created."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_tiny_project(tmp_path / "proj", generations=1)
    in_file = tmp_path / "proj" / "typo.yaml"
    raw = yaml.safe_load(params.read_text())
    in_file.write_text(yaml.safe_dump({**raw, "out_dir": "outptus"}))
    before = _snapshot(tmp_path)
    for p, extra, where in [(params, ["-S", "out_dir=typo"], tmp_path / "proj" / "typo"),
                            (in_file, [], tmp_path / "proj" / "outptus")]:
        for cmd in ("table", "track", "compare"):
            assert main([cmd, "-p", str(p), "-S", "tracking.enabled=true", *extra]) == 2, cmd
            err = _err(capsys)
            assert str(where) in err, (cmd, err)
            assert (f"out_dir {where}: does not exist" in err if cmd != "compare"
                    else f"{where / 'mlflow.db'}: no MLflow store there" in err), err
            assert _snapshot(tmp_path) == before, cmd


def test_track_refuses_a_pipeline_with_nothing_evaluated_and_logs_nothing(tmp_path, capsys, monkeypatch):
    """out_dir exists but no model has been evaluated: `nst track` used to log an empty pipeline as a FINISHED
    MLflow run; now it refuses before creating any run (no store is even created), and `nst table` says why."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = make_tiny_project(tmp_path / "proj", generations=1)
    out = tmp_path / "proj" / "outputs"
    (out / "g0" / "model").mkdir(parents=True)  # a training stage that never finished
    store = tmp_path / "store.db"
    before = _snapshot(tmp_path)
    for argv in (["track", "-S", "tracking.enabled=true"],
                 ["track", "-S", "tracking.enabled=true", "-S", f"tracking.tracking_uri=sqlite:///{store}"],
                 ["table"], ["compare"]):
        assert main([*argv, "-p", str(params)]) == 2, argv
        err = _err(capsys)
        assert (f"out_dir {out}: no evaluated model yet" in err if argv[0] != "compare"
                else f"{out / 'mlflow.db'}: no MLflow store there" in err), err
        assert _snapshot(tmp_path) == before, argv
    assert not store.exists()


# ---- 2. a metrics.json without the keys its readers need ------------------------------------------------

def test_a_metrics_file_without_test_top1_is_one_line_naming_file_and_key(project, tmp_path, capsys):
    mfile = project.parent / "outputs" / "g0" / "eval" / "metrics.json"
    metrics = json.loads(mfile.read_text())
    store = tmp_path / "store.db"
    fix = "delete the file and run `nst evaluate g0` to write it again"
    for damaged, expect in [({k: v for k, v in metrics.items() if k != "test/top1"}, "no 'test/top1' key"),
                            (metrics | {"test/ece": "n/a"}, "'test/ece' = 'n/a': expected a number")]:
        mfile.write_text(json.dumps(damaged))
        for argv in (["table"], ["track", "-S", "tracking.enabled=true", "-S",
                                 f"tracking.tracking_uri=sqlite:///{store}"]):
            assert main([*argv, "-p", str(project)]) == 2, argv
            assert _err(capsys) == f"error: {mfile}: {expect}; {fix}", argv
            assert not store.exists()  # refused before any run was created


# ---- 3. messages that name the right thing ----------------------------------------------------------------

def test_a_missing_parquet_file_is_named_with_the_reason(project, capsys):
    """pyarrow names a missing file by its bare path; every reader of the prepared data says what is missing and
    what makes it."""
    out = project.parent / "outputs"
    balanced = out / "g1" / "balanced" / "balanced.parquet"
    balanced.rename(balanced.with_suffix(".bak"))
    assert main(["labels", "g1", "-p", str(project)]) == 2
    assert _err(capsys) == (f"error: {balanced}: missing, no balanced pseudo-labels yet; run "
                            "`nst filter-balance g1`")
    balanced.with_suffix(".bak").rename(balanced)

    manifest = out / "data" / "unlabeled.parquet"
    manifest.unlink()
    expect = f"error: {manifest}: missing, the data is not prepared; run `nst prepare` first"
    for argv in (["labels", "g1", "--csv", str(project.parent / "rows.csv")], ["filter-balance", "g1"],
                 ["label", "g1", "--shards", "0"]):
        assert main([*argv, "-p", str(project)]) == 2, argv
        assert _err(capsys) == expect, argv
    assert not (project.parent / "rows.csv").exists()


def test_an_output_file_option_given_a_directory_names_the_option(project, tmp_path, capsys, monkeypatch):
    """`--csv DIR` used to make a temp file next to DIR (in `/` for `--csv /tmp`) and name that temp file."""
    folder = tmp_path / "reports"
    folder.mkdir()
    monkeypatch.chdir(folder)
    before = _snapshot(tmp_path)
    for argv, flag, value in [(["labels", "g1", "--csv", str(folder)], "--csv", str(folder)),
                              (["labels", "g1", "--csv", "."], "--csv", "."),
                              (["compare", "--markdown", str(folder)], "--markdown", str(folder))]:
        assert main([*argv, "-p", str(project)]) == 2, argv
        assert _err(capsys) == f"error: {flag} {value!r}: is a directory; give the name of a file (in it, or elsewhere)"
        assert _snapshot(tmp_path) == before, argv

    from nst.io import atomic_write_text  # the rule under every atomic write: the folder named, no temp file

    with pytest.raises(IsADirectoryError) as ei:
        atomic_write_text(folder, "x")
    assert ei.value.filename == str(folder) and _snapshot(tmp_path) == before


def test_a_file_name_near_the_255_byte_limit_is_written_and_pulled_from_s3(moto_s3, s3_bucket, tmp_path):
    """The temp name of an atomic write used to be the target's name plus ~20 bytes: a 240-character S3 key (or
    any name over ~235 bytes) failed with 'File name too long'."""
    from nst.io import atomic_write_bytes
    from nst.s3 import pull_prefix

    for name in ("k" * 255, "é" * 127):  # 255 bytes, ASCII and two-byte UTF-8
        assert atomic_write_bytes(tmp_path / "direct" / name, b"x").read_bytes() == b"x"
    key_name = "a" * 236 + ".png"  # 240 characters
    moto_s3.client().put_object(Bucket=s3_bucket, Key=f"raw/cls/{key_name}", Body=b"img")
    counts = pull_prefix(f"s3://{s3_bucket}/raw", tmp_path / "dest", client=moto_s3.client())
    assert counts["downloaded"] == 1 and (tmp_path / "dest" / "cls" / key_name).read_bytes() == b"img"
    assert not list((tmp_path / "dest").rglob("*.tmp"))


# ---- 4. malformed S3 URIs ---------------------------------------------------------------------------------

def test_malformed_s3_uris_and_escaping_keys_are_one_line_naming_the_uri(moto_s3, s3_bucket, tmp_path, capsys):
    dest = tmp_path / "raw"
    for uri, problem in [("s3://", "no bucket name in the S3 URI"), ("s3:///key", "no bucket name in the S3 URI"),
                         ("s3://b/../x", "bad bucket name in the S3 URI"),
                         ("s3://bad bucket!/x", "bad bucket name in the S3 URI"),
                         (f"s3://{s3_bucket}/../x", "a '.' or '..' part in the prefix of the S3 URI"),
                         (f"s3://{s3_bucket}/a/./x", "a '.' or '..' part in the prefix of the S3 URI"),
                         ("http://bucket/x", "not an S3 URI")]:
        assert main(["data", "pull", uri, "--dest", str(dest), "--endpoint-url", moto_s3.endpoint_url]) == 2, uri
        assert _err(capsys) == f"error: {uri!r}: {problem} (expected s3://bucket/prefix)"
        assert not dest.exists()

    moto_s3.client().put_object(Bucket=s3_bucket, Key="p/../../evil.txt", Body=b"evil")
    assert main(["data", "pull", f"s3://{s3_bucket}/p", "--dest", str(dest), "--endpoint-url",
                 moto_s3.endpoint_url]) == 2
    err = _err(capsys)
    assert f"refusing to pull s3://{s3_bucket}/p: 1 key(s) would escape" in err and "evil.txt" in err, err
    assert not (tmp_path / "evil.txt").exists()


# ---- 5. an unreachable Dask scheduler ---------------------------------------------------------------------

def test_an_unreachable_dask_scheduler_fails_in_seconds_naming_it(tmp_path, capsys, monkeypatch):
    """A closed port used to cost Dask's 30-second connect timeout and four tracebacks, after the data stages ran;
    a server that accepts the connection but is not Dask (a proxy) made Dask allocate exabytes. Both are one line
    naming the address within seconds, before the flow starts (nothing written)."""
    params = make_tiny_project(tmp_path / "proj", generations=1)
    before = _snapshot(tmp_path)
    not_dask = socket.create_server(("127.0.0.1", 0))

    def answer_like_a_proxy() -> None:
        while True:
            try:
                conn, _ = not_dask.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HTTP/1.0 426 Upgrade Required\r\nconnection: close\r\n\r\n")

    threading.Thread(target=answer_like_a_proxy, daemon=True).start()
    monkeypatch.setenv("NST_TASK_RUNNER", "dask")
    try:
        for address, why in [(f"tcp://127.0.0.1:{free_port()}", "Connection refused"),
                             (f"tcp://127.0.0.1:{not_dask.getsockname()[1]}", "not Dask's answer")]:
            monkeypatch.setenv("NST_DASK_ADDRESS", address)
            t0 = time.monotonic()
            assert main(["run", "-p", str(params)]) == 2
            assert time.monotonic() - t0 < 10
            err = _err(capsys)
            assert err.startswith(f"error: NST_DASK_ADDRESS={address!r}: no Dask scheduler answers there ({why}"), err
            assert _snapshot(tmp_path) == before
    finally:
        not_dask.close()


def test_a_running_dask_scheduler_passes_the_check(monkeypatch):
    from distributed import LocalCluster

    from flows.runners import check_scheduler

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        monkeypatch.setenv("NST_TASK_RUNNER", "dask")
        monkeypatch.setenv("NST_DASK_ADDRESS", cluster.scheduler_address)
        check_scheduler()
