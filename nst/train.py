"""The one training loop, shared by teacher and student (nanoGPT-style: readable top to bottom), and inference.

Each step: a labeled batch of B and, for a student, a pseudo-labeled batch of B x ratio, in one forward pass;
loss = CE(labels, smoothed) + ratio * CE(pseudo-labels), i.e. every example weighs the same (official code).
Every epoch ends with a resumable checkpoint (`train_state.pt`, loaded weights_only) and re-seeds from
(seed, epoch); augmentation is seeded per sample. So a run resumed after a crash, a run with data workers and a
run split over DDP ranks all see the same images and the same noise as one uninterrupted single process.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from nst.checkpoint import STATE, finish_model, load_state, load_weights, save_state, save_weights, set_aside
from nst.config import TrainConfig
from nst.data import EpochBatches, ImageDataset, make_loader, to_device
from nst.distributed import Dist
from nst.errors import DataError, StageError
from nst.io import atomic_write_json
from nst.progress import Progress

log = logging.getLogger("nst.train")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise StageError(f"device = {spec!r} but CUDA is not available on this machine")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**31


class SparseTargets:
    """Pseudo-label targets as the top-k classes and probabilities per row, kept in their compact dtypes (memory:
    rows x k, never rows x classes); one batch is densified on the device when needed."""

    def __init__(self, classes: np.ndarray, probs: np.ndarray, num_classes: int):
        self.classes, self.probs, self.num_classes = classes, probs, num_classes

    def batch(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        from nst.labels import densify

        r = rows.numpy()
        return densify(self.classes[r], self.probs[r], self.num_classes, device)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _resume(state_path: Path, fingerprint: str, log_name: str):
    """The resume state for this exact stage fingerprint, or None. A damaged file is set aside (kept for
    inspection) with a warning and training starts over; it never blocks a run."""
    if not state_path.is_file():
        return None
    try:
        st = load_state(state_path)
    except DataError as e:
        moved = set_aside(state_path)
        log.warning("%s; moved to %s, training starts over", e, moved.name)
        return None
    if st.get("fingerprint") != fingerprint:
        log.warning("%s: checkpoint is from another config or other inputs, starting over", log_name)
        return None
    return st


def fit(
    *,
    model: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    labeled: ImageDataset,
    labels: torch.Tensor,
    device: torch.device,
    seed: int,
    fingerprint: str,
    meta: dict[str, Any],
    val: ImageDataset | None = None,
    val_labels: torch.Tensor | None = None,
    unlabeled: ImageDataset | None = None,
    targets: SparseTargets | None = None,
    hard_targets: bool = False,
    ratio: float = 0.0,
    workers: int = 0,
    dist: Dist = Dist(),
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train `model` into `out_dir`, resuming from `out_dir/train_state.pt` when it was made with the same stage
    `fingerprint`. Rank 0 alone writes; returns the sidecar metadata."""
    out_dir = Path(out_dir)
    name = f"{out_dir.parent.name}/{out_dir.name}"
    if dist.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        for tmp in out_dir.glob(".*.tmp"):  # a write cut short by kill -9 (the run lock keeps other writers out)
            tmp.unlink(missing_ok=True)
    model.to(device)
    cl = cfg.channels_last  # NHWC is faster on CPU too (oneDNN): benchmarks/bench_channels_last.py
    if cl:
        model = model.to(memory_format=torch.channels_last)
    use_amp = cfg.amp and device.type == "cuda"
    opt = _optimizer(model, cfg)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile and device.type == "cuda":
        net = torch.compile(net)

    n_lab, bsz = len(labeled), cfg.batch_size
    n_unl = len(unlabeled) if unlabeled is not None else 0
    ubsz = max(1, round(bsz * ratio)) if n_unl else 0
    lab_bsz = bsz if n_unl else min(bsz, n_lab)
    for what, b in (("batch_size", lab_bsz), ("pseudo-labeled batch (batch_size x ratio)", ubsz)):
        if b and b % dist.world:
            raise StageError(f"{name}: {what} = {b} must be a multiple of the {dist.world} training processes")
    steps = max(math.ceil(n_lab / bsz), math.ceil(n_unl / ubsz) if n_unl else 0)
    total_steps, warmup_steps = steps * cfg.epochs, steps * cfg.warmup_epochs

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return cfg.lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    pin = device.type == "cuda"
    lab_sampler = EpochBatches(n_lab, lab_bsz, steps, seed, 0, dist.rank, dist.world)
    lab_loader = make_loader(labeled, batch_sampler=lab_sampler, workers=workers, pin=pin)
    unl_sampler = EpochBatches(n_unl, ubsz, steps, seed, 1, dist.rank, dist.world) if n_unl else None
    unl_loader = make_loader(unlabeled, batch_sampler=unl_sampler, workers=workers, pin=pin) if n_unl else None

    state_path = out_dir / STATE
    history: list[dict] = []
    start_epoch, best_acc, best_epoch = 0, -1.0, -1
    st = _resume(state_path, fingerprint, name)
    if st is not None:
        model.load_state_dict(st["model"])
        if ema is not None:
            ema.module.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        progress = json.loads(st["progress"])
        history, start_epoch = progress["history"], st["epoch"] + 1
        best_acc, best_epoch = progress["best_acc"], progress["best_epoch"]
        if dist.main:
            log.info("%s: resuming at epoch %d/%d", name, start_epoch + 1, cfg.epochs)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        seed_everything(_epoch_seed(seed, epoch))  # dropout / stochastic depth
        lab_sampler.set_epoch(epoch)
        unl_iter = None
        if unl_sampler is not None:
            unl_sampler.set_epoch(epoch)
            unl_iter = iter(unl_loader)
        net.train()
        sums = torch.zeros(5, dtype=torch.float64)  # loss, loss_labeled, loss_unlabeled, correct, seen
        bar = Progress(f"{name} epoch {epoch + 1}/{cfg.epochs}", total=steps * (lab_bsz + ubsz), unit="img",
                       logger=log) if dist.main else None
        if bar is not None:
            bar.__enter__()
        for i, (xl, il) in enumerate(lab_loader):
            step = epoch * steps + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            yl = labels[il].to(device, non_blocking=True)
            xs = [xl]
            if unl_iter is not None:
                xu, ru = next(unl_iter)
                xs.append(xu)
            x = to_device(torch.cat(xs), device, cl)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = net(x).float()
            nl = len(xl)
            ll = F.cross_entropy(logits[:nl], yl, label_smoothing=cfg.label_smoothing)
            loss, lu = ll, torch.zeros((), device=device)
            if unl_iter is not None:
                tu = targets.batch(ru, device)
                lu = (F.cross_entropy(logits[nl:], tu.argmax(1), label_smoothing=cfg.label_smoothing)
                      if hard_targets else torch.sum(-tu * F.log_softmax(logits[nl:], dim=-1), dim=-1).mean())
                loss = ll + ratio * lu
            if not torch.isfinite(loss):
                raise StageError(f"{name}: loss is {loss.item()} at epoch {epoch + 1} step {i + 1}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model, step=step)
            sums += torch.tensor([loss.item(), ll.item(), lu.item(), (logits[:nl].argmax(1) == yl).sum().item(), nl],
                                 dtype=torch.float64)
            if bar is not None:
                bar.advance(len(x) * dist.world, loss=float(sums[0]) / (i + 1))
        if bar is not None:
            bar.__exit__(None, None, None)
        s = dist.all_sum(sums.tolist(), device)
        eval_model = ema.module if ema is not None else model
        row = {"epoch": epoch + 1, "lr": lr_at(epoch * steps + steps - 1), "train_loss": s[0] / dist.world / steps,
               "train_loss_labeled": s[1] / dist.world / steps, "train_acc": s[3] / max(1.0, s[4])}
        if n_unl:
            row["train_loss_unlabeled"] = s[2] / dist.world / steps
        if val is not None and len(val):
            row |= validate(eval_model, val, val_labels, device, workers=workers, amp=cfg.amp, channels_last=cl,
                            dist=dist)
        seconds = time.time() - t0  # to the log and on_epoch only: history.json / train_state.pt stay byte-identical
        history.append(row)
        score = row.get("val_acc", float(epoch))  # no validation split: the last epoch is the best
        improved = score >= best_acc
        if improved:
            best_acc, best_epoch = score, epoch + 1
        if dist.main:
            # One file holds everything a resume needs, so a crash can never pair weights with another epoch's
            # optimizer; history and best score as one JSON string (pickle memoises Python objects shared between
            # them, which made the bytes depend on whether a run had been resumed).
            if improved:
                save_weights(out_dir / "best.safetensors", eval_model.state_dict())
            save_state(state_path, {
                "fingerprint": fingerprint, "epoch": epoch, "model": model.state_dict(),
                "ema": ema.module.state_dict() if ema is not None else {}, "optimizer": opt.state_dict(),
                "progress": json.dumps({"history": history, "best_acc": best_acc, "best_epoch": best_epoch})})
            atomic_write_json(out_dir / "history.json", history)
            log.info("%s epoch %d/%d %s", name, epoch + 1, cfg.epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch") + f" seconds={seconds:.1f}")
            if on_epoch is not None:
                on_epoch(row | {"seconds": seconds, "images": int(s[4]) * (1 + (ratio if n_unl else 0))})
        dist.barrier()


    final = dict(meta)
    final.update({
        "weights": "ema" if ema is not None else "raw",
        "best_epoch": best_epoch,
        "best_val_acc": best_acc if val is not None and len(val) else None,
        "epochs": cfg.epochs,
        "steps_per_epoch": steps,
        "world_size": dist.world,
        "params": sum(p.numel() for p in model.parameters()),
    })
    if dist.main:
        best = out_dir / "best.safetensors"
        finish_model(out_dir, load_weights(best), final)
        best.unlink()
    dist.barrier()
    return final


def validate(model, ds: ImageDataset, labels: torch.Tensor, device: torch.device, *, workers: int = 0,
             amp: bool = False, channels_last: bool = False, dist: Dist = Dist()) -> dict[str, float]:
    """Loss and accuracy on a labeled set; under DDP each rank takes every world-th image and the sums meet."""
    idx = list(range(dist.rank, len(ds), dist.world))
    logits = predict_logits(model, torch.utils.data.Subset(ds, idx), device, workers=workers, amp=amp,
                            channels_last=channels_last)
    y = labels[idx]
    with torch.no_grad():
        loss_sum = F.cross_entropy(logits, y, reduction="sum").item() if len(idx) else 0.0
    correct = (logits.argmax(1) == y).sum().item() if len(idx) else 0
    loss_sum, correct, n = dist.all_sum([loss_sum, float(correct), float(len(idx))], device)
    return {"val_loss": loss_sum / max(1.0, n), "val_acc": correct / max(1.0, n)}


def predict_logits(model: torch.nn.Module, ds, device: torch.device, batch_size: int = 256, workers: int = 0,
                   amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits of an un-noised model (eval mode, clean images), in dataset order. The model is laid out NHWC before
    inference mode starts: parameters converted inside it would become inference tensors, unusable for the
    gradients of the robustness suite's attacks or the EMA's in-place updates."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = []
    loader = make_loader(ds, batch_size=batch_size, workers=workers, pin=device.type == "cuda", persistent=False)
    use_amp = amp and device.type == "cuda"
    with torch.inference_mode():
        for x, _ in loader:
            x = to_device(x, device, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)
