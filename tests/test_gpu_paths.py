"""The GPU code paths, run on the CPU: bf16 autocast in training, evaluation and labelling, `torch.compile`
(inductor), channels_last, the labelling path that decodes raw JPEG bytes in batches (TorchCodec, CPU device), and
a training step that never reads a value back from the device. What only a GPU can run (nvJPEG itself, NCCL, CUDA
streams) sits in the smallest functions around these, and benchmarks/gpu_check.py runs it on a lent GPU; its CPU
mode runs here so that script cannot rot."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nst.checkpoint import build_model
from nst.config import DataConfig, TrainConfig
from nst.data import ImageDataset, TrainTransform, dataset_for
from nst.errors import StageError
from nst.gpu_decode import EncodedFiles, decode_jpegs, predict_logits_from_bytes
from nst.train import SparseTargets, fit, predict_logits

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def _images(folder: Path, n: int, size: int = 16, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        p = folder / f"{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def _fit(tmp_path: Path, *, labeled: int = 16, unlabeled: int = 0, epochs: int = 1, model=None, **train):
    """fit() on small PNGs: a teacher, or with `unlabeled` a student (two streams, soft targets); returns the
    model folder."""
    lab = ImageDataset(_images(tmp_path / "lab", labeled), 16, transform=TrainTransform(16, False, None))
    labels = torch.arange(labeled) % 2
    val = ImageDataset(_images(tmp_path / "val", 8, seed=1), 16)
    kw = {}
    if unlabeled:
        rng = np.random.default_rng(2)
        kw = dict(unlabeled=ImageDataset(_images(tmp_path / "unl", unlabeled, seed=3), 16,
                                         transform=TrainTransform(16, False, None)),
                  targets=SparseTargets(rng.integers(0, 2, (unlabeled, 2)).astype(np.uint16),
                                        np.full((unlabeled, 2), 0.5, np.float16), 2), ratio=1.0)
    torch.manual_seed(0)
    cfg = TrainConfig(model="nst_cnn_xs", epochs=epochs, batch_size=8, warmup_epochs=0, **train)
    out = tmp_path / "run" / "model"
    fit(model=model if model is not None else build_model("nst_cnn_xs", 2), cfg=cfg, out_dir=out, labeled=lab,
        labels=labels, device=CPU, seed=0, fingerprint="test", meta={"model": "nst_cnn_xs"}, val=val,
        val_labels=torch.arange(8) % 2, **kw)
    return out


class _Dtypes:
    """The dtype of every conv output while it is attached: bf16 under autocast, fp32 without."""

    def __init__(self):
        self.seen: list[tuple[bool, torch.dtype]] = []
        self._hooks = []

    def attach(self, model: torch.nn.Module) -> torch.nn.Module:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                self._hooks.append(m.register_forward_hook(lambda mod, a, out: self.seen.append((mod.training,
                                                                                                 out.dtype))))
                break
        return model


@pytest.mark.parametrize(("amp", "dtype"), [(True, torch.bfloat16), ("auto", torch.float32), (False, torch.float32)])
def test_amp_means_the_same_on_the_cpu_in_training_and_evaluation(tmp_path, amp, dtype):
    """amp: true is bf16 autocast on the CPU too (not a switch ignored off CUDA); auto, the default, is bf16 on
    CUDA only; false is fp32. Training steps and the per-epoch validation both follow it."""
    dtypes = _Dtypes()
    out = _fit(tmp_path, model=dtypes.attach(build_model("nst_cnn_xs", 2)), amp=amp, channels_last=True)
    assert {train for train, _ in dtypes.seen} == {True, False}  # training steps and validation both ran
    assert {d for _, d in dtypes.seen} == {dtype}, dtypes.seen
    history = json.loads((out / "history.json").read_text())
    assert math.isfinite(history[0]["train_loss"]) and 0 <= history[0]["val_acc"] <= 1
    assert (out / "model.safetensors").is_file()


def _jpeg(path: Path, a: np.ndarray, mode: str = "RGB", **save) -> str:
    img = Image.fromarray(a)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, "JPEG", quality=90, **save)
    return str(path)


def _mixed_files(folder: Path) -> tuple[list[str], list[bool]]:
    """JPEGs of several sizes, a grey one, a CMYK one, one with an EXIF orientation, and a PNG; and whether each
    should reach the batched decoder as bytes."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    files, as_bytes = [], []
    for i, (h, w) in enumerate([(64, 80), (40, 40), (120, 90), (33, 57), (200, 150)]):
        files.append(_jpeg(folder / f"rgb{i}.jpg", rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        as_bytes.append(True)
    files.append(_jpeg(folder / "grey.jpg", rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), "L"))
    as_bytes.append(True)
    files.append(_jpeg(folder / "cmyk.jpg", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), "CMYK"))
    as_bytes.append(False)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° to display"
    files.append(_jpeg(folder / "rotated.jpg", rng.integers(0, 256, (30, 60, 3), dtype=np.uint8), exif=exif))
    as_bytes.append(False)
    png = folder / "plain.png"
    Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(png)
    files.append(str(png))
    as_bytes.append(False)
    return files, as_bytes


def test_the_batched_bytes_labelling_path_gives_the_cpu_paths_logits(tmp_path):
    """The path the label stage takes on CUDA (raw bytes, decoded in batches by TorchCodec on the model's device,
    resized there), run with the CPU as that device: the same logits, bit for bit, as the CPU path (decode and
    resize in the loader) on JPEGs of every kind, in fp32 and in bf16."""
    files, as_bytes = _mixed_files(tmp_path / "img")
    data_cfg = DataConfig(builtin="toy", image_size=32, transform="rrc")
    enc = EncodedFiles(files, data_cfg)
    assert [enc[i][1] for i in range(len(files))] == as_bytes
    # the EXIF orientation is why that file goes the CPU way: TorchCodec turns it, every other decode here does not
    raw = Path(files[-2]).read_bytes()
    assert decode_jpegs([torch.frombuffer(bytearray(raw), dtype=torch.uint8)], CPU)[0].shape[1:] == (60, 30)

    torch.manual_seed(0)
    model = build_model("nst_cnn_xs", 3)
    for amp in (False, True):
        ours = predict_logits_from_bytes(model, files, data_cfg, CPU, 4, 0, amp=amp, channels_last=True)
        ref = predict_logits(model, dataset_for(data_cfg, files, cache=False), CPU, 4, 0, amp=amp,
                             channels_last=True)
        assert ours.shape == (len(files), 3) and ours.dtype == torch.float32
        assert torch.equal(ours, ref), (amp, (ours - ref).abs().max())
    fp32 = predict_logits(model, dataset_for(data_cfg, files, cache=False), CPU, 4, 0, amp=False, channels_last=True)
    assert not torch.equal(ref, fp32) and torch.allclose(ref, fp32, atol=0.1, rtol=0.05)  # bf16 did run


_READS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__", "__index__")


def _count_device_reads(monkeypatch) -> dict[tuple[str, int, str], int]:
    """Every call of a Tensor method that copies a value to the host (and on CUDA waits for the device), counted
    per call site in nst/. `.numpy()` is not among them: it refuses CUDA tensors, so it can only read host memory."""
    sites: dict[tuple[str, int, str], int] = {}
    nst = str(REPO / "nst")
    for name in _READS:
        original = getattr(torch.Tensor, name)

        def counted(self, *a, _original=original, _name=name, **kw):
            f = sys._getframe(1)
            if f.f_code.co_filename.startswith(nst):
                key = (Path(f.f_code.co_filename).name, f.f_lineno, _name)
                sites[key] = sites.get(key, 0) + 1
            return _original(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return sites


def test_the_training_step_reads_nothing_back_from_the_device(tmp_path, monkeypatch):
    """Per epoch, the host reads the device's values a fixed number of times (the epoch's sums, validation), however
    many steps the epoch has: 2 steps and 8 steps of a student (two streams, soft targets, EMA) read the same
    values at the same places. (The progress line, due every 1000 s here, would read the running loss when shown.)"""
    monkeypatch.setenv("NST_PROGRESS_EVERY_S", "1000")
    counts = []
    for n in (16, 64):  # batch 8: 2 and 8 steps
        sites = _count_device_reads(monkeypatch)
        _fit(tmp_path / str(n), labeled=n, unlabeled=n)
        counts.append(dict(sites))
        monkeypatch.undo()
        monkeypatch.setenv("NST_PROGRESS_EVERY_S", "1000")
    # Writing the checkpoint copies every tensor to the host by design (the best weights whenever validation
    # improved, so how often depends on the data): once an epoch at most, never per step.
    counts = [{k: v for k, v in c.items() if k[0] != "checkpoint.py"} for c in counts]
    assert counts[0] == counts[1], counts
    assert counts[0] and max(counts[1].values()) <= 2, counts  # at most twice an epoch per site


class _Diverges(torch.nn.Module):
    """A model whose logits turn NaN from its third training step: a run that diverges."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 2, 3)
        self.steps = 0

    def forward(self, x):
        out = self.conv(x).mean((2, 3))
        if self.training:
            self.steps += 1
            if self.steps >= 3:
                out = out * float("nan")
        return out


def test_a_loss_that_turns_nan_stops_the_epoch_naming_the_step_and_keeps_nothing(tmp_path):
    """The finiteness check is one of the epoch's sums now (no per-step wait): a NaN loss still ends the stage with
    one line naming the epoch and the first bad step, before anything of that epoch is validated or saved."""
    with pytest.raises(StageError) as e:
        _fit(tmp_path, labeled=32, model=_Diverges(), ema=False)
    assert str(e.value) == ("run/model: the loss was not finite in 2 step(s) of epoch 1, first at step 3; "
                            "lower the lr")
    out = tmp_path / "run" / "model"
    assert not any(out.iterdir()), list(out.iterdir())


def test_compile_true_without_a_cxx_compiler_is_one_line_before_training(tmp_path):
    """Inductor pointed at a compiler that does not exist (as on a slim image without g++): the stage stops before
    its first step with one line saying what is missing, and writes nothing."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}), pytest.raises(StageError) as e:
        _fit(tmp_path, compile=True)
    assert str(e.value) == ("run/model: compile: true on the CPU needs a C++ compiler (inductor uses $CXX, else g++) "
                            "and none was found; install g++ or set compile: false")
    assert not any((tmp_path / "run" / "model").iterdir())


@pytest.mark.slow
def test_compile_true_compiles_the_training_step_on_the_cpu(tmp_path):
    """compile: true runs inductor on the CPU (C++ kernels through the system compiler): a few steps of a tiny
    model train to nearly the eager run's weights (fused kernels round differently)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters

    counters.clear()
    eager = load_file(_fit(tmp_path / "eager", compile=False, ema=False) / "model.safetensors")
    compiled = load_file(_fit(tmp_path / "compiled", compile=True, ema=False) / "model.safetensors")
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])  # dynamo did capture the model
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert torch.allclose(eager[k].float(), compiled[k].float(), atol=1e-3, rtol=1e-3), k


@pytest.mark.slow
def test_gpu_check_runs_on_the_cpu_in_under_two_minutes():
    """The prepared GPU check, in its CPU mode: every row of its table runs (the GPU-only ones say why not), in
    under 2 minutes of CPU time (the script is mostly serial: on an idle 2-core machine its wall time is less; a
    machine busy with other work stretches the wall time, not the CPU time)."""
    import resource

    def cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t, c = time.monotonic(), cpu_s()
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    wall, cpu = time.monotonic() - t, cpu_s() - c
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = p.stdout
    for row in ("device", "torch", "JPEG decoding", "labelling efficientnet_b0", "training", "compile on",
                "nst run --no-prefect", "DDP"):
        assert row in out, out
    assert "FAILED" not in out, out
    assert cpu < 120, f"gpu_check --device cpu --quick took {cpu:.0f} s of CPU ({wall:.0f} s wall)"
