"""The Prefect flow `noisy-student-study`: a study's pipeline runs (tasks/study.py's plan) as `noisy-student`
subflows, side by side - every seed's teacher, then every (arm, seed) from it - one MLflow parent run for the study,
and the report (table, plot) as artifacts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.noisy_student import noisy_student
from nst.config import load_config
from nst.study import (check_report_paths, common_overrides, finish_study, load_study, share_teacher, start_study,
                       write_report)
from tasks.study import jobs_for, plan, threads_for


def _name() -> str:
    from prefect.runtime import task_run

    t = task_run.parameters["tags"]
    return f"{t['arm']}/seed{t['seed']}"


@task(task_run_name=_name, cache_policy=NO_CACHE, persist_result=False)
def pipeline_task(config_path: str, overrides: dict[str, Any], tags: dict, parent: str | None,
                  share: tuple[str, int] | None = None) -> list[dict]:
    """One pipeline run of the study, as a `noisy-student` subflow (its own run lock, its own out_dir)."""
    st = load_study(config_path)
    if share:
        share_teacher(st, *share)
    return noisy_student(str(st.params), overrides, parent_run_id=parent, tags=tags)


def study(config_path: str, jobs: int | None = None) -> dict:
    """Run the study flow with `jobs` pipeline runs side by side."""
    from prefect.task_runners import ThreadPoolTaskRunner

    st = load_study(config_path)
    return study_flow.with_options(task_runner=ThreadPoolTaskRunner(max_workers=jobs_for(st, jobs)))(config_path, jobs)


@flow(name="noisy-student-study", log_prints=True)
def study_flow(config_path: str, jobs: int | None = None) -> dict:
    """The paper's comparisons from one study file (see experiments/*.yaml)."""
    from prefect.artifacts import create_markdown_artifact

    st = load_study(config_path)
    check_report_paths(st)  # a report path holding a file of the user's: refused now, not after the study ran
    cfg = load_config(st.params, common_overrides(st))
    parent = start_study(cfg, st)
    teachers, arms = plan(st)
    threads = threads_for(st, jobs)
    status, report = "FAILED", {}
    try:
        for f in [pipeline_task.submit(config_path, threads | o, t, parent) for o, t in teachers]:
            f.result()
        futures = [pipeline_task.submit(config_path, threads | o, t, parent, (arm, seed))
                   for arm, seed, o, t in arms]
        errors = []
        for f in futures:  # resolve every future, failed ones included
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        if errors:
            raise errors[0]
        report = write_report(st)
        key = re.sub(r"[^a-z0-9-]", "-", f"study-{st.name.lower()}")
        create_markdown_artifact(markdown=Path(report["md"]).read_text(), key=key,
                                 description=f"Study {st.name}: test top-1 per arm and generation")
        get_run_logger().info("study %s: report %s", st.name, report["md"])
        status = "FINISHED"
        return {k: str(v) for k, v in report.items()}
    finally:
        finish_study(cfg, parent, report, status)
