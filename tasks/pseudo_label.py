"""Stage `pseudo-label`: the un-noised teacher (eval mode, clean images, EMA weights when trained with EMA) labels
one shard of the unlabeled set into one Parquet file. Shards are independent, so they map onto workers."""

from __future__ import annotations

import json
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from nst.checkpoint import WEIGHTS, load_model
from nst.config import Config, write_effective_config
from nst.data import ImageDataset, prepared_dir, resolve_paths
from nst.io import atomic_path, file_sha256, text_sha256
from nst.train import predict_logits, resolve_device

log = logging.getLogger("nst.pseudo_label")

SCHEMA = pa.schema([
    ("image_id", pa.string()), ("path", pa.string()), ("pred", pa.int32()), ("max_prob", pa.float32()),
    ("entropy", pa.float32()), ("classes", pa.list_(pa.int32())), ("probs", pa.list_(pa.float32())),
    ("true_label", pa.int32()), ("teacher", pa.string()),
])


def num_shards(cfg: Config) -> int:
    n = pq.ParquetFile(prepared_dir(cfg.out_dir) / "unlabeled.parquet").metadata.num_rows
    return max(1, math.ceil(n / cfg.pseudo_label.shard_size))


def shard_path(cfg: Config, gen: str, shard: int, n: int):
    return cfg.gen_dir(gen) / "pseudo" / f"shard-{shard:05d}-of-{n:05d}.parquet"


def soft_targets(logits: torch.Tensor, mode: str, temperature: float, top_k: int):
    """(pred, max_prob, entropy, classes, probs). Confidence and entropy come from softmax(logits) (T = 1), the
    quantity the paper thresholds; targets are softmax(logits / T) restricted to the top-k and renormalised, or
    the one-hot argmax for hard labels."""
    p1 = logits.float().softmax(1)
    max_prob, pred = p1.max(1)
    entropy = -(p1 * p1.clamp_min(1e-12).log()).sum(1)
    if mode == "hard":
        return pred, max_prob, entropy, pred[:, None], torch.ones(len(pred), 1)
    pt = (logits.float() / temperature).softmax(1)
    k = min(top_k, pt.shape[1])
    probs, classes = pt.topk(k, dim=1)
    return pred, max_prob, entropy, classes, probs / probs.sum(1, keepdim=True)


def _key(cfg: Config, teacher_dir) -> str:
    return text_sha256(file_sha256(teacher_dir / WEIGHTS) + cfg.pseudo_label.model_dump_json()
                       + file_sha256(prepared_dir(cfg.out_dir) / "unlabeled.parquet"))[:16]


def pseudo_label_shard(cfg: Config, gen: str, shard: int) -> dict:
    g = cfg.generation(gen)
    teacher_dir = cfg.model_dir(g.teacher)
    n = num_shards(cfg)
    if not 0 <= shard < n:
        raise ValueError(f"shard {shard} out of range: the unlabeled set has {n} shards of {cfg.pseudo_label.shard_size}")
    out = shard_path(cfg, gen, shard, n)
    key = _key(cfg, teacher_dir)
    if out.is_file() and (pq.read_schema(out).metadata or {}).get(b"nst_key", b"").decode() == key:
        return {"path": str(out), "shard": shard, "rows": pq.ParquetFile(out).metadata.num_rows, "skipped": True}

    pl = cfg.pseudo_label
    manifest = pq.read_table(prepared_dir(cfg.out_dir) / "unlabeled.parquet")
    lo, hi = shard * pl.shard_size, min((shard + 1) * pl.shard_size, manifest.num_rows)
    part = manifest.slice(lo, hi - lo)
    device = resolve_device(cfg.device)
    model, meta = load_model(teacher_dir, device)  # eval mode: no dropout, no stochastic depth
    ds = ImageDataset(resolve_paths(part.column("path").to_pylist(), cfg.root), cfg.data.image_size)  # clean: no augmentation
    logits = predict_logits(model, ds, device, pl.batch_size, cfg.data.num_workers,
                            amp=cfg.train_config(g.teacher).amp, channels_last=cfg.train_config(g.teacher).channels_last)
    pred, max_prob, entropy, classes, probs = soft_targets(logits, pl.mode, pl.temperature, pl.top_k)
    table = pa.table({
        "image_id": part.column("image_id"), "path": part.column("path"),
        "pred": pa.array(pred.numpy(), pa.int32()), "max_prob": pa.array(max_prob.numpy(), pa.float32()),
        "entropy": pa.array(entropy.numpy(), pa.float32()),
        "classes": pa.array(classes.numpy().astype("int32").tolist(), pa.list_(pa.int32())),
        "probs": pa.array(probs.numpy().astype("float32").tolist(), pa.list_(pa.float32())),
        "true_label": part.column("label"), "teacher": pa.array([g.teacher] * len(part), pa.string()),
    }, schema=SCHEMA).replace_schema_metadata({
        "nst_key": key, "mode": pl.mode, "temperature": str(pl.temperature), "top_k": str(pl.top_k),
        "teacher_model": meta["model"], "classes": json.dumps(meta["classes"]),
    })
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
    log.info("%s/pseudo-label shard %d/%d: %d images", gen, shard + 1, n, len(part))
    return {"path": str(out), "shard": shard, "rows": len(part), "skipped": False}


def pseudo_label(cfg: Config, gen: str, shards: list[int] | None = None) -> dict:
    """All (or the given) shards, skipping finished ones, then the finishing step when all were asked for."""
    results = [pseudo_label_shard(cfg, gen, s) for s in (range(num_shards(cfg)) if shards is None else shards)]
    if shards is None:
        finish_pseudo_label(cfg, gen)
    return {"out_dir": str(cfg.gen_dir(gen) / "pseudo"), "shards": [r["path"] for r in results],
            "metrics": {"n_labeled_images": sum(r["rows"] for r in results),
                        "shards_computed": sum(not r["skipped"] for r in results)}}


def finish_pseudo_label(cfg: Config, gen: str) -> None:
    """After every shard exists (however they were run: here, or mapped by the flow): remove stale shards of another
    shard size, so the folder DVC tracks holds exactly this labelling, and record the effective config."""
    n, pdir = num_shards(cfg), cfg.gen_dir(gen) / "pseudo"
    keep = {shard_path(cfg, gen, s, n).name for s in range(n)}
    present = {f.name for f in pdir.glob("shard-*.parquet")}
    if missing := sorted(keep - present):
        raise FileNotFoundError(f"{pdir}: pseudo-label shards missing: {', '.join(missing)}")
    for name in present - keep:
        (pdir / name).unlink()
    write_effective_config(cfg, pdir, "pseudo-label", {"generation": gen, "teacher": cfg.generation(gen).teacher})
