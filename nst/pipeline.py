"""The whole pipeline as plain function calls, in order: what the Prefect flow orchestrates, minus Prefect.

Used by `nst run --no-prefect`, the benchmark (flow vs. direct) and tests that need no orchestration.
"""

from __future__ import annotations

import logging

from nst.config import Config
from nst.io import run_lock
from nst.report import write_summary
from nst.tracking import finish_pipeline, start_pipeline, track_generation
from tasks import evaluate, filter_balance, prepare, pseudo_label, train_student, train_teacher

log = logging.getLogger("nst.pipeline")


def run_direct(cfg: Config) -> list[dict]:
    with run_lock(cfg.out_dir):
        return _run(cfg)


def _run(cfg: Config) -> list[dict]:
    # MLflow (nst/tracking.py): a parent run now, a child per generation once it is evaluated, the parent ended last.
    # Tracking failures are reported there and never raise; without `tracking.enabled` these are no-ops.
    parent = start_pipeline(cfg)
    status = "FAILED"
    try:
        prepare(cfg)
        train_teacher(cfg)
        evaluate(cfg, "g0")
        prev = track_generation(cfg, "g0", parent_run_id=parent, teacher_run_id=None)
        for g in cfg.generations:
            pseudo_label(cfg, g.name)
            filter_balance(cfg, g.name)
            train_student(cfg, g.name)
            evaluate(cfg, g.name)
            prev = track_generation(cfg, g.name, parent_run_id=parent, teacher_run_id=prev)
        rows, _ = write_summary(cfg)
        status = "FINISHED"
        return rows
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        finish_pipeline(cfg, parent, status)
