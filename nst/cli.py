"""`nst`: one subcommand per stage (what `dvc.yaml` calls), plus data tools, `run` and `compare`.

Every subcommand validates params.yaml first; bad input ends with one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from nst.config import ConfigError, load_config
from nst.io import Busy

log = logging.getLogger("nst")


def _add_cfg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--params", default="params.yaml", help="config file (default: params.yaml)")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a params.yaml value, e.g. -S teacher.epochs=5 (repeatable)")


def _cfg(args):
    cfg = load_config(args.params, args.overrides)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    return cfg


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def ensure_builtin_data(cfg) -> None:
    """The main job needs no download: built-in datasets are generated where params.yaml expects them."""
    from nst.datasets import make_digits, make_toy

    if cfg.data.labeled.exists():
        return
    root = cfg.data.labeled.parent
    if cfg.data.name == "toy":
        log.info("generating the toy dataset in %s", root)
        make_toy(root, seed=0)  # the dataset seed is fixed (as in dvc.yaml's `data` stage); `seed` drives training
    elif cfg.data.name.startswith("digits"):
        k = int(cfg.data.name.split("-")[1]) if "-" in cfg.data.name else 10
        make_digits(root, labels_per_class=k, seed=cfg.seed)


def cmd_data(args) -> None:
    from nst.datasets import make_digits, make_toy

    if args.data_cmd == "toy":
        sizes = {k: getattr(args, k) for k in ("size", "labeled_per_class", "val_per_class", "unlabeled_per_class",
                                               "test_per_class") if getattr(args, k) is not None}
        print(make_toy(Path(args.out), seed=args.seed, force=args.force, **sizes))
    elif args.data_cmd == "digits":
        out = Path(args.out or f"data/digits-{args.labels_per_class}")
        print(make_digits(out, labels_per_class=args.labels_per_class, seed=args.seed, force=args.force))
    elif args.data_cmd == "pull":
        from nst.s3 import S3PullError, pull_prefix

        try:
            _print(pull_prefix(args.uri, Path(args.dest), endpoint_url=args.endpoint_url, max_workers=args.workers))
        except S3PullError as e:  # objects still failing after retries: one line, like every other bad input
            raise ValueError(str(e)) from None


def cmd_stage(args) -> None:
    import tasks

    cfg = _cfg(args)
    if args.cmd == "prepare":
        ensure_builtin_data(cfg)
        _print(tasks.prepare(cfg))
    elif args.cmd == "train-teacher":
        _print(tasks.train_teacher(cfg))
    elif args.cmd == "pseudo-label":
        _print(tasks.pseudo_label(cfg, args.generation, None if args.shard is None else [args.shard]))
    elif args.cmd == "filter-balance":
        _print(tasks.filter_balance(cfg, args.generation))
    elif args.cmd == "train-student":
        _print(tasks.train_student(cfg, args.generation))
    elif args.cmd == "evaluate":
        _print(tasks.evaluate(cfg, args.generation))


def cmd_run(args) -> None:
    from nst.report import text_table

    cfg = _cfg(args)
    ensure_builtin_data(cfg)
    if args.no_prefect:
        from nst.dvc import record_outputs
        from nst.pipeline import run_direct

        rows = run_direct(cfg)
        try:  # as the flow's last task does: dvc.lock then describes these outputs
            record_outputs(cfg)
        except Exception as e:  # noqa: BLE001 - the outputs are complete; only their DVC record is missing
            log.error("recording outputs in DVC failed (%s); the outputs are complete: `dvc commit -f` records "
                      "them", e)
    else:
        rows = run_flow(args.params, args.overrides)
    print(text_table(rows))
    print(f"\noutputs: {cfg.out_dir}  (summary.md, per-generation folders)")


def run_flow(params_path: str, overrides: list[str] | None = None) -> list[dict]:
    """The Prefect flow `noisy-student` (flows/noisy_student.py), in this process. Without PREFECT_API_URL Prefect
    starts a temporary local server for the run (ephemeral mode; the first run on a new PREFECT_HOME spends
    ~30 s creating its database): nothing to start by hand. With PREFECT_API_URL set, the run shows in that server."""
    import os

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # default 20 s is too short
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nst")  # before Prefect configures logging
    if "prefect" not in sys.modules:
        # Prefect's console handler prints run logs with their flow/task run names and keeps the HTTP client's
        # INFO lines out; it installs itself on the root logger only when that has no handler of ours.
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        if root.level < logging.INFO:
            os.environ.setdefault("PREFECT_LOGGING_LEVEL", logging.getLevelName(root.level))
    from nst.config import parse_overrides

    from flows.noisy_student import noisy_student

    return noisy_student(params_path=str(params_path), overrides=parse_overrides(overrides) or None)


def cmd_table(args) -> None:
    from nst.report import markdown_table, text_table, write_summary

    rows, _ = write_summary(_cfg(args))
    print(markdown_table(rows) if args.markdown else text_table(rows))


def cmd_compare(args) -> None:
    """The generation table from the tracking server (MLflow), for the latest pipeline run or --run-id."""
    from nst.io import atomic_write_text
    from nst.report import markdown_table, text_table
    from nst.tracking import compare_rows, tracking_uri, write_csv

    cfg = load_config(args.params, args.overrides, check_models=False)
    from mlflow.exceptions import MlflowException

    try:
        parent, rows = compare_rows(cfg, args.run_id)
    except MlflowException as e:
        raise ValueError(f"{tracking_uri(cfg)}: {e.message}") from None
    print(f"pipeline run {parent.info.run_id} ({parent.info.run_name}, {parent.info.status}) at {tracking_uri(cfg)}")
    print(text_table(rows))
    if args.csv:
        print(f"csv: {write_csv(rows, args.csv)}")
    if args.markdown:
        print(f"markdown: {atomic_write_text(args.markdown, markdown_table(rows))}")


def cmd_track(args) -> None:
    """Log a finished pipeline's outputs to MLflow (e.g. after a tracking outage)."""
    from nst.tracking import track_finished, tracking_errors

    cfg = load_config(args.params, args.overrides, check_models=False)
    if not cfg.tracking.enabled:
        raise ValueError(f"{args.params}: tracking.enabled is false (override with -S tracking.enabled=true)")
    before = len(tracking_errors(cfg))
    run_id = track_finished(cfg)
    errors = tracking_errors(cfg)[before:]
    if run_id is None or errors:
        raise ValueError(f"tracking failed ({len(errors)} errors, see {cfg.out_dir / 'tracking_errors.json'})")
    print(f"pipeline run {run_id}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nst", description="Noisy Student Training pipeline (Xie et al., CVPR 2020).")
    ap.add_argument("-v", "--verbose", action="store_true")
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
    g.add_argument("--out", default=None, help="default data/digits-K")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force", action="store_true")
    pl = dsub.add_parser("pull", help="fetch a raw image set from S3 (any S3-compatible endpoint)")
    pl.add_argument("uri", help="s3://bucket/prefix")
    pl.add_argument("--dest", default="data/raw")
    pl.add_argument("--endpoint-url", default=None, help="default: $NST_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL")
    pl.add_argument("--workers", type=int, default=8)
    d.set_defaults(func=cmd_data)

    for name, needs_gen, help_ in [
        ("prepare", False, "scan data sources into Parquet manifests"),
        ("train-teacher", False, "train the generation-0 teacher on labeled data"),
        ("pseudo-label", True, "label the unlabeled set with GEN's teacher (all shards, or --shard N)"),
        ("filter-balance", True, "threshold and class-balance GEN's pseudo-labels"),
        ("train-student", True, "train GEN's noised student on labeled + pseudo-labeled data"),
        ("evaluate", True, "test metrics of GEN's model (g0 = teacher)"),
    ]:
        sp = sub.add_parser(name, help=help_)
        _add_cfg(sp)
        if needs_gen:
            sp.add_argument("generation", help="g0 (teacher, evaluate only), g1, g2, ...")
        if name == "pseudo-label":
            sp.add_argument("--shard", type=int, default=None)
        sp.set_defaults(func=cmd_stage)

    r = sub.add_parser("run", help="the whole pipeline: teacher, then every generation; prints the table")
    _add_cfg(r)
    r.add_argument("--no-prefect", action="store_true",
                   help="call the stage functions directly instead of running the Prefect flow")
    r.set_defaults(func=cmd_run)
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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "httpcore"):  # one INFO line per Prefect API request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError, Busy) as e:  # incl. nst.data.DataError (no torch import)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
