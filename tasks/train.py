"""Stages `train-teacher` and `train-student`: both are the one loop in `nst.train.fit`, fed differently.

Under `torchrun` (distributed.nproc_per_node > 1) the same functions run in every rank; rank 0 writes."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from nst.checkpoint import STATE, WEIGHTS, init_model, load_model
from nst.config import Config
from nst.data import Blobs, build_train_transform, dataset_for, open_split, read_classes, read_manifest
from nst.distributed import setup
from nst.errors import StageError
from nst.io import atomic_write_json
from nst.train import SparseTargets, fit, resolve_device
from tasks.spec import MODEL_CODE, TRAIN_KEYS, Stage

log = logging.getLogger("nst.train")


def _meta(cfg: Config, name: str, role: str, classes: list[str]) -> dict:
    tc = cfg.train_config(name)
    return {"model": tc.model, "num_classes": len(classes), "classes": classes, "generation": name, "role": role,
            "image_size": cfg.data.image_size, "transform": cfg.data.transform, "crop_pct": cfg.data.crop_pct,
            "mean": [0.5] * 3, "std": [0.5] * 3,
            "noise": tc.noise.model_dump() | {"randaugment_timm": tc.noise.randaugment}}


def announce_noise(cfg: Config, gen: str) -> None:
    """Say what noise this model trains with, before it trains: a student with all noise off is the paper's
    ablation, not the method, and should never be one by accident."""
    noise = cfg.train_config(gen).noise
    role = "teacher" if gen == "g0" else "student"
    log.info("%s (%s) trains with noise: %s", gen, role, noise.describe())
    if role == "student" and noise.off:
        log.warning("%s: the student's noise is all off (randaugment_n 0, dropout 0, drop_path 0): this trains the "
                    "no-noise ablation, not Noisy Student", gen)


def _labeled(cfg: Config, noise):
    tf = build_train_transform(cfg.data, noise)
    ds, labels = open_split(cfg, "labeled", tf)
    val = open_split(cfg, "val")
    return ds, labels, val


class StreamRows:
    """The duplicated pseudo-label stream as the `rows` of an ImageDataset: position -> index into the balanced
    set (duplicates never materialised)."""

    def __init__(self, targets):
        self.targets = targets

    def __len__(self) -> int:
        return self.targets.stream_length

    def __getitem__(self, i: int) -> int:
        return int(self.targets.stream_index(i))


def _timing(cfg: Config, gen: str, **times: float) -> None:
    """Wall-clock start/end of a training run, for the tracking run's times; bookkeeping, not an output."""
    f = cfg.state_dir / "timing" / f"{gen}.json"
    try:
        from nst.io import read_json

        old = read_json(f) if f.is_file() else {}
        atomic_write_json(f, old | times)
    except (OSError, ValueError):
        pass


def _fit(cfg: Config, gen: str, role: str, fingerprint: str, **kw) -> dict:
    tc = cfg.train_config(gen)
    device = resolve_device(cfg.device)
    dist, device = setup(device, cfg.distributed)
    if dist.main:
        announce_noise(cfg, gen)
    classes = read_classes(cfg)
    ds, labels, val = _labeled(cfg, tc.noise)
    torch.manual_seed(cfg.seed + (0 if gen == "g0" else cfg.generation(gen).index))
    field = "teacher" if gen == "g0" else f"generations[{cfg.gen_index(gen)}].student"
    model = init_model(tc, len(classes), field)
    init = kw.pop("init_from", None)
    if init is not None:
        teacher, _ = load_model(init)
        model.load_state_dict(teacher.state_dict())
    return run_fit(cfg, gen, dist, model=model, cfg=tc, labeled=ds, labels=labels, device=device,
                   seed=cfg.seed if gen == "g0" else cfg.seed + 1000 * cfg.generation(gen).index,
                   fingerprint=fingerprint, meta=_meta(cfg, gen, role, classes), val=val[0] if val else None,
                   val_labels=val[1] if val else None, **kw)


def run_fit(cfg: Config, gen: str, dist, /, **fit_kw) -> dict:
    """`nst.train.fit` into gen's model folder, its epochs logged live to its tracking run and its wall-clock
    times kept for it: the part every training stage (teacher, student, fine-tune) shares."""
    from nst.tracking import epoch_logger

    live = epoch_logger(cfg, gen) if dist.main else None
    if dist.main:
        _timing(cfg, gen, start=time.time())
    meta = fit(out_dir=cfg.model_dir(gen), workers=cfg.data.num_workers, dist=dist, on_epoch=live, **fit_kw)
    if dist.main:
        _timing(cfg, gen, end=time.time())
    if live is not None:
        live.close()  # the last epochs reach the run before the stage ends (bounded wait)
    return {"model": meta["model"], "params": meta["params"], "best_epoch": meta["best_epoch"],
            "metrics": {"best_val_acc": meta["best_val_acc"]} if meta["best_val_acc"] is not None else {}}


def train_teacher(cfg: Config, gen: str = "g0", fingerprint: str = "") -> dict:
    return _fit(cfg, "g0", "teacher", fingerprint)


def student_data(cfg: Config, gen: str, transform) -> tuple:
    """The balanced pseudo-labels as (dataset over the duplicated stream, sparse targets)."""
    from nst.labels import read_targets

    balanced = cfg.balanced_dir(gen) / "balanced.parquet"
    if not balanced.is_file():
        raise FileNotFoundError(f"{balanced}: no balanced pseudo-labels; run `nst filter-balance {gen}` first")
    t = read_targets(balanced)
    if len(t) == 0:
        raise StageError(f"{balanced}: no pseudo-labels to train on (filter.threshold = {cfg.filter.threshold} "
                         "kept none); lower the threshold")
    manifest = read_manifest(cfg.data_dir / "unlabeled.parquet")
    ds = dataset_for(cfg.data, Blobs.from_manifest(manifest, cfg, t.rows), transform=transform, rows=StreamRows(t),
                     cache=False)
    return ds, SparseTargets(t.classes, t.probs, t.num_classes)


def train_student(cfg: Config, gen: str, fingerprint: str = "") -> dict:
    g = cfg.generation(gen)
    unl, targets = student_data(cfg, gen, build_train_transform(cfg.data, g.student.noise))
    return _fit(cfg, gen, "student", fingerprint, unlabeled=unl, targets=targets,
                hard_targets=cfg.pseudo_label.mode == "hard", ratio=g.ratio,
                init_from=cfg.model_dir(g.teacher) if g.init == "teacher" else None)




def model_outs(cfg: Config, gen: str) -> list[Path]:
    d = cfg.model_dir(gen)
    return [d / WEIGHTS, d / "model.json", d / STATE, d / "config.json"]


def _labeled_deps(cfg: Config) -> list[Path]:
    d = cfg.data_dir
    return [d / "labeled.parquet"] + ([d / "val.parquet"] if cfg.data.val else []) + [d / "classes.json"]


def _pretrained(tc) -> list[Path]:
    return [tc.pretrained_file] if tc.pretrained_file is not None else []


TRAIN_TEACHER = Stage(
    name="train-teacher", fn=train_teacher, model=True,
    params=lambda c, g: TRAIN_KEYS + ["teacher"],
    deps=lambda c, g: _labeled_deps(c) + _pretrained(c.teacher),
    outs=model_outs,
    plots=lambda c, g: [c.model_dir(g) / "history.json"],
    code=MODEL_CODE + ("tasks/train.py",),
)

TRAIN_STUDENT = Stage(
    name="train-student", fn=train_student, scope="student", model=True,
    params=lambda c, g: TRAIN_KEYS + [f"generations.{c.gen_index(g)}", "pseudo_label.mode"],
    deps=lambda c, g: [c.balanced_dir(g) / "balanced.parquet", c.data_dir / "unlabeled.parquet"] + _labeled_deps(c)
    + ([c.model_dir(c.generation(g).teacher) / WEIGHTS] if c.generation(g).init == "teacher" else [])
    + _pretrained(c.generation(g).student),
    outs=model_outs,
    plots=lambda c, g: [c.model_dir(g) / "history.json"],
    code=MODEL_CODE + ("tasks/train.py",),
)
