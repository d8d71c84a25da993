"""Stage `label`: a finished model (un-noised: eval mode, clean images, EMA weights when trained with EMA) labels the
unlabeled set once, into compact Parquet shards (`gN/labels/`). The next generation's filter-balance reads them,
and so do the model's labeler statistics (`stats.json`): one forward pass over the unlabeled set per model.

Shards are independent, so they map onto workers and GPUs; each carries the key of the work it holds (model
weights, labelling params, manifest, code) and a re-run skips shards whose key matches.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from nst.checkpoint import WEIGHTS, load_model
from nst.config import Config
from nst.data import Blobs, dataset_for, read_classes, read_manifest, shard_reader
from nst.errors import StageError
from nst.io import atomic_write_json
from nst.labels import plan_shards, read_shard_metadata, write_label_shard
from nst.progress import Progress
from nst.train import predict_logits, resolve_device
from tasks.shards import num_shards, shard_path, shard_paths, truth
from tasks.spec import EVAL_KEYS, MODEL_CODE, Stage, fingerprint

log = logging.getLogger("nst.label")


def soft_targets(logits: torch.Tensor, mode: str, temperature: float, top_k: int):
    """(pred, conf, classes, probs). Confidence comes from softmax(logits) (T = 1), the quantity the paper
    thresholds; targets are softmax(logits / T) restricted to the top-k and renormalised, or the argmax (hard)."""
    p1 = logits.float().softmax(1)
    conf, pred = p1.max(1)
    if mode == "hard":
        return pred, conf, pred[:, None], torch.ones(len(pred), 1)
    pt = (logits.float() / temperature).softmax(1)
    probs, classes = pt.topk(min(top_k, pt.shape[1]), dim=1)
    return pred, conf, classes, probs / probs.sum(1, keepdim=True)


def shard_key(cfg: Config, gen: str) -> str:
    """What one shard's content depends on: the stage's fingerprint without the filter settings (those change
    only the statistics, not the labels)."""
    return fingerprint(LABEL, cfg, gen, exclude=LABEL.exclude_from_shards)


def _shard_current(path: Path, key: str) -> bool:
    if not path.is_file():
        return False
    try:
        return read_shard_metadata(path).get("nst_key") == key
    except (OSError, ValueError) as e:  # truncated or foreign: name it and label it again
        log.warning("%s: unreadable (%s); labelling it again", path, str(e).splitlines()[0][:120])
        return False


def label_shards(cfg: Config, gen: str, shards: list[int]) -> list[dict]:
    """Label the given shards with gN's model, loading it once; shards already holding this work are skipped."""
    n, key = num_shards(cfg), shard_key(cfg, gen)
    bad = [s for s in shards if not 0 <= s < n]
    if bad:
        raise StageError(f"{gen}/label: shard {bad[0]} out of range: the unlabeled set has {n} shards of "
                         f"{cfg.pseudo_label.shard_size}")
    todo = [s for s in shards if not _shard_current(shard_path(cfg, gen, s, n), key)]
    results = [{"shard": s, "skipped": True} for s in shards if s not in todo]
    if not todo:
        return results
    pl, tc = cfg.pseudo_label, cfg.train_config(gen)
    device = resolve_device(cfg.device)
    model, meta = load_model(cfg.model_dir(gen), device)  # eval mode: no dropout, no stochastic depth
    manifest = read_manifest(cfg.data_dir / "unlabeled.parquet")
    with Progress(f"{gen}/label", total=sum(min(pl.shard_size, manifest.num_rows - s * pl.shard_size) for s in todo),
                  unit="img", logger=log) as bar:
        reader = shard_reader(cfg) if "offset" in manifest.column_names else None

        def rows(s: int) -> Blobs:
            return Blobs.from_manifest(manifest.slice(s * pl.shard_size, pl.shard_size), cfg, reader=reader)

        blobs = rows(todo[0])
        for i, s in enumerate(todo):
            lo, hi = s * pl.shard_size, min((s + 1) * pl.shard_size, manifest.num_rows)
            nxt = rows(todo[i + 1]) if i + 1 < len(todo) else None
            if nxt is not None and reader is not None:  # read-ahead: the next group's S3 shards, while this one runs
                reader.prefetch(nxt.shards())
            try:
                logits = _logits(model, blobs, cfg, device, tc)
            except Exception as e:
                raise StageError(f"{gen}/label shard {s}: {str(e).splitlines()[0][:300]}") from e
            pred, conf, classes, probs = soft_targets(logits, pl.mode, pl.temperature, pl.top_k)
            write_label_shard(shard_path(cfg, gen, s, n), np.arange(lo, hi, dtype=np.int64), pred.numpy(),
                              conf.numpy(), classes.numpy(), probs.numpy(), len(meta["classes"]),
                              {"nst_key": key, "mode": pl.mode, "temperature": str(pl.temperature),
                               "top_k": str(pl.top_k), "labeler": gen, "model": meta["model"],
                               "classes": json.dumps(meta["classes"]), "shard": f"{s}/{n}"})
            bar.advance(hi - lo)
            log.info("%s/label shard %d/%d: %d images", gen, s + 1, n, hi - lo)
            results.append({"shard": s, "skipped": False})
            blobs = nxt
    return sorted(results, key=lambda r: r["shard"])


def _logits(model, paths: Blobs, cfg: Config, device: torch.device, tc) -> torch.Tensor:
    if device.type == "cuda" and cfg.pseudo_label.gpu_decode:
        from nst.gpu_decode import predict_logits_from_bytes

        return predict_logits_from_bytes(model, paths, cfg.data, device, cfg.pseudo_label.batch_size,
                                         cfg.data.num_workers, amp=tc.amp, channels_last=tc.channels_last)
    ds = dataset_for(cfg.data, paths, cache=False)  # clean: no augmentation
    return predict_logits(model, ds, device, cfg.pseudo_label.batch_size, cfg.data.num_workers, amp=tc.amp,
                          channels_last=tc.channels_last)


def labeler_stats(cfg: Config, gen: str) -> dict:
    """What the pipeline's filter makes of these labels (kept, capped, duplicated per class, confidence, accuracy
    against hidden labels): the statistics of the model as a labeler, from its shards, not from inference. Counts
    only: they do not depend on the seed that picks which rows are duplicated. Pass 1's files go to the state
    folder, not the DVC-tracked labels folder, so a killed run leaves nothing among the outputs."""
    fc, classes = cfg.filter, read_classes(cfg)
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"labeler-{gen}-", dir=cfg.state_dir) as tmp:
        stats = plan_shards(shard_paths(cfg, gen), Path(tmp), len(classes), fc.threshold, fc.target_per_class,
                            fc.duplicate, truth=truth(cfg), workers=min(4, os.cpu_count() or 1)).stats()
    stats["per_class"] = {classes[int(c)]: v for c, v in stats["per_class"].items()}
    return stats | {"labeler": gen}


def finish_labels(cfg: Config, gen: str) -> dict:
    """After every shard exists (however they were run): remove stale shards of another shard size (the folder DVC
    tracks holds exactly this labelling), then the labeler statistics."""
    n, ldir, key = num_shards(cfg), cfg.labels_dir(gen), shard_key(cfg, gen)
    keep = {shard_path(cfg, gen, s, n).name for s in range(n)}
    present = {f.name for f in ldir.glob("shard-*.parquet")}
    if missing := sorted(keep - present):
        raise StageError(f"{ldir}: label shards missing: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for name in present - keep:
        (ldir / name).unlink()
    stale = [p.name for p in shard_paths(cfg, gen) if not _shard_current(p, key)]
    if stale:
        raise StageError(f"{ldir}: shards made by other work: {', '.join(stale[:5])}; run `nst label {gen}`")
    stats = labeler_stats(cfg, gen)
    atomic_write_json(ldir / "stats.json", stats)
    log.info("%s/label: %d images, %.1f%% kept at threshold %.2f", gen, stats["total"], 100 * stats["kept_fraction"],
             cfg.filter.threshold)
    return {"metrics": {k: stats[k] for k in ("total", "kept", "kept_fraction", "mean_confidence_all")
                        if k in stats}}


def label(cfg: Config, gen: str, fingerprint: str = "", shards: list[int] | None = None) -> dict:
    """All (or the given) shards, then the finishing step when all were asked for. The result describes what was
    made, never how (which shards this call computed goes to the log): it is stamped, and must not differ between
    a flow that mapped the shards and one `nst label` that did them all."""
    done = label_shards(cfg, gen, list(range(num_shards(cfg))) if shards is None else shards)
    log.info("%s/label: %d of %d shards computed, the rest already held this work", gen,
             sum(not r["skipped"] for r in done), len(done))
    if shards is None:
        return finish_labels(cfg, gen)
    return {"shards": [r["shard"] for r in done], "computed": [r["shard"] for r in done if not r["skipped"]]}


LABEL = Stage(
    name="label", fn=label, model=True,
    params=lambda c, g: EVAL_KEYS + ["pseudo_label.mode", "pseudo_label.temperature", "pseudo_label.top_k",
                                     "pseudo_label.shard_size", "filter"],
    deps=lambda c, g: [c.model_dir(g) / WEIGHTS, c.model_dir(g) / "model.json", c.data_dir / "unlabeled.parquet"],
    outs=lambda c, g: [c.labels_dir(g)],
    code=MODEL_CODE + ("nst/gpu_decode.py", "tasks/label.py", "tasks/shards.py"),
    exclude_from_shards=("filter",),
)
