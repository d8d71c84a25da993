"""The Prefect 3 flow `noisy-student`: the pipeline of `tasks.pipeline.steps`, orchestrated. Orchestration only.

    [builtin-data] -> prepare -> one subflow per model `gN/generation`:
        g0: train-teacher -> evaluate -> label (shard groups, mapped) -> track
        g1, g2, ...: filter-balance -> train-student -> evaluate -> label -> track
        gN-ft (finetune.enabled, after gN): finetune -> evaluate -> track

* A model stage (train, evaluate, label) runs as its own `nst` command in a child process - the command dvc.yaml
  runs - with its log lines streamed into the task run's log; it fails with the child's last error line. Nothing
  of Prefect's threads reaches training, so flow runs are bit-reproducible and DataLoader workers just work. If
  the flow is killed, its children die with it (nst.proc).
* Resume, not recompute: task results are persisted under `<out_dir>/.prefect-results` and cached on the stage's
  fingerprint (tasks.spec: its config keys, its inputs' content, its code) - never on the flow-run id. A task
  whose outputs were deleted runs again; an interrupted training resumes from its last epoch.
* Label shards are grouped (one child per group, `NST_MAX_WORKERS` groups) and mapped over the task runner
  (flows/runners.py: threads, or Dask across machines); every future is resolved and failed shards are named.
* MLflow: a parent run, a child run per generation opened just before its model trains (the training process
  logs epochs to it live), completed after the model is labelled. DVC: the last task records the outputs.
* `NST_EXECUTION_LOG=<file>`: every task body that really executes appends its name (a counter for tests).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import as_completed

from flows.runners import max_workers, runner_kind, task_runner_from_env
from nst.config import Config, check_device, load_config
from nst.distributed import visible_gpus
from nst.io import run_lock
from nst.proc import ChildFailed, run_child
from nst.validate import check_sources
from tasks.label import LABEL, finish_labels, num_shards, shard_key
from tasks.pipeline import (STAGES, TRAINING, check_nodes, multi_node, needs_torchrun, stage_argv, steps,
                            torchrun_argv)
from tasks.spec import Stage, execute, fingerprint, outputs_exist, read_stamp

RESULTS_DIR = ".prefect-results"
GPU_TAG = "gpu"  # tasks that run a model: cap them across flow runs with `prefect concurrency-limit create gpu N`


def gpu_tags() -> list[str]:
    """[GPU_TAG] when the server holds an active `gpu` limit as the flow starts, else none. Prefect asks the server
    for a slot of every tag a task carries; with no limit that request still writes, and on the SQLite server it
    often fails as "database is locked" and is retried after 2 s: measured, ~2 s before each model stage that follows
    a long one (Prefect remembers "no limit" for 5 s)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return [GPU_TAG] if client.read_global_concurrency_limit_by_name(f"tag:{GPU_TAG}").active else []
        except ObjectNotFound:
            return []
        except Exception:  # noqa: BLE001 - a server that will not say (permissions): tag, so a limit still caps
            return [GPU_TAG]


if __name__ not in ("flows.noisy_student", "__main__"):
    # Loaded from a file path (a deployment's entrypoint): pickle its tasks by value for Dask workers.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ShardFailure(RuntimeError):
    """One or more label shards failed; the message names them."""


class StageFailed(RuntimeError):
    """A stage command failed; the message is its last error line."""


# ---- what every task receives: where the config is, never the config (it may hold secrets) ---------------------

def config_of(spec: dict[str, Any]) -> Config:
    return load_config(spec["params_path"], spec["overrides"], check_models=False)


def _begin(name: str) -> None:
    """`name<TAB>pid` of a task body that really executes (not cached), one O_APPEND write: a counter for tests."""
    path = os.environ.get("NST_EXECUTION_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{name}\t{os.getpid()}\n".encode())
        finally:
            os.close(fd)


_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) (\S+): (.*)$")


def _failed(name: str, e: ChildFailed) -> StageFailed:
    return StageFailed(f"{name}: {e.last_error.removeprefix('error: ')}")


def _child_env(spec: dict[str, Any], env: dict[str, str] | None) -> dict[str, str]:
    # The run's lock token travels in the spec: on a Dask worker the flow's environment is not ours to inherit.
    token = {"NST_RUN_TOKEN": spec["run_token"]} if spec.get("run_token") else {}
    return {**os.environ, **token, **(env or {})}


def _launch(argv: list[str], name: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> None:
    """Run a stage command, its log lines into this task run's log (level kept); fail with its last error."""
    logger = get_run_logger()

    def on_line(line: str) -> None:
        m = _LINE.match(line)
        if m:
            logger.log(getattr(logging, m[1]) if m[1] != "ERROR" else logging.WARNING, "%s: %s", m[2], m[3])
        elif line.strip() and not line.startswith(("error:", "internal error:")):
            logger.info("%s", line)

    try:
        run_child(argv, on_line=on_line, env=_child_env(spec, env))
    except ChildFailed as e:
        raise _failed(name, e) from None


# ---- cache keys: the stage's fingerprint ------------------------------------------------------------------------

def _stage_key(context: TaskRunContext, inputs: dict[str, Any]) -> str:
    stage, gen = STAGES[inputs["stage_name"]], inputs["gen"]
    return f"{stage.dvc_name(gen)}-{fingerprint(stage, config_of(inputs['spec']), gen)}"


def _group_key(context: TaskRunContext, inputs: dict[str, Any]) -> str:
    shards = inputs["shards"]
    return f"label-{inputs['gen']}-{shards[0]}-{shards[-1]}-{shard_key(config_of(inputs['spec']), inputs['gen'])}"


_STAGE_TASK = dict(persist_result=True, result_serializer="json", retries=0)


def _stage_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return STAGES[p["stage_name"]].task_name(p["gen"])


@task(name="stage", task_run_name=_stage_name, cache_key_fn=_stage_key, **_STAGE_TASK)
def stage_task(spec: dict[str, Any], stage_name: str, gen: str) -> dict:
    """A light stage (data, prepare, filter-balance) in this process."""
    _begin(f"{gen}/{stage_name}" if gen else stage_name)
    return execute(STAGES[stage_name], config_of(spec), gen)


@task(name="stage-command", task_run_name=_stage_name, cache_key_fn=_stage_key, **_STAGE_TASK)
def command_task(spec: dict[str, Any], stage_name: str, gen: str, run_id: str | None = None) -> dict:
    """A model stage as its own `nst` process (under torchrun for multi-process training)."""
    from nst.tracking import RUN_ENV

    _begin(f"{gen}/{stage_name}")
    stage, cfg = STAGES[stage_name], config_of(spec)
    argv = stage_argv(stage, gen, spec["params_path"], spec["overrides"])
    env = {RUN_ENV: run_id} if run_id else None
    if multi_node(stage, cfg):  # one torchrun agent per Dask worker (machine)
        from flows.runners import launch_nodes

        try:
            launch_nodes(cfg, argv, stage.task_name(gen), _child_env(spec, env))
        except ChildFailed as e:
            raise _failed(stage.task_name(gen), e) from None
        return (read_stamp(stage, cfg, gen) or {}).get("result", {})
    if n := needs_torchrun(stage, cfg):
        argv = torchrun_argv(n, argv)
    _launch(argv, stage.task_name(gen), spec, env)
    return (read_stamp(stage, cfg, gen) or {}).get("result", {})


def _group_name() -> str:
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"{p['gen']}/label-shards-{p['shards'][0]}-{p['shards'][-1]}"


@task(name="label-shards", task_run_name=_group_name, cache_key_fn=_group_key, **_STAGE_TASK)
def label_group_task(spec: dict[str, Any], gen: str, shards: list[int], gpu: str | None = None) -> dict:
    _begin(f"{gen}/label-shards-{shards[0]}-{shards[-1]}")
    argv = stage_argv(LABEL, gen, spec["params_path"], spec["overrides"], ["--shards", ",".join(map(str, shards))])
    _launch(argv, f"{gen}/label shards {shards[0]}-{shards[-1]}", spec, {"CUDA_VISIBLE_DEVICES": gpu} if gpu else None)
    return {"shards": shards}


@task(name="label-finish", task_run_name="{gen}/label", cache_key_fn=_stage_key, **_STAGE_TASK)
def label_finish_task(spec: dict[str, Any], stage_name: str, gen: str) -> dict:
    _begin(f"{gen}/label")
    return execute(LABEL, config_of(spec), gen, step=finish_labels)


# Tracking never raises (failures are reported and counted by nst.tracking), so these tasks have no retries.
_TRACK_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=0)


@task(name="mlflow-start", **_TRACK_TASK)
def start_tracking_task(spec: dict[str, Any], flow_run_id: str) -> str | None:
    from nst import tracking

    return tracking.start_pipeline(config_of(spec), flow_run_id=flow_run_id, parent_run_id=spec.get("parent_run_id"),
                                   tags=spec.get("tags"))


@task(name="mlflow-open", task_run_name="{gen}/mlflow-open", **_TRACK_TASK)
def open_run_task(spec: dict[str, Any], gen: str, parent: str | None, teacher_run: str | None) -> str | None:
    from nst import tracking

    return tracking.open_generation(config_of(spec), gen, parent, teacher_run)


@task(name="mlflow-log", task_run_name="{gen}/mlflow-log", **_TRACK_TASK)
def finish_run_task(spec: dict[str, Any], gen: str, run_id: str | None) -> str | None:
    from nst import tracking

    _begin(f"{gen}/mlflow-log")
    return tracking.finish_generation(config_of(spec), gen, run_id)


@task(name="mlflow-finish", task_run_name="mlflow-finish-{status}", **_TRACK_TASK)
def finish_tracking_task(spec: dict[str, Any], run_id: str | None, status: str) -> None:
    from nst import tracking

    tracking.finish_pipeline(config_of(spec), run_id, status)


@task(name="dvc-record", task_run_name="dvc-record", cache_policy=NO_CACHE, persist_result=False, retries=0)
def record_outputs_task(spec: dict[str, Any]) -> None:
    """Fails the flow when DVC cannot record the outputs, as `nst run --no-prefect` fails."""
    from nst.dvc import record_outputs

    _begin("dvc-record")
    record_outputs(config_of(spec))


# ---- running the steps ------------------------------------------------------------------------------------------

def _stage(t, cfg: Config, stage: Stage, gen: str):
    """The task with this project's result storage; refreshed when the stage's outputs are gone, so a cached
    result never stands in for deleted files. Called through the task runner (submit), so that with Dask a
    generation's stages run on the cluster's workers, not in the flow's process."""
    refresh = {"refresh_cache": True} if not outputs_exist(stage, cfg, gen) else {}
    task_ = t.with_options(result_storage=cfg.out_dir / RESULTS_DIR, **refresh)
    return lambda *args: task_.submit(*args).result()


def _label(spec: dict[str, Any], cfg: Config, gen: str) -> None:
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    from tasks.shards import shard_path

    n = num_shards(cfg)
    k = max(1, min(n, max_workers()))
    groups = [list(range(n * i // k, n * (i + 1) // k)) for i in range(k)]  # contiguous: one child each
    ngpu = 0 if runner_kind() == "dask" else visible_gpus(cfg.device)  # Dask workers pin their own
    progress = create_progress_artifact(0.0, key=f"{gen}-label-progress",
                                        description=f"{gen}: label shards finished, of {n}")
    futures = {}
    for i, group in enumerate(groups):
        done = all(shard_path(cfg, gen, s, n).is_file() for s in group)
        t = _on_gpu(label_group_task, spec, result_storage=cfg.out_dir / RESULTS_DIR,
                    **({} if done else {"refresh_cache": True}))
        f = t.submit(spec, gen, group, str(i % ngpu) if ngpu > 1 else None)
        futures[f.task_run_id] = (f, group)
    failed, finished = [], 0
    for fut in as_completed([f for f, _ in futures.values()]):
        group = futures[fut.task_run_id][1]
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001 - collected, then raised together
            failed.append((group, e))
        finished += len(group)
        update_progress_artifact(progress, 100.0 * finished / n)
    if failed:
        bad = sorted({int(s) for _, e in failed for s in re.findall(r"label shard (\d+):", str(e))})
        names = ", ".join(f"{gen}/label-shard-{s}" for s in bad) or ", ".join(f"shards {g[0]}-{g[-1]}" for g, _ in failed)
        raise ShardFailure(f"{len(bad) or len(failed)} label shard(s) failed: {names} ({failed[0][1]})")
    _stage(label_finish_task, cfg, LABEL, gen)(spec, LABEL.name, gen)


def _on_gpu(task_fn, spec: dict[str, Any], **options):
    """A task that runs a model (training, evaluation, a label shard group): tagged `gpu` when the flow found a `gpu`
    limit at its start (spec["gpu_tags"], see gpu_tags), so that limit caps exactly these."""
    return task_fn.with_options(tags=spec["gpu_tags"], **options)


def _publish(cfg: Config, gen: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    from nst.report import summary_markdown

    create_markdown_artifact(markdown=summary_markdown(cfg, gen), key=f"{gen}-summary",
                             description=f"Noisy Student {gen}: test accuracy and pseudo-labels")


def _run_steps(spec: dict[str, Any], cfg: Config, todo: list, parent: str | None, runs: dict[str, str | None]) -> None:
    for step in todo:
        stage, gen = step.stage, step.gen
        if stage is None:
            if cfg.tracking.enabled:
                finish_run_task(spec, gen, runs.get(gen))
        elif stage is LABEL:
            _label(spec, cfg, gen)
        elif stage.model:
            if stage in TRAINING and cfg.tracking.enabled:
                runs[gen] = open_run_task(spec, gen, parent, runs.get(cfg.made_from(gen)))  # None for g0
            run_id = runs.get(gen) if stage in TRAINING else None
            _stage(_on_gpu(command_task, spec), cfg, stage, gen)(spec, stage.name, gen, run_id)
            if stage.name == "evaluate":
                _publish(cfg, gen)
        else:
            _stage(stage_task, cfg, stage, gen)(spec, stage.name, gen)


@flow(name="noisy-student-generation", flow_run_name="{gen}/generation", validate_parameters=False)
def generation(spec: dict[str, Any], gen: str, parent: str | None, runs: dict[str, str | None]) -> str | None:
    """One model: (students: filter + balance the teacher's labels,) train, evaluate, label, track - on the task
    runner from the environment (threads, or a Dask cluster)."""
    cfg = config_of(spec)
    runs = dict(runs)
    _run_steps(spec, cfg, [s for s in steps(cfg) if s.gen == gen], parent, runs)
    get_run_logger().info("%s: finished", gen)
    return runs.get(gen)


@flow(name="noisy-student", log_prints=True)
def noisy_student(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                  parent_run_id: str | None = None, tags: dict[str, str] | None = None) -> list[dict]:
    """Noisy Student Training (Xie et al., CVPR 2020): teacher, then one subflow per student generation.

    Args:
        params_path: the project's params.yaml (relative to the working directory); paths inside it are relative
            to its folder.
        overrides: dotted keys over params.yaml, e.g. {"generations.0.student.epochs": 5}.
        parent_run_id: an MLflow run to nest this pipeline's run under (a study).
        tags: extra MLflow tags for the pipeline run (a study's arm and seed).
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from nst.report import markdown_table, write_summary

    from nst import warm

    warm.start()  # the stage commands' imports, once, in the background (nst.warm)
    logger = get_run_logger()
    cfg = load_config(params_path, overrides)  # invalid params fail the flow here, with the one-line ConfigError
    if runner_kind() != "dask":  # with Dask, stages run on other machines
        check_device(cfg, params_path)
    check_sources(cfg, params_path)
    check_nodes(cfg, dask=runner_kind() == "dask")
    all_steps = steps(cfg)
    with run_lock(cfg.out_dir) as token:
        spec = {"params_path": str(Path(params_path).resolve()), "overrides": overrides or {},
                "parent_run_id": parent_run_id, "tags": tags or {}, "run_token": token, "gpu_tags": gpu_tags()}
        logger.info("params %s -> outputs %s (%d generations)", spec["params_path"], cfg.out_dir, len(cfg.generations))
        parent = start_tracking_task(spec, str(flow_run.id)) if cfg.tracking.enabled else None
        runs: dict[str, str | None] = {}
        try:
            _run_steps(spec, cfg, [s for s in all_steps if s.gen == ""], parent, runs)  # data, prepare
            for gen in dict.fromkeys(s.gen for s in all_steps if s.gen):  # the models, in the pipeline's order
                runs[gen] = generation.with_options(task_runner=task_runner_from_env())(spec, gen, parent, runs)
            rows, _ = write_summary(cfg)
            create_markdown_artifact(markdown=markdown_table(rows), key="generation-table",
                                     description="Noisy Student: one row per generation")
            record_outputs_task(spec)
        except BaseException as e:
            if cfg.tracking.enabled:
                finish_tracking_task(spec, parent, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        if cfg.tracking.enabled:
            finish_tracking_task(spec, parent, "FINISHED")
        return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the noisy-student flow once (ephemeral Prefect unless "
                                             "PREFECT_API_URL is set).")
    ap.add_argument("params_path", nargs="?", default="params.yaml")
    ap.add_argument("--overrides", default=None, help="JSON object of dotted keys")
    a = ap.parse_args()
    noisy_student(a.params_path, json.loads(a.overrides) if a.overrides else None)
