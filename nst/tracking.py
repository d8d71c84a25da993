"""MLflow tracking: one parent run per pipeline run, one child run per generation, one registered model.

Everything here logs FINISHED work from the files the stages wrote (the model is on disk before MLflow hears of
it), through `MlflowClient` with explicit run ids, so a Prefect task in any thread or process logs to the right run.

    parent  (tags: kind=pipeline, pipeline_id, git_commit, config_hash, prefect_flow_run_id)
    ├── g0-teacher   (tags: kind=generation, generation, role, model, mlflow.parentRunId)
    ├── g1-student   (... teacher_run_id = g0-teacher's run)
    └── g2-student   (... teacher_run_id = g1-student's run)

Every child logs the SAME metric keys (see `docs/mlflow.md`):
  per epoch (step = epoch)  train/loss, train/loss_labeled, train/acc, train/lr, val/loss, val/acc (val: when a val split exists)
  final                     test/top1, test/top5, test/ece, test/nll, class_acc/<class>, robust/* (evaluate.enabled)
                            model/params, model/best_epoch, model/best_val_acc
  as a labeler              labeler/* - the pseudo-labels THIS generation's model makes on the unlabeled set under
                            the pipeline's filter (kept_fraction, dropped, duplicated, capped, mean confidence,
                            pseudo-label accuracy vs. hidden labels when known)
The `labeler/*` keys are what keeps the key set identical AND honest: every model, the g0 teacher and the last
student included, can be measured as a labeler, whereas "the pseudo-labels a model was trained on" do not exist
for g0. Student gN's training pseudo-labels are exactly its teacher's `labeler/*` numbers (same model, same data,
same filter) and are attached to gN's run as artifacts (`train_data/`) plus a dataset input.

Where: `tracking.tracking_uri` > `$MLFLOW_TRACKING_URI` > `sqlite:///<out_dir>/mlflow.db` (artifacts in
`<out_dir>/mlartifacts`; no server, no ./mlruns). A tracking outage never fails the pipeline: every remote call is
retried with backoff, then the failure is logged as a warning and appended to `<out_dir>/tracking_errors.json`,
and training goes on. `nst track` logs a finished pipeline from disk once the server is back.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
import traceback
import uuid
from pathlib import Path
from typing import Any, Callable

from nst.config import Config
from nst.io import atomic_write_json, file_sha256, read_json
from nst.report import robust_summary

log = logging.getLogger("nst.tracking")

ATTEMPTS = 3          # tries per remote call
BACKOFF_S = 1.0       # sleep before retry i (1-based): BACKOFF_S * 2**(i-1)
ERRORS_FILE = "tracking_errors.json"
STATUSES = ("FINISHED", "FAILED", "KILLED")

_NON_RETRYABLE = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                  "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED", "NOT_FOUND"}
_FLUENT_LOCK = threading.RLock()
_ERRORS_LOCK = threading.Lock()


class TrackingError(RuntimeError):
    """A tracking operation that failed after its retries (never raised out of the public functions)."""


# ---- where to track --------------------------------------------------------------------------------

def tracking_uri(cfg: Config) -> str:
    """`tracking.tracking_uri` > `$MLFLOW_TRACKING_URI` > a SQLite file in out_dir."""
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(cfg.out_dir) / 'mlflow.db').resolve()}"


def _artifact_location(uri: str) -> str | None:
    """Next to a SQLite file: `<dir>/mlartifacts` (else MLflow would write ./mlruns of the cwd). Servers choose."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _bound_http_retries() -> None:
    """MLflow's own HTTP retries default to 7 with backoff x2 (minutes on a dead server); ours wrap them, so keep
    MLflow's short unless the user chose otherwise."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")


def _client(uri: str):
    from mlflow import MlflowClient

    _bound_http_retries()
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@contextlib.contextmanager
def _fluent(uri: str):
    """MLflow's fluent APIs (log_model, load_model) read a process-global tracking URI: set it for the block only,
    under a lock, and restore both the global and $MLFLOW_TRACKING_URI afterwards."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tu

    with _FLUENT_LOCK:
        old_global, old_env = getattr(tu, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_global)
            if old_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_env


# ---- retries and reporting --------------------------------------------------------------------------

def _retryable(e: BaseException) -> bool:
    code = getattr(e, "error_code", None)
    return code not in _NON_RETRYABLE


def _retry(what: str, fn: Callable, *args, **kwargs):
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any transport/server error
            if attempt == ATTEMPTS or not _retryable(e):
                raise TrackingError(f"{what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                                    f" (after {attempt} attempt{'s' if attempt > 1 else ''})") from e
            delay = BACKOFF_S * 2 ** (attempt - 1)
            log.info("tracking: %s failed (%s), retry %d/%d in %.1fs", what, type(e).__name__, attempt, ATTEMPTS - 1,
                     delay)
            time.sleep(delay)


def _report(cfg: Config, operation: str, err: BaseException, **context) -> None:
    """A warning in the log and an entry in <out_dir>/tracking_errors.json; the pipeline goes on."""
    msg = str(err) or type(err).__name__
    log.warning("tracking: %s failed: %s. Training is unaffected (outputs are on disk in %s); "
                "log them later with `nst track`.", operation, msg, cfg.out_dir)
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "operation": operation, "error": msg,
             "tracking_uri": tracking_uri(cfg), **{k: v for k, v in context.items() if v is not None},
             "traceback": traceback.format_exception_only(type(err.__cause__ or err), err.__cause__ or err)[-1].strip()}
    path = Path(cfg.out_dir) / ERRORS_FILE
    with _ERRORS_LOCK:
        try:
            entries = read_json(path) if path.is_file() else []
            if not isinstance(entries, list):
                entries = []
        except (OSError, ValueError):
            entries = []
        entries.append(entry)
        try:
            atomic_write_json(path, entries)
        except OSError as e:
            log.warning("tracking: could not write %s: %s", path, e)


def tracking_errors(cfg: Config) -> list[dict]:
    path = Path(cfg.out_dir) / ERRORS_FILE
    return read_json(path) if path.is_file() else []


# ---- small helpers -------------------------------------------------------------------------------------

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "l": [{"x": 2}]} -> {"a.b": 1, "l.0.x": 2}; lists of scalars stay one JSON value."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.")
    elif isinstance(d, list) and any(isinstance(v, (dict, list)) for v in d):
        for i, v in enumerate(d):
            out |= flatten(v, f"{prefix}{i}.")
    else:
        out[prefix[:-1]] = json.dumps(d) if isinstance(d, list) else d
    return out


def _param_value(v: Any) -> str:
    s = "null" if v is None else str(v)
    return s if len(s) <= 6000 else s[:5997] + "..."  # MLflow's param value limit


def _git_commit(root: Path) -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def _md5(path: Path) -> str:
    import hashlib

    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _dvc_lock_hashes(root: Path) -> dict[str, str]:
    """path (relative to the repo root) -> md5 from dvc.lock's deps and outs, when DVC tracks the project."""
    lock = Path(root) / "dvc.lock"
    if not lock.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(lock.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, str] = {}
    for stage in (data.get("stages") or {}).values():
        for entry in (stage.get("deps") or []) + (stage.get("outs") or []):
            if isinstance(entry, dict) and entry.get("path") and entry.get("md5"):
                out[str(entry["path"])] = str(entry["md5"])
    return out


def _mlflow_schema_json(path: Path) -> str | None:
    """The Parquet schema as an MLflow schema (shown in the UI's dataset panel)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        from mlflow.types import ColSpec, DataType, Schema
        from mlflow.types.schema import Array

        def dtype(t):
            if pa.types.is_string(t) or pa.types.is_large_string(t):
                return DataType.string
            if pa.types.is_boolean(t):
                return DataType.boolean
            if pa.types.is_int64(t):
                return DataType.long
            if pa.types.is_integer(t):
                return DataType.integer
            if pa.types.is_float32(t):
                return DataType.float
            if pa.types.is_floating(t):
                return DataType.double
            if pa.types.is_list(t) or pa.types.is_large_list(t):
                return Array(dtype(t.value_type))
            raise TypeError(t)

        schema = pq.read_schema(path)
        return json.dumps({"mlflow_colspec": Schema([ColSpec(dtype(f.type), f.name) for f in schema]).to_dict()})
    except Exception:  # noqa: BLE001 - a schema is a nicety
        return None


def _dataset_input(cfg: Config, path: Path, name: str, context: str, dvc: dict[str, str]):
    """A metadata-only MLflow dataset for a Parquet file: digest = md5 of the bytes (DVC 3's file hash, fits
    MLflow's 36-character digest), the sha256 and row count in the profile, and dvc.lock's md5 for the path when
    listed there (with whether it matches the file now)."""
    import pyarrow.parquet as pq
    from mlflow.entities import Dataset, DatasetInput, InputTag

    path = Path(path)
    md5, sha = _md5(path), file_sha256(path)
    try:
        rel = path.resolve().relative_to(Path(cfg.root).resolve()).as_posix()
    except ValueError:
        rel = str(path)
    profile = {"num_rows": pq.ParquetFile(path).metadata.num_rows, "sha256": sha, "md5": md5, "path": rel}
    if rel in dvc:  # dvc.lock may predate this run (the flow commits to DVC at its end): say whether it agrees
        profile |= {"dvc_lock_md5": dvc[rel], "dvc_lock_current": dvc[rel] == md5}
    ds = Dataset(name=name, digest=md5, source_type="local", source=json.dumps({"uri": str(path.resolve())}),
                 schema=_mlflow_schema_json(path), profile=json.dumps(profile))
    return DatasetInput(ds, tags=[InputTag("mlflow.data.context", context), InputTag("sha256", sha)])


# ---- what a generation left on disk --------------------------------------------------------------------

def _role(gen: str) -> str:
    return "teacher" if gen == "g0" else "student"


def _next_generation_index(cfg: Config, gen: str) -> int:
    for g in cfg.generations:
        if g.teacher == gen:
            return g.index
    return int(gen[1:]) + 1


def _labeler_predictions(cfg: Config, gen: str):
    """(pred, max_prob, true_label, image_id) of gen's model on the unlabeled set: read from the pseudo-label shards
    it already produced for the next generation when those are current, else one inference pass (same code path
    and batch size as the pseudo-label stage)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nst.data import prepared_dir

    model_dir = cfg.model_dir(gen)
    try:
        from tasks.pseudo_label import _key, num_shards, shard_path

        n = num_shards(cfg)
        key = _key(cfg, model_dir)
        for g in cfg.generations:
            if g.teacher != gen:
                continue
            files = [shard_path(cfg, g.name, s, n) for s in range(n)]
            if all(f.is_file() and (pq.read_schema(f).metadata or {}).get(b"nst_key", b"").decode() == key
                   for f in files):
                t = pa.concat_tables([pq.read_table(f, columns=["pred", "max_prob", "true_label", "image_id"])
                                      for f in files])
                return (t.column("pred").to_numpy(), t.column("max_prob").to_numpy(),
                        t.column("true_label").to_numpy(), t.column("image_id").to_numpy(zero_copy_only=False))
    except (ImportError, OSError, KeyError):
        pass

    from nst.checkpoint import load_model
    from nst.data import ImageDataset, resolve_paths
    from nst.train import predict_logits, resolve_device
    from tasks.pseudo_label import soft_targets

    manifest = pq.read_table(prepared_dir(cfg.out_dir) / "unlabeled.parquet")
    device = resolve_device(cfg.device)
    model, _ = load_model(model_dir, device)
    ds = ImageDataset(resolve_paths(manifest.column("path").to_pylist(), cfg.root), cfg.data.image_size)
    tc = cfg.train_config(gen)
    logits = predict_logits(model, ds, device, cfg.pseudo_label.batch_size, cfg.data.num_workers, amp=tc.amp,
                            channels_last=tc.channels_last)
    pred, max_prob, *_ = soft_targets(logits, cfg.pseudo_label.mode, cfg.pseudo_label.temperature,
                                      cfg.pseudo_label.top_k)
    return (pred.numpy(), max_prob.numpy().astype(np.float32), manifest.column("label").to_numpy(),
            manifest.column("image_id").to_numpy(zero_copy_only=False))


def labeler_stats(cfg: Config, gen: str) -> dict:
    """The filter-balance statistics of the pseudo-labels gen's model makes (what `filter-balance` would write for
    the generation it teaches): same function, same threshold/target, same extra fields."""
    import numpy as np

    from nst.data import read_classes
    from tasks.filter_balance import balance

    classes = read_classes(cfg.out_dir)
    pred, conf, truth, ids = _labeler_predictions(cfg, gen)
    fc = cfg.filter
    rows, stats = balance(pred, conf, len(classes), fc.threshold, fc.target_per_class, fc.duplicate,
                          seed=cfg.seed + _next_generation_index(cfg, gen), image_ids=ids)
    stats["per_class"] = {classes[c]: v for c, v in stats["per_class"].items()}
    stats["mean_confidence_all"] = float(conf.mean()) if len(conf) else 0.0
    stats["mean_confidence_final"] = float(conf[rows].mean()) if len(rows) else 0.0
    stats["kept_fraction"] = stats["kept"] / max(1, stats["total"])
    if (truth >= 0).any():
        has = truth >= 0
        stats["pseudo_label_acc_all"] = float((pred[has] == truth[has]).mean())
        kept = has & (conf >= fc.threshold)
        stats["pseudo_label_acc_kept"] = float((pred[kept] == truth[kept]).mean()) if kept.any() else 0.0
    stats["confidence_histogram"] = np.histogram(conf, bins=20, range=(0.0, 1.0))[0].tolist()
    stats["labeler"] = gen
    return stats


LABELER_KEYS = ("total", "dropped", "kept", "capped", "duplicated", "final", "target_per_class", "kept_fraction",
                "mean_confidence_all", "mean_confidence_final", "pseudo_label_acc_all", "pseudo_label_acc_kept")


def _training_curves(history: list[dict], path: Path, title: str) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    ep = [r["epoch"] for r in history]
    for key, label in (("train_loss", "train (total)"), ("train_loss_labeled", "train labeled"),
                       ("train_loss_unlabeled", "train pseudo-labeled"), ("val_loss", "val")):
        if any(key in r for r in history):
            ax1.plot(ep, [r.get(key) for r in history], marker=".", label=label)
    for key, label in (("train_acc", "train (labeled batch)"), ("val_acc", "val")):
        if any(key in r for r in history):
            ax2.plot(ep, [r.get(key) for r in history], marker=".", label=label)
    ax1.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=f"{title}: accuracy")
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _pseudo_plots(stats: dict, out: Path, title: str) -> None:
    from nst.metrics import histogram_plot

    classes = list(stats["per_class"])
    histogram_plot({k: [stats["per_class"][c][k] for c in classes] for k in ("predicted", "kept", "final")},
                   classes, out / "class_counts.png", f"{title}: per-class counts before/after balancing", "images")
    hist = stats["confidence_histogram"]
    bins = [f"{i / len(hist):.2f}" for i in range(len(hist))]
    histogram_plot({"images": hist}, bins, out / "confidence_histogram.png",
                   f"{title}: max-probability histogram (threshold {stats['threshold']:g})", "images")
    atomic_write_json(out / "stats.json", stats)


def _collect(cfg: Config, gen: str, staging: Path) -> dict:
    """Everything a child run logs, read from disk (and the labeler pass), staged under `staging` for upload."""
    import shutil

    from nst.checkpoint import read_meta

    mdir, edir = cfg.model_dir(gen), cfg.gen_dir(gen) / "eval"
    meta = read_meta(mdir)
    eff = read_json(mdir / "config.json")
    ecfg = eff["config"]
    history = read_json(mdir / "history.json")
    metrics_final = read_json(edir / "metrics.json")
    train_cfg = ecfg["teacher"] if gen == "g0" else next(g for g in ecfg["generations"] if g["name"] == gen)["student"]

    params = flatten({"seed": ecfg["seed"], "data": ecfg["data"], "train": train_cfg,
                      "pseudo_label": ecfg["pseudo_label"], "filter": ecfg["filter"], "evaluate": ecfg["evaluate"]})
    params["role"] = _role(gen)
    if gen != "g0":
        g = next(g for g in ecfg["generations"] if g["name"] == gen)
        params |= {f"generation.{k}": g[k] for k in ("teacher", "ratio", "init", "allow_smaller")}

    steps: list[tuple[str, float, int]] = []
    for r in history:
        for src, key in (("train_loss", "train/loss"), ("train_loss_labeled", "train/loss_labeled"),
                         ("train_acc", "train/acc"), ("lr", "train/lr"),
                         ("val_loss", "val/loss"), ("val_acc", "val/acc")):
            if src in r:
                steps.append((key, float(r[src]), int(r["epoch"])))
    final = {k: float(v) for k, v in metrics_final.items()}
    final |= {"model/params": float(meta["params"]), "model/best_epoch": float(meta["best_epoch"])}
    if meta.get("best_val_acc") is not None:
        final["model/best_val_acc"] = float(meta["best_val_acc"])

    lab = labeler_stats(cfg, gen)
    final |= {f"labeler/{k}": float(lab[k]) for k in LABELER_KEYS if k in lab}

    staging.mkdir(parents=True, exist_ok=True)
    (staging / "config").mkdir()
    shutil.copy2(mdir / "config.json", staging / "config" / "effective_config.json")
    shutil.copy2(mdir / "model.json", staging / "config" / "model.json")
    (staging / "plots").mkdir()
    _training_curves(history, staging / "plots" / "training_curves.png", f"{gen} {meta['model']}")
    for name in ("confusion.png", "reliability.png"):
        if (edir / name).is_file():
            shutil.copy2(edir / name, staging / "plots" / name)
    (staging / "eval").mkdir()
    for name in ("metrics.json", "confusion.json"):
        if (edir / name).is_file():
            shutil.copy2(edir / name, staging / "eval" / name)
    shutil.copy2(mdir / "history.json", staging / "eval" / "history.json")
    (staging / "labeler").mkdir()
    _pseudo_plots(lab, staging / "labeler", f"{gen} as labeler")
    bstats = cfg.gen_dir(gen) / "balanced" / "stats.json"
    if gen != "g0" and bstats.is_file():  # the pseudo-labels this student trained on (made by its teacher)
        (staging / "train_data").mkdir()
        _pseudo_plots(read_json(bstats), staging / "train_data", f"{gen} training pseudo-labels")
        bcfg = cfg.gen_dir(gen) / "balanced" / "config.json"
        if bcfg.is_file():
            shutil.copy2(bcfg, staging / "config" / "filter_balance_config.json")
    return {"meta": meta, "params": params, "steps": steps, "final": final, "train_cfg": train_cfg,
            "config_hash": meta.get("config_hash", eff.get("config_hash"))}


# ---- the public API --------------------------------------------------------------------------------------

def _experiment_id(client, cfg: Config, uri: str) -> str:
    name = cfg.tracking.experiment
    exp = _retry("get experiment", client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return _retry("create experiment", client.create_experiment, name, artifact_location=_artifact_location(uri))
    except TrackingError as e:  # created meanwhile by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        log.debug("experiment created concurrently: %s", e)
        return exp.experiment_id


def _log_batch(client, run_id: str, *, metrics=(), params=(), tags=()) -> None:
    for i in range(0, len(params), 100):
        _retry("log params", client.log_batch, run_id, params=params[i:i + 100])
    for i in range(0, len(tags), 100):
        _retry("log tags", client.log_batch, run_id, tags=tags[i:i + 100])
    for i in range(0, len(metrics), 1000):
        _retry("log metrics", client.log_batch, run_id, metrics=metrics[i:i + 1000])


def start_pipeline(cfg: Config, *, flow_run_id: str | None = None) -> str | None:
    """Create the parent run; its id, or None when tracking is off or unreachable (reported, never raised)."""
    if not cfg.tracking.enabled:
        return None
    uri = tracking_uri(cfg)
    try:
        from mlflow.entities import Param

        client = _client(uri)
        exp_id = _experiment_id(client, cfg, uri)
        pipeline_id = uuid.uuid4().hex[:12]
        commit, dirty = _git_commit(cfg.root)
        tags = {"kind": "pipeline", "pipeline_id": pipeline_id, "config_hash": cfg.section_hash(),
                "dataset": cfg.data.name, "generations": str(len(cfg.generations)),
                "mlflow.source.name": "nst", "mlflow.source.type": "LOCAL"}
        with contextlib.suppress(Exception):
            tags["mlflow.user"] = getpass.getuser()
        if commit:
            tags |= {"git_commit": commit, "mlflow.source.git.commit": commit, "git_dirty": str(dirty).lower()}
        if flow_run_id:
            tags["prefect_flow_run_id"] = str(flow_run_id)
        run_name = f"{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run = _retry("create parent run", client.create_run, exp_id, run_name=run_name, tags=tags)
        run_id = run.info.run_id
        params = flatten({k: v for k, v in cfg.model_dump(mode="json").items() if k != "generations"})
        for g in cfg.model_dump(mode="json")["generations"]:
            params |= flatten(g, f"generations.{g['name']}.")
        _log_batch(client, run_id, params=[Param(k, _param_value(v)) for k, v in sorted(params.items())])
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "config.json"
            p.write_text(json.dumps(cfg.model_dump(mode="json"), indent=2, sort_keys=True))
            _retry("log parent config", client.log_artifact, run_id, str(p), "config")
        log.info("tracking: pipeline run %s in experiment %r at %s", run_id, cfg.tracking.experiment, uri)
        return run_id
    except Exception as e:  # noqa: BLE001 - tracking must not fail the pipeline
        _report(cfg, "start_pipeline", e)
        return None


def track_generation(cfg: Config, gen: str, *, parent_run_id: str | None, teacher_run_id: str | None) -> str | None:
    """Log a FINISHED generation (trained and evaluated) as a child run, register its model and move `champion`.

    Returns the child run id (also when part of the logging failed: the run is then marked FAILED and the failure
    reported), or None when tracking is off, the pipeline has no parent run, or the run could not be created.
    """
    if not cfg.tracking.enabled or parent_run_id is None:
        return None
    uri = tracking_uri(cfg)
    child_id = None
    try:
        from mlflow.entities import Metric, Param

        client = _client(uri)
        with tempfile.TemporaryDirectory(prefix=f"nst-track-{gen}-") as tmp:
            payload = _collect(cfg, gen, Path(tmp) / "artifacts")  # local work first: nothing half-logged on error
            meta = payload["meta"]
            parent = _retry("get parent run", client.get_run, parent_run_id)
            tags = {"kind": "generation", "generation": gen, "role": _role(gen), "model": meta["model"],
                    "mlflow.parentRunId": parent_run_id, "pipeline_id": parent.data.tags.get("pipeline_id", ""),
                    "config_hash": str(payload["config_hash"])}
            if teacher_run_id:
                tags |= {"teacher_run_id": teacher_run_id, "teacher_generation": cfg.generation(gen).teacher}
            for k in ("git_commit", "mlflow.source.git.commit", "prefect_flow_run_id", "mlflow.user",
                      "mlflow.source.name", "mlflow.source.type"):
                if k in parent.data.tags:
                    tags[k] = parent.data.tags[k]
            run = _retry("create child run", client.create_run, parent.info.experiment_id,
                         run_name=f"{gen}-{_role(gen)}", tags=tags)
            child_id = run.info.run_id
            now = int(time.time() * 1000)
            metrics = [Metric(k, v, now, s) for k, v, s in payload["steps"]]
            metrics += [Metric(k, v, now, 0) for k, v in sorted(payload["final"].items())]
            _log_batch(client, child_id, metrics=metrics,
                       params=[Param(k, _param_value(v)) for k, v in sorted(payload["params"].items())])
            _log_inputs(client, cfg, gen, child_id, teacher_run_id)
            _retry("log artifacts", client.log_artifacts, child_id, str(Path(tmp) / "artifacts"))
            version = _log_and_register(client, cfg, gen, child_id, parent_run_id, payload, uri)
            _retry("set version tag", client.set_tag, child_id, "registered_model_version",
                   f"{cfg.tracking.registered_model}/{version}")
        _retry("finish child run", client.set_terminated, child_id, "FINISHED")
        log.info("tracking: %s logged as run %s (registered %s version %s)", gen, child_id,
                 cfg.tracking.registered_model, version)
        return child_id
    except Exception as e:  # noqa: BLE001
        _report(cfg, "track_generation", e, generation=gen, parent_run_id=parent_run_id, run_id=child_id)
        if child_id is not None:
            with contextlib.suppress(Exception):
                client.set_tag(child_id, "tracking_incomplete", "true")
                client.set_terminated(child_id, "FAILED")
        return child_id


def _log_inputs(client, cfg: Config, gen: str, child_id: str, teacher_run_id: str | None) -> None:
    from nst.data import prepared_dir

    dvc = _dvc_lock_hashes(cfg.root)
    data = prepared_dir(cfg.out_dir)
    inputs = [(data / "labeled.parquet", "labeled", "training"), (data / "val.parquet", "val", "validation"),
              (data / "unlabeled.parquet", "unlabeled", "labeling"), (data / "test.parquet", "test", "evaluation")]
    if gen != "g0":
        inputs.append((cfg.gen_dir(gen) / "balanced" / "balanced.parquet", f"{gen}-pseudo-labels", "training"))
    datasets = [_dataset_input(cfg, p, n, c, dvc) for p, n, c in inputs if p.is_file()]
    models = []
    if teacher_run_id:  # the teacher's LoggedModel is an input of the student (lineage in the UI)
        from mlflow.entities import LoggedModelInput

        with contextlib.suppress(Exception):
            outs = client.get_run(teacher_run_id).outputs
            models = [LoggedModelInput(o.model_id) for o in (outs.model_outputs if outs else [])][:1]
    _retry("log inputs", client.log_inputs, child_id, datasets=datasets, models=models or None)


def _pip_requirements() -> list[str]:
    import mlflow
    import numpy
    import torch

    return [f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}", f"numpy=={numpy.__version__}"]


def _log_and_register(client, cfg: Config, gen: str, child_id: str, parent_run_id: str, payload: dict,
                      uri: str) -> str:
    import mlflow
    import numpy as np

    from nst.checkpoint import load_model
    from nst.data import MEAN, STD

    meta = payload["meta"]
    model, _ = load_model(cfg.model_dir(gen), "cpu")
    s = int(meta.get("image_size", cfg.data.image_size))
    example = np.random.default_rng(0).standard_normal((2, 3, s, s)).astype(np.float32)  # batch 2: dynamic batch dim
    model_meta = {"generation": gen, "role": _role(gen), "arch": meta["model"], "classes": meta["classes"],
                  "input": f"float32 NCHW {s}x{s}, normalised: (x/255 - mean)/std", "mean": list(MEAN),
                  "std": list(STD), "weights": meta.get("weights")}

    def log_model():
        with _fluent(uri):
            nested = mlflow.active_run() is not None
            with mlflow.start_run(run_id=child_id, nested=nested):
                return mlflow.pytorch.log_model(model, name="model", input_example=example,
                                                pip_requirements=_pip_requirements(), metadata=model_meta,
                                                tags={"generation": gen, "role": _role(gen)})

    info = _retry("log model", log_model)
    # MLflow's SQLAlchemy registry store resolves `models:/<id>` sources through a default MlflowClient(), i.e. the
    # process-global URI: register inside the same scope (a server resolves them itself).
    with _fluent(uri):
        return _register(client, cfg, gen, child_id, parent_run_id, payload, info)


def _register(client, cfg: Config, gen: str, child_id: str, parent_run_id: str, payload: dict, info) -> str:
    meta = payload["meta"]
    name = cfg.tracking.registered_model
    try:
        _retry("create registered model", client.create_registered_model, name,
               description="Noisy Student generations: one version per generation; alias champion = best test top-1.")
    except TrackingError as e:
        if getattr(e.__cause__, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    final = payload["final"]
    test_md5 = _md5(Path(cfg.out_dir) / "data" / "test.parquet")
    vtags = {"generation": gen, "role": _role(gen), "model": meta["model"], "run_id": child_id,
             "parent_run_id": parent_run_id, "test_top1": repr(final["test/top1"]), "test_nll": repr(final["test/nll"]),
             "test_ece": repr(final["test/ece"]), "test_data_md5": test_md5, "dataset": cfg.data.name}
    mv = _retry("register model version", client.create_model_version, name, source=info.model_uri, run_id=child_id,
                tags=vtags, model_id=info.model_id, description=f"{gen} ({_role(gen)}, {meta['model']})")
    _move_champion(client, name, test_md5)
    return str(mv.version)


def _move_champion(client, name: str, test_md5: str) -> None:
    """`champion` = the best test top-1 (ties: lower NLL, then the older version) among versions evaluated on the
    same test set (a champion from another test set is not comparable and is replaced)."""
    versions = _retry("search versions", client.search_model_versions, f"name='{name}'")
    cands = [v for v in versions if v.tags.get("test_data_md5") == test_md5 and "test_top1" in v.tags]
    if not cands:
        return
    best = min(cands, key=lambda v: (-float(v.tags["test_top1"]), float(v.tags.get("test_nll", "inf")), int(v.version)))
    try:
        current = client.get_model_version_by_alias(name, "champion").version
    except Exception:  # noqa: BLE001 - no champion yet
        current = None
    if str(current) != str(best.version):
        _retry("set champion alias", client.set_registered_model_alias, name, "champion", best.version)
        log.info("tracking: %s@champion -> version %s (%s, test top-1 %.4f)", name, best.version,
                 best.tags.get("generation"), float(best.tags["test_top1"]))


def finish_pipeline(cfg: Config, parent_run_id: str | None, status: str = "FINISHED") -> None:
    """Summary metrics/artifacts on the parent run, then end it with `status` (FINISHED, FAILED or KILLED)."""
    if not cfg.tracking.enabled or parent_run_id is None:
        return
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES} (got {status!r})")
    uri = tracking_uri(cfg)
    try:
        from mlflow.entities import Metric, RunTag

        from nst.report import generation_rows, markdown_table

        client = _client(uri)
        rows = generation_rows(cfg)
        now = int(time.time() * 1000)
        metrics, tags = [], [RunTag("tracking_errors", str(sum(e.get("parent_run_id") == parent_run_id
                                                                 for e in tracking_errors(cfg))))]
        if rows:
            best = max(rows, key=lambda r: r["test_top1"])
            metrics = [Metric("best/test_top1", float(best["test_top1"]), now, 0),
                       Metric("final/test_top1", float(rows[-1]["test_top1"]), now, 0),
                       Metric("final/test_ece", float(rows[-1]["test_ece"]), now, 0),
                       Metric("final/gain_vs_g0", float(rows[-1]["test_top1"] - rows[0]["test_top1"]), now, 0)]
            tags.append(RunTag("best_generation", best["generation"]))
        _log_batch(client, parent_run_id, metrics=metrics, tags=tags)
        if rows:
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "summary.md").write_text(markdown_table(rows))
                (Path(tmp) / "summary.json").write_text(json.dumps(rows, indent=2))
                _retry("log summary", client.log_artifacts, parent_run_id, tmp, "summary")
        _retry("finish parent run", client.set_terminated, parent_run_id, status)
    except Exception as e:  # noqa: BLE001
        _report(cfg, "finish_pipeline", e, parent_run_id=parent_run_id)


def track_finished(cfg: Config, *, flow_run_id: str | None = None) -> str | None:
    """Log a pipeline that already ran (e.g. during a tracking outage) from its outputs: `nst track`."""
    from nst.checkpoint import is_complete

    parent = start_pipeline(cfg, flow_run_id=flow_run_id)
    if parent is None:
        return None
    prev = None
    for name in ["g0"] + [g.name for g in cfg.generations]:
        if not (is_complete(cfg.model_dir(name)) and (cfg.gen_dir(name) / "eval" / "metrics.json").is_file()):
            break
        prev = track_generation(cfg, name, parent_run_id=parent, teacher_run_id=prev)
    finish_pipeline(cfg, parent, "FINISHED")
    return parent


# ---- reading back: the registry and `nst compare` --------------------------------------------------------

def load_registered(cfg: Config, ref: str | int = "champion"):
    """A registered generation as a torch module (eval mode), e.g. the next teacher: `ref` is an alias
    ("champion"), a version number, or a full `models:/...` URI. Input: normalised float32 NCHW (see metadata)."""
    import mlflow

    name = cfg.tracking.registered_model
    ref = str(ref)
    uri = ref if ref.startswith("models:/") else (f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}")
    with _fluent(tracking_uri(cfg)):
        return mlflow.pytorch.load_model(uri, map_location="cpu")


def _latest_parent(client, exp_id: str):
    runs = client.search_runs([exp_id], filter_string="tags.kind = 'pipeline'", order_by=["attributes.start_time DESC"],
                              max_results=1)
    return runs[0] if runs else None


def compare_rows(cfg: Config, run_id: str | None = None) -> tuple[Any, list[dict]]:
    """(parent run, generation rows) from the tracking server; the rows have `nst.report.COLUMNS`, so the table
    reads like the one built from disk (kept_fraction = the pseudo-labels the row's model trained on)."""
    uri = tracking_uri(cfg)
    client = _client(uri)
    if run_id:
        parent = client.get_run(run_id)
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        parent = _latest_parent(client, exp.experiment_id) if exp else None
        if parent is None:
            raise ValueError(f"no pipeline runs in experiment {cfg.tracking.experiment!r} at {uri}")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=1000)
    by_id = {r.info.run_id: r for r in children}
    rows = []
    for r in sorted(children, key=lambda r: int(r.data.tags.get("generation", "g0")[1:])):
        m, t = r.data.metrics, r.data.tags
        teacher = by_id.get(t.get("teacher_run_id", ""))
        top1 = m.get("test/top1")
        rows.append({
            "generation": t.get("generation"), "role": t.get("role"), "model": t.get("model"),
            "params": int(m["model/params"]) if "model/params" in m else None, "test_top1": top1,
            "delta_vs_teacher": (top1 - teacher.data.metrics["test/top1"]
                                 if teacher is not None and top1 is not None and "test/top1" in teacher.data.metrics
                                 else None),
            "test_ece": m.get("test/ece"),
            "kept_fraction": teacher.data.metrics.get("labeler/kept_fraction") if teacher is not None else None,
            "run_id": r.info.run_id, "status": r.info.status,
            **robust_summary(m),
        })
    return parent, rows


def write_csv(rows: list[dict], path: str | os.PathLike) -> Path:
    import csv

    from nst.report import COLUMNS

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = COLUMNS + ["run_id"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return path
