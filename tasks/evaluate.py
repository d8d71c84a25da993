"""Stage `evaluate`: clean test metrics for one generation's model (g0 = the teacher), plus the optional
robustness suite; one flat metrics JSON whose keys are the same in every generation (DVC and MLflow read it)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch.nn.functional as F

from nst.checkpoint import WEIGHTS, load_model
from nst.config import Config
from nst.data import open_split
from nst.io import atomic_write_json, read_json
from nst.metrics import confusion_matrix, confusion_plot, ece, reliability_diagram, topk_accuracy
from nst.train import predict_logits, resolve_device
from tasks.spec import EVAL_KEYS, MODEL_CODE, Stage

log = logging.getLogger("nst.evaluate")


def _scores(logits, labels, prefix: str) -> dict:
    return {f"{prefix}/top1": topk_accuracy(logits, labels, 1), f"{prefix}/top5": topk_accuracy(logits, labels, 5),
            f"{prefix}/nll": F.cross_entropy(logits, labels).item(),
            f"{prefix}/ece": ece(logits.softmax(1).numpy(), labels.numpy())}


def evaluate(cfg: Config, gen: str, fingerprint: str = "") -> dict:
    """`test/*` at the model's own (training) resolution; with evaluate.image_size also `test_at_size/*` at that
    one, the train/test resolution discrepancy a fine-tune at the test resolution removes."""
    model_dir, out = cfg.model_dir(gen), cfg.eval_dir(gen)
    device = resolve_device(cfg.device)
    model, meta = load_model(model_dir, device)
    classes = meta["classes"]
    tc = cfg.train_config(gen)
    own = int(meta.get("image_size", cfg.data.image_size))

    def logits_at(size: int):
        ds, labels = open_split(cfg, "test", image_size=size)
        return ds, labels, predict_logits(model, ds, device, cfg.pseudo_label.batch_size, cfg.data.num_workers,
                                          amp=tc.amp, channels_last=tc.channels_last)

    ds, labels, logits = logits_at(own)
    probs = logits.softmax(1).numpy()
    y = labels.numpy()
    cm = confusion_matrix(probs.argmax(1), y, len(classes))
    metrics = _scores(logits, labels, "test")
    if (size := cfg.evaluate.image_size) is not None:
        metrics |= _scores(logits if size == own else logits_at(size)[2], labels, "test_at_size")
        metrics["test_at_size/image_size"] = size
    per_class = cm.diagonal() / np.maximum(cm.sum(1), 1)
    atomic_write_json(out / "class_accuracy.json", {c: float(a) for c, a in zip(classes, per_class)})
    if cfg.robustness.enabled:
        metrics |= _robustness(cfg, gen, model, ds, labels, device, out)
    atomic_write_json(out / "confusion.json", {"classes": classes, "matrix": cm.tolist()})
    reliability_diagram(probs, y, out / "reliability.png", title=f"{gen} {meta['model']}")
    confusion_plot(cm, classes, out / "confusion.png", title=f"{gen} {meta['model']}")
    atomic_write_json(out / "metrics.json", metrics)
    log.info("%s/evaluate: top1=%.4f top5=%.4f ece=%.4f at %d px", gen, metrics["test/top1"], metrics["test/top5"],
             metrics["test/ece"], own)
    if "test_at_size/top1" in metrics:
        log.info("%s/evaluate: top1=%.4f at %d px", gen, metrics["test_at_size/top1"], cfg.evaluate.image_size)
    return {"metrics": metrics}


def _robustness(cfg: Config, gen: str, model, ds, labels, device, out) -> dict:
    """Corruptions/perturbations/attacks; corruption errors are normalised by the generation-0 teacher's."""
    from nst.robustness import robustness_report

    ref_file = cfg.eval_dir("g0") / "corruption_errors.json"
    reference = read_json(ref_file) if gen != "g0" and ref_file.is_file() else None
    if gen != "g0" and reference is None:
        raise FileNotFoundError(f"{ref_file}: evaluate g0 (the reference for mCE) before {gen}")
    images = ds.all_raw()
    result = robustness_report(model, images, labels, cfg.robustness, seed=cfg.seed, device=device, reference=reference)
    atomic_write_json(out / "corruption_errors.json", result.reference)
    return result.metrics


def eval_outs(cfg: Config, gen: str) -> list[Path]:
    d = cfg.eval_dir(gen)
    extra = [d / "corruption_errors.json"] if cfg.robustness.enabled else []
    return [d / "confusion.json", d / "class_accuracy.json", d / "config.json"] + extra


EVALUATE = Stage(
    name="evaluate", fn=evaluate, model=True,
    params=lambda c, g: EVAL_KEYS + ["robustness"] + (["seed"] if c.robustness.enabled else [])
    + (["evaluate.image_size"] if c.evaluate.image_size is not None else []),  # unset: no key, the same fingerprint
    deps=lambda c, g: [c.model_dir(g) / WEIGHTS, c.model_dir(g) / "model.json", c.data_dir / "test.parquet"]
    + ([c.eval_dir("g0") / "corruption_errors.json"] if c.robustness.enabled and g != "g0" else []),
    outs=eval_outs,
    metrics=lambda c, g: [c.eval_dir(g) / "metrics.json"],
    plots=lambda c, g: [c.eval_dir(g) / "reliability.png", c.eval_dir(g) / "confusion.png"],
    code=MODEL_CODE + ("nst/metrics.py", "nst/robustness.py", "tasks/evaluate.py"),
)
