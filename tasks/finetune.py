"""Stage `finetune`: the paper's last step (FixRes, as Noisy Student uses it). One model's EMA weights are fine-tuned
at the test resolution on unaugmented labeled images (resize + centre crop: the evaluation geometry), the stem and
the first blocks fixed with their BatchNorm in inference mode, for `finetune.epochs` (1.5 in the paper), continuing
the last steps of the model's own learning-rate schedule. The official code's flags: --init_model_path,
--input_image_size, --remove_aug, --fix_layer_num, --train_last_step_num. The result is the model `gN-ft`,
evaluated and tracked like the generations; it labels nothing.

The same loop as training (`nst.train.fit`), so DDP (torchrun) and resume work as they do there."""

from __future__ import annotations

import logging

from nst.checkpoint import WEIGHTS, build_model, load_into, load_weights, read_meta
from nst.config import Config
from nst.data import open_split
from nst.distributed import setup
from nst.freeze import freeze
from nst.train import Schedule, resolve_device
from tasks.spec import MODEL_CODE, TRAIN_KEYS, Stage
from tasks.train import _labeled_deps, model_outs, run_fit

log = logging.getLogger("nst.finetune")
# what fit adds to a model's sidecar: the fine-tune's run writes its own
_RUN_KEYS = ("weights", "best_epoch", "best_val_acc", "epochs", "steps_per_epoch", "world_size", "params")


def _schedule(cfg: Config, base_meta: dict) -> Schedule:
    """finetune.lr: a cosine from it over the fine-tune's steps; null: the tail of the base model's own schedule."""
    if cfg.finetune.lr is not None:
        return Schedule(cfg.finetune.lr)
    tc, steps = cfg.train_config(cfg.finetuned()), int(base_meta["steps_per_epoch"])
    return Schedule(tc.lr, round(base_meta["epochs"] * steps), steps * tc.warmup_epochs)


def finetune(cfg: Config, gen: str, fingerprint: str = "") -> dict:
    base, ft = cfg.finetuned(), cfg.finetune
    tc, size = cfg.train_config(base), cfg.finetune_size()
    dist, device = setup(resolve_device(cfg.device), cfg.distributed)
    src = cfg.model_dir(base)
    meta = read_meta(src)
    model = build_model(meta["model"], meta["num_classes"], tc.noise.dropout, tc.noise.drop_path)
    load_into(model, load_weights(src / WEIGHTS), src / WEIGHTS)  # the weights it was finished with (EMA)
    frozen = freeze(model, ft.freeze, meta["model"])
    names = list(frozen)
    if dist.main:
        log.info("%s: %s from %s at %d px (trained at %s px), %g epochs; fixed: %s (%d of %d parameters)", gen,
                 meta["model"], base, size, meta.get("image_size"), ft.epochs, ", ".join(names) or "nothing",
                 sum(p.numel() for p in model.parameters() if not p.requires_grad),
                 sum(p.numel() for p in model.parameters()))
    labeled, labels = open_split(cfg, "labeled", image_size=size)  # no transform: resize + centre crop
    val = open_split(cfg, "val", image_size=size)
    own = {k: v for k, v in meta.items() if k not in _RUN_KEYS}
    own |= {"generation": gen, "role": "finetune", "image_size": size, "finetuned_from": base,
            "trained_image_size": meta.get("image_size"), "frozen": names,
            "noise": {"randaugment_n": 0, "dropout": tc.noise.dropout, "drop_path": tc.noise.drop_path}}
    run = tc.model_copy(update={"batch_size": ft.batch_size or tc.batch_size})  # optimizer, EMA, amp: gN's own
    return run_fit(cfg, gen, dist, model=model, cfg=run, labeled=labeled, labels=labels, device=device,
                   fingerprint=fingerprint, meta=own, seed=cfg.seed + 1000 * int(base[1:]) + 500,
                   val=val[0] if val else None, val_labels=val[1] if val else None, epochs=ft.epochs,
                   schedule=_schedule(cfg, meta), frozen=list(frozen.values()))


def _params(cfg: Config, gen: str) -> list[str]:
    base = cfg.finetuned()
    own = "teacher" if base == "g0" else f"generations.{cfg.gen_index(base)}.student"
    return TRAIN_KEYS + [own, "finetune"] + (["evaluate.image_size"] if cfg.finetune.image_size is None else [])


FINETUNE = Stage(
    name="finetune", fn=finetune, scope="finetune", model=True,
    params=_params,
    deps=lambda c, g: [c.model_dir(c.finetuned()) / WEIGHTS, c.model_dir(c.finetuned()) / "model.json"]
    + _labeled_deps(c),
    outs=model_outs,
    plots=lambda c, g: [c.model_dir(g) / "history.json"],
    code=MODEL_CODE + ("nst/freeze.py", "tasks/finetune.py", "tasks/train.py"),
)
