"""`nst study --no-prefect`: a study's pipeline runs as `nst run --no-prefect` processes, side by side (flows/study.py
runs the same plan under Prefect). Each seed's teacher first, then every (arm, seed) from that teacher."""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from nst.config import load_config, override_args
from nst.errors import EXIT_TRACKING, StageError
from nst.proc import ChildFailed, run_child
from nst.study import (StudyConfig, check_report_paths, common_overrides, finish_study, run_overrides, share_teacher,
                       start_study, teacher_overrides, write_report)

log = logging.getLogger("nst.study")


def jobs_for(st: StudyConfig, jobs: int | None) -> int:
    return jobs or st.jobs or max(1, (os.cpu_count() or 2) // 2)


def threads_for(st: StudyConfig, jobs: int | None) -> dict[str, int]:
    """torch threads of each of the runs side by side: the cores shared out, unless the study sets `threads`
    itself (it is put first, so a run's own `threads` override wins)."""
    return {"threads": max(1, (os.cpu_count() or 1) // jobs_for(st, jobs))}


def plan(st: StudyConfig) -> tuple[list[tuple[dict, dict]], list[tuple[str, int, dict, dict]]]:
    """(teacher runs, arm runs): overrides and MLflow tags of every pipeline run of the study."""
    teachers = [(teacher_overrides(st, s), {"study": st.name, "arm": "teacher", "seed": str(s)}) for s in st.seeds]
    arms = [(arm, s, run_overrides(st, arm, s), {"study": st.name, "arm": arm, "seed": str(s)})
            for s in st.seeds for arm in st.arms]
    return teachers, arms


def _run(st: StudyConfig, overrides: dict[str, Any], tags: dict, parent: str | None, threads: dict) -> None:
    argv = [sys.executable, "-m", "cli", "run", "--no-prefect", "-p", str(st.params)]
    argv += [a for o in override_args(threads | overrides) for a in ("-S", o)]
    argv += [a for k, v in tags.items() for a in ("--tag", f"{k}={v}")]
    argv += ["--mlflow-parent", parent] if parent else []
    name = f"{tags['arm']}/seed{tags['seed']}"
    log.info("study %s: %s started", st.name, name)
    try:  # a child process that dies with the study (nst.proc); its own log and MLflow runs report it
        run_child(argv, on_line=lambda line: None)
    except ChildFailed as e:
        if e.returncode != EXIT_TRACKING:  # finished, tracking incomplete (reported by that run)
            raise StageError(f"study {st.name}: {name} failed: {e.last_error}") from None
    log.info("study %s: %s finished", st.name, name)


def run_study_direct(st: StudyConfig, jobs: int | None = None) -> dict:
    check_report_paths(st)  # a report path holding a file of the user's: refused now, not after the study ran
    cfg = load_config(st.params, common_overrides(st))
    n, threads = jobs_for(st, jobs), threads_for(st, jobs)
    parent = start_study(cfg, st)
    teachers, arms = plan(st)
    status, report = "FAILED", {}
    try:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda t: _run(st, t[0], t[1], parent, threads), teachers))

            def arm_run(a):
                arm, seed, overrides, tags = a
                share_teacher(st, arm, seed)
                _run(st, overrides, tags, parent, threads)

            list(pool.map(arm_run, arms))
        report = write_report(st)
        status = "FINISHED"
        return report
    finally:
        finish_study(cfg, parent, report, status)
