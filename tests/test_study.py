"""`nst study`: arms x seeds from one file, each seed's teacher trained once and shared, one MLflow parent run with
the pipeline runs as children (tags arm, seed), and the report (mean ± std table, CSV, plot) - through processes
(`--no-prefect`) and through the Prefect flow, with the same numbers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import main
from conftest import make_tiny_project
from nst.config import load_config, override_args, parse_overrides
from nst.errors import StageError
from nst.study import load_study, run_overrides, teacher_overrides, write_report
from test_failures import _err

REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def direct_study(tmp_path_factory):
    """The tiny study (2 arms x seeds 0, 1) run once through processes (`--no-prefect`), shared by the tests."""
    tmp = tmp_path_factory.mktemp("study-direct")
    out = _run(["study", str(_study(tmp, [0, 1])), "--no-prefect"], tmp)
    return tmp, out


@pytest.mark.slow
def test_study_without_prefect_shares_teachers_and_reports(direct_study):
    from mlflow import MlflowClient

    tmp_path, out = direct_study
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


@pytest.mark.slow
def test_study_as_a_prefect_flow_gives_the_same_numbers(prefect_server, direct_study, tmp_path):
    """Seed 0 through the flow: the same numbers as seed 0 of the study run through processes."""
    f = _study(tmp_path / "flow", [0])
    _run(["study", str(f)], tmp_path / "flow", env=prefect_server.env())
    key = lambda p: sorted((r["arm"], r["generation"], r["test_top1"]) for r in json.loads(p.read_text())  # noqa
                           if r.get("seed", 0) == 0)
    assert key(tmp_path / "flow/report/tiny.json") == key(direct_study[0] / "report/tiny.json")
    assert os.path.getsize(tmp_path / "flow/report/tiny.png") > 1000


# ---- a study's runs are what its file says; bad study files and foreign report files are one line ------------

NOISE_OFF = {"student.noise.randaugment_n": 0, "student.noise.dropout": 0.0, "student.noise.drop_path": 0.0}


def _effective(st, arm: str, seed: int):
    """The config an arm's run gets: its overrides as the child `nst run` parses them back from `-S`."""
    return load_config(st.params, parse_overrides(override_args(run_overrides(st, arm, seed))), check_models=False)


@pytest.mark.parametrize("alias", [False, True], ids=["g2-spelled-out", "g2-student-a-yaml-alias-of-g1s"])
def test_an_arm_reaches_every_generation_the_study_adds(tmp_path, alias):
    params = make_tiny_project(tmp_path / "p", generations=1)  # params.yaml: g1 only
    g1 = yaml.safe_load(params.read_text())["generations"][0]
    g2 = {**g1, "name": "g2", "teacher": "g1"} if alias else {**copy.deepcopy(g1), "name": "g2", "teacher": "g1"}
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({
        "name": "added", "params": "p/params.yaml", "out_dir": "p/study", "seeds": [0, 1],
        "overrides": {"generations": [g1, g2], "student.epochs": 1},  # the study adds g2
        "arms": {"noised": {}, "no-noise": NOISE_OFF,
                 "late-dropout": {**NOISE_OFF, "generations.1.student.noise.dropout": 0.2}}}))
    st = load_study(f)
    for seed in (0, 1):
        noised, off, late = (_effective(st, arm, seed).generations for arm in ("noised", "no-noise", "late-dropout"))
        assert [g.name for g in off] == ["g1", "g2"]
        assert all(g.student.noise.off for g in off), [g.student.noise for g in off]
        assert all(g.student.noise.randaugment_n == 2 and g.student.noise.dropout == 0.3 for g in noised)
        assert all(g.student.epochs == 1 for g in noised + off)  # the study's own student.X: every generation too
        assert [g.student.noise.dropout for g in late] == [0.0, 0.2]  # one generation's key beats student.X
        teacher = load_config(st.params, teacher_overrides(st, seed), check_models=False)
        assert teacher.generations == [] and teacher.seed == seed
        stores = {_effective(st, arm, seed).tracking.tracking_uri for arm in st.arms} | {teacher.tracking.tracking_uri}
        assert stores == {f"sqlite:///{st.out_dir / 'mlflow.db'}"}  # every run tracked where the study's run is


def _bare_study(tmp_path: Path, **fields) -> Path:
    """A study over a params.yaml whose data does not exist: a study that got past its checks fails at once."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "data": {"labeled": "none/l", "unlabeled": "none/u", "test": "none/t"}, "tracking": {"enabled": False},
        "generations": [{"name": "g1", "teacher": "g0"}]}))
    f = tmp_path / "study.yaml"
    f.write_text(yaml.safe_dump({"name": "bare", "params": "params.yaml", "out_dir": "study", "report_dir": "docs",
                                 "seeds": [0, 1], "arms": {"noised": {}, "no-noise": NOISE_OFF}} | fields))
    return f


@pytest.mark.parametrize("fault, expect", [
    ("non-UTF-8", "not a UTF-8 text file"),
    ("a list", "a study file is a mapping (name, params, out_dir, seeds, arms), got list"),
    ("empty", "a study file is a mapping (name, params, out_dir, seeds, arms), got nothing"),
    ("bad YAML", "not valid YAML"),
    ("unknown key", "arm: unknown key (value {})"),
    ("seeds twice", "seeds = [0, 1, 0]: seed 0 is listed twice; seeds must be distinct"),
    ("arm seed", "arms.no-noise.seed = 7: the study sets seed for every run"),
    ("arm out_dir", "arms.noised.out_dir = 'elsewhere': the study sets out_dir for every run"),
    ("study seed", "overrides.seed = 3: the study sets seed for every run"),
])
def test_a_malformed_study_file_is_one_line(tmp_path, capsys, fault, expect):
    f = _bare_study(tmp_path)
    raw = yaml.safe_load(f.read_text())
    change = {"unknown key": {"arm": {}}, "seeds twice": {"seeds": [0, 1, 0]},
              "arm seed": {"arms": {**raw["arms"], "no-noise": {**NOISE_OFF, "seed": 7}}},
              "arm out_dir": {"arms": {**raw["arms"], "noised": {"out_dir": "elsewhere"}}},
              "study seed": {"overrides": {"seed": 3}}}
    if fault in change:
        f.write_text(yaml.safe_dump(raw | change[fault]))
    else:
        f.write_bytes({"non-UTF-8": b"name: \xff\xfe bare\n", "a list": b"- name: bare\n", "empty": b"",
                       "bad YAML": b"name: [bare\n"}[fault])
    assert main(["study", str(f), "--no-prefect"]) == 2
    err = _err(capsys)
    assert err.startswith(f"error: {f}: ") and expect in err, err
    assert not (tmp_path / "study").exists()  # refused before anything ran


def _rows(st, top1: float) -> None:
    """Finished runs' summaries, as a pipeline run writes them (no training: the report reads only these)."""
    for arm in st.arms:
        for seed in st.seeds:
            d = st.out_dir / f"seed{seed}" / arm
            d.mkdir(parents=True, exist_ok=True)
            (d / "summary.json").write_text(json.dumps([
                {"generation": g, "role": "teacher" if g == "g0" else "student", "model": "nst_cnn_xs",
                 "params": 1000, "test_top1": top1 + seed / 100, "test_ece": 0.1} for g in ("g0", "g1")]))


def test_the_report_never_overwrites_a_file_it_did_not_write(tmp_path, capsys, monkeypatch):
    import nst.study

    f = _bare_study(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bare.md").write_text("# my own notes on this study\n")
    assert main(["study", str(f), "--no-prefect"]) == 2  # refused before the study runs, not after
    assert _err(capsys) == (f"error: {docs / 'bare.md'}: exists and was not written by study 'bare' (or was changed "
                            "since); refusing to overwrite it - move it away or set the study's report_dir")
    assert (docs / "bare.md").read_text() == "# my own notes on this study\n" and not (tmp_path / "study").exists()

    (docs / "bare.md").unlink()
    st = load_study(f)
    _rows(st, 0.5)
    first = {k: p.read_bytes() for k, p in write_report(st).items()}
    _rows(st, 0.6)
    second = {k: p.read_bytes() for k, p in write_report(st).items()}  # its own files: replaced
    assert all(first[k] != second[k] for k in first) and b"60.5" in second["md"]

    (docs / "bare.csv").write_text((docs / "bare.csv").read_text() + "my,own,row\n")  # the user edits ours
    with pytest.raises(StageError, match="bare.csv: exists and was not written by study 'bare'"):
        write_report(st)
    assert (docs / "bare.csv").read_text().endswith("my,own,row\n")
    (docs / "bare.csv").unlink()

    real, calls = nst.study.atomic_write_bytes, []

    def crash_at_the_third_report_file(path, data):
        calls.append(path)
        if len(calls) == 4:  # the stamp, then md, csv: killed before json
            raise KeyboardInterrupt
        return real(path, data)

    monkeypatch.setattr(nst.study, "atomic_write_bytes", crash_at_the_third_report_file)
    _rows(st, 0.7)
    with pytest.raises(KeyboardInterrupt):
        write_report(st)
    monkeypatch.undo()
    top1 = lambda: {r["test_top1"] for r in json.loads((docs / "bare.json").read_text())}  # noqa: E731
    assert b"70.5" in (docs / "bare.md").read_bytes() and top1() == {0.6, 0.61}  # half old, half new
    write_report(st)  # the new md and csv and the old json and png alike are known as ours
    assert top1() == {0.7, 0.71}

    stamp = docs / ".bare.study-report.json"
    stamp.write_text("my own file\n")  # a user's file where the stamp goes: never replaced either
    with pytest.raises(StageError, match=r"\.bare\.study-report\.json: exists and is not the report stamp"):
        write_report(st)
    assert stamp.read_text() == "my own file\n"


def test_the_shipped_study_files_load():
    for f in sorted((REPO / "experiments").glob("*.yaml")):
        st = load_study(f)
        for arm, o in st.arms.items():
            gens = _effective(st, arm, st.seeds[0]).generations
            assert gens and all(g.student.noise.off == (arm == "no-noise") for g in gens), (f.name, arm)


def test_an_override_of_one_generation_never_reaches_another_through_a_yaml_alias(tmp_path):
    """params.yaml may write g2's student as an alias of g1's (`student: *s`): one object once loaded, so setting
    g2's epochs (an arm's `generations.1.…`, `-S`) would silently set g1's too."""
    params = make_tiny_project(tmp_path, generations=2)
    raw = yaml.safe_load(params.read_text())
    raw["generations"][1]["student"] = raw["generations"][0]["student"]
    params.write_text(yaml.safe_dump(raw))
    assert "*id001" in params.read_text()
    cfg = load_config(params, ["generations.1.student.epochs=5"], check_models=False)
    assert [g.student.epochs for g in cfg.generations] == [2, 5]
