"""MLflow tracking: a parent run per pipeline run, a child run per generation, one registered model.

It reads what the stages wrote and never computes (no model runs here but to hand it to `log_model`). A child run
is opened just before its model trains; the training process logs each epoch to it live (`epoch_logger`); then
`finish_generation` completes the same run from the files (docs/mlflow.md has the keys). Where:
`tracking.tracking_uri` > `$MLFLOW_TRACKING_URI` > `sqlite:///<out_dir>/mlflow.db`. An outage never fails
training: MLflow's own HTTP retries (bounded) are the only retry layer; a failure is a warning and an entry in
`<out_dir>/tracking_errors.json`, the run ends "tracking incomplete", and `nst track` logs the outputs later.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import re
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from nst.config import FT, Config, config_hash, model_order, portable_dump
from nst.errors import StageError
from nst.io import atomic_write_json, read_json
from nst.secrets import move_tracking_credentials, redact

log = logging.getLogger("nst.tracking")

RUN_ENV = "NST_MLFLOW_RUN_ID"  # the child run a training process logs its epochs to
ERRORS_FILE = "tracking_errors.json"
EPOCH_KEYS = {"train_loss": "train/loss", "train_loss_labeled": "train/loss_labeled",
              "train_loss_unlabeled": "train/loss_unlabeled", "train_acc": "train/acc", "lr": "train/lr",
              "val_loss": "val/loss", "val_acc": "val/acc"}
LABELER_KEYS = ("total", "dropped", "kept", "capped", "duplicated", "final", "target_per_class", "kept_fraction",
                "mean_confidence_all", "pseudo_label_acc_all", "pseudo_label_acc_kept")
_LOCK = threading.RLock()


def tracking_uri(cfg: Config) -> str:
    uri = move_tracking_credentials(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    return uri or f"sqlite:///{(cfg.out_dir / 'mlflow.db').resolve()}"


def _client(cfg: Config, *, read_only: bool = False):
    """`read_only` (for commands that only read the store): a local store that does not exist is an error naming
    it, rather than an empty one created there (with its folder)."""
    from mlflow import MlflowClient

    # MLflow's HTTP retries are the one retry layer; its defaults (7 retries, 120 s timeout) would stall a run on a
    # dead server for many minutes, so bound them unless the user chose otherwise.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if read_only and not db.is_file():
            raise StageError(f"{db}: no MLflow store there, nothing has been tracked (check out_dir or "
                             "tracking.tracking_uri)")
        db.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _report(cfg: Config, operation: str, err: BaseException, **context: Any) -> None:
    msg = redact(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")[:500]
    log.warning("tracking: %s failed: %s. Outputs are unaffected; `nst track` logs them later.", operation, msg)
    path = cfg.out_dir / ERRORS_FILE
    with _LOCK:
        with contextlib.suppress(OSError, ValueError):
            entries = read_json(path) if path.is_file() else []
            entries.append({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "operation": operation, "error": msg,
                            "tracking_uri": redact(tracking_uri(cfg))} | {k: v for k, v in context.items() if v})
            atomic_write_json(path, entries)


def tracking_errors(cfg: Config) -> list[dict]:
    path = cfg.out_dir / ERRORS_FILE
    return read_json(path) if path.is_file() else []


def _guarded(operation: str):
    """Tracking never raises into the pipeline: a failure is reported (and counted) and the call returns None."""
    def wrap(fn):
        def inner(cfg: Config, *args, **kwargs):
            if not cfg.tracking.enabled:
                return None
            try:
                return fn(cfg, *args, **kwargs)
            except Exception as e:  # noqa: BLE001
                _report(cfg, operation, e, generation=args[0] if args and isinstance(args[0], str) else None)
                return None
        inner.__name__, inner.__doc__ = fn.__name__, fn.__doc__
        return inner
    return wrap


def metric_key(name: str, used: dict[str, str]) -> str:
    """A class name as part of a metric key MLflow accepts everywhere (ASCII letters, digits, `_-. /`); collisions
    get a suffix. `used` maps key -> class name and is logged, so no name is lost."""
    key = re.sub(r"[^A-Za-z0-9_\-. /]", "_", name).strip(" /") or "_"
    key = key.replace("..", "__")
    base, n = key, 2
    while key in used and used[key] != name:
        key, n = f"{base}_{n}", n + 1
    used[key] = name
    return key


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "l": [{"x": 2}]} -> {"a.b": 1, "l.0.x": 2}; lists of scalars stay one JSON value."""
    if isinstance(d, dict):
        return {k: v for key, val in d.items() for k, v in flatten(val, f"{prefix}{key}.").items()}
    if isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        return {k: v for i, val in enumerate(d) for k, v in flatten(val, f"{prefix}{i}.").items()}
    return {prefix[:-1]: json.dumps(d) if isinstance(d, list) else d}


def _params(d: dict) -> list:
    from mlflow.entities import Param

    return [Param(k, ("null" if v is None else str(v))[:6000]) for k, v in sorted(flatten(d).items())]


def _git(root: Path) -> dict[str, str]:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}


def _experiment_id(client, cfg: Config) -> str:
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    uri = tracking_uri(cfg)
    loc = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri() if uri.startswith("sqlite") else None
    try:  # a model-training experiment (MLflow's UI otherwise opens it in its GenAI layout)
        return client.create_experiment(cfg.tracking.experiment, artifact_location=loc,
                                        tags={"mlflow.experimentKind": "custom_model_development"})
    except Exception:  # noqa: BLE001 - created meanwhile by another process
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# ---- the pipeline (parent) run ------------------------------------------------------------------------------

@_guarded("start_pipeline")
def start_pipeline(cfg: Config, *, flow_run_id: str | None = None, parent_run_id: str | None = None,
                   tags: dict[str, str] | None = None) -> str:
    """The parent run of one pipeline run (nested under a study's run when `parent_run_id` is given)."""
    client = _client(cfg)
    dump = portable_dump(cfg)
    t = {"kind": "pipeline", "pipeline_id": uuid.uuid4().hex[:12], "config_hash": config_hash(cfg),
         "dataset": cfg.data.builtin or Path(dump["data"]["labeled"]).name, "generations": str(len(cfg.generations)),
         "mlflow.source.name": "nst", "mlflow.source.type": "LOCAL"} | _git(cfg.root) | (tags or {})
    if flow_run_id:
        t["prefect_flow_run_id"] = str(flow_run_id)
    if parent_run_id:
        t["mlflow.parentRunId"] = parent_run_id
    run_name = (f"{t.get('study', 'study')}-{t['arm']}-seed{t.get('seed', '')}" if "arm" in t  # `--tag arm=...`
                else f"{t['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")
    run = client.create_run(_experiment_id(client, cfg), tags=t, run_name=run_name)
    client.log_batch(run.info.run_id, params=_params({k: v for k, v in dump.items() if k != "generations"}))
    client.log_dict(run.info.run_id, dump, "config/params.json")
    log.info("tracking: pipeline run %s in experiment %r at %s", run.info.run_id, cfg.tracking.experiment,
             redact(tracking_uri(cfg)))
    return run.info.run_id


@_guarded("finish_pipeline")
def finish_pipeline(cfg: Config, run_id: str | None, status: str = "FINISHED") -> None:
    if run_id is None:
        return
    from mlflow.entities import Metric

    from nst.report import generation_rows, markdown_table

    client, rows, now = _client(cfg), generation_rows(cfg), int(time.time() * 1000)
    if rows:
        best = max(rows, key=lambda r: r["test_top1"])
        # One point per model, step = its place in the pipeline (g0 = 0, ...): the run's default charts in MLflow's UI
        # are then accuracy, calibration and kept fraction by generation - the result, at first look. The UI sorts its
        # chart sections by name: "generation" comes before the one-value "summary" bars.
        curve = [Metric(f"generation/{key}", float(r[key]), now, step) for step, r in enumerate(rows)
                 for key in ("test_top1", "test_ece", "kept_fraction") if r.get(key) is not None]
        client.log_batch(run_id, metrics=curve + [
            Metric("summary/best_test_top1", best["test_top1"], now, 0),
            Metric("summary/final_test_top1", rows[-1]["test_top1"], now, 0),
            Metric("summary/final_gain_vs_g0", rows[-1]["test_top1"] - rows[0]["test_top1"], now, 0)])
        client.set_tag(run_id, "best_generation", best["generation"])
        client.log_text(run_id, markdown_table(rows), "summary/summary.md")
        client.log_dict(run_id, rows, "summary/summary.json")
    client.set_terminated(run_id, status)


# ---- one generation (child) run ---------------------------------------------------------------------------

def _train_section(dump: dict, gen: str) -> tuple[dict, dict]:
    """(the model's training section, extra params): a fine-tune's are its base model's and the finetune one."""
    if gen.endswith(FT):
        train, _ = _train_section(dump, gen.removesuffix(FT))
        return train, {"finetune": dump["finetune"], "evaluate": dump["evaluate"]}
    if gen == "g0":
        return dump["teacher"], {}
    g = next(g for g in dump["generations"] if g["name"] == gen)
    return g["student"], {f"generation.{k}": g[k] for k in ("teacher", "ratio", "init", "allow_smaller")}


def _source_tags(cfg: Config, gen: str, run_id: str | None) -> dict[str, str]:
    """The run of the model `gen` learns from: a student's teacher, a fine-tune's base model."""
    if not run_id:
        return {}
    kind = "base" if cfg.role(gen) == "finetune" else "teacher"
    return {f"{kind}_run_id": run_id, f"{kind}_generation": cfg.made_from(gen)}


@_guarded("open_generation")
def open_generation(cfg: Config, gen: str, parent_run_id: str | None, teacher_run_id: str | None = None) -> str | None:
    """The child run of `gen`, RUNNING from now (call it just before the model trains)."""
    if parent_run_id is None:
        return None
    from mlflow.entities import Metric

    client = _client(cfg)
    parent = client.get_run(parent_run_id)
    tc = cfg.train_config(gen)
    tags = {"kind": "generation", "generation": gen, "role": cfg.role(gen), "model": tc.model,
            "mlflow.parentRunId": parent_run_id}
    tags |= {k: v for k, v in parent.data.tags.items() if k in ("pipeline_id", "config_hash", "git_commit",
                                                                "mlflow.source.git.commit", "prefect_flow_run_id",
                                                                "arm", "seed", "study")}
    tags |= _source_tags(cfg, gen, teacher_run_id)
    run = client.create_run(parent.info.experiment_id, tags=tags, run_name=f"{gen}-{tags['role']}")
    dump = portable_dump(cfg)
    train, extra = _train_section(dump, gen)
    params = {"seed": dump["seed"], "generation": gen, "data": dump["data"], "train": train,
              "pseudo_label": dump["pseudo_label"], "filter": dump["filter"], "robustness": dump["robustness"]}
    number, ft = model_order(gen)  # g2-ft sits at 2.5 on the compare view's generation axis
    client.log_batch(run.info.run_id, params=_params(params | extra),
                     metrics=[Metric("generation", number + 0.5 * ft, int(time.time() * 1000), 0)])
    return run.info.run_id


def epoch_logger(cfg: Config, gen: str):
    """In the training process: a callback that sends each epoch's metrics to the open child run ($NST_MLFLOW_RUN_ID)
    from a background thread, so a slow or dead server never slows training; after the first failure it stops
    (`finish_generation` fills in what is missing). None when there is no run to log to."""
    run_id = os.environ.get(RUN_ENV)
    if not (cfg.tracking.enabled and cfg.tracking.live and run_id):
        return None
    from mlflow.entities import Metric

    q: queue.Queue = queue.Queue(maxsize=10_000)

    def worker() -> None:
        client = _client(cfg)
        while (row := q.get()) is not None:
            try:
                now = int(time.time() * 1000)
                client.log_batch(run_id, metrics=[Metric(key, float(row[k]), now, int(row["epoch"]))
                                                  for k, key in EPOCH_KEYS.items() if k in row])
            except Exception as e:  # noqa: BLE001
                _report(cfg, "live epoch logging", e, generation=gen)
                return

    t = threading.Thread(target=worker, name="nst-live-tracking", daemon=True)
    t.start()

    def on_epoch(row: dict) -> None:
        with contextlib.suppress(queue.Full):
            q.put_nowait(row)

    def close(timeout: float = 10.0) -> None:
        with contextlib.suppress(queue.Full):
            q.put_nowait(None)
        t.join(timeout)

    on_epoch.close = close  # type: ignore[attr-defined]
    return on_epoch


def _logged_steps(client, run_id: str) -> dict[str, set[int]]:
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in EPOCH_KEYS.values()}


def finish_generation(cfg: Config, gen: str, run_id: str | None) -> str | None:
    """Complete `gen`'s run from its files (trained, evaluated, labelled), register its model, end the run. A run
    that cannot be completed is marked FAILED and tagged `tracking_incomplete` (and the failure reported)."""
    if run_id is None or not cfg.tracking.enabled:
        return None
    try:
        return _finish_generation(cfg, gen, run_id)
    except Exception as e:  # noqa: BLE001
        _report(cfg, "finish_generation", e, generation=gen, run_id=run_id)
        with contextlib.suppress(Exception):
            client = _client(cfg)
            client.set_tag(run_id, "tracking_incomplete", "true")
            client.set_terminated(run_id, "FAILED")
        return run_id


def _finish_generation(cfg: Config, gen: str, run_id: str) -> str:
    from mlflow.entities import Metric

    from nst.checkpoint import read_meta
    from nst.metrics import training_curves
    from nst.report import read_metrics

    client, now = _client(cfg), int(time.time() * 1000)
    mdir, edir = cfg.model_dir(gen), cfg.eval_dir(gen)
    meta, history = read_meta(mdir), read_json(mdir / "history.json")
    have = _logged_steps(client, run_id)
    metrics = [Metric(key, float(r[k]), now, int(r["epoch"])) for r in history for k, key in EPOCH_KEYS.items()
               if k in r and int(r["epoch"]) not in have[key]]  # what live logging missed, never twice
    final = dict(read_metrics(cfg, gen))
    used: dict[str, str] = {}
    class_acc = read_json(edir / "class_accuracy.json") if (edir / "class_accuracy.json").is_file() else {}
    final |= {f"class_acc/{metric_key(c, used)}": a for c, a in class_acc.items()}
    final |= {"model/params": meta["params"], "model/best_epoch": meta["best_epoch"]}
    if isinstance(meta.get("image_size"), int):
        final["model/image_size"] = meta["image_size"]
    if meta.get("best_val_acc") is not None:
        final["model/best_val_acc"] = meta["best_val_acc"]
    lstats_f = cfg.labels_dir(gen) / "stats.json"
    lstats = read_json(lstats_f) if lstats_f.is_file() else {}
    final |= {f"labeler/{k}": lstats[k] for k in LABELER_KEYS if k in lstats}
    metrics += [Metric(k, float(v), now, 0) for k, v in sorted(final.items())]
    client.log_batch(run_id, metrics=metrics)
    client.log_dict(run_id, used, "eval/class_keys.json")
    client.log_dict(run_id, read_json(mdir / "config.json"), "config/effective_config.json")
    client.log_dict(run_id, history, "eval/history.json")
    client.log_figure(run_id, training_curves(history, f"{gen} {meta['model']}"), "plots/training_curves.png")
    for name in ("confusion.png", "reliability.png"):
        if (edir / name).is_file():
            client.log_artifact(run_id, str(edir / name), "plots")
    for src, dest in ((lstats_f, "labeler"), (cfg.balanced_dir(gen) / "stats.json", "train_data")):
        if src.is_file():
            client.log_artifact(run_id, str(src), dest)
    _log_inputs(cfg, client, gen, run_id)
    version = _log_and_register(cfg, client, gen, run_id, meta, final)
    client.set_tag(run_id, "registered_model_version", f"{cfg.tracking.registered_model}/{version}")
    timing = cfg.state_dir / "timing" / f"{gen}.json"
    end = read_json(timing).get("end") if timing.is_file() else None
    start = client.get_run(run_id).info.start_time
    client.set_terminated(run_id, "FINISHED", end_time=int(end * 1000) if end and end * 1000 >= start else None)
    log.info("tracking: %s logged as run %s (registered %s version %s)", gen, run_id, cfg.tracking.registered_model,
             version)
    return run_id


@contextlib.contextmanager
def _global_uri(cfg: Config):
    """MLflow's fluent APIs (log_model, load_model) read a process-global URI: set it for the block only."""
    import mlflow

    with _LOCK:
        old = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking_uri(cfg))
        try:
            yield mlflow
        finally:
            mlflow.set_tracking_uri(old or "")
            if old is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)


def _log_and_register(cfg: Config, client, gen: str, run_id: str, meta: dict, final: dict) -> str:
    import mlflow
    import numpy as np
    import torch

    from nst.checkpoint import load_model

    model, _ = load_model(cfg.model_dir(gen), "cpu")
    s = int(meta.get("image_size", cfg.data.image_size))
    example = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)
    with _global_uri(cfg) as mf, mf.start_run(run_id=run_id, nested=mf.active_run() is not None):
        info = mf.pytorch.log_model(model, name="model", input_example=example,
                                    pip_requirements=[f"mlflow=={mlflow.__version__}",
                                                      f"torch=={torch.__version__.split('+')[0]}"],
                                    metadata={"generation": gen, "arch": meta["model"], "classes": meta["classes"],
                                              "input": f"float32 NCHW {s}x{s}, (x/255 - mean)/std",
                                              "mean": meta["mean"], "std": meta["std"]})
        name = cfg.tracking.registered_model
        with contextlib.suppress(Exception):  # exists already
            client.create_registered_model(name, description="Noisy Student generations; champion = best test top-1.")
        test_digest = _digest(cfg.data_dir / "test.parquet")
        weights = _digest(cfg.model_dir(gen) / "model.safetensors")
        same = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("weights") == weights]
        mv = same[0] if same else client.create_model_version(  # a study's arms share their seed's teacher: once
            name, source=info.model_uri, run_id=run_id, model_id=info.model_id,
            tags={"generation": gen, "run_id": run_id, "test_top1": repr(final["test/top1"]),
                  "test_nll": repr(final["test/nll"]), "test_data": test_digest, "weights": weights})
    versions = [v for v in client.search_model_versions(f"name='{name}'") if v.tags.get("test_data") == test_digest]
    best = min(versions, key=lambda v: (-float(v.tags["test_top1"]), float(v.tags["test_nll"]), int(v.version)))
    client.set_registered_model_alias(name, "champion", best.version)
    return str(mv.version)


def _log_inputs(cfg: Config, client, gen: str, run_id: str) -> None:
    """What the model was made from, as MLflow datasets (content digest, rows) and, for a student, its teacher's
    logged model: lineage one click away in the UI."""
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset, DatasetInput, InputTag, LoggedModelInput

    role = cfg.role(gen)
    files = [("labeled", "training"), ("val", "validation"), ("unlabeled", "labeling"), ("test", "evaluation")]
    items = [(cfg.data_dir / f"{n}.parquet", n, c) for n, c in files if not (role == "finetune" and n == "unlabeled")]
    if role == "student":
        items.append((cfg.balanced_dir(gen) / "balanced.parquet", f"{gen}-pseudo-labels", "training"))
    datasets = [DatasetInput(Dataset(name=name, digest=_digest(p), source_type="local",
                                     source=json.dumps({"uri": cfg.rel(p)}),
                                     profile=json.dumps({"num_rows": pq.ParquetFile(p).metadata.num_rows,
                                                         "sha256": _digest(p, full=True)})),
                             tags=[InputTag("mlflow.data.context", ctx)])
                for p, name, ctx in items if p.is_file()]
    models = []
    tags = client.get_run(run_id).data.tags
    if trun := tags.get("teacher_run_id") or tags.get("base_run_id"):
        outs = client.get_run(trun).outputs
        models = [LoggedModelInput(o.model_id) for o in (outs.model_outputs if outs else [])][:1]
    client.log_inputs(run_id, datasets=datasets, models=models or None)


def load_registered(cfg: Config, ref: str | int = "champion"):
    """A registered generation as a torch module (eval mode), e.g. the next teacher: `ref` is an alias
    ("champion"), a version number, or a `models:/...` URI. Input: normalised float32 NCHW (see its metadata)."""
    ref, name = str(ref), cfg.tracking.registered_model
    uri = ref if ref.startswith("models:/") else (f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}")
    with _global_uri(cfg) as mf:
        return mf.pytorch.load_model(uri, map_location="cpu")


def _digest(path: Path, full: bool = False) -> str:
    from nst.io import content_digest

    return content_digest(path) if full else content_digest(path)[:32]


# ---- backfill and read-back ----------------------------------------------------------------------------------

def track_finished(cfg: Config, *, flow_run_id: str | None = None) -> str | None:
    """Log a pipeline that already ran (e.g. during a tracking outage) from its outputs: `nst track`. Nothing
    evaluated (or a metrics file it cannot read) is an error before any run is created: an empty pipeline is never
    logged as a finished one."""
    from nst.checkpoint import is_complete
    from nst.report import finished_rows

    finished_rows(cfg)
    parent = start_pipeline(cfg, flow_run_id=flow_run_id)
    if parent is None:
        return None
    runs: dict[str, str | None] = {}
    for gen in cfg.evaluated_models():
        if not (is_complete(cfg.model_dir(gen)) and (cfg.eval_dir(gen) / "metrics.json").is_file()):
            break
        runs[gen] = finish_generation(cfg, gen, open_generation(cfg, gen, parent, runs.get(cfg.made_from(gen))))
    finish_pipeline(cfg, parent, "FINISHED")
    return parent
