"""The Prefect 3 flow `noisy-student`: the pipeline of `nst.pipeline.run_direct`, orchestrated.

    prepare -> g0/train-teacher -> g0/evaluate -> for each generation, a subflow `gN/generation`:
        gN/pseudo-label-shard-K (mapped over shards) -> gN/filter-balance (reduces them) -> gN/train-student -> gN/evaluate

Every task calls the one stage function in `tasks/` (no stage logic here) and takes only the validated params
(a JSON dict), strings and ints, so inputs hash and pickle. What this module adds is orchestration:

* Resume, not recompute. Task results are persisted (JSON) under `<out_dir>/.prefect-results` and cached on
  CONTENT: the cache key of a task is a hash of (its input files' content, the config sections it reads, the
  source code of its stage module and every project module that imports transitively, the output folder) and
  never of the flow-run id. A rerun after a crash or `kill -9` finds every finished stage and shard cached; a
  task whose outputs were deleted is re-run (`refresh_cache`), and an interrupted training run resumes from
  its last finished epoch (`train_state.pt`, handled by the stage itself).
* Sharded labelling on a configurable task runner: `NST_TASK_RUNNER=thread|process|dask` and `NST_MAX_WORKERS=N`
  (read when a generation starts). Every shard future is resolved; failed shards fail the flow, named.
  On a cluster, `NST_TASK_RUNNER=dask NST_DASK_ADDRESS=tcp://scheduler:8786` sends each shard to a Dask worker
  (one per GPU; the workers run this image and must see `out_dir` on a shared filesystem, since stages
  exchange files), and the task tag `gpu` caps model work across all flow runs:
  `prefect concurrency-limit create gpu <number of GPUs>`.
* Observability: `gN-summary` markdown artifacts (model, test top-1, change vs teacher, pseudo-labels kept /
  dropped / duplicated per class), a `gN-pseudo-label-progress` progress artifact, a `generation-table`
  artifact, and the `nst` loggers' messages in the run logs.
* MLflow (`nst.tracking`) and DVC (`nst.dvc`) hooks as tasks with retries and exponential backoff.
* `NST_EXECUTION_LOG=<file>`: every task body appends its run name to that file when it really executes
  (not when cached) -- a cheap counter for resume tests and debugging; off by default.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Child processes (process task runner, flow-run subprocesses) configure Prefect logging from the environment.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nst")

from prefect import flow, get_run_logger, task, unmapped  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.context import FlowRunContext, TaskRunContext  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.logging.handlers import APILogHandler  # noqa: E402
from prefect.tasks import exponential_backoff  # noqa: E402

import tasks as stages  # noqa: E402
from nst.config import Config, config_from_dict, load_config  # noqa: E402
from nst.io import file_sha256, run_lock, text_sha256  # noqa: E402
from tasks.prepare import fingerprint as prepare_fingerprint  # noqa: E402

RESULTS_DIR = ".prefect-results"
CODE_PACKAGES = ("nst", "tasks", "models")
GPU_TAG = "gpu"  # tasks that run a model: cap them across flow runs with `prefect concurrency-limit create gpu N`


if __name__ not in ("flows.noisy_student", "__main__"):
    # Loaded from a file path (a deployment's entrypoint): the module name (`noisy_student`) is not importable in
    # the spawned children of the process task runner, so its tasks must be pickled by value.
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ShardFailure(RuntimeError):
    """One or more pseudo-label shards failed; the message names them."""


# ---- params: the validated config, as plain JSON ------------------------------------------------------------------

def params_of(cfg: Config) -> dict[str, Any]:
    """The validated config as a JSON dict (absolute paths) plus the project root: what every task receives."""
    return {"root": str(cfg.root), "config": cfg.model_dump(mode="json")}


def config_of(params: dict[str, Any]) -> Config:
    cfg = config_from_dict(params["config"], base=Path(params["root"]), check_models=False)
    if cfg.threads:
        import torch

        if torch.get_num_threads() != cfg.threads:
            torch.set_num_threads(cfg.threads)
    return cfg


# ---- content-based cache keys ---------------------------------------------------------------------------------

def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def _project_imports(name: str, path: Path) -> set[str]:
    """Project modules (nst, tasks, models) that `name` imports anywhere in its source, function bodies included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    out = set()
    for mod in found:
        parts = mod.split(".")
        if parts[0] in CODE_PACKAGES:
            out.update(".".join(parts[: i + 1]) for i in range(len(parts)))  # parents' __init__ run too
    return out


@functools.cache
def code_version(module: str) -> str:
    """sha256 over the source of `module` and every project module it imports, transitively.

    Editing a stage (or the engine code it uses) invalidates that stage's cache; editing the CLI or the report
    does not. Third-party versions (torch, timm) are not part of it.
    """
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        todo.extend(_project_imports(name, path) - seen.keys())
    h = hashlib.sha256()
    for name in sorted(seen):
        h.update(f"{name}\0{file_sha256(seen[name])}\n".encode())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=4096)
def _content_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    return file_sha256(path)


def content_hash(path: Path | None) -> str:
    """sha256 of a file's content (memoised per path + stat, so shards sharing a teacher hash it once)."""
    if path is None:
        return "none"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"missing:{path}"
    return _content_hash(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def _data(cfg: Config, name: str) -> Path:
    return cfg.out_dir / "data" / name


def _key_parts(stage: str, cfg: Config, inputs: dict[str, Any]) -> tuple[str, list[str]]:
    """(readable prefix, key material) of one task call; material = inputs' content + config + code."""
    d = cfg.data.model_dump_json()
    common = [str(cfg.out_dir), str(cfg.root), d, str(cfg.seed)]
    if stage == "prepare":
        return "prepare", common + [prepare_fingerprint(cfg)]
    if stage == "train-teacher":
        return "g0-train-teacher", common + [cfg.teacher.model_dump_json()] + [
            content_hash(_data(cfg, f)) for f in ("labeled.parquet", "val.parquet", "classes.json")]
    gen = inputs["gen"]
    if stage == "evaluate":
        mdir = cfg.model_dir(gen)
        parts = [cfg.evaluate.model_dump_json(), cfg.train_config(gen).model_dump_json(),
                 content_hash(mdir / "model.safetensors"), content_hash(mdir / "model.json"),
                 content_hash(_data(cfg, "test.parquet"))]
        if cfg.evaluate.enabled and gen != "g0":  # mCE is normalised by the teacher's corruption errors
            parts.append(content_hash(cfg.gen_dir("g0") / "eval" / "corruption_errors.json"))
        return f"{gen}-evaluate", common + parts
    g = cfg.generation(gen)
    if stage == "pseudo-label-shard":
        tdir = cfg.model_dir(g.teacher)
        return f"{gen}-pseudo-label-shard-{inputs['shard']}", common + [
            g.teacher, cfg.pseudo_label.model_dump_json(), cfg.train_config(g.teacher).model_dump_json(),
            str(inputs["shard"]), str(stages.num_shards(cfg)), content_hash(tdir / "model.safetensors"),
            content_hash(tdir / "model.json"), content_hash(_data(cfg, "unlabeled.parquet"))]
    if stage == "filter-balance":
        from tasks.pseudo_label import shard_path

        n = stages.num_shards(cfg)
        return f"{gen}-filter-balance", common + [cfg.filter.model_dump_json(), g.model_dump_json()] + [
            content_hash(shard_path(cfg, gen, s, n)) for s in range(n)] + [content_hash(_data(cfg, "classes.json"))]
    if stage == "train-student":
        parts = [g.model_dump_json(), cfg.pseudo_label.mode,
                 content_hash(cfg.gen_dir(gen) / "balanced" / "balanced.parquet")] + [
            content_hash(_data(cfg, f)) for f in ("labeled.parquet", "val.parquet", "classes.json")]
        if g.init == "teacher":
            parts.append(content_hash(cfg.model_dir(g.teacher) / "model.safetensors"))
        return f"{gen}-train-student", common + parts
    raise ValueError(f"no cache key for stage {stage!r}")


STAGE_MODULES = {"prepare": "tasks.prepare", "train-teacher": "tasks.train", "evaluate": "tasks.evaluate",
                 "pseudo-label-shard": "tasks.pseudo_label", "filter-balance": "tasks.filter_balance",
                 "train-student": "tasks.train"}


def cache_key(stage: str) -> Callable[[TaskRunContext, dict[str, Any]], str]:
    """Prefect `cache_key_fn` for a stage: `<gen>-<stage>-<sha256 of inputs + config + code>` (no run ids)."""

    def key_fn(context: TaskRunContext, inputs: dict[str, Any]) -> str:
        cfg = config_of(inputs["params"])
        prefix, material = _key_parts(stage, cfg, inputs)
        material.append(code_version(STAGE_MODULES[stage]))
        return f"{prefix}-{text_sha256(chr(30).join(material))[:32]}"

    key_fn.__name__ = f"cache_key_{stage.replace('-', '_')}"
    return key_fn


def outputs_exist(stage: str, cfg: Config, gen: str = "g0", shard: int | None = None) -> bool:
    """The stage's completion marker: without it a cached result would point at deleted files, so the task is
    re-run (`refresh_cache`); the stage function then redoes only what is missing."""
    from nst.checkpoint import is_complete

    if stage == "prepare":
        return (_data(cfg, "prepare.json")).is_file()
    if stage in ("train-teacher", "train-student"):
        return is_complete(cfg.model_dir(gen))
    if stage == "evaluate":
        return (cfg.gen_dir(gen) / "eval" / "metrics.json").is_file()
    if stage == "pseudo-label-shard":
        from tasks.pseudo_label import shard_path

        return shard_path(cfg, gen, shard, stages.num_shards(cfg)).is_file()
    if stage == "filter-balance":
        b = cfg.gen_dir(gen) / "balanced"
        return (b / "balanced.parquet").is_file() and (b / "stats.json").is_file()
    raise ValueError(stage)


def _stage(t, cfg: Config, stage: str, gen: str = "g0", shard: int | None = None):
    """The task with this project's result storage, refreshed when its outputs are gone."""
    return _with_storage(t, cfg, refresh=not outputs_exist(stage, cfg, gen, shard))


def _with_storage(t, cfg: Config, refresh: bool):
    # refresh only when needed: left unset, PREFECT_TASKS_REFRESH_CACHE=true still forces a recompute
    opts = {"refresh_cache": True} if refresh else {}
    return t.with_options(result_storage=cfg.out_dir / RESULTS_DIR, **opts)


# ---- logging and the execution counter ----------------------------------------------------------------------------

class _RunLogHandler(APILogHandler):
    """Prefect's API log handler for the `nst` loggers, silent outside a flow/task run (e.g. `run_direct`)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


def connect_nst_logging() -> None:
    """Send the `nst` loggers' INFO messages to the run's logs (what PREFECT_LOGGING_EXTRA_LOGGERS=nst does when
    set before Prefect starts; this also covers processes where it was not). Idempotent."""
    lg = logging.getLogger("nst")
    if lg.level == logging.NOTSET:  # else Prefect's root level (WARNING) would drop the stages' INFO messages
        lg.setLevel(logging.INFO)
    if not any(isinstance(h, APILogHandler) for h in lg.handlers):
        lg.addHandler(_RunLogHandler())


def _begin(name: str) -> None:
    """First line of every task body: logging, and one line in $NST_EXECUTION_LOG (one O_APPEND write)."""
    connect_nst_logging()
    path = os.environ.get("NST_EXECUTION_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            os.close(fd)


# ---- tasks: each one calls one stage function ---------------------------------------------------------------------

_STAGE_TASK = dict(persist_result=True, result_serializer="json", retries=0)


@task(name="prepare", task_run_name="prepare", cache_key_fn=cache_key("prepare"), **_STAGE_TASK)
def prepare_task(params: dict[str, Any]) -> dict:
    _begin("prepare")
    return stages.prepare(config_of(params))


@task(name="train-teacher", task_run_name="g0/train-teacher", cache_key_fn=cache_key("train-teacher"),
      tags=[GPU_TAG], **_STAGE_TASK)
def train_teacher_task(params: dict[str, Any]) -> dict:
    _begin("g0/train-teacher")
    return stages.train_teacher(config_of(params))


@task(name="evaluate", task_run_name="{gen}/evaluate", cache_key_fn=cache_key("evaluate"), tags=[GPU_TAG],
      **_STAGE_TASK)
def evaluate_task(params: dict[str, Any], gen: str) -> dict:
    _begin(f"{gen}/evaluate")
    return stages.evaluate(config_of(params), gen)


@task(name="pseudo-label-shard", task_run_name="{gen}/pseudo-label-shard-{shard}",
      cache_key_fn=cache_key("pseudo-label-shard"), tags=[GPU_TAG], **_STAGE_TASK)
def pseudo_label_shard_task(params: dict[str, Any], gen: str, shard: int) -> dict:
    _begin(f"{gen}/pseudo-label-shard-{shard}")
    return stages.pseudo_label_shard(config_of(params), gen, shard)


@task(name="filter-balance", task_run_name="{gen}/filter-balance", cache_key_fn=cache_key("filter-balance"),
      **_STAGE_TASK)
def filter_balance_task(params: dict[str, Any], gen: str, shards: list[str]) -> dict:
    """Reduces the shards: `shards` (the mapped results' paths) makes the data dependency explicit; the labelling's
    finishing step (stale shards, effective config) runs here, once every shard exists."""
    _begin(f"{gen}/filter-balance")
    cfg = config_of(params)
    stages.finish_pseudo_label(cfg, gen)
    return stages.filter_balance(cfg, gen)


@task(name="train-student", task_run_name="{gen}/train-student", cache_key_fn=cache_key("train-student"),
      tags=[GPU_TAG], **_STAGE_TASK)
def train_student_task(params: dict[str, Any], gen: str) -> dict:
    _begin(f"{gen}/train-student")
    return stages.train_student(config_of(params), gen)


# Remote side effects (MLflow server, S3 artifacts, DVC): retried with exponential backoff + jitter, never cached.
_REMOTE_TASK = dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
                    cache_policy=NO_CACHE, persist_result=False)


@task(name="mlflow-start", task_run_name="mlflow-start", **_REMOTE_TASK)
def start_tracking_task(params: dict[str, Any], flow_run_id: str | None) -> str | None:
    _begin("mlflow-start")
    from nst import tracking

    return tracking.start_pipeline(config_of(params), flow_run_id=flow_run_id)


@task(name="mlflow-log-generation", task_run_name="{gen}/mlflow-log", **_REMOTE_TASK)
def track_generation_task(params: dict[str, Any], gen: str, parent_run_id: str | None,
                          teacher_run_id: str | None) -> str | None:
    _begin(f"{gen}/mlflow-log")
    from nst import tracking

    return tracking.track_generation(config_of(params), gen, parent_run_id=parent_run_id,
                                     teacher_run_id=teacher_run_id)


@task(name="mlflow-finish", task_run_name="mlflow-finish-{status}", **_REMOTE_TASK)
def finish_tracking_task(params: dict[str, Any], parent_run_id: str | None, status: str = "FINISHED") -> None:
    _begin(f"mlflow-finish-{status}")
    from nst import tracking

    tracking.finish_pipeline(config_of(params), parent_run_id, status=status)


@task(name="dvc-record", task_run_name="dvc-record", **_REMOTE_TASK)
def record_outputs_task(params: dict[str, Any]) -> None:
    _begin("dvc-record")
    from nst import dvc

    dvc.record_outputs(config_of(params))


# ---- artifacts -------------------------------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def summary_markdown(cfg: Config, gen: str) -> str:
    """One generation's card: model, test top-1, change vs its teacher, and the pseudo-labels per class."""
    from nst.io import read_json
    from nst.report import generation_rows

    row = next((r for r in generation_rows(cfg) if r["generation"] == gen), None)
    if row is None:
        return f"### {gen}\n\nno evaluated model yet\n"
    teacher = "-" if gen == "g0" else cfg.generation(gen).teacher
    delta = row["delta_vs_teacher"]
    lines = [f"### {gen}: {row['role']} `{row['model']}` ({row['params']:,} parameters)", "",
             "| test top-1 | change vs teacher | teacher | test ECE |", "|---|---|---|---|",
             f"| {_pct(row['test_top1'])} | {'-' if delta is None else f'{100 * delta:+.1f} pt'} | {teacher} "
             f"| {row['test_ece']:.3f} |"]
    stats_f = cfg.gen_dir(gen) / "balanced" / "stats.json"
    if stats_f.is_file():
        s = read_json(stats_f)
        lines += ["", f"Pseudo-labels: {s['total']} labelled, {s['dropped']} dropped below {s['threshold']:g}, "
                      f"{s['capped']} capped, {s['duplicated']} duplicated -> {s['final']} "
                      f"(K = {s['target_per_class']} per class)"]
        if "pseudo_label_acc_kept" in s:
            lines[-1] += f"; accuracy of kept pseudo-labels {_pct(s['pseudo_label_acc_kept'])}"
        lines += ["", "| class | predicted | dropped | kept | capped | duplicated | final |", "|---|---|---|---|---|---|---|"]
        for c, v in s["per_class"].items():
            lines.append(f"| {c} | {v['predicted']} | {v['below_threshold']} | {v['unique']} | {v['capped']} "
                         f"| {v['duplicated']} | {v['final']} |")
    return "\n".join(lines) + "\n"


def publish_summary(cfg: Config, gen: str) -> None:
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=summary_markdown(cfg, gen), key=f"{gen}-summary",
                             description=f"Noisy Student {gen}: test accuracy and pseudo-labels")


# ---- task runner ------------------------------------------------------------------------------------------------------

def _share_ephemeral_server() -> None:
    """Spawned task processes inherit the environment: without an API URL each would start its own temporary
    server (~10 s each). In ephemeral mode, point them at this process's."""
    from prefect.settings import get_current_settings

    if os.environ.get("PREFECT_API_URL") or get_current_settings().api.url:
        return
    from prefect.client.orchestration import get_client

    url = str(get_client(sync_client=True).api_url)
    if url.startswith("http"):
        os.environ["PREFECT_API_URL"] = url


def task_runner_from_env():
    """`NST_TASK_RUNNER=thread` (default), `process` or `dask` (prefect-dask; `NST_DASK_ADDRESS=tcp://host:8786`
    for an existing cluster), with `NST_MAX_WORKERS` workers (default: CPU count, at most 4)."""
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    kind = os.environ.get("NST_TASK_RUNNER", "thread").strip().lower()
    workers = int(os.environ.get("NST_MAX_WORKERS") or min(4, os.cpu_count() or 1))
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        _share_ephemeral_server()
        return ProcessPoolTaskRunner(max_workers=workers)
    if kind == "dask":  # a Dask cluster, e.g. one GPU worker per node: every worker must see out_dir (shared FS)
        address = os.environ.get("NST_DASK_ADDRESS")
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise ValueError("NST_TASK_RUNNER=dask needs prefect-dask (pip install -c constraints.txt prefect-dask)") from None
        return DaskTaskRunner(address=address) if address else DaskTaskRunner(cluster_kwargs={"n_workers": workers})
    raise ValueError(f"NST_TASK_RUNNER={kind!r}: expected 'thread', 'process' or 'dask'")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


# ---- flows ------------------------------------------------------------------------------------------------------------

@flow(name="noisy-student-generation", flow_run_name="{gen}/generation", validate_parameters=False)
def generation(params: dict[str, Any], gen: str) -> dict:
    """One generation: label every shard (mapped), filter + balance (reduce), train the noised student, evaluate."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    connect_nst_logging()
    cfg = config_of(params)
    n = stages.num_shards(cfg)
    progress = create_progress_artifact(0.0, key=f"{gen}-pseudo-label-progress",
                                        description=f"{gen}: pseudo-label shards finished, of {n}")
    # One .map per refresh setting: shards whose files exist may come from the cache, missing ones are recomputed.
    done = [s for s in range(n) if outputs_exist("pseudo-label-shard", cfg, gen, s)]
    todo = [s for s in range(n) if s not in done]
    futures, shard_of = [], {}
    for group, refresh in ((done, False), (todo, True)):
        if not group:
            continue
        fs = _with_storage(pseudo_label_shard_task, cfg, refresh).map(unmapped(params), unmapped(gen), group)
        futures += list(fs)
        shard_of.update({f.task_run_id: s for f, s in zip(fs, group)})
    logger.info("%s: labelling %d shards (%d with outputs on disk)", gen, n, len(done))

    results: dict[int, dict] = {}
    failed: list[tuple[int, BaseException]] = []
    for i, fut in enumerate(as_completed(futures), 1):  # resolve EVERY future, failed ones included
        s = shard_of[fut.task_run_id]
        try:
            results[s] = fut.result()
        except Exception as e:  # noqa: BLE001 - collected, then raised together
            failed.append((s, e))
        update_progress_artifact(progress, 100.0 * i / n)
    if failed:
        failed.sort(key=lambda x: x[0])
        names = ", ".join(f"{gen}/pseudo-label-shard-{s}" for s, _ in failed)
        s0, e0 = failed[0]
        raise ShardFailure(f"{len(failed)} of {n} pseudo-label shards failed: {names} "
                           f"(shard {s0}: {type(e0).__name__}: {_first_line(e0)})") from e0

    shard_paths = [results[s]["path"] for s in range(n)]
    _stage(filter_balance_task, cfg, "filter-balance", gen)(params, gen, shard_paths)
    _stage(train_student_task, cfg, "train-student", gen)(params, gen)
    ev = _stage(evaluate_task, cfg, "evaluate", gen)(params, gen)
    publish_summary(cfg, gen)
    logger.info("%s: test top-1 %.4f", gen, ev["metrics"]["test/top1"])
    return ev


@flow(name="noisy-student", log_prints=True)
def noisy_student(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None) -> list[dict]:
    """Noisy Student Training (Xie et al., CVPR 2020): teacher, then one subflow per student generation.

    Args:
        params_path: the project's params.yaml (relative to the working directory); paths inside it are relative
            to its folder.
        overrides: dotted keys over params.yaml, e.g. {"generations.0.student.epochs": 5}.
    """
    from prefect.artifacts import create_markdown_artifact
    from prefect.runtime import flow_run

    from nst.cli import ensure_builtin_data
    from nst.report import markdown_table, write_summary

    logger = get_run_logger()
    connect_nst_logging()
    cfg = load_config(params_path, overrides)  # invalid params fail the flow here, with the one-line ConfigError
    ensure_builtin_data(cfg)
    params = params_of(cfg)
    logger.info("params %s -> outputs %s (%d generations)", Path(params_path).resolve(), cfg.out_dir,
                len(cfg.generations))

    with run_lock(cfg.out_dir):
        tracking = cfg.tracking.enabled
        parent_run = start_tracking_task(params, str(flow_run.id)) if tracking else None
        try:
            _stage(prepare_task, cfg, "prepare")(params)
            _stage(train_teacher_task, cfg, "train-teacher")(params)
            _stage(evaluate_task, cfg, "evaluate", "g0")(params, "g0")
            publish_summary(cfg, "g0")
            teacher_run = track_generation_task(params, "g0", parent_run, None) if tracking else None
            for g in cfg.generations:
                generation.with_options(task_runner=task_runner_from_env())(params, g.name)
                if tracking:
                    teacher_run = track_generation_task(params, g.name, parent_run, teacher_run)
            rows, _ = write_summary(cfg)
            create_markdown_artifact(markdown=markdown_table(rows), key="generation-table",
                                     description="Noisy Student: one row per generation")
            record_outputs_task(params)
        except BaseException as e:
            if tracking:
                try:
                    finish_tracking_task(params, parent_run, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
                except Exception:  # noqa: BLE001 - never hide the original error
                    logger.exception("could not mark the MLflow run as failed")
            raise
        if tracking:
            finish_tracking_task(params, parent_run, "FINISHED")
        return rows


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="Run the noisy-student flow once (ephemeral Prefect unless "
                                             "PREFECT_API_URL is set).")
    ap.add_argument("params_path", nargs="?", default="params.yaml")
    ap.add_argument("--overrides", default=None, help="JSON object of dotted keys")
    a = ap.parse_args()
    noisy_student(a.params_path, json.loads(a.overrides) if a.overrides else None)
