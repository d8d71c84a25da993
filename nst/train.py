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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.utils import ModelEmaV3

from nst.checkpoint import STATE, finish_model, load_state, load_weights, save_state, save_weights, set_aside
from nst.config import TrainConfig
from nst.data import EpochBatches, ImageDataset, host_to_device, make_loader, to_device
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


def amp_on(amp: bool | str, device: torch.device) -> bool:
    """A TrainConfig's `amp` on this device: true = bf16 autocast on every device, false = never, auto = on CUDA
    only (so CPU runs, the toy's included, keep their fp32 results unless bf16 is asked for)."""
    return amp is True or (amp == "auto" and device.type == "cuda")


def check_compiler(device: torch.device, name: str) -> None:
    """`compile: true` on the CPU has inductor build C++ kernels with the system's compiler ($CXX, else g++): a
    missing one is one line before training starts, not a long traceback at its first step."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise StageError(f"{name}: compile: true on the CPU needs a C++ compiler (inductor uses $CXX, else g++) and "
                         "none was found; install g++ or set compile: false") from None


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

        r = rows.numpy()  # the loader's row numbers: host memory, not a read of the device
        classes = host_to_device(torch.from_numpy(self.classes[r].astype(np.int32, copy=False)), device)
        return densify(classes, host_to_device(torch.from_numpy(self.probs[r]), device), self.num_classes, device)


def _optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a fine-tune's fixed layers are not the optimizer's (no weight decay, no momentum)
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


@dataclass(frozen=True)
class Schedule:
    """The learning rate per step: linear warmup over `warmup` steps, then cosine to 0 at step `total`. A run of n
    steps takes the schedule's last n steps: a training run is its whole schedule, a fine-tune that continues its
    model's schedule is that schedule's tail (the official code's --train_last_step_num). `total` None = the run's
    own length."""

    lr: float
    total: int | None = None
    warmup: int = 0

    def for_run(self, steps: int) -> Callable[[int], float]:
        total = steps if self.total is None else self.total
        start, warmup = max(0, total - steps), self.warmup

        def lr_at(step: int) -> float:
            step += start
            if step < warmup:
                return self.lr * (step + 1) / warmup
            t = min(1.0, (step - warmup) / max(1, total - warmup))
            return self.lr * 0.5 * (1 + math.cos(math.pi * t))

        return lr_at


class CheckpointSaver:
    """A run's files in its out_dir (timm's CheckpointSaver, for one run): every epoch the resumable state
    (`train_state.pt`), the best weights so far and history.json; at the end the model (safetensors + sidecar).
    Rank 0 alone writes."""

    def __init__(self, out_dir: Path, fingerprint: str, dist: Dist):
        self.out_dir, self.fingerprint, self.main = Path(out_dir), fingerprint, dist.main
        self.name = f"{self.out_dir.parent.name}/{self.out_dir.name}"
        self.history: list[dict] = []
        self.best_acc, self.best_epoch = -1.0, -1
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for tmp in self.out_dir.glob(".*.tmp"):  # a write cut short by kill -9 (the run lock keeps others out)
                tmp.unlink(missing_ok=True)

    def resume(self, model: torch.nn.Module, ema, opt: torch.optim.Optimizer) -> int:
        """Load the state this exact stage fingerprint saved, if any; the first epoch still to run."""
        st = _resume(self.out_dir / STATE, self.fingerprint, self.name)
        if st is None:
            return 0
        model.load_state_dict(st["model"])
        if ema is not None:
            ema.module.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        progress = json.loads(st["progress"])
        self.history = progress["history"]
        self.best_acc, self.best_epoch = progress["best_acc"], progress["best_epoch"]
        return st["epoch"] + 1

    def save(self, epoch: int, row: dict, model: torch.nn.Module, ema, opt: torch.optim.Optimizer) -> None:
        self.history.append(row)
        score = row.get("val_acc", float(epoch))  # no validation split: the last epoch is the best
        improved = score >= self.best_acc
        if improved:
            self.best_acc, self.best_epoch = score, epoch + 1
        if not self.main:
            return
        # One file holds everything a resume needs, so a crash can never pair weights with another epoch's
        # optimizer; history and best score as one JSON string (pickle memoises Python objects shared between
        # them, which made the bytes depend on whether a run had been resumed).
        if improved:
            save_weights(self.out_dir / "best.safetensors", (ema.module if ema is not None else model).state_dict())
        save_state(self.out_dir / STATE, {
            "fingerprint": self.fingerprint, "epoch": epoch, "model": model.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else {}, "optimizer": opt.state_dict(),
            "progress": json.dumps({"history": self.history, "best_acc": self.best_acc,
                                    "best_epoch": self.best_epoch})})
        atomic_write_json(self.out_dir / "history.json", self.history)

    def finish(self, meta: dict[str, Any]) -> None:
        """The best epoch's weights become the model; its sidecar, written last, marks it complete."""
        if self.main:
            best = self.out_dir / "best.safetensors"
            finish_model(self.out_dir, load_weights(best), meta)
            best.unlink()


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
    epochs: float | None = None,
    schedule: Schedule | None = None,
    frozen: Sequence[torch.nn.Module] = (),
) -> dict[str, Any]:
    """Train `model` into `out_dir`, resuming from `out_dir/train_state.pt` when it was made with the same stage
    `fingerprint`. Rank 0 alone writes; returns the sidecar metadata. A fine-tune passes its own `epochs` (a
    fraction counts steps: the last epoch is cut short), `schedule` and the `frozen` modules, kept in eval mode
    (their BatchNorm statistics untouched) while the rest trains."""
    saver = CheckpointSaver(out_dir, fingerprint, dist)
    out_dir, name = saver.out_dir, saver.name
    model.to(device)
    cl = cfg.channels_last  # NHWC is faster on CPU too (oneDNN): benchmarks/bench_channels_last.py
    if cl:
        model = model.to(memory_format=torch.channels_last)
    use_amp = amp_on(cfg.amp, device)
    opt = _optimizer(model, cfg)
    ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True) if cfg.ema else None
    net = model
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # inductor on every device: Triton kernels on CUDA, C++ ones on the CPU
        check_compiler(device, name)
        net = torch.compile(net)

    n_lab, bsz = len(labeled), cfg.batch_size
    n_unl = len(unlabeled) if unlabeled is not None else 0
    ubsz = max(1, round(bsz * ratio)) if n_unl else 0
    lab_bsz = bsz if n_unl else min(bsz, n_lab)
    for what, b in (("batch_size", lab_bsz), ("pseudo-labeled batch (batch_size x ratio)", ubsz)):
        if b and b % dist.world:
            raise StageError(f"{name}: {what} = {b} must be a multiple of the {dist.world} training processes")
    steps = max(math.ceil(n_lab / bsz), math.ceil(n_unl / ubsz) if n_unl else 0)
    epochs = cfg.epochs if epochs is None else epochs
    run_steps = math.ceil(round(epochs * steps, 9))  # float products: 1.1 x 10 = 11.000000000000002 is 11 steps
    n_epochs = math.ceil(run_steps / steps)
    lr_at = (schedule or Schedule(cfg.lr, None, steps * cfg.warmup_epochs)).for_run(run_steps)

    pin = device.type == "cuda"
    lab_sampler = EpochBatches(n_lab, lab_bsz, steps, seed, 0, dist.rank, dist.world)
    lab_loader = make_loader(labeled, batch_sampler=lab_sampler, workers=workers, pin=pin)
    unl_sampler = EpochBatches(n_unl, ubsz, steps, seed, 1, dist.rank, dist.world) if n_unl else None
    unl_loader = make_loader(unlabeled, batch_sampler=unl_sampler, workers=workers, pin=pin) if n_unl else None
    labels_on_device = labels.to(device)  # once: a step indexes it with the batch's rows, no copy of its own

    start_epoch = saver.resume(model, ema, opt)
    if start_epoch and dist.main:
        log.info("%s: resuming at epoch %d/%d", name, start_epoch + 1, n_epochs)

    for epoch in range(start_epoch, n_epochs):
        t0 = time.time()
        n = min(steps, run_steps - epoch * steps)  # this epoch's steps: all of them but in a fraction's last
        seed_everything(_epoch_seed(seed, epoch))  # dropout / stochastic depth
        lab_sampler.set_epoch(epoch, n)
        unl_iter = None
        if unl_sampler is not None:
            unl_sampler.set_epoch(epoch, n)
            unl_iter = iter(unl_loader)
        net.train()
        for m in frozen:
            m.eval()
        # The step never waits for the device: its sums stay there (float64, added in step order: the same numbers
        # as when each was read), read once at the end of the epoch and by the progress bar only when it shows them.
        # loss, loss_labeled, loss_unlabeled, correct, non-finite losses
        sums = torch.zeros(5, dtype=torch.float64, device=device)
        first_bad = torch.full((), math.inf, device=device)  # the first step whose loss was not finite
        seen = 0
        bar = Progress(f"{name} epoch {epoch + 1}/{n_epochs}", total=n * (lab_bsz + ubsz), unit="img",
                       logger=log) if dist.main else None
        if bar is not None:
            bar.__enter__()
        for i, (xl, il) in enumerate(lab_loader):
            step = epoch * steps + i
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            yl = labels_on_device[host_to_device(il, device)]
            xs = [host_to_device(xl, device)]  # each part straight from the loader's pinned memory
            if unl_iter is not None:
                xu, ru = next(unl_iter)
                xs.append(host_to_device(xu, device))
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
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update(model, step=step)
            with torch.no_grad():
                finite = torch.isfinite(loss)
                sums += torch.stack([loss, ll, lu, (logits[:nl].argmax(1) == yl).sum().float(), (~finite).float()]
                                    ).double()
                first_bad = torch.where(finite, first_bad, first_bad.clamp(max=i + 1))
            seen += nl
            if bar is not None:
                bar.advance(len(x) * dist.world, loss=lambda: sums[0].item() / (i + 1))
        if bar is not None:
            bar.__exit__(None, None, None)
        s = dist.all_sum(sums.tolist() + [float(seen)], device)  # the epoch's one read of the device
        if s[4]:  # nothing of this epoch is kept: it stops before validation and the checkpoint
            at = f", first at step {int(first_bad.item())}" if math.isfinite(first_bad.item()) else ""
            raise StageError(f"{name}: the loss was not finite in {int(s[4])} step(s) of epoch {epoch + 1}{at}; "
                             "lower the lr")
        eval_model = ema.module if ema is not None else model
        row = {"epoch": epoch + 1, "lr": lr_at(epoch * steps + n - 1), "train_loss": s[0] / dist.world / n,
               "train_loss_labeled": s[1] / dist.world / n, "train_acc": s[3] / max(1.0, s[5])}
        if n_unl:
            row["train_loss_unlabeled"] = s[2] / dist.world / n
        if val is not None and len(val):
            row |= validate(eval_model, val, val_labels, device, workers=workers, amp=cfg.amp, channels_last=cl,
                            dist=dist)
        seconds = time.time() - t0  # to the log and on_epoch only: history.json / train_state.pt stay byte-identical
        saver.save(epoch, row, model, ema, opt)
        if dist.main:
            log.info("%s epoch %d/%d %s", name, epoch + 1, n_epochs,
                     " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch") + f" seconds={seconds:.1f}")
            if on_epoch is not None:
                on_epoch(row | {"seconds": seconds, "images": int(s[5]) * (1 + (ratio if n_unl else 0))})
        dist.barrier()


    final = dict(meta)
    final.update({
        "weights": "ema" if ema is not None else "raw",
        "best_epoch": saver.best_epoch,
        "best_val_acc": saver.best_acc if val is not None and len(val) else None,
        "epochs": epochs,
        "steps_per_epoch": steps,
        "world_size": dist.world,
        "params": sum(p.numel() for p in model.parameters()),
    })
    saver.finish(final)
    dist.barrier()
    return final


def validate(model, ds: ImageDataset, labels: torch.Tensor, device: torch.device, *, workers: int = 0,
             amp: bool | str = False, channels_last: bool = False, dist: Dist = Dist()) -> dict[str, float]:
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
                   amp: bool | str = False, channels_last: bool = False) -> torch.Tensor:
    """Logits of an un-noised model (eval mode, clean images), in dataset order, gathered on the device and copied
    to the host once (a copy per batch would make the host wait for the device every batch). The model is laid out
    NHWC before inference mode starts: parameters converted inside it would become inference tensors, unusable for
    the gradients of the robustness suite's attacks or the EMA's in-place updates."""
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    out = []
    loader = make_loader(ds, batch_size=batch_size, workers=workers, pin=device.type == "cuda", persistent=False)
    use_amp = amp_on(amp, device)
    with torch.inference_mode():
        for x, _ in loader:
            x = to_device(x, device, channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out.append(model(x).float())
    return torch.cat(out).cpu() if out else torch.empty(0)
