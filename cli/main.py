"""`nst`: one subcommand per stage (what `dvc.yaml` runs and the Prefect flow launches), plus `run`, data tools,
`dvc-yaml`, `labels`, `study`, `table`, `compare` and `track`.

Exit codes: 0 ok; 2 an expected failure (bad config, bad data, a busy out_dir, a missing file, disk full, S3
errors...), printed as ONE `error:` line naming the culprit; 1 an internal error (one line; the traceback with
`--debug`); 3 the pipeline finished but tracking is incomplete (see outputs/tracking_errors.json, `nst track`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

from nst.errors import EXIT_ERROR, EXIT_INTERNAL, EXIT_TRACKING, USER_ERRNOS, ConfigError, NstError, os_error_line, quote

log = logging.getLogger("nst")

OFFLINE_DEFAULTS = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}


def _add_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", default="params.yaml", help="config file (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value, e.g. -S teacher.epochs=5 (repeatable)")


def _cfg(args, *, check_models: bool = True, device: bool = False, sources: bool = False):
    from nst.config import check_device, load_config
    from nst.validate import check_sources

    cfg = load_config(args.params, args.overrides, check_models=check_models)
    if device:
        check_device(cfg, args.params)
    if sources:
        check_sources(cfg, args.params)
    if cfg.threads:
        import torch

        # `threads` is the stage's budget on this machine: torchrun's processes here share it (each taking all of it
        # oversubscribes the cores, and OpenMP's spinning made 2 ranks on 2 cores 2.9x slower than 1 thread each).
        torch.set_num_threads(max(1, cfg.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return cfg


def _print(obj, args=None) -> None:
    if not getattr(args, "quiet", False):
        print(json.dumps(obj, indent=2, default=str))


# ---- stages ---------------------------------------------------------------------------------------------------

def _shards(spec: str | None, n: int) -> list[int] | None:
    """`3`, `0,1,5`, `2-7` or `i::k` (every k-th shard from i: how shards spread over k GPUs)."""
    if spec is None:
        return None
    try:
        if "::" in spec:
            i, k = (int(x) for x in spec.split("::"))
            return list(range(i, n, k))
        out: list[int] = []
        for part in spec.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        return out
    except ValueError:
        raise ConfigError(f"--shards {quote(spec, 80)}: expected N, N,M,..., A-B or I::K") from None


def cmd_stage(args) -> None:
    from nst.config import parse_overrides
    from nst.distributed import visible_gpus
    from nst.io import stage_lock
    from tasks.pipeline import STAGES, Step, run_step, steps
    from tasks.spec import execute

    stage = STAGES[args.cmd]
    cfg = _cfg(args, device=stage.model, sources=stage.name == "prepare")
    gen = getattr(args, "generation", None) or ("g0" if stage.name == "train-teacher" else "")
    if gen and stage.scope == "student":
        cfg.generation(gen)
    elif gen and gen not in (runs_for := [s.gen for s in steps(cfg) if s.stage is stage]):
        raise ConfigError(f"{args.params}: generation {quote(gen, 80)} is not one of {runs_for}"
                          + (" (finetune.enabled is false)" if stage.scope == "finetune" and not runs_for else ""))
    with stage_lock(cfg.out_dir):
        if stage.name == "label":
            from tasks.label import finish_labels, label, num_shards

            if not args.finish and args.shards is None and (ngpu := visible_gpus(cfg.device)) > 1:
                _spread_over_gpus(stage, gen, args, ngpu)
                _print(execute(stage, cfg, gen, step=finish_labels), args)
                return
            if args.finish or (shards := _shards(args.shards, num_shards(cfg))) is None:
                _print(execute(stage, cfg, gen, step=finish_labels if args.finish else None), args)
            else:
                _print(label(cfg, gen, shards=shards), args)
            return
        _print(run_step(Step(stage, gen), cfg, args.params, parse_overrides(args.overrides)), args)  # torchrun if asked


def _spread_over_gpus(stage, gen: str, args, n: int) -> None:
    """`nst label gN` on a machine with N GPUs: one process per GPU, each labelling every N-th shard."""
    from concurrent.futures import ThreadPoolExecutor

    from nst.proc import run_child
    from tasks.pipeline import stage_argv

    def one(i: int) -> None:
        argv = stage_argv(stage, gen, args.params, None, ["--shards", f"{i}::{n}"] +
                          [a for o in args.overrides for a in ("-S", o)])
        run_child(argv, on_line=lambda line: print(f"[gpu {i}] {line}", file=sys.stderr, flush=True),
                  env={**os.environ, "CUDA_VISIBLE_DEVICES": str(i)})

    with ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))


# ---- data --------------------------------------------------------------------------------------------------

def cmd_data(args) -> None:
    from nst.datasets import make_digits, make_toy

    if args.data_cmd == "toy":
        sizes = {k: getattr(args, k) for k in ("size", "labeled_per_class", "val_per_class", "unlabeled_per_class",
                                               "test_per_class") if getattr(args, k) is not None}
        print(make_toy(Path(args.out), seed=args.seed, force=args.force, **sizes))
    elif args.data_cmd == "digits":
        out = Path(args.out or f"data/digits-{args.labels_per_class}-seed{args.seed}")
        print(make_digits(out, labels_per_class=args.labels_per_class, seed=args.seed, force=args.force))
    elif args.data_cmd == "pull":
        from nst.s3 import pull_prefix

        _print(pull_prefix(args.uri, Path(args.dest), endpoint_url=args.endpoint_url, max_workers=args.workers))


def cmd_pack(args) -> None:
    from nst.pack import pack

    _print(pack(args.source, args.dest, shard_size=args.shard_size, workers=args.workers))


# ---- the pipeline ----------------------------------------------------------------------------------------------

def _clean_overrides(args) -> list[str]:
    """Credentials in a tracking URI override move to MLflow's auth variables: the URI that travels on (Prefect
    parameters, child command lines, logs) is clean."""
    from nst.secrets import move_tracking_credentials

    out = []
    for o in args.overrides:
        k, _, v = o.partition("=")
        if k.strip() == "tracking.tracking_uri" and "@" in v:
            v = move_tracking_credentials(v.strip().strip("'\""))
        out.append(f"{k}={v}")
    return out


def cmd_run(args) -> int:
    from nst.report import text_table
    from nst.tracking import tracking_errors

    args.overrides = _clean_overrides(args)
    from flows.runners import check_scheduler, runner_kind

    cfg = _cfg(args, device=args.no_prefect or runner_kind() != "dask", sources=True)  # the flow's own rule
    if not args.no_prefect:
        check_scheduler()  # before the flow starts
    errors_before = len(tracking_errors(cfg)) if cfg.tracking.enabled else 0
    tags = dict(t.split("=", 1) for t in args.tag)
    if args.no_prefect:
        from nst.config import parse_overrides
        from tasks.pipeline import run_direct

        rows = run_direct(cfg, args.params, parse_overrides(args.overrides), parent_run_id=args.mlflow_parent,
                          tags=tags)
    else:
        from nst import warm

        warm.start()  # the stage commands' imports, while Prefect starts its server
        rows = run_flow(args.params, args.overrides, args.mlflow_parent, tags)
    print(text_table(rows))
    print(f"\noutputs: {cfg.out_dir}  (summary.md, per-generation folders)")
    lost = tracking_errors(cfg)[errors_before:] if cfg.tracking.enabled else []
    if lost:
        print(f"tracking incomplete: {len(lost)} tracking operation(s) failed (first: {lost[0]['operation']}: "
              f"{lost[0]['error']}); outputs are complete - see {cfg.out_dir / 'tracking_errors.json'} and log them "
              "with `nst track`", file=sys.stderr)
        return EXIT_TRACKING
    return 0


def run_flow(params_path: str, overrides: list[str] | None = None, parent_run_id: str | None = None,
             tags: dict | None = None) -> list[dict]:
    """The Prefect flow `noisy-student`, in this process. Without PREFECT_API_URL Prefect starts a temporary local
    server for the run (ephemeral mode): nothing to start by hand."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # default 20 s is too short
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nst")  # before Prefect configures logging
    if "prefect" not in sys.modules:
        # Prefect's console handler prints run logs with their flow/task run names; it installs itself on the root
        # logger only when that has no handler of ours.
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
    from flows.noisy_student import noisy_student
    from nst.config import parse_overrides

    return noisy_student(params_path=str(params_path), overrides=parse_overrides(overrides) or None,
                         parent_run_id=parent_run_id, tags=tags or None)


def cmd_dvc_yaml(args) -> int:
    import yaml

    from nst.io import atomic_write_text
    from tasks.pipeline import HEADER, dvc_yaml

    cfg = _cfg(args)
    from nst.config import read_yaml

    raw = read_yaml(args.params) or {}
    name = Path(args.params).name
    if name != "params.yaml" and not args.output:  # never overwrite the project's dvc.yaml from another file
        raise ConfigError(f"{args.params}: not the project's params.yaml; choose where to write with -o")
    text = HEADER + yaml.safe_dump(dvc_yaml(cfg, raw, name), sort_keys=False, width=120)
    target = Path(args.output or cfg.root / "dvc.yaml")
    if args.check:
        current = target.read_text() if target.is_file() else ""
        if current != text:
            print(f"error: {target} is out of date with {args.params} and the stage declarations; run `nst dvc-yaml`",
                  file=sys.stderr)
            return EXIT_ERROR
        print(f"{target}: up to date")
        return 0
    atomic_write_text(target, text)
    print(target)
    return 0


# ---- reports --------------------------------------------------------------------------------------------------

def _output_file(flag: str, path: str | None) -> str | None:
    """A file to write named by an option, checked before any work: a folder there is named with its option."""
    if path is not None and Path(path).is_dir():
        raise ConfigError(f"{flag} {quote(path)}: is a directory; give the name of a file (in it, or elsewhere)")
    return path


def cmd_table(args) -> None:
    """Reads outputs only (the pipeline writes summary.json/.md): a mistyped out_dir creates nothing."""
    from nst.report import finished_rows, markdown_table, text_table

    rows = finished_rows(_cfg(args, check_models=False))
    print(markdown_table(rows) if args.markdown else text_table(rows))


def cmd_labels(args) -> None:
    from nst.report import labels_report

    csv_path = _output_file("--csv", args.csv)
    print(labels_report(_cfg(args, check_models=False), args.generation, csv_path=csv_path))


def cmd_compare(args) -> None:
    from nst.io import atomic_write_text
    from nst.report import compare_rows, markdown_table, text_table, write_csv
    from nst.secrets import redact
    from nst.tracking import tracking_uri

    cfg = _cfg(args, check_models=False)
    _output_file("--csv", args.csv)
    _output_file("--markdown", args.markdown)
    from mlflow.exceptions import MlflowException

    try:
        parent, rows = compare_rows(cfg, args.run_id)
    except MlflowException as e:
        raise ConfigError(f"{redact(tracking_uri(cfg))}: {e.message}") from None
    print(f"pipeline run {parent.info.run_id} ({parent.info.run_name}, {parent.info.status}) at "
          f"{redact(tracking_uri(cfg))}")
    print(text_table(rows))
    if args.csv:
        print(f"csv: {write_csv(rows, args.csv)}")
    if args.markdown:
        print(f"markdown: {atomic_write_text(args.markdown, markdown_table(rows))}")


def cmd_track(args) -> None:
    from nst.tracking import track_finished, tracking_errors

    cfg = _cfg(args, check_models=False)
    if not cfg.tracking.enabled:
        raise ConfigError(f"{args.params}: tracking.enabled is false (override with -S tracking.enabled=true)")
    before = len(tracking_errors(cfg))
    run_id = track_finished(cfg)
    errors = tracking_errors(cfg)[before:]
    if run_id is None or errors:
        raise NstError(f"tracking failed ({len(errors)} errors, see {cfg.out_dir / 'tracking_errors.json'})")
    print(f"pipeline run {run_id}")


def cmd_study(args) -> int:
    from nst.study import load_study

    st = load_study(args.config)
    if args.no_prefect:
        from tasks.study import run_study_direct

        report = run_study_direct(st, args.jobs)
    else:
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        from flows.study import study

        report = study(str(Path(args.config).resolve()), args.jobs)
    print(Path(report["md"]).read_text())
    print("report: " + ", ".join(str(p) for p in report.values()))
    return 0


# ---- parser and main -------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nst", description="Noisy Student Training pipeline (Xie et al., CVPR 2020).")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="make or fetch datasets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    t = dsub.add_parser("toy", help="synthetic 10-class shapes, offline and deterministic")
    t.add_argument("--out", default="data/toy")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true")
    for flag in ("size", "labeled-per-class", "val-per-class", "unlabeled-per-class", "test-per-class"):
        t.add_argument(f"--{flag}", type=int, default=None, help="default: nst.datasets.make_toy's")
    g = dsub.add_parser("digits", help="scikit-learn's bundled digits, K labels per class")
    g.add_argument("--labels-per-class", type=int, required=True)
    g.add_argument("--out", default=None, help="default data/digits-K-seedS")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true")
    pl = dsub.add_parser("pull", help="fetch a raw image set from S3 (any S3-compatible endpoint)")
    pl.add_argument("uri", help="s3://bucket/prefix")
    pl.add_argument("--dest", default="data/raw")
    pl.add_argument("--endpoint-url", default=None, help="default: $NST_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL")
    pl.add_argument("--workers", type=int, default=8)
    d.set_defaults(func=cmd_data)

    pk = sub.add_parser("pack", help="pack loose images (ImageFolder, manifest, s3:// prefix) into tar shards")
    pk.add_argument("source", help="ImageFolder dir, CSV/Parquet manifest (path,label) or s3://bucket/prefix of files")
    pk.add_argument("dest", help="folder or s3://bucket/prefix for NNNNN.tar + NNNNN.parquet + classes.json")
    pk.add_argument("--shard-size", default="256MB", help="bytes of tar per shard (256MB, 1GB, 65536)")
    pk.add_argument("--workers", type=int, default=None, help="shards written at once (default: CPUs, max 8)")
    pk.set_defaults(func=cmd_pack)

    for name, gen, help_ in [
        ("builtin-data", False, "generate the built-in set named by data.builtin into data/<name>"),
        ("prepare", False, "scan data sources into Parquet manifests"),
        ("train-teacher", False, "train the generation-0 teacher on labeled data"),
        ("evaluate", True, "test metrics of GEN's model (g0 = teacher)"),
        ("label", True, "GEN's model labels the unlabeled set (all shards, or --shards)"),
        ("filter-balance", True, "threshold and class-balance the pseudo-labels GEN trains on (made by its teacher)"),
        ("train-student", True, "train GEN's noised student on labeled + pseudo-labeled data"),
        ("finetune", True, "fine-tune gN into GEN = gN-ft at the test resolution (finetune.*), shallow layers fixed"),
    ]:
        sp = sub.add_parser(name, help=help_)
        _add_cfg(sp)
        sp.add_argument("-q", "--quiet", action="store_true", help="no JSON result on stdout (launched stages)")
        if gen:
            sp.add_argument("generation", help="g0 (the teacher), g1, g2, ...")
        if name == "label":
            sp.add_argument("--shards", default=None, help="N | N,M | A-B | I::K (every K-th from I)")
            sp.add_argument("--finish", action="store_true", help="only the finishing step (statistics, stamp)")
        sp.set_defaults(func=cmd_stage)

    r = sub.add_parser("run", help="the whole pipeline: teacher, then every generation; prints the table")
    _add_cfg(r)
    r.add_argument("--no-prefect", action="store_true", help="walk the pipeline in this process, without Prefect")
    r.add_argument("--mlflow-parent", default=None, metavar="RUN_ID",
                   help="nest the pipeline's MLflow run under this one")
    r.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="MLflow tag of the pipeline run")
    r.set_defaults(func=cmd_run)
    dv = sub.add_parser("dvc-yaml", help="write dvc.yaml from params.yaml and the stage declarations")
    _add_cfg(dv)
    dv.add_argument("--check", action="store_true", help="fail when dvc.yaml differs from what would be written")
    dv.add_argument("-o", "--output", default=None, help="default: dvc.yaml next to params.yaml")
    dv.set_defaults(func=cmd_dvc_yaml)
    lb = sub.add_parser("labels", help="per-class table of GEN's training pseudo-labels (and --csv of the rows)")
    _add_cfg(lb)
    lb.add_argument("generation")
    lb.add_argument("--csv", default=None, metavar="PATH", help="write the selected rows (path, class, copies...)")
    lb.set_defaults(func=cmd_labels)
    tb = sub.add_parser("table", help="print the generation table from finished outputs")
    _add_cfg(tb)
    tb.add_argument("--markdown", action="store_true")
    tb.set_defaults(func=cmd_table)
    cp = sub.add_parser("compare", help="the generation table from the MLflow tracking server (latest pipeline run)")
    _add_cfg(cp)
    cp.add_argument("--run-id", default=None, help="a pipeline (parent) run id; default: the latest")
    cp.add_argument("--csv", default=None, metavar="PATH", help="also write the table as CSV")
    cp.add_argument("--markdown", default=None, metavar="PATH", help="also write the table as Markdown")
    cp.set_defaults(func=cmd_compare)
    tr = sub.add_parser("track", help="log finished outputs to MLflow (after a tracking outage)")
    _add_cfg(tr)
    tr.set_defaults(func=cmd_track)
    st = sub.add_parser("study", help="the paper's comparisons (noise arms x seeds x generations) from one config")
    st.add_argument("config", help="study YAML (see experiments/)")
    st.add_argument("--no-prefect", action="store_true", help="run the arms here, without Prefect")
    st.add_argument("--jobs", type=int, default=None, help="arms x seeds run side by side (default: CPU cores / 2)")
    st.set_defaults(func=cmd_study)
    return ap


class _Stderr:
    """The current sys.stderr at each write (tests and embedding code swap it), never a stale one."""

    def write(self, s: str) -> int:
        return sys.stderr.write(s)

    def flush(self) -> None:
        sys.stderr.flush()


def _setup_logging(verbose: bool) -> None:
    from nst.secrets import RedactingFilter

    rank = int(os.environ.get("RANK", "0"))
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_nst", False)]:
        root.removeHandler(h)
    handler = logging.StreamHandler(_Stderr())
    handler._nst = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else (logging.INFO if rank == 0 else logging.WARNING))
    for noisy in ("httpx", "httpcore", "botocore", "urllib3"):  # one INFO line per request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    for k, v in OFFLINE_DEFAULTS.items():  # no network but package registries: fail fast, never phone home
        os.environ.setdefault(k, v)
    if os.environ.get("NST_PARENT_PID") or os.environ.get("TORCHELASTIC_RUN_ID"):
        from nst.proc import die_with_parent

        # A launched stage (and each torchrun rank) dies with the process that started it; a rank started by an
        # outside launcher's torchrun (srun, a PyTorchJob) with its agent, which runs it in a session of its own.
        die_with_parent()
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        from nst.settings import check_environment

        check_environment()
        rc = args.func(args)
        return rc or 0
    except NstError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except (FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e if e.filename is None else os_error_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as e:
        if e.errno in USER_ERRNOS:
            print(f"error: {os_error_line(e)}", file=sys.stderr)
            return EXIT_ERROR
        return _internal(e, args.debug)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns anything else into exit code 1
        from nst.proc import ChildFailed

        if isinstance(e, ChildFailed):
            print(e.last_error if e.last_error.startswith("error:") else f"error: {e}", file=sys.stderr)
            return EXIT_ERROR if e.last_error.startswith("error:") else EXIT_INTERNAL
        if type(e).__name__ in ("ShardFailure", "StageFailed"):
            print(f"error: {e}", file=sys.stderr)
            return EXIT_ERROR
        return _internal(e, args.debug)


def _internal(e: BaseException, debug: bool) -> int:
    from nst.secrets import redact

    if debug:
        traceback.print_exc()
    text = str(e).splitlines()[0][:300] if str(e) else ""
    print(redact(f"internal error: {type(e).__name__}: {text} (run with --debug for the traceback)"), file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
