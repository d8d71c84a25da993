"""Stages `train-teacher` and `train-student`: both are the one loop in `nst.train.fit`, fed differently."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow.parquet as pq
import torch

from nst.checkpoint import build_model, load_model
from nst.config import Config, write_effective_config
from nst.data import ImageDataset, TrainTransform, open_split, read_classes, resolve_paths
from nst.io import file_sha256
from nst.train import fit, resolve_device

log = logging.getLogger("nst.train")


def _meta(cfg: Config, name: str, role: str, classes: list[str], config_hash: str) -> dict:
    tc = cfg.train_config(name)
    return {"model": tc.model, "num_classes": len(classes), "classes": classes, "generation": name, "role": role,
            "config_hash": config_hash, "image_size": cfg.data.image_size, "mean": [0.5] * 3, "std": [0.5] * 3}


def _train_hash(cfg: Config, name: str, *inputs: str) -> str:
    """What a model depends on: its training config, the data config, the seed and its input files' content."""
    import json

    from nst.config import portable_dump
    from nst.io import text_sha256

    tc = cfg.train_config(name)
    extra = cfg.generation(name).model_dump_json() if name != "g0" else ""
    data = json.dumps(portable_dump(cfg)["data"], sort_keys=True)  # relative paths: the same hash in every clone
    return text_sha256("|".join([tc.model_dump_json(), extra, data, str(cfg.seed), *inputs]))[:16]


def _labeled(cfg: Config, noise_ra: str | None):
    tf = TrainTransform(cfg.data.image_size, cfg.data.hflip, noise_ra)
    ds, labels, table = open_split(cfg.out_dir, cfg.root, "labeled", cfg.data.image_size, tf)
    val = open_split(cfg.out_dir, cfg.root, "val", cfg.data.image_size)
    return ds, labels, table, val


def train_teacher(cfg: Config) -> dict:
    classes = read_classes(cfg.out_dir)
    tc = cfg.teacher
    ds, labels, _, val = _labeled(cfg, tc.noise.randaugment)
    out = cfg.model_dir("g0")
    labeled_hash = file_sha256(cfg.out_dir / "data" / "labeled.parquet")
    h = _train_hash(cfg, "g0", labeled_hash)
    write_effective_config(cfg, out, "train-teacher", {"generation": "g0"})
    torch.manual_seed(cfg.seed)
    model = build_model(tc.model, len(classes), tc.noise.dropout, tc.noise.drop_path)
    meta = fit(model=model, cfg=tc, out_dir=out, labeled=ds, labels=labels, device=resolve_device(cfg.device),
               seed=cfg.seed, meta=_meta(cfg, "g0", "teacher", classes, h),
               val=val[0] if val else None, val_labels=val[1] if val else None, workers=cfg.data.num_workers)
    return {"out_dir": str(out), "model": meta["model"], "params": meta["params"], "config_hash": h,
            "metrics": {"best_val_acc": meta["best_val_acc"]} if meta["best_val_acc"] is not None else {}}


def pseudo_targets(path, num_classes: int, root) -> tuple[list[str], torch.Tensor]:
    """Dense soft targets (N x C) from the balanced Parquet set's top-k classes and probabilities."""
    t = pq.read_table(path, columns=["path", "classes", "probs"])
    n = t.num_rows
    dense = torch.zeros(n, num_classes)
    cls = t.column("classes").combine_chunks()
    prb = t.column("probs").combine_chunks()
    offsets = cls.offsets.to_numpy()
    rows = np.repeat(np.arange(n), np.diff(offsets))
    dense[torch.from_numpy(rows), torch.from_numpy(cls.values.to_numpy().astype(np.int64))] = torch.from_numpy(
        prb.values.to_numpy().astype(np.float32))
    return resolve_paths(t.column("path").to_pylist(), root), dense


def train_student(cfg: Config, gen: str) -> dict:
    g = cfg.generation(gen)
    classes = read_classes(cfg.out_dir)
    sc = g.student
    ds, labels, _, val = _labeled(cfg, sc.noise.randaugment)
    balanced = cfg.gen_dir(gen) / "balanced" / "balanced.parquet"
    if not balanced.is_file():
        raise FileNotFoundError(f"{balanced}: no balanced pseudo-labels; run `nst filter-balance {gen}` first")
    upaths, targets = pseudo_targets(balanced, len(classes), cfg.root)
    unl = ImageDataset(upaths, cfg.data.image_size, TrainTransform(cfg.data.image_size, cfg.data.hflip, sc.noise.randaugment))
    out = cfg.model_dir(gen)
    h = _train_hash(cfg, gen, file_sha256(balanced), file_sha256(cfg.out_dir / "data" / "labeled.parquet"))
    write_effective_config(cfg, out, "train-student", {"generation": gen, "teacher": g.teacher})
    torch.manual_seed(cfg.seed + g.index)
    model = build_model(sc.model, len(classes), sc.noise.dropout, sc.noise.drop_path)
    if g.init == "teacher":
        teacher, tmeta = load_model(cfg.model_dir(g.teacher))
        if tmeta["model"] != sc.model:
            raise ValueError(f"generations.{gen}.init = 'teacher' needs the same architecture "
                             f"(teacher {tmeta['model']!r}, student {sc.model!r})")
        model.load_state_dict(teacher.state_dict())
    meta = fit(model=model, cfg=sc, out_dir=out, labeled=ds, labels=labels, device=resolve_device(cfg.device),
               seed=cfg.seed + 1000 * g.index, meta=_meta(cfg, gen, "student", classes, h) | {"teacher": g.teacher},
               val=val[0] if val else None, val_labels=val[1] if val else None, unlabeled=unl, targets=targets,
               hard_targets=cfg.pseudo_label.mode == "hard", ratio=g.ratio, workers=cfg.data.num_workers)
    return {"out_dir": str(out), "model": meta["model"], "params": meta["params"], "config_hash": h,
            "metrics": {"best_val_acc": meta["best_val_acc"]} if meta["best_val_acc"] is not None else {}}
