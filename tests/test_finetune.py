"""The paper's last step: a model fine-tuned at the test resolution (FixRes), shallow layers fixed. Each test runs
the real stage on the tiny project's trained teacher (g0 -> g0-ft; 16 px -> 24 px) and checks what it promises
in the files it writes: fixed layers bit-identical (BatchNorm statistics included), everything else trained, a
fractional epoch counted in steps, the tail of the model's schedule, resume, and its place in the pipeline."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cli.main import main
from conftest import make_tiny_project
from nst.checkpoint import STATE, WEIGHTS, load_weights
from nst.config import load_config
from tasks.finetune import FINETUNE
from tasks.pipeline import STAGES, dvc_yaml, steps
from tasks.prepare import PREPARE
from tasks.spec import execute, fingerprint
from tasks.train import TRAIN_TEACHER
from test_failures import _err

FT = {"finetune": {"enabled": True, "image_size": 24, "epochs": 1.5}}  # 40 labeled / batch 16: 3 steps an epoch


@pytest.fixture(scope="module")
def teacher_project(tmp_path_factory) -> Path:
    """The tiny project with its g0 teacher trained (2 epochs of 3 steps), fine-tune on; copied per test."""
    params = make_tiny_project(tmp_path_factory.mktemp("ft") / "proj", generations=0, extra=yaml.safe_dump(FT))
    cfg = load_config(params)
    execute(PREPARE, cfg)
    execute(TRAIN_TEACHER, cfg, "g0")
    return params.parent


@pytest.fixture
def project(teacher_project, tmp_path) -> Path:
    shutil.copytree(teacher_project, tmp_path / "proj")
    return tmp_path / "proj" / "params.yaml"


def _set(params: Path, **finetune) -> None:
    raw = yaml.safe_load(params.read_text())
    raw["finetune"].update(finetune)
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def _raw_state(cfg, gen: str) -> dict[str, torch.Tensor]:
    """The last epoch's raw (not EMA) weights: BatchNorm's num_batches_tracked counts its training steps."""
    return torch.load(cfg.model_dir(gen) / STATE, weights_only=True)["model"]


@pytest.mark.parametrize("freeze, fixed", [
    ({"stages": 1}, ("stem.", "blocks.0.")),                      # the default: stem + first stage
    ({"blocks": 2}, ("stem.", "blocks.0.", "blocks.1.")),         # the official --fix_layer_num 2
    ({"patterns": ["blocks.1", "*.shortcut"]}, ("blocks.1.", "blocks.2.shortcut.")),  # by name
])
def test_fixed_layers_stay_bit_identical_and_everything_else_trains(project, freeze, fixed):
    _set(project, freeze=freeze)
    cfg = load_config(project)
    execute(FINETUNE, cfg, "g0-ft")
    student = load_weights(cfg.model_dir("g0") / WEIGHTS)
    tuned = load_weights(cfg.model_dir("g0-ft") / WEIGHTS)
    assert student.keys() == tuned.keys()
    names = sorted(student)
    kept = [n for n in names if n.startswith(fixed)]
    assert kept and any("running_var" in n for n in kept), kept  # BatchNorm statistics among the fixed
    for n in names:  # parameters and BatchNorm buffers (running mean/var, num_batches_tracked) alike
        if n.startswith(fixed):
            assert torch.equal(student[n], tuned[n]), f"{n} is fixed but changed"
        else:
            assert not torch.equal(student[n], tuned[n]), f"{n} should have trained but is unchanged"
    meta = json.loads((cfg.model_dir("g0-ft") / "model.json").read_text())
    assert meta["role"] == "finetune" and meta["finetuned_from"] == "g0"
    assert meta["image_size"] == 24 and meta["trained_image_size"] == 16


def test_a_fractional_epoch_counts_steps_and_the_schedule_is_the_models_tail(project):
    cfg = load_config(project)
    execute(FINETUNE, cfg, "g0-ft")
    trained, fixed = "blocks.2.bn1.num_batches_tracked", "stem.1.num_batches_tracked"
    assert int(_raw_state(cfg, "g0")[trained]) == 2 * 3  # the teacher trained 2 epochs of 3 steps
    before, after = load_weights(cfg.model_dir("g0") / WEIGHTS), _raw_state(cfg, "g0-ft")  # from its best epoch's
    assert int(after[trained]) - int(before[trained]) == 5  # 1.5 epochs of 3 steps = 5, not 6 (nor 3)
    assert int(after[fixed]) == int(before[fixed])
    history = json.loads((cfg.model_dir("g0-ft") / "history.json").read_text())
    teacher = json.loads((cfg.model_dir("g0") / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # the last step of the fine-tune is the last step of the teacher's own schedule (--train_last_step_num)
    assert history[-1]["lr"] == teacher[-1]["lr"] and history[0]["lr"] > history[-1]["lr"]
    assert json.loads((cfg.model_dir("g0-ft") / "model.json").read_text())["epochs"] == 1.5

    _set(project, lr=0.01, epochs=0.5)  # a cosine from the given lr instead; half an epoch = 2 steps
    cfg = load_config(project)
    execute(FINETUNE, cfg, "g0-ft")
    assert int(_raw_state(cfg, "g0-ft")[trained]) - int(before[trained]) == 2
    history = json.loads((cfg.model_dir("g0-ft") / "history.json").read_text())
    assert len(history) == 1 and 0 < history[0]["lr"] < 0.01


def test_a_finetune_resumes_after_a_crash_to_the_same_weights(project, tmp_path):
    from conftest import crash_after_first_epoch

    cfg = load_config(project)
    crash_after_first_epoch(lambda: execute(FINETUNE, cfg, "g0-ft"))
    mdir = cfg.model_dir("g0-ft")
    assert (mdir / STATE).is_file() and not (mdir / WEIGHTS).exists()
    execute(FINETUNE, cfg, "g0-ft")  # resumes at epoch 2 of 2
    fresh = tmp_path / "fresh"
    shutil.copytree(project.parent, fresh, ignore=shutil.ignore_patterns("g0-ft"))
    fcfg = load_config(fresh / "params.yaml")
    execute(FINETUNE, fcfg, "g0-ft")
    assert (fcfg.model_dir("g0-ft") / WEIGHTS).read_bytes() == (mdir / WEIGHTS).read_bytes()
    assert (fcfg.model_dir("g0-ft") / STATE).read_bytes() == (mdir / STATE).read_bytes()


def test_the_new_keys_change_no_other_stages_fingerprint(tmp_path):
    """finetune.* and an unset evaluate.image_size are in no existing stage's declaration: turning the fine-tune on
    re-runs nothing that ran before (and so trains the same bytes)."""
    params = make_tiny_project(tmp_path / "proj", generations=2)
    plain = load_config(params)
    tuned = load_config(params, ["finetune.enabled=true", "finetune.image_size=24", "finetune.epochs=3",
                                 "finetune.freeze={blocks: 1}"])
    assert [s.name for s in steps(tuned)] == [s.name for s in steps(plain)] + [
        "g2-ft/finetune", "g2-ft/evaluate", "g2-ft/track"]  # right after the model it fine-tunes
    for s in steps(plain):
        if s.stage is not None:
            assert fingerprint(s.stage, tuned, s.gen) == fingerprint(s.stage, plain, s.gen), s.name
    tested = load_config(params, ["evaluate.image_size=24"])  # a test resolution re-evaluates, trains nothing
    for s in steps(plain):
        if s.stage is not None:
            same = fingerprint(s.stage, tested, s.gen) == fingerprint(s.stage, plain, s.gen)
            assert same == (s.stage.name != "evaluate"), s.name
    middle = load_config(params, ["finetune.enabled=true", "finetune.generation=g1", "evaluate.image_size=24"])
    assert [s.name for s in steps(middle) if s.gen.startswith("g1")] == [
        "g1/filter-balance", "g1/train-student", "g1/evaluate", "g1/label", "g1/track",
        "g1-ft/finetune", "g1-ft/evaluate", "g1-ft/track"]


def test_dvc_yaml_runs_the_finetune_and_its_evaluation_from_their_declarations(tmp_path):
    params = make_tiny_project(tmp_path / "proj", generations=1,
                               extra=yaml.safe_dump(FT | {"evaluate": {"image_size": 24}}))
    cfg, raw = load_config(params), yaml.safe_load(params.read_text())
    spec = dvc_yaml(cfg, raw)
    names = list(spec["stages"])
    assert names[-2:] == ["finetune-g1-ft", "evaluate-g1-ft"]
    ft = spec["stages"]["finetune-g1-ft"]
    assert ft["cmd"] == "nst finetune g1-ft"
    assert {"outputs/g1/model/model.safetensors", "outputs/g1/model/model.json", "outputs/data/labeled.parquet",
            "nst/freeze.py", "tasks/finetune.py", "nst/train.py"} <= set(ft["deps"])
    assert "finetune" in ft["params"] and "generations.0.student" in ft["params"]
    assert ft["outs"][0] == "outputs/g1-ft/model/model.safetensors"
    assert "evaluate.image_size" in spec["stages"]["evaluate-g0"]["params"]
    assert "outputs/g1-ft/model/history.json" in spec["plots"][0]["val_acc by generation"]["y"]
    assert main(["dvc-yaml", "-p", str(params)]) == 0
    assert main(["dvc-yaml", "--check", "-p", str(params)]) == 0
    assert STAGES["finetune"] is FINETUNE


def test_run_without_prefect_tracks_the_finetune_as_its_own_run_and_registry_candidate(project, capsys):
    from mlflow import MlflowClient

    raw = yaml.safe_load(project.read_text())
    raw["evaluate"] = {"image_size": 24}
    raw["tracking"] = {"enabled": True, "experiment": "ft", "registered_model": "ft"}
    project.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert main(["run", "--no-prefect", "-p", str(project)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("g0")}
    assert lines["g0"][1] == "teacher" and lines["g0-ft"][1] == "finetune"
    header = next(ln for ln in out.splitlines() if ln.startswith("generation")).split()
    assert header[:7] == ["generation", "role", "model", "params", "image_size", "test_top1", "test_top1@24"]
    g0, ft = dict(zip(header, lines["g0"])), dict(zip(header, lines["g0-ft"]))
    assert (g0["image_size"], ft["image_size"]) == ("16", "24")
    assert ft["test_top1"] == ft["test_top1@24"]  # trained at the test resolution: one number
    cfg = load_config(project)
    metrics = json.loads((cfg.eval_dir("g0") / "metrics.json").read_text())
    assert metrics["test_at_size/image_size"] == 24 and 0 <= metrics["test_at_size/top1"] <= 1
    assert f"{100 * metrics['test_at_size/top1']:.1f}%" == g0["test_top1@24"]

    client = MlflowClient(f"sqlite:///{cfg.out_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ft")
    runs = {r.data.tags["generation"]: r for r in client.search_runs([exp.experiment_id], "tags.kind = 'generation'")}
    assert set(runs) == {"g0", "g0-ft"}
    t = runs["g0-ft"].data.tags
    assert t["role"] == "finetune" and t["base_run_id"] == runs["g0"].info.run_id and t["base_generation"] == "g0"
    assert runs["g0-ft"].info.status == "FINISHED" and runs["g0-ft"].info.run_name == "g0-ft-finetune"
    assert runs["g0-ft"].data.metrics["model/image_size"] == 24 and runs["g0-ft"].data.metrics["generation"] == 0.5
    versions = {v.tags["generation"]: v for v in client.search_model_versions("name='ft'")}
    assert set(versions) == {"g0", "g0-ft"}
    best = max(versions.values(), key=lambda v: (float(v.tags["test_top1"]), -float(v.tags["test_nll"])))
    assert client.get_model_version_by_alias("ft", "champion").version == best.version

    assert main(["compare", "-p", str(project)]) == 0
    cmp = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("g0-ft")]
    assert cmp and cmp[0][1] == "finetune" and cmp[0][4] == "24"
    assert main(["run", "--no-prefect", "-p", str(project)]) == 0  # everything up to date: nothing re-runs
    assert "up to date" in capsys.readouterr().err


def test_a_freeze_that_does_not_fit_the_model_is_one_line_before_any_compute(tiny_project, capsys):
    for override, expect in [
        ("finetune.freeze={blocks: 7}", "finetune.freeze.blocks = 7: nst_cnn_s has 3 blocks after its stem"),
        ("finetune.freeze={patterns: [encoder.*]}", "finetune.freeze.patterns: 'encoder.*' matches no module"),
        ("finetune.freeze={blocks: 1, stages: 1}", "set freeze.blocks or freeze.stages, not both"),
        ("finetune.generation=g7", "finetune.generation = 'g7': not a model of this pipeline (g0, g1, g2)"),
    ]:
        assert main(["run", "--no-prefect", "-p", str(tiny_project), "-S", "finetune.enabled=true",
                     "-S", "finetune.image_size=24", "-S", override]) == 2
        assert expect in _err(capsys), override
    assert main(["run", "--no-prefect", "-p", str(tiny_project), "-S", "finetune.enabled=true"]) == 2
    assert "finetune.enabled needs a resolution: set finetune.image_size or evaluate.image_size" in _err(capsys)
    assert main(["finetune", "g2-ft", "-p", str(tiny_project)]) == 2
    assert "(finetune.enabled is false)" in _err(capsys)
    assert not (tiny_project.parent / "outputs").exists()


@pytest.mark.slow
def test_under_torchrun_the_fixed_layers_stay_fixed_and_rank_0_writes(project):
    p = subprocess.run([sys.executable, "-m", "cli", "finetune", "g0-ft", "-p", str(project),
                        "-S", "distributed.nproc_per_node=2"], cwd=project.parent, capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    cfg = load_config(project)
    meta = json.loads((cfg.model_dir("g0-ft") / "model.json").read_text())
    assert meta["world_size"] == 2
    student, tuned = load_weights(cfg.model_dir("g0") / WEIGHTS), load_weights(cfg.model_dir("g0-ft") / WEIGHTS)
    for n in student:
        assert torch.equal(student[n], tuned[n]) == n.startswith(("stem.", "blocks.0.")), n


@pytest.mark.slow
def test_the_flow_runs_the_finetune_as_its_own_subflow_with_the_same_bytes(prefect_server, project, tmp_path):
    from prefect_api import artifacts, client_for, run_for_params, subflow_runs

    direct = tmp_path / "direct"
    shutil.copytree(project.parent, direct)
    assert main(["run", "--no-prefect", "-p", str(direct / "params.yaml")]) == 0
    run = ("import sys\nfrom flows.noisy_student import noisy_student\nnoisy_student(sys.argv[1])\n")
    exec_log = tmp_path / "exec.log"
    p = subprocess.run([sys.executable, "-c", run, str(project)], cwd=project.parent, capture_output=True, text=True,
                       env=prefect_server.env(NST_EXECUTION_LOG=str(exec_log)), timeout=420, check=False)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    executed = [ln.split("\t")[0] for ln in exec_log.read_text().splitlines()]
    assert {"g0-ft/finetune", "g0-ft/evaluate"} <= set(executed), executed
    for f in ("g0-ft/model/model.safetensors", "g0-ft/eval/metrics.json"):
        assert (project.parent / "outputs" / f).read_bytes() == (direct / "outputs" / f).read_bytes(), f
    with client_for(prefect_server.api_url) as client:
        flow_run = run_for_params(client, str(project.resolve()))
        subs = {r.name: r for r in subflow_runs(client, flow_run.id)}
        assert {"g0/generation", "g0-ft/generation"} <= set(subs), sorted(subs)
        arts = {a.key: a for a in artifacts(client, [flow_run.id, *[r.id for r in subs.values()]]) if a.key}
        assert "| g0-ft | finetune |" in arts["generation-table"].data
        assert "change vs base model" in arts["g0-ft-summary"].data
