"""The one training loop, shared by teacher and student (nanoGPT-style: readable top to bottom).

Each step: a labeled batch of B and, for a student, a pseudo-labeled batch of B x ratio, in one forward pass;
loss = CE(labels, smoothed) + ratio * CE(pseudo-labels), i.e. every example weighs the same (official code).
Every epoch ends with a resumable checkpoint (`train_state.pt`, loaded weights_only); every epoch re-seeds from (seed, epoch), so a run resumed after
a crash makes the same numbers as one that never stopped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader

from nst.checkpoint import finish_model, is_complete, load_state, read_meta, save_state, save_weights
from nst.config import TrainConfig
from nst.data import ImageDataset, normalize, seed_worker
from nst.io import atomic_write_json

log = logging.getLogger("nst.train")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device = {spec!r} but CUDA is not available on this machine")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % 2**31


def _index_batches(n: int, batch: int, steps: int, gen: torch.Generator) -> list[list[int]]:
    """`steps` batches of `batch` indices, walking fresh permutations of range(n) (cycles small sets)."""
    need, chunks = steps * batch, []
    while sum(len(c) for c in chunks) < need:
        chunks.append(torch.randperm(n, generator=gen))
    flat = torch.cat(chunks)[:need].tolist()
    return [flat[i * batch:(i + 1) * batch] for i in range(steps)]


def _loader(ds: ImageDataset, batches: list[list[int]], workers: int, gen: torch.Generator) -> DataLoader:
    return DataLoader(ds, batch_sampler=batches, num_workers=workers, worker_init_fn=seed_worker, generator=gen,
                      persistent_workers=False)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, ds: ImageDataset, device: torch.device, batch_size: int = 256,
                   workers: int = 0, amp: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Logits of an un-noised model (eval mode, clean images), in dataset order."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = []
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    use_amp = amp and device.type == "cuda"
    for x, _ in loader:
        x = normalize(x.to(device, non_blocking=True))
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out.append(model(x).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def fit(
    *,
    model: torch.nn.Module,
    cfg: TrainConfig,
    out_dir: Path,
    labeled: ImageDataset,
    labels: torch.Tensor,
    device: torch.device,
    seed: int,
    meta: dict[str, Any],
    val: ImageDataset | None = None,
    val_labels: torch.Tensor | None = None,
    unlabeled: ImageDataset | None = None,
    targets: torch.Tensor | None = None,
    hard_targets: bool = False,
    ratio: float = 0.0,
    workers: int = 0,
    on_epoch: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Train `model` into `out_dir`; resume from `out_dir/train_state.pt` when one exists for the same config.

    Returns the sidecar metadata. A finished `out_dir` (sidecar present, same config hash) is not retrained.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config_hash = meta["config_hash"]
    if is_complete(out_dir) and read_meta(out_dir).get("config_hash") == config_hash:
        log.info("%s: already trained (config %s), skipping", out_dir, config_hash)
        return read_meta(out_dir)

    model.to(device)
    cl = cfg.channels_last  # NHWC is faster on CPU too (oneDNN): benchmarks/bench_channels_last.py
    if cl:
        model = model.to(memory_format=torch.channels_last)
    use_amp = cfg.amp and device.type == "cuda"
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    soft_ce = SoftTargetCrossEntropy()

    n_lab, bsz = len(labeled), cfg.batch_size
    n_unl = len(unlabeled) if unlabeled is not None else 0
    ubsz = max(1, round(bsz * ratio)) if n_unl else 0
    steps = max(math.ceil(n_lab / bsz), math.ceil(n_unl / ubsz) if n_unl else 0)
    total_steps = steps * cfg.epochs
    warmup_steps = steps * cfg.warmup_epochs

    def lr_at(step: int) -> float:
        if step < warmup_steps:
            return cfg.lr * (step + 1) / warmup_steps
        t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))

    state_path = out_dir / "train_state.pt"
    history: list[dict] = []
    start_epoch, best_acc, best_epoch = 0, -1.0, -1
    if state_path.is_file():
        st = load_state(state_path)
        if st.get("config_hash") == config_hash:
            model.load_state_dict(st["model"])
            if ema is not None:
                ema.module.load_state_dict(st["ema"])
            opt.load_state_dict(st["optimizer"])
            history, start_epoch = st["history"], st["epoch"] + 1
            best_acc, best_epoch = st["best_acc"], st["best_epoch"]
            log.info("%s: resuming at epoch %d/%d", out_dir, start_epoch + 1, cfg.epochs)
        else:
            log.warning("%s: checkpoint is from another config, starting over", out_dir)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        es = _epoch_seed(seed, epoch)
        seed_everything(es)
        gen = torch.Generator().manual_seed(es)
        lab_iter = iter(_loader(labeled, _index_batches(n_lab, min(bsz, n_lab) if n_unl == 0 else bsz, steps, gen), workers, gen))
        unl_iter = iter(_loader(unlabeled, _index_batches(n_unl, ubsz, steps, gen), workers, gen)) if n_unl else None
        model.train()
        sums = {"loss": 0.0, "loss_labeled": 0.0, "loss_unlabeled": 0.0, "correct": 0, "seen": 0}
        for i in range(steps):
            step = epoch * steps + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            xl, il = next(lab_iter)
            yl = labels[il].to(device)
            xs = [xl]
            if unl_iter is not None:
                xu, iu = next(unl_iter)
                tu = targets[iu].to(device)
                xs.append(xu)
            x = normalize(torch.cat(xs).to(device, non_blocking=True))
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x).float()
            ll = F.cross_entropy(logits[: len(xl)], yl, label_smoothing=cfg.label_smoothing)
            loss = ll
            if unl_iter is not None:
                lu_logits = logits[len(xl):]
                lu = (F.cross_entropy(lu_logits, tu.argmax(1), label_smoothing=cfg.label_smoothing)
                      if hard_targets else soft_ce(lu_logits, tu))
                loss = ll + ratio * lu
                sums["loss_unlabeled"] += lu.item()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{out_dir}: loss is {loss.item()} at epoch {epoch + 1} step {i + 1}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model, step=step)
            sums["loss"] += loss.item()
            sums["loss_labeled"] += ll.item()
            sums["correct"] += (logits[: len(xl)].argmax(1) == yl).sum().item()
            sums["seen"] += len(xl)

        eval_model = ema.module if ema is not None else model
        row = {
            "epoch": epoch + 1,
            "lr": lr_at(epoch * steps + steps - 1),
            "train_loss": sums["loss"] / steps,
            "train_loss_labeled": sums["loss_labeled"] / steps,
            "train_acc": sums["correct"] / max(1, sums["seen"]),
        }
        if n_unl:
            row["train_loss_unlabeled"] = sums["loss_unlabeled"] / steps
        if val is not None and len(val):
            vl = predict_logits(eval_model, val, device, workers=workers, amp=cfg.amp, channels_last=cl)
            row["val_loss"] = F.cross_entropy(vl, val_labels).item()
            row["val_acc"] = (vl.argmax(1) == val_labels).float().mean().item()
        # Wall time goes to the log and on_epoch only: history.json / train_state.pt stay byte-identical across
        # runs, so DVC sees the same outputs whether the Prefect flow or `dvc repro` made them.
        seconds = time.time() - t0
        history.append(row)
        score = row.get("val_acc", float(epoch))  # no validation split: the last epoch is the best
        eval_state = eval_model.state_dict()
        if score >= best_acc:
            best_acc, best_epoch = score, epoch + 1
            save_weights(out_dir / "best.safetensors", eval_state)
        # One file holds everything a resume needs, so a crash can never pair weights with another epoch's optimizer.
        save_state(state_path, {"config_hash": config_hash, "epoch": epoch, "model": model.state_dict(),
                                "ema": ema.module.state_dict() if ema is not None else {},
                                "optimizer": opt.state_dict(), "history": history,
                                "best_acc": best_acc, "best_epoch": best_epoch})
        atomic_write_json(out_dir / "history.json", history)
        log.info("%s epoch %d/%d %s", out_dir.parent.name + "/" + out_dir.name, epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch") + f" seconds={seconds:.1f}")
        if on_epoch is not None:
            on_epoch(row | {"seconds": seconds})

    final = dict(meta)
    final.update({
        "weights": "ema" if ema is not None else "raw",
        "best_epoch": best_epoch,
        "best_val_acc": best_acc if val is not None and len(val) else None,
        "epochs": cfg.epochs,
        "steps_per_epoch": steps,
        "params": sum(p.numel() for p in model.parameters()),
    })
    return read_meta(finish_model(out_dir, load_file(str(out_dir / "best.safetensors")), final))

