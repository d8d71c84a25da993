"""Classification metrics and the plots that go with them (headless matplotlib, atomic PNG writes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nst.io import atomic_path


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    k = min(k, logits.shape[1])
    return (logits.topk(k, 1).indices == labels[:, None]).any(1).float().mean().item()


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


def _bins(probs: Any, labels: Any, n_bins: int):
    p, y = np.asarray(probs, dtype=np.float64), np.asarray(labels).astype(np.int64)
    conf, correct = p.max(1), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.searchsorted(edges[1:-1], conf, side="left")  # bins (lo, hi], as in Guo et al. 2017
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    acc = np.bincount(idx, weights=correct, minlength=n_bins)
    cf = np.bincount(idx, weights=conf, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return edges, count, acc / count, cf / count


def ece(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """Expected calibration error: Σ_b |B_b|/N · |acc(B_b) - conf(B_b)| over equal-width confidence bins."""
    _, count, acc, conf = _bins(probs, labels, n_bins)
    keep = count > 0
    return float(np.sum(count[keep] / count.sum() * np.abs(acc[keep] - conf[keep])))


def reliability_diagram(probs: Any, labels: Any, path: str | os.PathLike, n_bins: int = 15, title: str = "") -> str:
    """Accuracy vs confidence per bin as a PNG, written atomically (Figure + Agg canvas: no pyplot global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    edges, count, acc, conf = _bins(probs, labels, n_bins)
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = edges[1] - edges[0]
    keep = count > 0
    ax.bar(edges[:-1][keep], acc[keep], width=width, align="edge", edgecolor="black", label="accuracy")
    ax.bar(edges[:-1][keep], (conf - acc)[keep], bottom=acc[keep], width=width, align="edge", color="red",
           alpha=0.3, label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
           title=(title + " " if title else "") + f"ECE = {ece(probs, labels, n_bins):.4f}")
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return str(path)


def training_curves(history: list[dict], title: str):
    """Loss and accuracy per epoch, a matplotlib Figure (no pyplot state) for MLflow's log_figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    for key in ("train_loss", "train_loss_labeled", "train_loss_unlabeled", "val_loss"):
        if any(key in r for r in history):
            ax1.plot(ep, [r.get(key) for r in history], marker=".", label=key)
    for key in ("train_acc", "val_acc"):
        if any(key in r for r in history):
            ax2.plot(ep, [r.get(key) for r in history], marker=".", label=key)
    ax1.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=f"{title}: accuracy")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
