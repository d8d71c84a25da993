"""The pipeline, declared once: the order of its steps, walked alike by `nst run --no-prefect` (below), by the
Prefect flow (flows/) and by `nst dvc-yaml` (which writes dvc.yaml from it).

    data (built-in sets only) -> prepare -> for g0, g1, ...:
        [filter-balance (students)] -> train -> evaluate -> label -> tracking
        [after the fine-tuned one (finetune.enabled): finetune gN-ft -> evaluate gN-ft -> tracking]

A model is labelled once, right after it is evaluated; the next generation's filter-balance reads those shards,
and so do the model's labeler statistics. The fine-tuned model labels nothing.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from dataclasses import dataclass

from nst.config import Config, override_args
from nst.distributed import nproc, under_torchrun
from tasks.evaluate import EVALUATE
from tasks.filter_balance import FILTER_BALANCE
from tasks.finetune import FINETUNE
from tasks.label import LABEL
from tasks.builtin_data import DATA
from tasks.prepare import PREPARE
from tasks.spec import Stage, dvc_stage, execute
from tasks.train import TRAIN_STUDENT, TRAIN_TEACHER

log = logging.getLogger("nst.pipeline")

STAGES: dict[str, Stage] = {s.name: s for s in (DATA, PREPARE, TRAIN_TEACHER, TRAIN_STUDENT, EVALUATE, LABEL,
                                                FILTER_BALANCE, FINETUNE)}
TRAINING = (TRAIN_TEACHER, TRAIN_STUDENT, FINETUNE)  # open the model's tracking run; torchrun when asked


@dataclass(frozen=True)
class Step:
    """One step of the pipeline: a stage for a generation, or (stage None) the generation's tracking."""

    stage: Stage | None
    gen: str = ""

    @property
    def name(self) -> str:
        return self.stage.task_name(self.gen) if self.stage else f"{self.gen}/track"


def steps(cfg: Config) -> list[Step]:
    out = [Step(DATA)] if cfg.data.builtin else []
    out.append(Step(PREPARE))
    for gen in cfg.model_names():
        if gen != "g0":
            out.append(Step(FILTER_BALANCE, gen))
        out += [Step(TRAIN_TEACHER if gen == "g0" else TRAIN_STUDENT, gen), Step(EVALUATE, gen), Step(LABEL, gen),
                Step(None, gen)]
        if gen == cfg.finetuned():
            ft = cfg.finetune_name()
            out += [Step(FINETUNE, ft), Step(EVALUATE, ft), Step(None, ft)]
    return out


# ---- the launch line: one place --------------------------------------------------------------------------------

def stage_argv(stage: Stage, gen: str, params_path: str, overrides: dict | None = None,
               extra: list[str] | None = None) -> list[str]:
    """`python -m cli <stage> [gen] -p params.yaml -S k=v ...`: the command dvc.yaml runs (as `nst ...`) and the
    flow launches. A training stage with distributed.nproc_per_node > 1 re-executes itself under torchrun."""
    return [sys.executable, "-m", "cli", *stage.argv(gen), "-q", "-p", str(Path(params_path).resolve()),
            *[a for o in override_args(overrides) for a in ("-S", o)], *(extra or [])]


def _torchrun(args: list[str], argv: list[str]) -> list[str]:
    assert argv[1:3] == ["-m", "cli"], argv
    return [sys.executable, "-m", "torch.distributed.run", *args, "-m", "cli", *argv[3:]]


def torchrun_argv(n: int, argv: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node N -m cli ...` in front of a stage command (argv from stage_argv)."""
    return _torchrun(["--standalone", f"--nproc-per-node={n}"], argv)


def node_argv(cfg: Config, argv: list[str], endpoint: str, rdzv_id: str) -> list[str]:
    """One node's torchrun agent in front of a stage command: the c10d rendezvous at `endpoint` (its first node
    hosts the store; ranks are given in the order the nodes join), no restarts (a lost node fails the stage, and a
    re-run resumes from the checkpoint), nodes allowed `rdzv_timeout_s` to join."""
    d = cfg.distributed
    per_node = "gpu" if d.nproc_per_node == "auto" and d.nnodes > 1 else str(nproc(d.nproc_per_node))
    return _torchrun([f"--nnodes={d.nnodes}", f"--nproc-per-node={per_node}", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
                      f"--rdzv-conf=join_timeout={int(d.rdzv_timeout_s)}", "--max-restarts=0"], argv)


def check_nodes(cfg: Config, stage: str = "train-teacher", dask: bool = False) -> None:
    """A multi-node config where nothing will start the nodes' agents: one line, before any compute."""
    if cfg.distributed.nnodes > 1 and not dask and not under_torchrun():
        from nst.errors import ConfigError

        raise ConfigError(f"distributed.nnodes = {cfg.distributed.nnodes}: a stage that spans machines runs one "
                          f"torchrun agent per node: the flow on Dask (NST_TASK_RUNNER=dask) starts them, or your "
                          f"cluster does (`torchrun --nnodes {cfg.distributed.nnodes} --rdzv-backend c10d "
                          f"--rdzv-endpoint HOST:PORT -m cli {stage} ...`, docker/slurm-train.sh, "
                          "docker/pytorchjob.yaml)")


def multi_node(stage: Stage, cfg: Config) -> bool:
    """A training stage that spans machines, not yet started by their agents."""
    return stage in TRAINING and cfg.distributed.nnodes > 1 and not under_torchrun()


def needs_torchrun(stage: Stage, cfg: Config) -> int:
    """The number of processes a stage wants when it is not already one of them (0 = run it here)."""
    if stage not in TRAINING or under_torchrun():
        return 0
    check_nodes(cfg, stage.name)
    n = nproc(cfg.distributed.nproc_per_node)
    return n if n > 1 else 0


# ---- nst run --no-prefect -----------------------------------------------------------------------------------

def run_step(step: Step, cfg: Config, params_path: str, overrides: dict | None) -> dict:
    """A stage here, in this process - or, for multi-process training, as its command under torchrun."""
    from nst.proc import run_child

    if n := needs_torchrun(step.stage, cfg):
        run_child(torchrun_argv(n, stage_argv(step.stage, step.gen, params_path, overrides)),
                  on_line=lambda line: print(line, file=sys.stderr, flush=True), cwd=str(cfg.root))
        from tasks.spec import read_stamp

        return (read_stamp(step.stage, cfg, step.gen) or {}).get("result", {})
    return execute(step.stage, cfg, step.gen)


def run_direct(cfg: Config, params_path: str = "params.yaml", overrides: dict | None = None, *,
               parent_run_id: str | None = None, tags: dict | None = None) -> list[dict]:
    """The whole pipeline as plain calls, under the out_dir's run lock; tracked like the flow."""
    import os

    from nst import tracking
    from nst.dvc import record_outputs
    from nst.io import run_lock
    from nst.report import write_summary

    check_nodes(cfg)
    with run_lock(cfg.out_dir):
        parent = tracking.start_pipeline(cfg, parent_run_id=parent_run_id, tags=tags)
        status, runs = "FAILED", {}
        try:
            for step in steps(cfg):
                if step.stage is None:
                    tracking.finish_generation(cfg, step.gen, runs.get(step.gen))
                    continue
                if step.stage in TRAINING:
                    made_from = runs.get(cfg.made_from(step.gen))  # None for g0: no run is keyed None
                    runs[step.gen] = tracking.open_generation(cfg, step.gen, parent, made_from)
                    os.environ[tracking.RUN_ENV] = runs[step.gen] or ""
                try:
                    run_step(step, cfg, params_path, overrides)
                finally:
                    os.environ.pop(tracking.RUN_ENV, None)
            rows, _ = write_summary(cfg)
            record_outputs(cfg)
            status = "FINISHED"
            return rows
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            tracking.finish_pipeline(cfg, parent, status)


# ---- dvc.yaml -------------------------------------------------------------------------------------------------

HEADER = """\
# GENERATED by `nst dvc-yaml` from params.yaml and the stage declarations in tasks/ - do not edit by hand.
# Regenerate after changing the generations list or the optional splits; `nst dvc-yaml --check` (and a test)
# fails when this file is out of date. Every `cmd` is an `nst` stage command: the same function the Prefect flow
# and `nst run` call. Execution settings (device, threads, DataLoader workers, tracking) are not params: they do not
# change which computation runs (another device or thread count may still round floating point differently).
"""


def dvc_yaml(cfg: Config, raw_params: dict, params_file: str = "params.yaml") -> dict:
    stages = {s.stage.dvc_name(s.gen): dvc_stage(s.stage, cfg, s.gen, raw_params, params_file)
              for s in steps(cfg) if s.stage}
    val = {cfg.rel(cfg.model_dir(g) / "history.json"): "val_acc" for g in cfg.evaluated_models()}
    out: dict = {"stages": stages}
    if cfg.data.val is not None:
        out["plots"] = [{"val_acc by generation": {"x": "epoch", "y": val}}]
    return out
