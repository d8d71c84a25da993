"""Scaling up, tested on CPU: data-parallel training under torchrun (gloo, 2 processes), starting from a pretrained
checkpoint, the photo transforms, and one labelling pass per model. The flow on a real Dask cluster is in
tests/test_multinode.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import make_tiny_project
from nst.config import load_config

REPO = Path(__file__).resolve().parents[1]


def _project(root: Path, generations: int = 0, per_class: int = 16, test: int = 20) -> Path:
    """The tiny project with more labeled and test images, so accuracy means something."""
    from nst.datasets import make_toy

    params = make_tiny_project(root, generations=generations)
    shutil.rmtree(root / "data" / "toy")
    make_toy(root / "data" / "toy", size=16, labeled_per_class=per_class, val_per_class=2, unlabeled_per_class=4,
             test_per_class=test)
    return params


def _nst(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, check=False)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


# ---- torchrun + DDP -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_ddp_training_under_torchrun_matches_single_process_and_resumes(tmp_path):
    """2 gloo processes: the run completes, rank 0 alone writes one checkpoint, a run killed mid-training resumes to
    the same weights as an uninterrupted one, and test accuracy is within 8 points of a single process (same global
    batch and per-sample augmentation; only BatchNorm statistics are per rank)."""
    over = ["-S", "teacher.epochs=40", "-S", "teacher.model=nst_cnn_s", "-S", "teacher.batch_size=32"]
    ddp = over + ["-S", "distributed.nproc_per_node=2"]
    single, a, b = (_project(tmp_path / n) for n in ("single", "a", "b"))
    _nst(["run", "--no-prefect", "-p", str(single), *over], tmp_path)
    _nst(["run", "--no-prefect", "-p", str(a), *ddp], tmp_path)

    # b: killed (the whole launcher: nst -> torchrun -> ranks) after a few epochs, then run again
    state = b.parent / "outputs/g0/model/train_state.pt"
    _nst(["prepare", "-p", str(b)], tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "cli", "train-teacher", "-p", str(b), *ddp], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (state.is_file() and torch.load(state, weights_only=True)["epoch"] >= 2):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = torch.load(state, weights_only=True)["epoch"] + 1
    assert done < 40 and not (b.parent / "outputs/g0/model/model.json").exists()
    resumed = _nst(["run", "--no-prefect", "-p", str(b), *ddp], tmp_path)
    assert f"resuming at epoch {done + 1}/40" in resumed.stderr

    meta = json.loads((a.parent / "outputs/g0/model/model.json").read_text())
    assert meta["world_size"] == 2
    assert sorted(p.name for p in (a.parent / "outputs/g0/model").iterdir()) == [
        "config.json", "history.json", "model.json", "model.safetensors", "train_state.pt"]
    weights = lambda p: (p.parent / "outputs/g0/model/model.safetensors").read_bytes()  # noqa: E731
    assert weights(a) == weights(b), "a DDP run resumed after kill -9 differs from an uninterrupted one"
    top1 = {n: json.loads((p.parent / "outputs/g0/eval/metrics.json").read_text())["test/top1"]
            for n, p in (("single", single), ("ddp", a))}
    print("ddp vs single test top-1:", top1)
    assert abs(top1["ddp"] - top1["single"]) <= 0.08, top1


def test_torchruns_processes_on_a_machine_share_its_threads(tiny_project, monkeypatch):
    """`threads` is the stage's budget on one machine: each of torchrun's N processes there takes threads // N (on 2
    cores, 2 ranks of 2 threads each trained 40 epochs in 45.9 s, of 1 thread each in 15.9 s)."""
    from types import SimpleNamespace

    from cli.main import _cfg

    args = SimpleNamespace(params=str(tiny_project), overrides=["threads=4"])
    for local_world, want in ((None, 4), ("2", 2), ("8", 1)):
        if local_world:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
        _cfg(args)
        assert torch.get_num_threads() == want, local_world


@pytest.mark.slow
def test_ddp_student_splits_both_streams_without_overlap():
    """Every rank walks the same global batches and takes every world-th position: together the ranks see each
    sample of the single-process batch exactly once, with the same per-sample seed."""
    from nst.data import EpochBatches

    one = list(EpochBatches(50, 12, 7, seed=3, stream=1))
    r0 = list(EpochBatches(50, 12, 7, seed=3, stream=1, rank=0, world=2))
    r1 = list(EpochBatches(50, 12, 7, seed=3, stream=1, rank=1, world=2))
    for full, a, b in zip(one, r0, r1):
        assert sorted(a + b) == sorted(full) and not set(a) & set(b) and len(a) == len(b) == 6


# ---- pretrained weights --------------------------------------------------------------------------------------------

def test_a_pretrained_file_initialises_all_but_the_classifier(tmp_path):
    from safetensors.torch import save_file

    from nst.checkpoint import build_model, init_model
    from nst.config import NoiseConfig, TrainConfig

    src = build_model("nst_cnn_s", 1000)  # e.g. an ImageNet head
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "in1k.safetensors"))
    torch.save({"state_dict": src.state_dict(), "epoch": 9}, tmp_path / "timm.pth")  # a timm-style checkpoint
    for f in ("in1k.safetensors", "timm.pth"):
        tc = TrainConfig(model="nst_cnn_s", pretrained_file=tmp_path / f, noise=NoiseConfig())
        m = init_model(tc, 10, "teacher")
        own, ref = m.state_dict(), src.state_dict()
        assert own["fc.weight"].shape == (10, 96)
        assert all(torch.equal(own[k], ref[k]) for k in own if not k.startswith("fc."))

    # a file of another model: one line naming it; a pickle with code in it: refused, never executed
    save_file({k: v.contiguous() for k, v in build_model("nst_cnn_m", 10).state_dict().items()},
              str(tmp_path / "other.safetensors"))
    from nst.errors import DataError

    with pytest.raises(DataError, match=r"other.safetensors: does not fit the model \(shape mismatch"):
        init_model(TrainConfig(model="nst_cnn_s", pretrained_file=tmp_path / "other.safetensors",
                               noise=NoiseConfig()), 10, "teacher")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(DataError, match="evil.pth: not a safetensors file or a weights-only torch checkpoint"):
        init_model(TrainConfig(model="nst_cnn_s", pretrained_file=tmp_path / "evil.pth", noise=NoiseConfig()), 10, "t")
    assert not (tmp_path / "pwned").exists()


def test_the_teacher_trains_from_a_pretrained_file_through_the_cli(tiny_project, tmp_path):
    from safetensors.torch import save_file

    from nst.checkpoint import build_model

    save_file({k: v.contiguous() for k, v in build_model("nst_cnn_xs", 1000).state_dict().items()},
              str(tmp_path / "w.safetensors"))
    _nst(["prepare", "-p", str(tiny_project)], tmp_path)
    _nst(["train-teacher", "-p", str(tiny_project), "-S", f"teacher.pretrained_file={tmp_path / 'w.safetensors'}"],
         tmp_path)
    bad = subprocess.run([sys.executable, "-m", "cli", "train-teacher", "-p", str(tiny_project), "-S",
                          "teacher.pretrained_file=missing.safetensors"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode == 2 and "teacher.pretrained_file = 'missing.safetensors': file not found" in bad.stderr


# ---- photos: RandomResizedCrop / resize + centre crop ------------------------------------------------------------------

def test_photo_transforms_from_jpeg_files_end_to_end(tmp_path):
    """`data.transform: rrc` on JPEGs of mixed sizes: training crops and evaluation centre crops come out at
    image_size, and a whole teacher + student pipeline runs on them."""
    from PIL import Image

    from nst.data import RRCTransform, eval_resize

    rng = np.random.default_rng(0)
    root = tmp_path / "proj"
    for split, n in (("labeled", 3), ("test", 2), ("val", 1)):
        for c in ("cat", "dog"):
            d = root / "photos" / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    (root / "photos" / "unlabeled").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(root / f"photos/unlabeled/{i}.jpg")
    img = torch.randint(0, 255, (3, 60, 80), dtype=torch.uint8)
    assert eval_resize(img, 32, "rrc", 0.875).shape == (3, 32, 32)
    assert RRCTransform(32, True, "rand-m9-n2-mmax10", (0.3, 1.0))(Image.new("RGB", (80, 60))).shape == (3, 32, 32)
    params = yaml.safe_load((REPO / "tests" / "conftest.py").read_text().split('TINY_PARAMS = """')[1].split('"""')[0])
    params["data"] = {"labeled": "photos/labeled", "unlabeled": "photos/unlabeled", "test": "photos/test",
                      "val": "photos/val", "image_size": 24, "transform": "rrc", "rrc_scale": [0.35, 1.0],
                      "hflip": True}
    params["generations"] = params["generations"][:1]
    params["filter"] = {"threshold": 0.0}
    params["pseudo_label"] = {"shard_size": 6, "batch_size": 8}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    _nst(["run", "--no-prefect", "-p", str(root / "params.yaml")], tmp_path)
    cfg = load_config(root / "params.yaml")
    assert json.loads((cfg.model_dir("g1") / "model.json").read_text())["transform"] == "rrc"


# ---- label once ------------------------------------------------------------------------------------------------------

def test_every_model_labels_the_unlabeled_set_exactly_once(tiny_project, monkeypatch):
    """One forward pass over the unlabeled set per model - the last generation included, tracking included (its
    labeler statistics come from the shards) - counted where images meet a model."""
    import nst.train
    import tasks.evaluate
    import tasks.label
    from tasks.pipeline import run_direct

    unlabeled_images = 0
    real = nst.train.predict_logits

    def counting(model, ds, *a, **k):
        nonlocal unlabeled_images
        base, idx = (ds.dataset, ds.indices) if isinstance(ds, torch.utils.data.Subset) else (ds, range(len(ds)))
        unlabeled_images += sum("/unlabeled/" in base._path(base.row(i)) for i in idx)
        return real(model, ds, *a, **k)

    for mod in (nst.train, tasks.label, tasks.evaluate):
        monkeypatch.setattr(mod, "predict_logits", counting)
    cfg = load_config(tiny_project, ["tracking.enabled=true",
                                     f"tracking.tracking_uri=sqlite:///{tiny_project.parent}/m.db"])
    run_direct(cfg, str(tiny_project))
    assert unlabeled_images == 3 * 120  # g0, g1, g2: each labels the 120 unlabeled images once
    assert {g: len(list(cfg.labels_dir(g).glob("shard-*.parquet"))) for g in cfg.model_names()} == \
        {"g0": 3, "g1": 3, "g2": 3}
    assert not (cfg.out_dir / "tracking_errors.json").exists()
