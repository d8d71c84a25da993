"""The whole pipeline as plain function calls, in order: what the Prefect flow orchestrates, minus Prefect.

Used by `nst run --no-prefect`, the benchmark (flow vs. direct) and tests that need no orchestration.
"""

from __future__ import annotations

import logging

from nst.config import Config
from nst.report import write_summary
from tasks import evaluate, filter_balance, prepare, pseudo_label, train_student, train_teacher

log = logging.getLogger("nst.pipeline")


def run_direct(cfg: Config) -> list[dict]:
    prepare(cfg)
    train_teacher(cfg)
    evaluate(cfg, "g0")
    for g in cfg.generations:
        pseudo_label(cfg, g.name)
        filter_balance(cfg, g.name)
        train_student(cfg, g.name)
        evaluate(cfg, g.name)
    rows, _ = write_summary(cfg)
    return rows
