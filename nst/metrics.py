"""Classification metrics and the plots that go with them (headless matplotlib, atomic PNG writes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nst.io import atomic_path


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item()


def ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error: |accuracy - confidence| per equal-width confidence bin, weighted by bin size."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == labels).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            total += m.sum() * abs(correct[m].mean() - conf[m].mean())
    return float(total / max(1, len(labels)))


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (labels, pred), 1)
    return cm


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _figure().close(fig)
    return Path(path)


def reliability_diagram(probs: np.ndarray, labels: np.ndarray, path: Path, n_bins: int = 15, title: str = "") -> Path:
    plt = _figure()
    conf, pred = probs.max(1), probs.argmax(1)
    correct = pred == labels
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.minimum((conf * n_bins).astype(int), n_bins - 1)
    acc = np.array([correct[bins == b].mean() if (bins == b).any() else 0.0 for b in range(n_bins)])
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.bar(edges[:-1], acc, width=1 / n_bins, align="edge", edgecolor="k", alpha=0.8, label="accuracy")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{title} ECE={ece(probs, labels, n_bins):.3f}".strip())
    ax.legend(loc="upper left")
    return _save(fig, path)


def confusion_plot(cm: np.ndarray, classes: list[str], path: Path, title: str = "") -> Path:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 4.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=90, fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def histogram_plot(series: dict[str, list[float]], labels: list[str], path: Path, title: str, ylabel: str) -> Path:
    """Grouped bars, e.g. per-class counts before/after balancing."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(labels))
    w = 0.8 / max(1, len(series))
    for i, (name, vals) in enumerate(series.items()):
        ax.bar(x + i * w, vals, w, label=name)
    ax.set_xticks(x + 0.4 - w / 2)
    ax.set_xticklabels(labels, rotation=45, fontsize=7)
    ax.set(title=title, ylabel=ylabel)
    ax.legend()
    return _save(fig, path)
