"""DVC for real, on the tiny toy project in temporary git repos: `dvc repro` end to end, granular re-runs, push/pull
through an S3 remote on a moto server, old commits restoring outputs, `nst data pull` over the CLI, and the one-truth
contract with Prefect: after a flow run `dvc status` is clean, `dvc repro` would run nothing, and the flow wrote the
same files `dvc repro` writes.

Every DVC call is a subprocess (`dvc` of this venv, its bin first on PATH so stage commands find `nst`), with
DVC_SITE_CACHE_DIR and DVC's global/system config dirs in temp folders. Servers are the session's moto server and
Prefect server (tests/conftest.py), stopped by PID there; the fault-injecting S3 proxy here is stopped by each test.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import make_tiny_project
from servers import FaultProxy, venv_executable

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CODE_DEPS = ["nst", "tasks", "models", "cli"]  # dvc.yaml lists files of these as stage deps

pytestmark = pytest.mark.slow


# ---- helpers ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def dvc_environment(tmp_path_factory):
    """DVC's site cache and global/system config in temp dirs; this venv's bin first on PATH (for `nst`)."""
    d = tmp_path_factory.mktemp("dvc-env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        mp.setenv("DVC_SITE_CACHE_DIR", str(d / "site-cache"))
        mp.setenv("DVC_GLOBAL_CONFIG_DIR", str(d / "global"))
        mp.setenv("DVC_SYSTEM_CONFIG_DIR", str(d / "system"))
        mp.setenv("DVC_NO_ANALYTICS", "1")
        mp.setenv("DVC_STUDIO_OFFLINE", "1")
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        yield


def run(cmd: list[str], cwd: Path, *, check: bool = True, timeout: float = 600,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       check=False, stdin=subprocess.DEVNULL, env=env)
    if check:
        assert p.returncode == 0, \
            f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def dvc(repo: Path, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    return run([venv_executable("dvc"), *args], repo, check=check, timeout=timeout)


def git(repo: Path, *args: str) -> str:
    return run(["git", *args], repo).stdout


def ran_stages(output: str) -> list[str]:
    return re.findall(r"^Running stage '([^']+)'", output, flags=re.MULTILINE)


def status(repo: Path) -> dict:
    return json.loads(dvc(repo, "status", "--json").stdout or "{}")


def file_hashes(repo: Path) -> dict[str, str]:
    """md5 of every file DVC manages here (data/, outputs/ minus the runs' own bookkeeping: Prefect results,
    summaries, and the run lock's empty file)."""
    out = {}
    for top in ("data", "outputs"):
        for p in sorted((repo / top).rglob("*")):
            rel = p.relative_to(repo).as_posix()
            if p.is_file() and ".prefect-results" not in rel and not rel.startswith(("outputs/summary.", "outputs/.nst/")) \
                    and not rel.endswith((".lock", ".gitignore")):
                out[rel] = hashlib.md5(p.read_bytes()).hexdigest()
    return out


def make_dvc_repo(root: Path) -> Path:
    """A git repo with this project's code deps, .gitignore, .dvc/config, the tiny params.yaml, its images added to
    DVC (`dvc add data/toy`, as users version their own images) and the dvc.yaml `nst dvc-yaml` generates."""
    root.mkdir(parents=True)
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.email", "test@example.com")
    git(root, "config", "user.name", "test")
    for d in CODE_DEPS:
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / ".dvcignore", root / ".dvcignore")
    # this project git-ignores data/ (where built-in sets are generated); a user versioning their own images with
    # `dvc add` commits data/*.dvc instead
    ignore = [ln for ln in (ROOT / ".gitignore").read_text().splitlines() if ln.strip() != "/data/"]
    (root / ".gitignore").write_text("\n".join(ignore) + "\n")
    make_tiny_project(root, generations=2, extra="robustness: {enabled: false}")
    dvc(root, "init", "-q")
    shutil.copy(ROOT / ".dvc" / "config", root / ".dvc" / "config")
    dvc(root, "add", "-q", "data/toy")
    run([venv_executable("nst"), "dvc-yaml"], root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "pipeline")
    return root


def stage_names(repo: Path) -> list[str]:
    return list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    """The tiny project with 2 generations, reproduced once by `dvc repro` and committed (shared by the tests)."""
    repo = make_dvc_repo(tmp_path_factory.mktemp("dvc") / "repo")
    t0 = time.monotonic()
    out = dvc(repo, "repro").stdout
    seconds = time.monotonic() - t0
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "reproduced")
    return SimpleNamespace(root=repo, output=out, seconds=seconds, hashes=file_hashes(repo),
                           commit=git(repo, "rev-parse", "HEAD").strip())


# ---- dvc repro -------------------------------------------------------------------------------------------------------

def test_repro_runs_every_stage_once_then_nothing(repro_repo):
    repo = repro_repo.root
    assert ran_stages(repro_repo.output) == stage_names(repo), repro_repo.output[-3000:]  # in the declared order
    assert stage_names(repo) == ["prepare", "train-teacher", "evaluate-g0", "label-g0", "filter-balance-g1",
                                 "train-student-g1", "evaluate-g1", "label-g1", "filter-balance-g2",
                                 "train-student-g2", "evaluate-g2", "label-g2"]
    for gen in ("g0", "g1", "g2"):
        assert (repo / f"outputs/{gen}/model/model.safetensors").is_file()
        assert json.loads((repo / f"outputs/{gen}/eval/metrics.json").read_text())["test/top1"] >= 0
        assert sorted(p.name for p in (repo / f"outputs/{gen}/labels").glob("*.parquet")) == [
            f"shard-0000{i}-of-00003.parquet" for i in range(3)]  # a few Parquet shards, not a file per image
    for gen in ("g1", "g2"):
        assert (repo / f"outputs/{gen}/balanced/balanced.parquet").is_file()
    # metrics are in Git (cache: false), everything else in DVC's cache: git tracks no other output
    tracked = git(repo, "ls-files", "outputs", "data").split()
    assert sorted(tracked) == ["data/.gitignore", "data/toy.dvc"] + [f"outputs/{g}/eval/metrics.json"
                                                                     for g in ("g0", "g1", "g2")]
    assert git(repo, "status", "--porcelain") == ""

    assert status(repo) == {}
    again = dvc(repo, "repro").stdout
    assert ran_stages(again) == [], again

    metrics = json.loads(dvc(repo, "metrics", "show", "--json").stdout)
    files = metrics[""]["data"] if "" in metrics else next(iter(metrics.values()))["data"]
    assert {f"outputs/{g}/eval/metrics.json" for g in ("g0", "g1", "g2")} <= set(files)
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    assert {f"outputs/{g}/model/history.json" for g in ("g0", "g1", "g2")} <= set(plots)
    assert "val_acc by generation" in plots


def test_g2_student_param_reruns_only_that_student_and_old_commits_restore_outputs(repro_repo):
    repo = repro_repo.root
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["generations"][1]["student"]["epochs"] == 1

    # `dvc exp run -S` on a list item: dotted index (generations.1...), Hydra syntax
    exp = dvc(repo, "exp", "run", "-S", "generations.1.student.epochs=2").stdout
    assert ran_stages(exp) == ["train-student-g2", "evaluate-g2", "label-g2"], exp
    assert yaml.safe_load((repo / "params.yaml").read_text())["generations"][1]["student"]["epochs"] == 2
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    assert set(diff) <= {"outputs/g2/eval/metrics.json"} and diff, diff  # only g2's metrics moved
    changed = {k for k, v in file_hashes(repo).items() if repro_repo.hashes.get(k) != v}
    assert changed and all(k.startswith(("outputs/g2/model/", "outputs/g2/eval/", "outputs/g2/labels/"))
                           for k in changed), changed
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "g2 student: 2 epochs")

    # break the workspace: lose a pseudo-label shard, corrupt another
    (repo / "outputs/g1/labels/shard-00000-of-00003.parquet").unlink()
    (repo / "outputs/g0/labels/shard-00001-of-00003.parquet").write_bytes(b"not parquet")
    # an old commit + `dvc checkout` restores that commit's outputs exactly: pseudo-labels, weights, metrics
    git(repo, "checkout", "-q", repro_repo.commit)
    dvc(repo, "checkout", "--force")
    assert file_hashes(repo) == repro_repo.hashes
    assert status(repo) == {}
    git(repo, "checkout", "-q", "main")
    dvc(repo, "checkout", "--force")
    assert status(repo) == {}
    git(repo, "checkout", "-q", repro_repo.commit)  # leave the shared repo as the fixture made it
    dvc(repo, "checkout", "--force")


# ---- S3 remote ------------------------------------------------------------------------------------------------------

def test_push_to_s3_then_pull_into_an_empty_workspace_gives_identical_files(repro_repo, moto_s3, s3_bucket):
    from nst.dvc import configure_remote

    repo = repro_repo.root
    git(repo, "checkout", "-q", repro_repo.commit)
    dvc(repo, "checkout", "--force")
    # endpoint + bucket + prefix in .dvc/config; credentials only from the environment (conftest's dummy keys)
    assert configure_remote(s3_bucket, "dvcstore", moto_s3.endpoint_url, root=repo) == f"s3://{s3_bucket}/dvcstore"
    config = (repo / ".dvc/config").read_text()
    assert moto_s3.endpoint_url in config and "secret" not in config and "testing" not in config
    dvc(repo, "push")
    keys = [o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=s3_bucket, Prefix="dvcstore/")["Contents"]]
    assert len(keys) > 10

    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "outputs")
    shutil.rmtree(repo / "data" / "toy")  # the images: versioned by DVC (data/toy.dvc is in Git)
    git(repo, "checkout", "--", "outputs")  # the metrics files live in Git
    dvc(repo, "pull")
    assert file_hashes(repo) == repro_repo.hashes
    assert status(repo) == {}
    git(repo, "checkout", "--", ".dvc/config")


# ---- nst data pull, end to end over the CLI -----------------------------------------------------------------------

def test_nst_data_pull_cli_retries_a_cut_download_and_skips_on_rerun(moto_s3, s3_bucket, tmp_path):
    from nst.s3 import push_dir

    src = tmp_path / "src"
    files = {f"labeled/c{i % 3}/{i:03d}.png": os.urandom(2000 + 97 * i) for i in range(12)}
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    push_dir(src, f"s3://{s3_bucket}/raw/toy", client=moto_s3.client())
    victim = "labeled/c1/004.png"
    dest = tmp_path / "data" / "raw"
    nst = venv_executable("nst")

    proxy = FaultProxy(moto_s3.endpoint_url, f"/{s3_bucket}/raw/toy/{victim}", times=1, mode="cut", exact=True)
    try:
        first = run([nst, "data", "pull", f"s3://{s3_bucket}/raw/toy", "--dest", dest, "--endpoint-url", proxy.url],
                    tmp_path)
        counts = json.loads(first.stdout)
        assert proxy.failed == 1
        assert counts["downloaded"] == len(files) and counts["failed"] == 0, counts  # the cut one read again
        assert {rel: (dest / rel).read_bytes() for rel in files} == files

        again = json.loads(run([nst, "data", "pull", f"s3://{s3_bucket}/raw/toy", "--dest", dest,
                                "--endpoint-url", proxy.url], tmp_path).stdout)
        assert again["skipped"] == len(files) and again["downloaded"] == 0, again

        # a download that keeps failing: non-zero exit naming the object, no partial file left behind
        proxy.times, proxy.failed = 10, 0
        (dest / victim).unlink()
        bad = run([nst, "data", "pull", f"s3://{s3_bucket}/raw/toy", "--dest", dest, "--endpoint-url", proxy.url],
                  tmp_path, check=False)
        assert bad.returncode != 0 and victim in bad.stderr, bad.stderr[-2000:]
        assert not (dest / victim).exists() and not list(dest.rglob("*.tmp"))
    finally:
        proxy.stop()


# ---- one truth: a Prefect flow run, then DVC ------------------------------------------------------------------------

_RUN_FLOW = ("import sys\n"
             "from flows.noisy_student import noisy_student\n"
             "noisy_student(sys.argv[1])\n")


def test_prefect_flow_run_leaves_dvc_clean_with_the_files_dvc_repro_makes(prefect_server, repro_repo, tmp_path):
    import flows.noisy_student  # noqa: F401 - the flow calls nst.dvc.record_outputs(cfg) as its last task

    repo = make_dvc_repo(tmp_path / "repo")
    log = tmp_path / "flow.log"
    with open(log, "wb") as out:
        p = subprocess.run([sys.executable, "-c", _RUN_FLOW, str(repo / "params.yaml")], cwd=tmp_path,
                           env=prefect_server.env(), stdout=out, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, timeout=480, check=False)
    assert p.returncode == 0, log.read_text()[-4000:]
    # The flow maps shard groups and then runs the same finishing step `nst label` does: same files, no fewer.
    assert_recorded_like_repro(repo, repro_repo, "the flow")


def test_run_without_prefect_also_leaves_dvc_clean(repro_repo, tmp_path):
    repo = make_dvc_repo(tmp_path / "repo")
    run([venv_executable("nst"), "run", "--no-prefect"], repo)
    assert_recorded_like_repro(repo, repro_repo, "`nst run --no-prefect`")


def assert_recorded_like_repro(repo: Path, repro_repo, who: str) -> None:
    """`who` recorded its outputs in DVC (status clean, repro has nothing to do) and wrote `dvc repro`'s files."""
    assert (repo / "dvc.lock").is_file(), f"{who} did not record its outputs in DVC"
    assert status(repo) == {}
    dry = dvc(repo, "repro", "--dry").stdout
    assert ran_stages(dry) == [], dry

    # Every output is the same bytes, in another folder: nothing records absolute paths, wall time or temp names.
    files, dvc_files = file_hashes(repo), repro_repo.hashes
    differ = sorted(k for k in dvc_files if k in files and files[k] != dvc_files[k])
    assert differ == [], f"{who} and `dvc repro` wrote different bytes: {differ}"
    missing = sorted(k for k in dvc_files if k not in files)
    assert missing == [], f"{who} did not write: {missing}"
    assert set(files) - set(dvc_files) == set(), f"{who} wrote files `dvc repro` does not"
