"""Student training: the real `train-student` stage vs. a minimal plain PyTorch loop doing the same work on the same
data, side by side in one run.

Same model, same batches (B labeled + B x ratio pseudo-labeled per step, one forward pass), same per-sample
augmentation (pad-crop + RandAugment), same soft-target loss, SGD. The stage adds what a real run needs: per-sample
seeding, EMA, validation each epoch, the resumable checkpoint and history every epoch, best weights, the finished
model. Both follow the student's `amp`, `channels_last` and `compile` settings. Ratio = stage images/s / plain
images/s (target >= 0.95 on CPU); on CUDA both also report images/s. benchmarks/gpu_check.py reuses these functions.

    python benchmarks/bench_train.py                                  # toy set, nst_cnn_m, 32 px, CPU
    python benchmarks/bench_train.py --model resnet18 --size 64 --device cuda --batch 128
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_project(work: Path, args) -> Path:
    """The toy set with `--unlabeled-per-class` unlabeled images, so an epoch is long enough to be a real epoch
    (its fixed costs - validation, the checkpoint - weigh as in a real run, not as in a 2-second one)."""
    from nst.datasets import make_toy

    make_toy(work / "data", seed=0, unlabeled_per_class=args.unlabeled_per_class)
    params = {
        "seed": 0, "device": args.device, "out_dir": "outputs", "threads": args.threads,
        "data": {"labeled": "data/labeled", "unlabeled": "data/unlabeled", "val": "data/val", "test": "data/test",
                 "image_size": args.size, "num_workers": args.workers},
        "teacher": {"model": "nst_cnn_s", "epochs": 3, "batch_size": 32, "warmup_epochs": 0},
        "pseudo_label": {"shard_size": 500}, "filter": {"threshold": 0.0},
        "generations": [{"name": "g1", "teacher": "g0", "ratio": args.ratio, "student": {
            "model": args.model, "epochs": args.epochs, "batch_size": args.batch, "warmup_epochs": 0,
            "noise": {"randaugment_n": 2, "randaugment_m": 9, "dropout": 0.3, "drop_path": 0.1}}}],
        "tracking": {"enabled": False},
    }
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work / "params.yaml"


def setup(work: Path, args):
    """The project of `make_project` with the stages before the student done (data, teacher, its labels, the
    balanced set); returns its config."""
    from nst.config import load_config
    from tasks.filter_balance import FILTER_BALANCE
    from tasks.label import LABEL
    from tasks.prepare import PREPARE
    from tasks.spec import execute
    from tasks.train import TRAIN_TEACHER

    cfg = load_config(make_project(work, args))
    for stage, gen in ((PREPARE, ""), (TRAIN_TEACHER, "g0"), (LABEL, "g0"), (FILTER_BALANCE, "g1")):
        execute(stage, cfg, gen)
    return cfg


class _EpochEnds(logging.Handler):
    """When each of the stage's epoch lines was logged (the last thing an epoch does, its checkpoint written)."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "%s epoch %d/%d %s":
            self.times.append(time.perf_counter())


def stage_img_s(cfg, gen: str = "g1", skip_epochs: int = 0) -> float:
    """The real `train-student` stage from scratch, in this process; images/s over its whole run, or with
    `skip_epochs` over the epochs after those (a warm-up: torch.compile, cuDNN's autotuning, worker start)."""
    import json

    from tasks.spec import execute
    from tasks.train import TRAIN_STUDENT

    shutil.rmtree(cfg.model_dir(gen), ignore_errors=True)
    ends, train_log = _EpochEnds(), logging.getLogger("nst.train")
    train_log.addHandler(ends)
    level = train_log.level
    train_log.setLevel(logging.INFO)
    try:
        t = time.perf_counter()
        execute(TRAIN_STUDENT, cfg, gen)
        dt = time.perf_counter() - t
    finally:
        train_log.removeHandler(ends)
        train_log.setLevel(level)
    g = cfg.generation(gen)
    if skip_epochs:
        dt = ends.times[-1] - ends.times[skip_epochs - 1]
    m = json.loads((cfg.model_dir(gen) / "model.json").read_text())
    per_step = g.student.batch_size + round(g.student.batch_size * g.ratio)
    return m["steps_per_epoch"] * (g.student.epochs - skip_epochs) * per_step / dt


def plain_loop(cfg, gen: str, device: torch.device, skip_epochs: int = 0) -> tuple[float, int]:
    """The same work, written the plain way: DataLoaders over the same datasets, shuffled, one optimizer step per
    labeled + pseudo-labeled batch, with the stage's amp / channels_last / compile settings. No seeding per sample,
    no EMA, no validation, no checkpoints. Timed from the files on disk, like the stage (opening the data and
    building the model included), or with `skip_epochs` over the epochs after those, as stage_img_s."""
    t = time.perf_counter()
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from nst.checkpoint import build_model
    from nst.data import build_train_transform, collate_images, open_split, read_classes
    from nst.train import amp_on
    from tasks.train import student_data

    g = cfg.generation(gen)
    sc = g.student
    tf = build_train_transform(cfg.data, sc.noise)
    lab, labels = open_split(cfg, "labeled", tf)
    unl, targets = student_data(cfg, gen, tf)
    classes = read_classes(cfg)
    model = build_model(sc.model, len(classes), sc.noise.dropout, sc.noise.drop_path).to(device)
    cl = sc.channels_last
    if cl:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model) if sc.compile else model
    opt = torch.optim.SGD(model.parameters(), lr=sc.lr, momentum=0.9, nesterov=True, weight_decay=sc.weight_decay)
    amp = amp_on(sc.amp, device)
    ub = round(sc.batch_size * g.ratio)
    steps = max(math.ceil(len(lab) / sc.batch_size), math.ceil(len(unl) / ub))

    class Aug(torch.utils.data.Dataset):  # the same transform on the same images, no per-sample seeding
        def __init__(self, ds):
            self.ds = ds

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds.transform(self.ds.raw(i)), self.ds.row(i)

    kw = dict(num_workers=cfg.data.num_workers, collate_fn=collate_images, drop_last=True, shuffle=True,
              persistent_workers=cfg.data.num_workers > 0, pin_memory=device.type == "cuda")
    ll = DataLoader(Aug(lab), batch_size=sc.batch_size, **kw)
    ul = DataLoader(Aug(unl), batch_size=ub, **kw)
    seen = 0
    for epoch in range(sc.epochs):
        if epoch == skip_epochs and epoch:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t, seen = time.perf_counter(), 0
        li, ui = iter(ll), iter(ul)
        model.train()
        for _ in range(steps):
            try:
                xl, il = next(li)
            except StopIteration:
                li = iter(ll)
                xl, il = next(li)
            try:
                xu, ru = next(ui)
            except StopIteration:
                ui = iter(ul)
                xu, ru = next(ui)
            x = torch.cat([xl, xu]).to(device, non_blocking=True)
            x = (x.contiguous(memory_format=torch.channels_last) if cl else x).float().div_(127.5).sub_(1)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(x).float()
            tu = targets.batch(ru, device)
            loss = F.cross_entropy(logits[:len(xl)], labels[il].to(device), label_smoothing=0.1) + g.ratio * torch.sum(
                -tu * F.log_softmax(logits[len(xl):], -1), -1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="nst_cnn_m")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--unlabeled-per-class", type=int, default=500)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="nst-bench-train-"))
    try:
        cfg = setup(work, args)
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        stage, plain = [], []
        for r in range(args.repeats):  # alternate, so drifting load hits both
            stage.append(stage_img_s(cfg, "g1"))
            dt, n = plain_loop(cfg, "g1", device)
            plain.append(n / dt)
        s, p = max(stage), max(plain)
        print(f"student training: {args.model}, {args.size} px, batch {args.batch} + {round(args.batch * args.ratio)} "
              f"pseudo-labeled, {args.epochs} epochs, {args.workers} workers, {torch.get_num_threads()} threads, {device}")
        print(f"{'':<28}{'img/s':>10}")
        print(f"{'plain PyTorch loop':<28}{p:>10.1f}")
        print(f"{'nst train-student stage':<28}{s:>10.1f}")
        print(f"ratio stage/plain: {s / p:.3f}  (target >= 0.95 on CPU)  {'ok' if s / p >= 0.95 else 'MISSED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
