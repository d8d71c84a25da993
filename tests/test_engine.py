"""Contract tests of the engine's stages: each checks a rule of the paper or a promise of the tool, and can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from nst.config import ConfigError, NoiseConfig, load_config
from nst.data import TrainTransform
from tasks.evaluate import EVALUATE
from tasks.label import LABEL, finish_labels, label, num_shards, soft_targets
from tasks.prepare import PREPARE
from tasks.spec import execute
from tasks.train import TRAIN_TEACHER


def _prepare_and_teacher(cfg):
    execute(PREPARE, cfg)
    execute(TRAIN_TEACHER, cfg, "g0")


# ---- pseudo-labels ----------------------------------------------------------------------------------------------

def test_soft_labels_renormalised_over_top_k_with_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    pred, conf, classes, probs = soft_targets(logits, "soft", temperature=2.0, top_k=3)
    p_t = (logits / 2.0).softmax(1)[0]
    assert classes[0].tolist() == [0, 1, 2]
    expect = p_t[:3] / p_t[:3].sum()
    assert torch.allclose(probs[0], expect, atol=1e-6) and abs(probs[0].sum().item() - 1) < 1e-6
    assert conf.item() == pytest.approx(logits.softmax(1).max().item())  # confidence is at T = 1
    assert pred.item() == 0


def test_hard_labels_are_the_argmax():
    pred, _, classes, probs = soft_targets(torch.tensor([[0.0, 5.0, 1.0]]), "hard", 1.0, 3)
    assert classes.tolist() == [[1]] and probs.tolist() == [[1.0]] and pred.item() == 1


def test_teacher_is_unnoised_two_labelling_passes_identical(tiny_project):
    cfg = load_config(tiny_project)
    _prepare_and_teacher(cfg)
    label(cfg, "g0")
    ldir = cfg.labels_dir("g0")
    shards = sorted(ldir.glob("shard-*.parquet"))
    blobs = [p.read_bytes() for p in shards]
    shutil.rmtree(ldir)
    label(cfg, "g0")
    assert [p.read_bytes() for p in sorted(ldir.glob("shard-*.parquet"))] == blobs
    t = pq.read_table(shards[0])
    assert t.schema.names == ["row", "pred", "conf", "classes", "probs"]  # compact: no paths, no string ids
    assert str(t.schema.field("conf").type) == "halffloat" and t.column("row").to_pylist()[:2] == [0, 1]
    stats = json.loads((ldir / "stats.json").read_text())
    assert stats["total"] == 120 and stats["labeler"] == "g0" and "pseudo_label_acc_all" in stats

    # A new shard size relabels; the finishing step leaves exactly the new shards (what DVC tracks).
    cfg2 = load_config(tiny_project, [f"pseudo_label.shard_size={2 * cfg.pseudo_label.shard_size}"])
    assert num_shards(cfg2) != len(shards)
    label(cfg2, "g0")
    assert sorted(p.name for p in ldir.glob("shard-*.parquet")) == [f"shard-0000{i}-of-00002.parquet" for i in (0, 1)]
    (ldir / "shard-00001-of-00002.parquet").unlink()
    with pytest.raises(Exception, match="shard-00001-of-00002.parquet"):
        finish_labels(cfg2, "g0")


def test_a_truncated_shard_is_named_and_labelled_again(tiny_project, caplog):
    cfg = load_config(tiny_project)
    _prepare_and_teacher(cfg)
    label(cfg, "g0")
    victim = cfg.labels_dir("g0") / "shard-00001-of-00003.parquet"
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])
    result = label(cfg, "g0", shards=[0, 1, 2])
    assert result["computed"] == [1] and victim.read_bytes() == good
    assert any(victim.name in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)


def test_student_is_noised_in_train_mode_and_deterministic_in_eval():
    from nst.checkpoint import build_model

    torch.manual_seed(0)
    m = build_model("nst_cnn_s", 10, dropout=0.5, drop_path=0.2)
    x = torch.randn(8, 3, 16, 16)
    m.train()
    assert not torch.allclose(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))


def test_randaugment_magnitude_reaches_configured_m():
    noise = NoiseConfig(randaugment_n=2, randaugment_m=27)
    assert noise.randaugment == "rand-m27-n2-mmax27"
    ra = TrainTransform(32, False, noise.randaugment).randaugment
    assert ra.num_layers == 2
    assert {min(op.magnitude, op.magnitude_max or 10) for op in ra.ops} == {27}
    rotate = next(op for op in ra.ops if op.name == "Rotate")
    assert abs(rotate.level_fn(27, rotate.hparams)[0]) == pytest.approx(81.0)  # 27/10 * 30 degrees
    # and the trap it avoids: without mmax, timm silently clips M to 10
    plain = TrainTransform(32, False, "rand-m27-n2").randaugment
    assert {min(op.magnitude, op.magnitude_max or 10) for op in plain.ops} == {10}


def test_augmentation_is_per_sample_seeded_and_leaves_dropouts_rng_alone():
    """The same (index, seed) gives the same augmented image whatever else drew from the global RNGs; and torch's
    RNG (dropout's) is untouched in the training process, so it never depends on data loading."""
    import random

    from nst.data import ImageDataset

    imgs = torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8)

    class Mem(ImageDataset):
        def _load(self, row):
            return imgs[row]

    ds = Mem(["a", "b", "c", "d"], 16, transform=TrainTransform(16, True, "rand-m9-n2-mmax10"))
    a = ds[(2, 12345)][0]
    random.random(), np.random.rand(), torch.rand(1)  # another thread's draws
    state = torch.get_rng_state()
    b = ds[(2, 12345)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds[(2, 54321)][0])
    assert torch.equal(torch.get_rng_state(), state)


# ---- config validation ------------------------------------------------------------------------------------------

def _write(tmp_path, mutate) -> Path:
    base = yaml.safe_load((Path(__file__).parents[1] / "params.yaml").read_text())
    mutate(base)
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(base))
    return p


def test_student_smaller_than_teacher_is_an_error_unless_allowed(tmp_path):
    def smaller(d):
        d["teacher"]["model"] = "nst_cnn_m"
        d["generations"][0]["student"]["model"] = "nst_cnn_xs"

    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, smaller))
    msg = str(e.value)
    assert "\n" not in msg and "generations[0].student.model = 'nst_cnn_xs'" in msg and "fewer than" in msg

    def allowed(d):
        smaller(d)
        d["generations"][0]["allow_smaller"] = True
        d["generations"][1]["student"]["model"] = "nst_cnn_m"

    load_config(_write(tmp_path, allowed))


@pytest.mark.parametrize("mutate, expect", [
    (lambda d: d["generations"][0]["student"]["noise"].update(dropout=1.5), "generations.0.student.noise.dropout = 1.5"),
    (lambda d: d["generations"][0]["student"]["noise"].update(randaugment_m=31), "randaugment_m = 31"),
    (lambda d: d["filter"].update(threshold=-0.1), "filter.threshold = -0.1"),
    (lambda d: d["teacher"].update(epochs=0), "teacher.epochs = 0"),
    (lambda d: d.update(device="tpu"), "device = 'tpu'"),
    (lambda d: d["teacher"].update(optimizer="lion"), "teacher.optimizer = 'lion'"),
    (lambda d: d["pseudo_label"].update(mode="fuzzy"), "pseudo_label.mode = 'fuzzy'"),
    (lambda d: d["data"].update(colour="yes"), "data.colour: unknown key"),
    (lambda d: d["data"].update(builtin=None), "data.labeled is required"),
    (lambda d: d["data"].update(labeled="mine/labeled"), "data.labeled is set together with data.builtin = 'toy'"),
    (lambda d: d["data"].update(builtin="cifar"), "data.builtin = 'cifar'"),
    (lambda d: d["generations"][1].update(teacher="g0"), "generations[1].teacher = 'g0' must be the previous generation 'g1'"),
    (lambda d: d["generations"][0].update(name="first"), "generations.0.name = 'first'"),
    (lambda d: d["teacher"].update(model="resnet_nonexistent"), "teacher.model = 'resnet_nonexistent': unknown model"),
    (lambda d: d["generations"][0].update(ratio=0), "generations.0.ratio = 0"),
    (lambda d: d.update(robustness={"enabled": True, "severities": [9]}), "robustness.severities"),
])
def test_invalid_config_gives_one_line_naming_field_and_value(tmp_path, mutate, expect):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, mutate))
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert expect in msg and "params.yaml" in msg, msg


def test_bad_yaml_and_bad_override_are_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match=r"not valid YAML"):
        load_config(p)
    good = _write(tmp_path, lambda d: None)
    with pytest.raises(ConfigError, match=r"override generations.7.ratio=2: no such key"):
        load_config(good, ["generations.7.ratio=2"])
    assert load_config(good, ["generations.0.ratio=5"]).generations[0].ratio == 5


def test_cli_reports_config_error_in_one_line_before_any_compute(tmp_path, capsys):
    from cli.main import main

    p = _write(tmp_path, lambda d: d["filter"].update(threshold=2))
    assert main(["run", "-p", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "filter.threshold = 2" in err
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "data").exists()


def test_a_second_run_on_one_out_dir_is_refused_at_once(tiny_project, capsys):
    from cli.main import main
    from nst.io import run_lock

    cfg = load_config(tiny_project)
    with run_lock(cfg.out_dir):  # another run holds it (flock: a second open() conflicts even in one process)
        import os

        token = os.environ.pop("NST_RUN_TOKEN")  # ... as another process would: without this run's token
        try:
            assert main(["run", "--no-prefect", "-p", str(tiny_project)]) == 2
        finally:
            os.environ["NST_RUN_TOKEN"] = token
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"another pipeline run is writing {cfg.out_dir}" in err
    assert not (cfg.out_dir / "data").exists()  # refused before any stage ran


# ---- data -------------------------------------------------------------------------------------------------------

def _build_toy(out: str, barrier) -> None:
    from nst.datasets import make_toy

    barrier.wait()
    make_toy(Path(out), size=16, labeled_per_class=4, val_per_class=2, unlabeled_per_class=30, test_per_class=4)


def test_two_processes_asking_for_one_dataset_both_get_it_whole(tmp_path):
    """A flow and a `dvc repro` (or two runs) may ask for the built-in data at once: one builds, the other waits."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_build_toy, args=(str(tmp_path / "toy"), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads((tmp_path / "toy" / "dataset.json").read_text())["unlabeled_per_class"] == 30
    assert len(list((tmp_path / "toy" / "unlabeled").glob("*.png"))) == 300
    assert not (tmp_path / ".toy.partial").exists()


def test_unreadable_images_are_skipped_and_listed_up_to_a_fraction(tiny_project):
    from nst.errors import DataError

    root = tiny_project.parent
    (root / "data" / "toy" / "unlabeled" / "zzz_broken.png").write_bytes(b"not a png")
    cfg = load_config(tiny_project, ["data.max_bad_fraction=0.05"])
    res = execute(PREPARE, cfg)
    listed = json.loads((cfg.data_dir / "bad_images.json").read_text())["unlabeled"]
    assert [Path(b["path"]).name for b in listed] == ["zzz_broken.png"]
    assert res["metrics"]["n_unlabeled"] == 120 and res["metrics"]["n_bad"] == 1
    with pytest.raises(DataError, match=r"1 of 121 images unreadable"):
        execute(PREPARE, load_config(tiny_project, ["data.max_bad_fraction=0.001"]))


def test_csv_manifest_source_with_relative_paths_and_content_digests(tiny_project):
    root = tiny_project.parent
    rows = ["path,label"] + [f"toy/labeled/{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted((root / "data" / "toy" / "labeled").rglob("*.png"))]
    (root / "data" / "labeled.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tiny_project, ["data.labeled=data/labeled.csv"])
    res = execute(PREPARE, cfg)
    assert res["metrics"]["n_labeled"] == 40 and len(res["classes"]) == 10
    t = pq.read_table(cfg.data_dir / "labeled.parquet")
    assert t.column("path").to_pylist()[0].startswith("data/toy/labeled/")  # stored relative: portable outputs
    import hashlib

    first = root / t.column("path")[0].as_py()
    assert t.column("digest")[0].as_py() == bytes.fromhex(hashlib.sha256(first.read_bytes()).hexdigest()[:32])


# ---- training resume --------------------------------------------------------------------------------------------

def test_training_resumes_after_a_crash_to_the_same_weights(tiny_project):
    """A crash after epoch 1 and a re-run give the same model as one uninterrupted run (per-epoch seeding)."""
    from conftest import crash_after_first_epoch
    from nst.checkpoint import WEIGHTS

    cfg = load_config(tiny_project, ["teacher.epochs=3"])
    execute(PREPARE, cfg)
    crash_after_first_epoch(lambda: execute(TRAIN_TEACHER, cfg, "g0"))
    mdir = cfg.model_dir("g0")
    assert (mdir / "train_state.pt").is_file() and not (mdir / WEIGHTS).exists() and not (mdir / "config.json").exists()
    execute(TRAIN_TEACHER, cfg, "g0")  # resumes at epoch 2
    assert [h["epoch"] for h in json.loads((mdir / "history.json").read_text())] == [1, 2, 3]
    resumed = (mdir / WEIGHTS).read_bytes()

    fresh = load_config(tiny_project, ["teacher.epochs=3", "out_dir=outputs-fresh"])
    execute(PREPARE, fresh)
    execute(TRAIN_TEACHER, fresh, "g0")
    assert (fresh.model_dir("g0") / WEIGHTS).read_bytes() == resumed
    assert (fresh.model_dir("g0") / "train_state.pt").read_bytes() == (mdir / "train_state.pt").read_bytes()


def test_a_changed_val_split_retrains(tiny_project):
    """What a stage depends on comes from its one declaration: fit has no skip check of its own that could forget
    the val split (it did once), so a changed val.parquet re-runs the teacher."""
    cfg = load_config(tiny_project)
    _prepare_and_teacher(cfg)
    assert execute(TRAIN_TEACHER, cfg, "g0").get("skipped")
    val = sorted((tiny_project.parent / "data/toy/val").rglob("*.png"))[0]
    val.unlink()
    execute(PREPARE, cfg)
    assert not execute(TRAIN_TEACHER, cfg, "g0").get("skipped")
    assert execute(EVALUATE, cfg, "g0")["metrics"]["test/top1"] >= 0


# ---- end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_toy_teacher_and_two_generations(tmp_path):
    """The real toy set (20 labels/class) with the shipped params.yaml (the README's main job, ~2 min on 2 cores):
    files, schemas, and the paper's claim in miniature: the best noised student is at least as accurate as its
    teacher."""
    from tasks.pipeline import run_direct

    repo = Path(__file__).parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    cfg = load_config(tmp_path / "params.yaml", ["tracking.enabled=false", "threads=2"])
    rows = run_direct(cfg, str(tmp_path / "params.yaml"))
    for gen in ("g0", "g1", "g2"):
        meta = json.loads((cfg.model_dir(gen) / "model.json").read_text())
        assert meta["generation"] == gen and meta["num_classes"] == 10 and len(meta["classes"]) == 10
        assert json.loads((cfg.model_dir(gen) / "config.json").read_text())["stage"].startswith("train-")
        assert {"test/top1", "test/top5", "test/ece", "test/nll"} <= set(
            json.loads((cfg.eval_dir(gen) / "metrics.json").read_text()))
        assert len(list(cfg.labels_dir(gen).glob("shard-*.parquet"))) == 3  # every model labels once, the last too
    for gen in ("g1", "g2"):
        bal = pq.read_table(cfg.balanced_dir(gen) / "balanced.parquet")
        stats = json.loads((cfg.balanced_dir(gen) / "stats.json").read_text())
        assert stats["final"] == int(np.sum(bal.column("copies").to_numpy())) and len(stats["per_class"]) == 10
    assert [r["generation"] for r in rows] == ["g0", "g1", "g2"]
    teacher, best_student = rows[0]["test_top1"], max(r["test_top1"] for r in rows[1:])
    print("toy e2e:", [(r["generation"], round(r["test_top1"], 3)) for r in rows])
    assert teacher < 0.9, "toy should leave the teacher clearly imperfect"
    assert best_student >= teacher


def test_nst_labels_prints_the_per_class_table_and_writes_the_rows(tiny_project, tmp_path, capsys):
    """What a user opens first when a student disappoints: per class, what its teacher predicted, what the filter
    dropped, capped and duplicated, the mean confidence and the accuracy against hidden labels; and the rows."""
    import csv

    from cli.main import main
    from tasks.filter_balance import FILTER_BALANCE

    cfg = load_config(tiny_project)
    _prepare_and_teacher(cfg)
    execute(LABEL, cfg, "g0")
    execute(FILTER_BALANCE, cfg, "g1")
    assert main(["labels", "g1", "-p", str(tiny_project), "--csv", str(tmp_path / "rows.csv")]) == 0
    out = capsys.readouterr().out
    stats = json.loads((cfg.balanced_dir("g1") / "stats.json").read_text())
    head = out.splitlines()[2]
    assert head.split() == ["class", "predicted", "dropped", "capped", "duplicated", "final", "mean", "conf", "acc",
                            "(hidden", "labels)"]
    for name, v in stats["per_class"].items():
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert line.split()[1:6] == [f"{v[k]:,}" for k in ("predicted", "below_threshold", "capped", "duplicated",
                                                            "final")]
    rows = list(csv.DictReader(open(tmp_path / "rows.csv")))
    assert len(rows) == pq.ParquetFile(cfg.balanced_dir("g1") / "balanced.parquet").metadata.num_rows
    assert sum(int(r["copies"]) for r in rows) == stats["final"]
    assert all(r["path"].startswith("data/toy/unlabeled/") and r["pseudo_label"] in stats["per_class"] for r in rows)


def test_progress_is_a_bar_in_a_terminal_and_plain_lines_elsewhere(tmp_path):
    """Interactive: a rich bar with rate and ETA; not a TTY (CI, Prefect logs, files): periodic plain log lines."""
    import os
    import pty
    import subprocess
    import sys

    code = ("import logging, time\nlogging.basicConfig(level=logging.INFO, format='%(message)s')\n"
            "from nst.progress import Progress\n"
            "with Progress('g1/label', total=40, unit='img') as p:\n"
            "    for _ in range(4):\n        time.sleep(0.05); p.advance(10, loss=0.5)\n")
    env = {**os.environ, "NST_PROGRESS_EVERY_S": "0", "TERM": "xterm", "COLUMNS": "120"}
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("g1/label: 40/40 img (") and "img/s" in lines[-1], lines
    assert "ETA" in lines[0] and "\r" not in plain.stderr

    pid, fd = pty.fork()
    if pid == 0:  # the child: stderr is a terminal
        os.execve(sys.executable, [sys.executable, "-c", code], env)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "g1/label" in text and "img/s" in text and "━" in text, text[-500:]
