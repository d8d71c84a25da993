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

import tasks
from nst.config import ConfigError, NoiseConfig, load_config
from nst.data import TrainTransform
from tasks.filter_balance import balance
from tasks.pseudo_label import soft_targets


# ---- filter / balance: the paper's rule, exact ------------------------------------------------------------------

def test_balance_threshold_cap_and_duplicate_exact():
    # class 0: 5 images (conf .9 .8 .7 .6 .2) -> .2 dropped, 4 kept, capped to K=3 keeping the 3 most confident
    # class 1: 2 images (conf .5 .35)          -> both kept, duplicated up to K=3 (one extra copy)
    # class 2: 1 image  (conf .25)             -> dropped by the threshold, nothing left to duplicate
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 2])
    conf = np.array([0.6, 0.9, 0.2, 0.8, 0.7, 0.35, 0.5, 0.25])
    rows, stats = balance(pred, conf, num_classes=3, threshold=0.3, target=3, duplicate=True, seed=0)
    picked = rows.tolist()
    assert sorted(picked[:3]) == [1, 3, 4]  # the 3 most confident of class 0, not row 0 (0.6) nor row 2 (0.2)
    assert sorted(picked[3:]) in ([5, 5, 6], [5, 6, 6])  # originals once + one seeded duplicate
    assert stats["per_class"][0] == {"predicted": 5, "below_threshold": 1, "kept": 4, "capped": 1, "duplicated": 0,
                                     "final": 3, "unique": 3}
    assert stats["per_class"][1]["duplicated"] == 1 and stats["per_class"][1]["final"] == 3
    assert stats["per_class"][2] == {"predicted": 1, "below_threshold": 1, "kept": 0, "capped": 0, "duplicated": 0,
                                     "final": 0, "unique": 0}
    assert stats["dropped"] == 2 and stats["kept"] == 6 and stats["final"] == 6


def test_balance_duplication_is_seeded_and_can_be_switched_off():
    pred = np.zeros(3, dtype=int)
    conf = np.array([0.9, 0.8, 0.7])
    a, _ = balance(pred, conf, 1, 0.3, 10, True, seed=1)
    b, _ = balance(pred, conf, 1, 0.3, 10, True, seed=1)
    assert a.tolist() == b.tolist() and len(a) == 10
    assert sorted(np.bincount(a).tolist()) == [3, 3, 4]  # copy factor 10/3: each image 3x, one drawn a 4th time
    c, st = balance(pred, conf, 1, 0.3, 10, False, seed=1)
    assert sorted(c.tolist()) == [0, 1, 2] and st["duplicated"] == 0


def test_balance_default_target_keeps_filtered_size():
    pred = np.array([0] * 6 + [1] * 2)
    conf = np.full(8, 0.9)
    rows, stats = balance(pred, conf, 2, 0.3, None, True, seed=0)
    assert stats["target_per_class"] == 4 and len(rows) == 8


# ---- pseudo-labels ----------------------------------------------------------------------------------------------

def test_soft_labels_renormalised_over_top_k_with_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    pred, max_prob, entropy, classes, probs = soft_targets(logits, "soft", temperature=2.0, top_k=3)
    p_t = (logits / 2.0).softmax(1)[0]
    assert classes[0].tolist() == [0, 1, 2]
    expect = p_t[:3] / p_t[:3].sum()
    assert torch.allclose(probs[0], expect, atol=1e-6) and abs(probs[0].sum().item() - 1) < 1e-6
    assert max_prob.item() == pytest.approx(logits.softmax(1).max().item())  # confidence is at T = 1
    assert pred.item() == 0 and entropy.item() > 0


def test_hard_labels_are_the_argmax():
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    pred, _, _, classes, probs = soft_targets(logits, "hard", 1.0, 3)
    assert classes.tolist() == [[1]] and probs.tolist() == [[1.0]] and pred.item() == 1


# ---- noise: teacher clean, student noised -----------------------------------------------------------------------

def test_teacher_is_unnoised_two_labelling_passes_identical(tiny_project):
    cfg = load_config(tiny_project)
    tasks.prepare(cfg)
    tasks.train_teacher(cfg)
    first = tasks.pseudo_label(cfg, "g1")["shards"]
    blobs = [Path(p).read_bytes() for p in first]
    shutil.rmtree(cfg.gen_dir("g1") / "pseudo")
    second = tasks.pseudo_label(cfg, "g1")["shards"]
    assert [Path(p).read_bytes() for p in second] == blobs
    t = pq.read_table(second[0])
    assert t.schema.names == ["image_id", "path", "pred", "max_prob", "entropy", "classes", "probs", "true_label",
                              "teacher"]
    assert set(t.column("teacher").to_pylist()) == {"g0"}

    # A new shard size relabels; the finishing step leaves exactly the new shards (what DVC tracks) and the config.
    cfg2 = load_config(tiny_project, [f"pseudo_label.shard_size={2 * cfg.pseudo_label.shard_size}"])
    assert tasks.num_shards(cfg2) != len(first)
    third = tasks.pseudo_label(cfg2, "g1")["shards"]
    pdir = cfg.gen_dir("g1") / "pseudo"
    assert sorted(p.name for p in pdir.glob("shard-*.parquet")) == sorted(Path(p).name for p in third)
    assert json.loads((pdir / "config.json").read_text())["config"]["pseudo_label"]["shard_size"] == \
        cfg2.pseudo_label.shard_size
    Path(third[-1]).unlink()
    with pytest.raises(FileNotFoundError, match=Path(third[-1]).name):
        tasks.finish_pseudo_label(cfg2, "g1")


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
    effective = {min(op.magnitude, op.magnitude_max or 10) for op in ra.ops}
    assert effective == {27}
    rotate = next(op for op in ra.ops if op.name == "Rotate")
    assert abs(rotate.level_fn(27, rotate.hparams)[0]) == pytest.approx(81.0)  # 27/10 * 30 degrees
    # and the trap it avoids: without mmax, timm silently clips M to 10
    plain = TrainTransform(32, False, "rand-m27-n2").randaugment
    assert {min(op.magnitude, op.magnitude_max or 10) for op in plain.ops} == {10}


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
    (lambda d: d["data"].pop("labeled"), "data.labeled: required field is missing"),
    (lambda d: d["generations"][1].update(teacher="g0"), "generations[1].teacher = 'g0' must be the previous generation 'g1'"),
    (lambda d: d["generations"][0].update(name="first"), "generations.0.name = 'first'"),
    (lambda d: d["teacher"].update(model="resnet_nonexistent"), "teacher.model = 'resnet_nonexistent': unknown model"),
    (lambda d: d["generations"][0].update(ratio=0), "generations.0.ratio = 0"),
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
    from nst.cli import main

    p = _write(tmp_path, lambda d: d["filter"].update(threshold=2))
    assert main(["run", "-p", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "filter.threshold = 2" in err
    assert not (tmp_path / "outputs").exists()


def test_a_second_run_on_one_out_dir_is_refused_at_once(tiny_project, capsys):
    from nst.cli import main
    from nst.io import run_lock

    cfg = load_config(tiny_project)
    with run_lock(cfg.out_dir):  # another run holds it (flock: a second open() conflicts even in one process)
        assert main(["run", "--no-prefect", "-p", str(tiny_project)]) == 2
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
    assert not (tmp_path / "toy.partial").exists()


def test_unreadable_images_are_skipped_and_listed_up_to_a_fraction(tiny_project):
    root = tiny_project.parent
    bad = root / "data" / "toy" / "unlabeled" / "zzz_broken.png"
    bad.write_bytes(b"not a png")
    cfg = load_config(tiny_project, ["data.max_bad_fraction=0.05"])
    res = tasks.prepare(cfg)
    listed = json.loads((cfg.out_dir / "data" / "bad_images.json").read_text())["unlabeled"]
    assert [Path(b["path"]).name for b in listed] == ["zzz_broken.png"]
    assert res["metrics"]["n_unlabeled"] == 120 and res["metrics"]["n_bad"] == 1
    from nst.data import DataError

    with pytest.raises(DataError, match=r"unlabeled: 1 of 121 images unreadable"):
        tasks.prepare(load_config(tiny_project, ["data.max_bad_fraction=0.001"]))


def test_csv_manifest_source_with_relative_paths(tiny_project):
    root = tiny_project.parent
    rows = ["path,label"] + [f"toy/labeled/{p.parent.name}/{p.name},{p.parent.name}"
                             for p in sorted((root / "data" / "toy" / "labeled").rglob("*.png"))]
    (root / "data" / "labeled.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(tiny_project, ["data.labeled=data/labeled.csv"])
    res = tasks.prepare(cfg)
    assert res["metrics"]["n_labeled"] == 40 and len(res["classes"]) == 10
    t = pq.read_table(cfg.out_dir / "data" / "labeled.parquet")
    assert t.column("path").to_pylist()[0].startswith("data/toy/labeled/")  # stored relative: portable outputs


# ---- training resume --------------------------------------------------------------------------------------------

def test_training_resumes_after_a_crash_to_the_same_weights(tiny_project):
    """A crash after epoch 1 and a re-run give the same model as one uninterrupted run (per-epoch seeding)."""
    from nst.checkpoint import WEIGHTS
    from nst import train as train_mod

    cfg = load_config(tiny_project, ["teacher.epochs=3"])
    tasks.prepare(cfg)
    real_fit = train_mod.fit

    class Crash(Exception):
        pass

    def crashing_fit(**kw):
        def on_epoch(row):
            if row["epoch"] == 1:
                raise Crash()
        return real_fit(**kw, on_epoch=on_epoch)

    import tasks.train as tt

    tt.fit = crashing_fit
    try:
        with pytest.raises(Crash):
            tasks.train_teacher(cfg)
    finally:
        tt.fit = real_fit
    mdir = cfg.model_dir("g0")
    assert (mdir / "train_state.pt").is_file() and not (mdir / WEIGHTS).exists()
    tasks.train_teacher(cfg)  # resumes at epoch 2
    hist = json.loads((mdir / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    resumed = (mdir / WEIGHTS).read_bytes()

    fresh = load_config(tiny_project, ["teacher.epochs=3", "out_dir=outputs-fresh"])
    tasks.prepare(fresh)
    tasks.train_teacher(fresh)
    assert (fresh.model_dir("g0") / WEIGHTS).read_bytes() == resumed


# ---- end to end ---------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_end_to_end_toy_teacher_and_two_generations(tmp_path):
    """The real toy set (20 labels/class) with the shipped params.yaml (the README's main job, ~2 min on 2 cores):
    files, schemas, and the paper's claim in miniature: the best noised student is at least as accurate as its
    teacher."""
    from nst.cli import ensure_builtin_data
    from nst.pipeline import run_direct

    repo = Path(__file__).parents[1]
    shutil.copy(repo / "params.yaml", tmp_path / "params.yaml")
    cfg = load_config(tmp_path / "params.yaml", ["tracking.enabled=false", "threads=2"])
    ensure_builtin_data(cfg)
    rows = run_direct(cfg)
    out = cfg.out_dir
    for gen in ("g0", "g1", "g2"):
        mdir = cfg.model_dir(gen)
        meta = json.loads((mdir / "model.json").read_text())
        assert meta["generation"] == gen and meta["num_classes"] == 10 and len(meta["classes"]) == 10
        assert (mdir / "model.safetensors").is_file() and (mdir / "config.json").is_file()
        m = json.loads((out / gen / "eval" / "metrics.json").read_text())
        assert {"test/top1", "test/top5", "test/ece", "test/nll"} <= set(m)
    for gen in ("g1", "g2"):
        shards = sorted((out / gen / "pseudo").glob("shard-*.parquet"))
        assert len(shards) == 3
        bal = pq.read_table(out / gen / "balanced" / "balanced.parquet")
        assert bal.schema.names == pq.read_schema(shards[0]).names
        stats = json.loads((out / gen / "balanced" / "stats.json").read_text())
        assert stats["final"] == bal.num_rows and set(stats["per_class"]) == set(meta["classes"])
    assert [r["generation"] for r in rows] == ["g0", "g1", "g2"]
    teacher = rows[0]["test_top1"]
    best_student = max(r["test_top1"] for r in rows[1:])
    print("toy e2e:", [(r["generation"], round(r["test_top1"], 3)) for r in rows])
    assert teacher < 0.9, "toy should leave the teacher clearly imperfect"
    assert best_student >= teacher
