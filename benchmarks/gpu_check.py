"""The prepared check for a lent GPU: every GPU path of the pipeline run once and measured side by side, printed as
one table (GPU, torch and CUDA versions on top) to paste into the README.

- JPEG decoding: TorchCodec (the labelling path's decoder; batched nvJPEG on CUDA) vs. torchvision's;
- labelling efficientnet_b0 at 224 px from JPEG files through the real `label` stage (GPU decode) vs. the model's
  raw bf16 forward on preloaded tensors (benchmarks/bench_label_throughput.py); target >= 0.70x on a GPU;
- student training images/s through the real `train-student` stage (augmentation workers, two streams, EMA,
  validation and a checkpoint every epoch) vs. a plain PyTorch loop on the same data (benchmarks/bench_train.py),
  bf16 + channels_last, compile off and on, after a warm-up epoch; target >= 0.90x;
- where a training step waits for the GPU (torch.cuda.set_sync_debug_mode): none of the step's own lines may;
- peak GPU memory of each; a short end-to-end `nst run --no-prefect` on the toy; NCCL DDP with 2 processes when
  2 GPUs are visible (skipped, and said so, with one).

    python benchmarks/gpu_check.py                        # on the GPU machine: about 5 minutes, at most 8
    python benchmarks/gpu_check.py --device cpu --quick   # the same code on the CPU in under 2 minutes (CI runs it)

Exit status 1 when a check failed (its row says how); a missed target is reported, not a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_label_throughput as label_bench  # noqa: E402
import bench_train as train_bench  # noqa: E402

# What each mode runs. The GPU sizes fill a data-centre GPU for a few seconds per measurement; --quick keeps every
# row but shrinks it to seconds on 2 CPU cores (and the toy run to the test suite's tiny toy: 4 labels per class).
FULL = dict(decode_images=2048, label_images=4096, label_batch=256, label_repeats=2, train_model="resnet18",
            train_size=64, train_batch=128, train_epochs=3, unlabeled_per_class=1000, e2e_epochs=(20, 5), e2e_toy=None)
QUICK = dict(decode_images=64, label_images=16, label_batch=8, label_repeats=1, train_model="nst_cnn_s",
             train_size=16, train_batch=32, train_epochs=2, unlabeled_per_class=40, e2e_epochs=(2, 1),
             e2e_toy=dict(size=16, labeled_per_class=4, val_per_class=2, unlabeled_per_class=12, test_per_class=4))


@dataclass
class Row:
    check: str
    nst: str = "–"
    baseline: str = "–"
    ratio: str = "–"
    target: str = "–"
    memory: str = "–"
    note: str = ""


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:,.0f} MiB"


def _ratio(ours: float, base: float, target: float) -> tuple[str, str]:
    r = ours / base
    return f"{r:.3f}x", f">= {target:.2f}x {'ok' if r >= target else 'MISSED'}"


def header(device: torch.device) -> list[str]:
    import torchcodec

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        what = (f"{torch.cuda.get_device_name(device)} ({props.total_memory / 2**30:.0f} GiB, "
                f"{torch.cuda.device_count()} visible)")
        cuda = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
    else:
        what = f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
        cuda = f"CUDA {torch.version.cuda} build, no GPU used"
    return [f"gpu_check {datetime.date.today().isoformat()}",
            f"device: {what}",
            f"torch {torch.__version__}, {cuda}, torchvision {__import__('torchvision').__version__}, "
            f"torchcodec {torchcodec.__version__}, Python {platform.python_version()}"]


def label_row(device: torch.device, size: dict, workers: int) -> list[Row]:
    jpegs = Path(tempfile.mkdtemp(prefix="nst-gpucheck-jpegs-"))
    try:
        label_bench.make_jpegs(jpegs, size["label_images"])
        r = label_bench.bench("efficientnet_b0", SimpleNamespace(
            images=size["label_images"], batch=size["label_batch"], workers=workers, device=device.type,
            repeats=size["label_repeats"]), jpegs)
    finally:
        shutil.rmtree(jpegs, ignore_errors=True)
    ratio, target = _ratio(r["stage_img_s"], r["forward_img_s"], 0.70)
    how = "bf16, GPU decode (TorchCodec/nvJPEG)" if device.type == "cuda" else "fp32, CPU decode"
    return [Row(f"labelling efficientnet_b0 224 px from {size['label_images']} JPEG files, batch "
                f"{size['label_batch']}, {workers} workers: the label stage vs. the raw forward",
                f"{r['stage_img_s']:,.1f} img/s", f"{r['forward_img_s']:,.1f} img/s", ratio,
                target if device.type == "cuda" else ">= 0.70x (GPU)",
                f"{_mib(r['stage_peak_bytes'])} / {_mib(r['forward_peak_bytes'])}", how)]


def decode_row(device: torch.device, size: dict) -> list[Row]:
    """The labelling path's decoder (TorchCodec: one batched nvJPEG call on CUDA) vs. torchvision's, on the same
    JPEG bytes, same device, same batches; each the best of 3 passes."""
    import torchvision.io as tvio

    from nst.data import _TV_DEPRECATION
    from nst.gpu_decode import decode_jpegs

    folder = Path(tempfile.mkdtemp(prefix="nst-gpucheck-decode-"))
    try:
        label_bench.make_jpegs(folder, size["decode_images"])
        data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in sorted(folder.glob("*.jpg"))]
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    batch = size["label_batch"]

    def torchvision_decode(chunk):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_TV_DEPRECATION, category=DeprecationWarning)
            return tvio.decode_jpeg(chunk, mode=tvio.ImageReadMode.RGB, device=device)

    def img_s(decode) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for i in range(0, len(data), batch):
                decode(data[i:i + batch])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t)
        return len(data) / best

    same = all(torch.equal(a, b) for a, b in zip(decode_jpegs(data[:batch], device), torchvision_decode(data[:batch])))
    img_s(lambda c: decode_jpegs(c, device))  # warm-up (nvJPEG handles, CUDA context)
    ours, theirs = img_s(lambda c: decode_jpegs(c, device)), img_s(torchvision_decode)
    return [Row(f"JPEG decoding of {len(data)} files 320x240, batches of {batch}, {device.type}: TorchCodec (the "
                "labelling path's) vs. torchvision.io.decode_jpeg", f"{ours:,.0f} img/s", f"{theirs:,.0f} img/s",
                f"{ours / theirs:.3f}x", note="identical pixels" if same else "pixels differ (nvJPEG versions)")]


@contextlib.contextmanager
def _sync_sites(into: dict):
    """(file, line) of our code -> how often a call made there (directly or through torch) made the host wait for
    the GPU: torch.cuda.set_sync_debug_mode's warnings, each put down to the innermost frame in nst/."""
    ours = str(ROOT / "nst")

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        frame = next((f for f in reversed(traceback.extract_stack()) if f.filename.startswith(ours)), None)
        key = (os.path.relpath(frame.filename, ROOT), frame.lineno) if frame else ("elsewhere", 0)
        into[key] = into.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


def train_rows(device: torch.device, size: dict, workers: int) -> list[Row]:
    from nst.config import load_config

    work = Path(tempfile.mkdtemp(prefix="nst-gpucheck-train-"))
    rows = []
    try:
        args = SimpleNamespace(model=size["train_model"], size=size["train_size"], batch=size["train_batch"],
                               ratio=3, epochs=size["train_epochs"], workers=workers, threads=None,
                               device=device.type, unlabeled_per_class=size["unlabeled_per_class"])
        train_bench.setup(work, args)
        # bf16 on the GPU; on the CPU amp's default (fp32 there: bf16 on the CPU is tests/test_gpu_paths.py's)
        amp = True if device.type == "cuda" else "auto"
        what = (f"{args.model} {args.size} px, batch {args.batch} + {3 * args.batch} pseudo-labeled, {workers} "
                f"workers, {'bf16' if amp is True else 'fp32'} + channels_last")
        for compile_ in (False, True):
            cfg = load_config(work / "params.yaml", {"generations.0.student.amp": amp,
                                                     "generations.0.student.compile": compile_})
            peak: dict = {}
            with label_bench.peak_memory(device, peak, "stage"):
                stage = train_bench.stage_img_s(cfg, "g1", skip_epochs=1)
            with label_bench.peak_memory(device, peak, "plain"):
                dt, n = train_bench.plain_loop(cfg, "g1", device, skip_epochs=1)
            ratio, target = _ratio(stage, n / dt, 0.90)
            rows.append(Row(f"training {what}, compile {'on' if compile_ else 'off'}: the train-student stage vs. a "
                            "plain loop", f"{stage:,.1f} img/s", f"{n / dt:,.1f} img/s", ratio, target,
                            f"{_mib(peak.get('stage'))} / {_mib(peak.get('plain'))}",
                            f"epochs 2-{args.epochs} (epoch 1 warms up)"))
        rows.append(sync_row(device, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def sync_row(device: torch.device, work: Path) -> Row:
    check = "host-device syncs made by the training step's own lines (set_sync_debug_mode)"
    if device.type != "cuda":
        return Row(check, note="CUDA only; on the CPU tests/test_gpu_paths.py counts the step's device reads")
    from nst.config import load_config

    cfg = load_config(work / "params.yaml", {"generations.0.student.epochs": 2})
    sites: dict = {}
    with _sync_sites(sites):
        train_bench.stage_img_s(cfg, "g1")
    import json

    steps = json.loads((cfg.model_dir("g1") / "model.json").read_text())["steps_per_epoch"]
    # a line reached once a step waits 2 x steps times in 2 epochs; saving a checkpoint copies every tensor, by
    # design once an epoch (so many times from one line of nst/checkpoint.py)
    per_step = {k: v for k, v in sites.items() if v >= 2 * steps and k[0] != "nst/checkpoint.py"}
    return Row(check, f"{len(per_step)} lines", "0 lines", "–", "0 lines " + ("ok" if not per_step else "MISSED"),
               note=(", ".join(f"{f}:{ln} x{v}" for (f, ln), v in per_step.items()) or
                     f"{sum(sites.values())} syncs in 2 epochs of {steps} steps, all per epoch (checkpoint, "
                     "validation, sums)"))


def _nst(args: list[str], cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NST_PROGRESS": "plain"}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _failed(p: subprocess.CompletedProcess) -> str:
    lines = (p.stderr or p.stdout).strip().splitlines()
    return f"exit {p.returncode}: {lines[-1][:200] if lines else ''}"


def e2e_rows(device: torch.device, size: dict) -> list[Row]:
    work = Path(tempfile.mkdtemp(prefix="nst-gpucheck-run-"))
    try:
        raw = yaml.safe_load((ROOT / "params.yaml").read_text())
        if size["e2e_toy"]:
            from nst.datasets import make_toy

            make_toy(work / "toy", **size["e2e_toy"])
            raw["data"].update(builtin=None, labeled="toy/labeled", unlabeled="toy/unlabeled", val="toy/val",
                               test="toy/test", unlabeled_truth="toy/unlabeled_truth.csv")
            raw["pseudo_label"]["shard_size"] = 40
            raw["filter"]["threshold"] = 0.0  # a teacher of 2 epochs on 40 images is rarely 30% sure
        (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        te, se = size["e2e_epochs"]
        sets = [f"device={device.type}", "tracking.enabled=false", f"teacher.epochs={te}", "teacher.warmup_epochs=0"]
        for g in (0, 1):
            sets += [f"generations.{g}.student.epochs={se}", f"generations.{g}.student.warmup_epochs=0"]
        argv = [a for s in sets for a in ("-S", s)]
        t = time.perf_counter()
        p = _nst(["run", "--no-prefect", "-p", str(work / "params.yaml"), *argv], work, 600)
        took = time.perf_counter() - t
        check = (f"nst run --no-prefect on the {'tiny ' if size['e2e_toy'] else ''}toy, device {device.type} "
                 f"(teacher {te} epochs, students {se})")
        if p.returncode != 0:
            return [Row(check, "FAILED", note=_failed(p)), Row("DDP", "FAILED", note="not run: the toy run failed")]
        top1 = re.findall(r"^(g\d+)\s+\w+\s+\S+\s+[\d,]+\s+([\d.]+%)", p.stdout, re.M)
        rows = [Row(check, f"{took:.0f} s", note="test top-1 " + ", ".join(f"{g} {v}" for g, v in top1))]
        rows.append(ddp_row(device, work, argv))
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ddp_row(device: torch.device, work: Path, argv: list[str]) -> Row:
    check = "DDP: nst train-teacher with 2 processes (torchrun), NCCL"
    n = torch.cuda.device_count() if device.type == "cuda" else 0
    if n < 2:
        why = f"{n} GPU visible" if device.type == "cuda" else "--device cpu"
        return Row(check, "skipped", note=f"{why}: NCCL needs 2 GPUs (2-process gloo DDP runs in tests/test_scale.py)")
    import json

    t = time.perf_counter()
    p = _nst(["train-teacher", "-p", str(work / "params.yaml"), *argv, "-S", "distributed.nproc_per_node=2"], work, 600)
    if p.returncode != 0:
        return Row(check, "FAILED", note=_failed(p))
    meta = json.loads((work / "outputs" / "g0" / "model" / "model.json").read_text())
    ok = meta.get("world_size") == 2
    return Row(check, f"{time.perf_counter() - t:.0f} s" if ok else "FAILED",
               note=f"world_size {meta.get('world_size')} in model.json")


def table(rows: list[Row]) -> list[str]:
    out = ["| check | nst | baseline | ratio | target | peak GPU memory (nst / baseline) | note |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {r.check} | {r.nst} | {r.baseline} | {r.ratio} | {r.target} | {r.memory} | {r.note} |" for r in rows]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--quick", action="store_true", help="every row at a few seconds' size (for CI / a dry run)")
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: CPUs - 1, at most 8)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here (use --device cpu)", file=sys.stderr)
        return 2
    size = QUICK if args.quick else FULL
    workers = args.workers if args.workers is not None else (0 if args.quick else min(8, (os.cpu_count() or 2) - 1))
    t0 = time.perf_counter()
    rows: list[Row] = []
    for name, run in (("JPEG decoding", lambda: decode_row(device, size)),
                      ("labelling efficientnet_b0", lambda: label_row(device, size, workers)),
                      ("training", lambda: train_rows(device, size, workers)),
                      ("nst run --no-prefect", lambda: e2e_rows(device, size))):
        t = time.perf_counter()
        try:
            rows += run()
        except Exception as e:  # noqa: BLE001 - one failed check must not hide the others' figures
            traceback.print_exc()
            why = str(e).splitlines()[0][:200] if str(e) else ""
            rows.append(Row(name, "FAILED", note=f"{type(e).__name__}: {why}"))
        print(f"[{name}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)
    print("\n".join(header(device) + [""] + table(rows)))
    print(f"\n{time.perf_counter() - t0:.0f} s in all{' (--quick)' if args.quick else ''}")
    return 1 if any(r.nst == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
