"""Robustness metrics on cases with known answers, plus one small model trained here (digits, 16×16 RGB)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from nst.config import RobustnessConfig
from nst import robustness as R

torch.set_num_threads(2)


# ---- fixtures ---------------------------------------------------------------------------------------------------

def _digits_16px():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = nn.functional.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = train_test_split(np.arange(len(y)), test_size=400, random_state=0, stratify=y.numpy())
    return x[tr], y[tr], x[te], y[te]


def _tiny_cnn() -> nn.Module:
    """~8x cheaper than nst_cnn_xs, so training and attacks fit the test budget; BatchNorm checks eval handling."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
    )


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained for a few seconds; returns (pixel-space model, test images uint8, test labels, clean acc)."""
    torch.manual_seed(0)
    xtr, ytr, xte, yte = _digits_16px()
    net = R.pixel_model(_tiny_cnn())
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(4):
        for idx in torch.randperm(len(xtr), generator=g).split(64):
            loss = nn.functional.cross_entropy(net(xtr[idx].float() / 255), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = float((net(xte.float() / 255).argmax(1) == yte).float().mean())
    return net, xte, yte, acc


class Constant(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.logits = nn.Parameter(torch.arange(n_classes, dtype=torch.float32))

    def forward(self, x):
        return self.logits.expand(len(x), -1)


class FirstPixelParity(nn.Module):
    """Predicts class (first pixel value in 0..255) mod 2: a model whose flips we can place by hand."""

    def forward(self, x):
        k = (x[:, 0, 0, 0] * 255).round().long() % 2
        return nn.functional.one_hot(k, 2).float()


# ---- corruptions ------------------------------------------------------------------------------------------------

def test_default_corruptions_are_the_library_benchmark_set():
    assert list(R.DEFAULT_CORRUPTIONS) == R._ic().get_corruption_names("common")


@pytest.mark.parametrize("size", [16, 32])
def test_corruption_suite_is_deterministic_and_keeps_shape(size):
    imgs = np.random.default_rng(1).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    a = R.corruption_suite(imgs, None, [1, 5], seed=7)
    assert (np.random.get_state()[1] == before).all(), "the caller's global numpy RNG must be left alone"
    b = R.corruption_suite(imgs, None, [1, 5], seed=7)
    c = R.corruption_suite(imgs, ["gaussian_noise", "glass_blur"], [1, 5], seed=8)
    assert set(a) == {(n, s) for n in R.DEFAULT_CORRUPTIONS for s in (1, 5)}
    for k in a:
        assert a[k].dtype == np.uint8 and a[k].shape == imgs.shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))
    assert not np.array_equal(a[("gaussian_noise", 5)], c[("gaussian_noise", 5)])
    assert not np.array_equal(a[("glass_blur", 5)], c[("glass_blur", 5)])
    # noise strength does not depend on the image size (pointwise corruptions run at native resolution)
    std = np.std(a[("gaussian_noise", 1)].astype(float) - imgs)
    assert 0.06 * 255 < std < 0.09 * 255


def test_unknown_corruption_is_rejected():
    with pytest.raises(ValueError, match="unknown corruption"):
        R.corruption_suite(np.zeros((1, 32, 32, 3), np.uint8), ["not_a_corruption"], [1])


def test_severity_5_hurts_more_than_severity_1(trained):
    net, x, y, _ = trained
    cfg = RobustnessConfig(enabled=True, severities=[1, 5])
    out = R.corruption_errors(net, x[:50], y[:50], cfg, seed=0)
    s1 = np.mean([v[1] for v in out["per_severity"].values()])
    s5 = np.mean([v[5] for v in out["per_severity"].values()])
    assert s5 > s1 + 0.05, (s1, s5)
    assert out["metrics"]["robust/severity_error/s5"] == pytest.approx(s5)
    assert out["errors"]["contrast"] == pytest.approx(np.mean(list(out["per_severity"]["contrast"].values())))


# ---- mCE --------------------------------------------------------------------------------------------------------

def test_mce_hand_computed():
    assert R.mce({"a": 0.2, "b": 0.6}, {"a": 0.4, "b": 0.3}) == pytest.approx(100 * (0.5 + 2.0) / 2)
    # per-severity mappings are summed: (0.1 + 0.3) / (0.2 + 0.2) = 1, (0.5 + 0.5) / (0.25 + 0.25) = 2
    per_sev = {"a": {1: 0.1, 2: 0.3}, "b": {1: 0.5, 2: 0.5}}
    ref = {"a": {1: 0.2, 2: 0.2}, "b": {1: 0.25, 2: 0.25}}
    assert R.mce(per_sev, ref) == pytest.approx(150.0)
    assert R.mce(ref, ref) == 100.0
    with pytest.raises(ValueError):
        R.mce({"a": 0.2}, {"b": 0.2})
    with pytest.raises(ValueError):
        R.mce({"a": {1: 0.2}}, {"a": {2: 0.2}})


def test_relative_mce_hand_computed():
    # a: (0.5 - 0.1) / (0.6 - 0.2) = 1;  b: (0.3 - 0.1) / (0.3 - 0.2) = 2
    got = R.relative_mce({"a": 0.5, "b": 0.3}, 0.1, {"a": 0.6, "b": 0.3}, 0.2)
    assert got == pytest.approx(150.0)


# ---- flip rate --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["translate", "brightness", "gaussian_noise"])
def test_constant_classifier_never_flips(kind):
    imgs = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seq = R.perturbation_sequences(imgs, kind, steps=5, seed=0)
    assert seq.shape == (8, 6, 3, 16, 16) and seq.dtype == torch.uint8
    assert torch.equal(seq[:, 0], imgs)
    assert not torch.equal(seq[:, 1], imgs)
    for against_first in (False, True):
        assert R.flip_rate(Constant(), seq, against_first) == 0.0


def test_flip_rate_hand_computed():
    # sequence 0 predicts 0,1,0,1 ; sequence 1 predicts 0,0,0,0 (first pixel value parity)
    seq = torch.zeros(2, 4, 3, 2, 2, dtype=torch.uint8)
    seq[0, :, 0, 0, 0] = torch.tensor([10, 11, 12, 13], dtype=torch.uint8)
    seq[1, :, 0, 0, 0] = torch.tensor([10, 12, 14, 16], dtype=torch.uint8)
    assert R.flip_rate(FirstPixelParity(), seq) == pytest.approx(3 / 6)  # consecutive: 3 flips of 6 pairs
    assert R.flip_rate(FirstPixelParity(), seq, against_first=True) == pytest.approx(2 / 6)


def test_translate_moves_one_pixel_per_frame():
    imgs = torch.arange(16, dtype=torch.uint8).view(1, 1, 1, 16).expand(1, 3, 16, 16).contiguous()
    seq = R.perturbation_sequences(imgs, "translate", steps=6, seed=0)
    for t in range(1, 7):
        shift = (seq[0, t, 0, 0].float() - seq[0, t - 1, 0, 0].float())[4:12]  # away from replicated edges
        assert shift.abs().eq(1).all(), t


# ---- adversarial ------------------------------------------------------------------------------------------------

def test_trained_model_beats_chance(trained):
    assert trained[3] > 0.8


def test_fgsm_eps0_equals_clean_accuracy(trained):
    import torchattacks

    net, x, y, acc = trained
    xs = x[:100].float() / 255
    assert torch.equal(torchattacks.FGSM(net, eps=0.0)(xs, y[:100]), xs)  # why skipping the attack at ε = 0 is exact
    out = R.adversarial_accuracy(net, x[:100], y[:100], [0.0], pgd_steps=3)
    assert out["robust/fgsm_acc_eps0_255"] == out["robust/adv_clean_acc"] == out["robust/pgd_acc_eps0_255"]
    with torch.no_grad():
        assert out["robust/adv_clean_acc"] == int((net(xs).argmax(1) == y[:100]).sum()) / 100


def test_pgd_le_fgsm_le_clean(trained):
    net, x, y, _ = trained
    out = R.adversarial_accuracy(net, x[:200], y[:200], [8 / 255], pgd_steps=5, seed=0)
    clean, fgsm, pgd = out["robust/adv_clean_acc"], out["robust/fgsm_acc_eps8_255"], out["robust/pgd_acc_eps8_255"]
    assert pgd <= fgsm <= clean
    assert pgd < clean, "the attack should change some predictions"
    again = R.adversarial_accuracy(net, x[:200], y[:200], [8 / 255], pgd_steps=5, seed=0)
    assert again == out


def test_eps_keys_collide_loudly():
    with pytest.raises(ValueError, match="collide"):
        R.adversarial_accuracy(Constant(), torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1), [1 / 255, 1.00001 / 255])


# ---- calibration ------------------------------------------------------------------------------------------------

def test_ece_hand_computed():
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.95, 0.05], [0.92, 0.08]])
    labels = np.array([0, 1, 0, 1, 0, 1])
    # 10 bins: 0.9 -> (0.8, 0.9] right, gap 0.1; 0.8 -> (0.7, 0.8] wrong, gap 0.8; 0.6 -> right, 0.4;
    # 0.7 -> right, 0.3; 0.95 and 0.92 share (0.9, 1]: accuracy 0.5, confidence 0.935, gap 0.435 (weight 2)
    expected = (0.1 + 0.8 + 0.4 + 0.3 + 2 * 0.435) / 6
    assert R.ece(probs, labels, n_bins=10) == pytest.approx(expected)
    assert R.ece(np.eye(3), np.arange(3)) == 0.0


def test_reliability_diagram_writes_png_atomically(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=50)
    path = R.reliability_diagram(probs, rng.integers(0, 4, 50), tmp_path / "rel.png")
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rel.png"]


# ---- report -----------------------------------------------------------------------------------------------------

def _small_cfg(**kw):
    base = dict(enabled=True, subset=60, corruptions=["gaussian_noise", "contrast", "pixelate"], severities=[1, 3],
                perturbation_steps=4, epsilons=[0.0, 2 / 255], pgd_steps=3, adversarial_subset=30)
    return RobustnessConfig(**(base | kw))


def test_report_reference_against_itself_is_exactly_100(trained, tmp_path):
    net, x, y, _ = trained
    model = net[1]  # the raw model: the report adds the (x - 0.5) / 0.5 normalisation itself
    model.train()
    cfg = _small_cfg()
    first = R.robustness_report(model, x, y, cfg, seed=3, diagram_path=tmp_path / "rel.png")
    assert model.training, "the caller's train/eval mode must be restored"
    model.eval()
    assert first.metrics["robust/mce"] == 100.0
    assert first.metrics["robust/relative_mce"] == 100.0
    assert first.metrics["robust/mfr"] == 100.0
    stored = json.loads(json.dumps(first.reference))  # the reference travels as JSON between generations
    second = R.robustness_report(model, x, y, cfg, seed=3, reference=stored)
    assert second.metrics["robust/mce"] == 100.0
    assert second.metrics == first.metrics
    expected = {"robust/clean_error", "robust/ece", "robust/mce", "robust/relative_mce", "robust/mean_corruption_error",
                "robust/severity_error/s1", "robust/severity_error/s3", "robust/mean_flip_rate", "robust/mfr",
                "robust/adv_clean_acc", "robust/fgsm_acc_eps0_255", "robust/pgd_acc_eps0_255",
                "robust/fgsm_acc_eps2_255", "robust/pgd_acc_eps2_255"}
    expected |= {f"robust/corruption_error/{c}" for c in cfg.corruptions}
    expected |= {f"robust/flip_rate/{k}" for k in cfg.perturbations}
    assert set(first.metrics) == expected
    assert all(re.fullmatch(r"[A-Za-z0-9_\-./ ]+", k) for k in first.metrics)
    assert all(isinstance(v, float) for v in first.metrics.values())
    assert (tmp_path / "rel.png").is_file()
    with pytest.raises(ValueError, match="other settings"):
        R.robustness_report(model, x, y, _small_cfg(severities=[1, 5]), seed=3, reference=stored)


def test_report_disabled_is_empty(trained):
    net, x, y, _ = trained
    assert R.robustness_report(net[1], x, y, RobustnessConfig(enabled=False)) == ({}, {})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_report_on_cuda_matches_cpu_keys(trained):
    net, x, y, _ = trained
    cpu = R.robustness_report(net[1], x, y, _small_cfg(), seed=3, device="cpu")
    gpu = R.robustness_report(net[1], x.cuda(), y.cuda(), _small_cfg(), seed=3, device="cuda")
    net.cpu()
    assert set(gpu.metrics) == set(cpu.metrics) and gpu.metrics["robust/mce"] == 100.0
    assert gpu.metrics["robust/clean_error"] == pytest.approx(cpu.metrics["robust/clean_error"], abs=0.02)


def test_evaluate_with_the_robustness_suite_runs_on_a_trained_model(tiny_project):
    """The stage end to end with robustness on: attacks need gradients through a model that evaluation laid out
    NHWC (it must not become inference tensors)."""
    from nst.config import load_config
    from tasks.evaluate import EVALUATE
    from tasks.prepare import PREPARE
    from tasks.spec import execute
    from tasks.train import TRAIN_TEACHER

    cfg = load_config(tiny_project, ["robustness.enabled=true", "robustness.subset=20", "robustness.adversarial_subset=8",
                                     "robustness.corruptions=[gaussian_noise]", "robustness.severities=[1]",
                                     "robustness.pgd_steps=2"])
    execute(PREPARE, cfg)
    execute(TRAIN_TEACHER, cfg, "g0")
    m = execute(EVALUATE, cfg, "g0")["metrics"]
    assert m["robust/mce"] == pytest.approx(100.0) and any(k.startswith("robust/pgd_acc") for k in m)
