"""Optional robustness part of `evaluate`: the paper's ImageNet-C (mCE), ImageNet-P (flip rate) and FGSM/PGD
measurements, scaled down to this project's small uint8 images, plus calibration (ECE, reliability diagram).

Conventions: images are uint8 tensors N×3×H×W; every model given to the functions below takes float pixels in
[0, 1] (wrap a trained model with `pixel_model(model, mean, std)`), so torchattacks' ε is in pixel units.
`robustness_report` does the wrapping itself. The generation-0 teacher is the mCE / mFR reference, so the
numbers compare generations of this run, not the published ImageNet-C tables (whose denominator is AlexNet).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import re
import sys
import types
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from nst.metrics import ece, reliability_diagram

__all__ = [
    "DEFAULT_CORRUPTIONS", "MIN_CORRUPT_SIZE", "POINTWISE_CORRUPTIONS", "NOISE_PERTURBATIONS", "Normalize", "pixel_model",
    "corruption_suite", "corruption_errors", "mce", "relative_mce", "perturbation_sequences", "flip_rate",
    "flip_rates", "adversarial_accuracy", "eps_key", "ece", "reliability_diagram", "robustness_report",
    "RobustnessResult",
]

# imagecorruptions' `corrupt` refuses images below 32 px. Smaller ones are upscaled by an integer factor (nearest),
# corrupted, and box-averaged back (the identity on an uncorrupted image); per-pixel corruptions, whose effect does
# not depend on image size, instead run the library's function directly at the native size.
MIN_CORRUPT_SIZE = 32
POINTWISE_CORRUPTIONS = frozenset(
    {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "brightness", "contrast", "saturate"})
# ImageNet-P compares noise frames (independent draws) with the clean frame, temporal ones with the previous frame.
NOISE_PERTURBATIONS = frozenset({"gaussian_noise"})
PERTURBATIONS = ("translate", "brightness", "gaussian_noise")
BRIGHTNESS_STEP = 0.02  # added per frame, in [0, 1] pixel units
NOISE_SIGMA = 0.03  # per-frame Gaussian noise std, in [0, 1] pixel units
_MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-./ ]+$")


# ---- imagecorruptions, made importable and deterministic ------------------------------------------------------

def _load_imagecorruptions():
    """imagecorruptions 1.1.2 predates setuptools 81 (no pkg_resources), NumPy 2 (np.float_), scikit-image 0.21
    (gaussian's `multichannel`) and skimage's own RNG (random_noise ignores np.random.seed). Patch those names in
    its module only, so the library's corruption code runs unchanged and reproducibly under np.random.seed."""
    fake = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        fake = types.ModuleType("pkg_resources")
        fake.resource_filename = _resource_filename
        sys.modules["pkg_resources"] = fake
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ic = importlib.import_module("imagecorruptions")
    finally:
        if fake is not None and sys.modules.get("pkg_resources") is fake:
            del sys.modules["pkg_resources"]
    import skimage.color
    import skimage.filters
    import skimage.util

    mod = ic.corruptions
    mod.resource_filename = _resource_filename
    mod.gaussian = _gaussian
    mod.sk = types.SimpleNamespace(util=types.SimpleNamespace(random_noise=_random_noise), color=skimage.color)
    mod.np = _NumpyCompat("numpy")
    return ic


def _resource_filename(package: str, resource: str) -> str:
    return os.path.join(os.path.dirname(sys.modules[package].__file__), resource)


def _gaussian(image, sigma=1.0, multichannel=None, **kw):
    import skimage.filters

    if multichannel:
        kw["channel_axis"] = -1
    return skimage.filters.gaussian(image, sigma=sigma, **kw)


def _random_noise(image, **kw):
    import skimage.util

    kw.setdefault("rng", int(np.random.randint(2**31 - 1)))  # draw from the seeded global RNG
    return skimage.util.random_noise(image, **kw)


class _NumpyCompat(types.ModuleType):
    def __getattr__(self, name: str):
        return np.float64 if name == "float_" else getattr(np, name)


_IC = None


def _ic():
    global _IC
    if _IC is None:
        _IC = _load_imagecorruptions()
    return _IC


# The 15 ImageNet-C benchmark families (imagecorruptions' "common" set). All run on 16 and 32 px images with the
# upscaling above; their strengths are ImageNet's (224 px), so blurs are harsher here than on ImageNet.
DEFAULT_CORRUPTIONS = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)


@contextlib.contextmanager
def _numpy_global_rng():
    """imagecorruptions draws from np.random's global state: seed it per image, then put the caller's state back."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _image_seed(seed: int, name: str, severity: int, index: int) -> int:
    """Stable across processes (crc32, not the salted hash()) and independent per (corruption, severity, image)."""
    ss = np.random.SeedSequence([int(seed), zlib.crc32(name.encode()), int(severity), int(index)])
    return int(ss.generate_state(1)[0])


def _corrupt_image(img: np.ndarray, name: str, severity: int) -> np.ndarray:
    h, w = img.shape[:2]
    k = max(1, math.ceil(MIN_CORRUPT_SIZE / min(h, w)))
    if k > 1 and name in POINTWISE_CORRUPTIONS:
        # Size-independent per-pixel ops: run the library's function as is; box-averaging would weaken noise by k.
        from PIL import Image

        return np.uint8(_ic().corruption_dict[name](Image.fromarray(img), severity))
    big = img.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else img
    out = np.asarray(_ic().corrupt(np.ascontiguousarray(big), severity=severity, corruption_name=name))
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    out = out[: h * k, : w * k, :3]
    if k > 1:
        out = out.reshape(h, k, w, k, 3).astype(np.float64).mean(axis=(1, 3))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _corrupt_batch(images: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    out = np.empty_like(images)
    with _numpy_global_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, img in enumerate(images):
            np.random.seed(_image_seed(seed, name, severity, i))
            out[i] = _corrupt_image(img, name, severity)
    return out


def _check_names(corruptions: Sequence[str] | None) -> list[str]:
    names = list(DEFAULT_CORRUPTIONS) if corruptions is None else list(corruptions)
    known = set(_ic().get_corruption_names("all"))
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown corruption(s) {bad}; imagecorruptions knows {sorted(known)}")
    return names


def corruption_suite(images_uint8: np.ndarray, corruptions: Sequence[str] | None = None,
                     severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0) -> dict[tuple[str, int], np.ndarray]:
    """N×H×W×3 uint8 -> {(corruption, severity): N×H×W×3 uint8}. The randomness of image i depends only on
    (seed, name, severity, i), so reruns and other models see the same corrupted pixels."""
    images = np.asarray(images_uint8)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 N×H×W×3 images, got {images.dtype} {images.shape}")
    return {(n, int(s)): _corrupt_batch(images, n, int(s), seed) for n in _check_names(corruptions) for s in severities}


# ---- models in pixel space --------------------------------------------------------------------------------------

class Normalize(nn.Module):
    """(x - mean) / std on [0, 1] pixels, so attacks and perturbations live in pixel space."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def pixel_model(model: nn.Module, mean: Sequence[float] = (0.5, 0.5, 0.5),
                std: Sequence[float] = (0.5, 0.5, 0.5)) -> nn.Module:
    """The trained model as a function of [0, 1] pixels (what torchattacks expects)."""
    p = next(model.parameters(), None)
    norm = Normalize(mean, std)
    if p is not None:
        norm = norm.to(p.device)
    return nn.Sequential(norm, model)


def _device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _as_tensor(x: Any) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


@torch.no_grad()
def _logits(model: nn.Module, images: torch.Tensor, device: torch.device, batch_size: int = 256) -> torch.Tensor:
    outs = [model(_to_unit(images[i:i + batch_size].to(device))).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


def _error(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device) -> float:
    pred = _logits(model, images, device).argmax(1)
    return int((pred != labels.cpu()).sum()) / max(1, len(labels))  # counts, not a float32 mean: exact fractions


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# ---- ImageNet-C -------------------------------------------------------------------------------------------------

def corruption_errors(model: nn.Module, images: Any, labels: Any, cfg, seed: int = 0,
                      device: str | torch.device | None = None) -> dict:
    """Top-1 error under each (corruption, severity) of `cfg` (a RobustnessConfig), one batch at a time.

    Returns {"errors": {name: mean over severities}, "per_severity": {name: {severity: error}},
    "metrics": flat `robust/...` keys}. `model` takes [0, 1] pixels; images are uint8 N×3×H×W.
    """
    dev = _device(device, model)
    images, labels = _as_tensor(images).cpu(), _as_tensor(labels).long().cpu()
    hwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    severities = [int(s) for s in cfg.severities]
    per_sev: dict[str, dict[int, float]] = {}
    with _eval_mode(model):
        for name in _check_names(cfg.corruptions):
            per_sev[name] = {}
            for s in severities:
                x = torch.from_numpy(_corrupt_batch(hwc, name, s, seed)).permute(0, 3, 1, 2)
                per_sev[name][s] = _error(model, x, labels, dev)
    errors = {n: float(np.mean(list(v.values()))) for n, v in per_sev.items()}
    metrics = {f"robust/corruption_error/{n}": e for n, e in errors.items()}
    if errors:
        metrics["robust/mean_corruption_error"] = float(np.mean(list(errors.values())))
        for s in severities:
            metrics[f"robust/severity_error/s{s}"] = float(np.mean([v[s] for v in per_sev.values()]))
    return {"errors": errors, "per_severity": per_sev, "metrics": metrics}


def _summed(v: float | Mapping) -> tuple[float, tuple | None]:
    if isinstance(v, Mapping):
        return float(sum(v.values())), tuple(sorted(str(k) for k in v))
    return float(v), None


def _ratio(num: float, den: float) -> float:
    """0/0 = 1 (both models equally unaffected); x/0 = inf: the reference gives no scale to compare with."""
    if den == 0:
        return 1.0 if num == 0 else math.inf
    return num / den


def _common(errors: Mapping, reference: Mapping) -> list[str]:
    if set(errors) != set(reference) or not errors:
        raise ValueError(f"corruptions differ from the reference's: {sorted(errors)} vs {sorted(reference)}")
    return sorted(errors)


def mce(errors: Mapping[str, float | Mapping], reference_errors: Mapping[str, float | Mapping]) -> float:
    """ImageNet-C mCE: 100 × mean_c (Σ_s E_c,s / Σ_s E^ref_c,s). Values are per-corruption errors averaged over
    the same severities (the ratio of means equals the ratio of sums) or {severity: error} mappings, summed."""
    ratios = []
    for c in _common(errors, reference_errors):
        (num, ks), (den, kr) = _summed(errors[c]), _summed(reference_errors[c])
        if ks != kr:
            raise ValueError(f"{c}: severities {ks} differ from the reference's {kr}")
        ratios.append(_ratio(num, den))
    return 100.0 * float(np.mean(ratios))


def relative_mce(errors: Mapping[str, float], clean_err: float, ref_errors: Mapping[str, float],
                 ref_clean_err: float) -> float:
    """ImageNet-C relative mCE: 100 × mean_c (E_c - E_clean) / (E^ref_c - E^ref_clean), with per-corruption errors
    averaged over severities (equal to the per-severity sums' ratio)."""
    ratios = [_ratio(float(errors[c]) - clean_err, float(ref_errors[c]) - ref_clean_err)
              for c in _common(errors, ref_errors)]
    return 100.0 * float(np.mean(ratios))


# ---- ImageNet-P -------------------------------------------------------------------------------------------------

def _triangle(k: int, amplitude: int) -> int:
    """0, 1, .., A, A-1, .., -A, .., 0, ...: one pixel per step without drifting off a tiny image."""
    period = 4 * amplitude
    p = k % period
    return p if p <= amplitude else (2 * amplitude - p if p <= 3 * amplitude else p - period)


def perturbation_sequences(images: Any, kind: str, steps: int, seed: int = 0) -> torch.Tensor:
    """uint8 N×3×H×W -> uint8 N×(steps+1)×3×H×W, frame 0 clean.

    translate: 1 px horizontal shift per frame (edge-replicated), back and forth within ±max(1, W//8) px;
    brightness: +BRIGHTNESS_STEP per frame; gaussian_noise: an independent N(0, NOISE_SIGMA) draw per frame
    (seeded by `seed`), each compared with the clean frame as in ImageNet-P.
    """
    x = _to_unit(_as_tensor(images).cpu())
    n, _, h, w = x.shape
    frames = [x]
    if kind == "translate":
        amp = max(1, w // 8)
        padded = torch.nn.functional.pad(x, (amp, amp, 0, 0), mode="replicate")
        for k in range(1, steps + 1):
            dx = _triangle(k, amp)
            frames.append(padded[..., amp - dx: amp - dx + w])
    elif kind == "brightness":
        frames += [(x + k * BRIGHTNESS_STEP).clamp_(0, 1) for k in range(1, steps + 1)]
    elif kind == "gaussian_noise":
        g = torch.Generator().manual_seed(int(seed))
        frames += [(x + NOISE_SIGMA * torch.randn(x.shape, generator=g)).clamp_(0, 1) for _ in range(steps)]
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {list(PERTURBATIONS)}")
    return torch.stack(frames, 1).mul_(255).round_().to(torch.uint8)


def flip_rate(model: nn.Module, sequences: torch.Tensor, against_first: bool = False,
              device: str | torch.device | None = None, batch_size: int = 256) -> float:
    """ImageNet-P flip probability: share of frames j ≥ 1 whose top-1 differs from frame j-1 (or from the clean
    frame 0 when `against_first`, ImageNet-P's rule for noise sequences). `model` takes [0, 1] pixels."""
    dev = _device(device, model)
    sequences = _as_tensor(sequences)
    n, t = sequences.shape[:2]
    if t < 2 or n == 0:
        raise ValueError(f"need at least one sequence of ≥ 2 frames, got shape {tuple(sequences.shape)}")
    with _eval_mode(model):
        pred = _logits(model, sequences.reshape(n * t, *sequences.shape[2:]), dev, batch_size).argmax(1).view(n, t)
    ref = pred[:, :1] if against_first else pred[:, :-1]
    return int((pred[:, 1:] != ref).sum()) / (n * (t - 1))


def flip_rates(model: nn.Module, images: Any, kinds: Sequence[str], steps: int, seed: int = 0,
               device: str | torch.device | None = None) -> dict[str, float]:
    """{kind: flip probability} for each perturbation kind."""
    return {k: flip_rate(model, perturbation_sequences(images, k, steps, seed), k in NOISE_PERTURBATIONS, device)
            for k in kinds}


# ---- adversarial ------------------------------------------------------------------------------------------------

def eps_key(eps: float) -> str:
    """ε in 1/255 units, MLflow-safe: 4/255 -> 'eps4_255', 0.5/255 -> 'eps0.5_255'."""
    return f"eps{round(eps * 255, 4):g}_255"


def adversarial_accuracy(model: nn.Module, images: Any, labels: Any, epsilons: Sequence[float], pgd_steps: int = 10,
                         seed: int = 0, device: str | torch.device | None = None, batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy under L∞ FGSM and PGD (random start, step 2.5·ε/steps) per ε, with torchattacks.

    `model` takes [0, 1] pixels and is attacked in eval mode. ε = 0 skips the attack (torchattacks would return
    the input unchanged), so it equals clean accuracy exactly. PGD's random start uses a forked, seeded torch RNG.
    Keys: `robust/adv_clean_acc`, `robust/fgsm_acc_<eps_key>`, `robust/pgd_acc_<eps_key>`.
    """
    import torchattacks

    dev = _device(device, model)
    x_all, y_all = _to_unit(_as_tensor(images).cpu()), _as_tensor(labels).long().cpu()
    keys = [eps_key(e) for e in epsilons]
    if len(set(keys)) != len(keys):
        raise ValueError(f"epsilons {list(epsilons)} collide once rounded to 1e-4/255: {keys}")
    out: dict[str, float] = {}
    fork = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with _eval_mode(model), torch.random.fork_rng(devices=fork):
        torch.manual_seed(int(seed))
        out["robust/adv_clean_acc"] = int((_logits(model, x_all, dev).argmax(1) == y_all).sum()) / max(1, len(x_all))
        for eps, key in zip(epsilons, keys):
            attacks = {} if eps == 0 else {
                "fgsm": torchattacks.FGSM(model, eps=float(eps)),
                "pgd": torchattacks.PGD(model, eps=float(eps), alpha=2.5 * float(eps) / pgd_steps, steps=int(pgd_steps),
                                        random_start=True),
            }
            for name in ("fgsm", "pgd"):
                correct = 0
                for i in range(0, len(x_all), batch_size):
                    x, y = x_all[i:i + batch_size].to(dev), y_all[i:i + batch_size].to(dev)
                    adv = attacks[name](x, y) if name in attacks else x
                    with torch.no_grad():
                        correct += int((model(adv).argmax(1) == y).sum())
                out[f"robust/{name}_acc_{key}"] = correct / max(1, len(x_all))
    return out


# ---- the report ------------------------------------------------------------------------------------------------

class RobustnessResult(NamedTuple):
    metrics: dict[str, float]  # flat, `robust/` prefixed, MLflow-safe keys
    reference: dict  # JSON-able; pass it back as `reference` when evaluating later generations


def _subset(n: int, k: int, seed: int) -> np.ndarray:
    """Seeded (not first-k: test sets are often sorted by class) and nested: a smaller k is a prefix."""
    return np.random.default_rng([int(seed), 0x5EB]).permutation(n)[: min(k, n)]


def robustness_report(model: nn.Module, images_uint8_NCHW: Any, labels: Any, cfg, seed: int = 0,
                      device: str | torch.device | None = None, reference: Mapping | None = None,
                      mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5),
                      diagram_path: str | os.PathLike | None = None) -> RobustnessResult:
    """All enabled parts of `cfg` (a RobustnessConfig) on seeded test subsets of `cfg.subset` images (attacks on
    the first `cfg.adversarial_subset` of those). `model` takes normalised input (`mean`/`std`).

    `reference` is the `.reference` of the generation-0 teacher's result; None makes this model its own
    reference (mCE = relative mCE = mFR = 100). It must come from the same corruptions, severities, subset and seed.
    """
    if not cfg.enabled:
        return RobustnessResult({}, {})
    images, labels = _as_tensor(images_uint8_NCHW).cpu(), _as_tensor(labels).long().cpu()
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 N×3×H×W images, got {images.dtype} {tuple(images.shape)}")
    dev = _device(device, model)
    was_training = model.training
    net = pixel_model(model.to(dev), mean, std).to(dev).eval()
    idx = torch.from_numpy(_subset(len(images), cfg.subset, seed))
    x, y = images[idx], labels[idx]
    names = _check_names(cfg.corruptions)
    own = {
        "n": len(idx), "seed": int(seed), "severities": [int(s) for s in cfg.severities], "corruptions": names,
        "perturbation_steps": int(cfg.perturbation_steps),
    }
    if reference is not None:
        diff = [k for k in own if k in reference and reference[k] != own[k]]
        if diff:
            raise ValueError(f"reference was computed with other settings: {[(k, reference[k], own[k]) for k in diff]}")
    m: dict[str, float] = {}
    try:
        with torch.no_grad():
            logits = _logits(net, x, dev)
        probs = logits.softmax(1).numpy()
        clean = int((logits.argmax(1) != y).sum()) / len(y)
        m["robust/clean_error"] = clean
        m["robust/ece"] = ece(probs, y.numpy())
        if diagram_path is not None:
            reliability_diagram(probs, y.numpy(), diagram_path)
        own["clean_error"] = clean
        ref = own if reference is None else reference  # `own` is filled in below, so self-reference stays exact
        if names:
            ce = corruption_errors(net, x, y, cfg, seed, dev)
            m.update(ce["metrics"])
            own["corruption_errors"] = {c: {str(s): e for s, e in v.items()} for c, v in ce["per_severity"].items()}
            if "corruption_errors" not in ref:
                raise ValueError("reference has no corruption errors (it was computed with corruptions off)")
            ref_ce = ref["corruption_errors"]
            m["robust/mce"] = mce(own["corruption_errors"], ref_ce)
            ref_mean = {c: float(np.mean(list(v.values()))) for c, v in ref_ce.items()}
            m["robust/relative_mce"] = relative_mce(ce["errors"], clean, ref_mean, float(ref["clean_error"]))
        if cfg.perturbations:
            fr = flip_rates(net, x, cfg.perturbations, cfg.perturbation_steps, seed, dev)
            own["flip_rates"] = fr
            m.update({f"robust/flip_rate/{k}": v for k, v in fr.items()})
            m["robust/mean_flip_rate"] = float(np.mean(list(fr.values())))
            ref_fr = ref.get("flip_rates", {})
            if set(ref_fr) == set(fr):
                m["robust/mfr"] = 100.0 * float(np.mean([_ratio(fr[k], float(ref_fr[k])) for k in fr]))
        if cfg.epsilons:
            k = min(cfg.adversarial_subset, len(idx))
            m.update(adversarial_accuracy(net, x[:k], y[:k], cfg.epsilons, cfg.pgd_steps, seed, dev))
    finally:
        model.train(was_training)
    bad = [k for k in m if not _MLFLOW_KEY.match(k)]
    assert not bad, f"metric keys MLflow would reject: {bad}"
    return RobustnessResult(m, own)
