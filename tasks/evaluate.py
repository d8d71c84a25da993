"""Stage `evaluate`: clean test metrics for one generation's model (g0 = the teacher), plus the optional
robustness suite; one flat metrics JSON whose keys are the same in every generation (DVC and MLflow read it)."""

from __future__ import annotations

import logging

import numpy as np
import torch.nn.functional as F

from nst.checkpoint import load_model
from nst.config import Config, write_effective_config
from nst.data import open_split
from nst.io import atomic_write_json, read_json
from nst.metrics import confusion_matrix, confusion_plot, ece, reliability_diagram, topk_accuracy
from nst.train import predict_logits, resolve_device

log = logging.getLogger("nst.evaluate")


def evaluate(cfg: Config, gen: str) -> dict:
    model_dir = cfg.model_dir(gen)
    out = cfg.gen_dir(gen) / "eval"
    device = resolve_device(cfg.device)
    model, meta = load_model(model_dir, device)
    classes = meta["classes"]
    ds, labels, _ = open_split(cfg.out_dir, cfg.root, "test", cfg.data.image_size)
    tc = cfg.train_config(gen)
    logits = predict_logits(model, ds, device, 256, cfg.data.num_workers, amp=tc.amp, channels_last=tc.channels_last)
    probs = logits.softmax(1).numpy()
    y = labels.numpy()
    pred = probs.argmax(1)
    cm = confusion_matrix(pred, y, len(classes))
    metrics = {
        "test/top1": topk_accuracy(logits, labels, 1),
        "test/top5": topk_accuracy(logits, labels, 5),
        "test/nll": F.cross_entropy(logits, labels).item(),
        "test/ece": ece(probs, y),
    }
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    metrics |= {f"class_acc/{c}": float(a) for c, a in zip(classes, per_class)}
    if cfg.evaluate.enabled:
        metrics |= _robustness(cfg, gen, model, ds, labels, device, out)
    atomic_write_json(out / "confusion.json", {"classes": classes, "matrix": cm.tolist()})
    reliability_diagram(probs, y, out / "reliability.png", title=f"{gen} {meta['model']}")
    confusion_plot(cm, classes, out / "confusion.png", title=f"{gen} {meta['model']}")
    write_effective_config(cfg, out, "evaluate", {"generation": gen})
    atomic_write_json(out / "metrics.json", metrics)
    log.info("%s/evaluate: top1=%.4f top5=%.4f ece=%.4f", gen, metrics["test/top1"], metrics["test/top5"], metrics["test/ece"])
    return {"out_dir": str(out), "metrics_path": str(out / "metrics.json"), "metrics": metrics}


def _robustness(cfg: Config, gen: str, model, ds, labels, device, out) -> dict:
    """Corruptions/perturbations/attacks; corruption errors are normalised by the generation-0 teacher's."""
    from tasks.robustness import robustness_report

    ref_file = cfg.gen_dir("g0") / "eval" / "corruption_errors.json"
    reference = read_json(ref_file) if gen != "g0" and ref_file.is_file() else None
    if gen != "g0" and reference is None:
        raise FileNotFoundError(f"{ref_file}: evaluate g0 (the reference for mCE) before {gen}")
    images = ds.all_raw()
    result = robustness_report(model, images, labels, cfg.evaluate, seed=cfg.seed, device=device, reference=reference)
    atomic_write_json(out / "corruption_errors.json", result.reference)
    return result.metrics
