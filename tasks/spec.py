"""The stage contract: each stage is declared ONCE (`Stage`), and everything else is derived from that declaration.

A declaration names the stage's function, the config keys it reads (dotted, as DVC spells params), the files it
reads and writes, and the source code it runs. From it come:

* the stage's fingerprint: sha256 over those config values, the CONTENT of those input files and that code;
* its up-to-date check: the stamp (`config.json`, written last, next to its outputs) holds the fingerprint;
  equal fingerprint + every output present = nothing to do (`execute`);
* the Prefect task's cache key and "outputs exist" check (flows/), the same fingerprint;
* its `dvc.yaml` entry (`dvc_stage`): `cmd` = the stage command, `deps` = inputs + code, `params`, `outs`.

So a changed val split, a changed teacher or an edited training loop re-runs exactly the stages that read them,
in the flow, under `dvc repro` and with `nst run --no-prefect` alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nst.config import Config, portable_dump, value_at
from nst.io import atomic_write_json, content_digest, read_json

log = logging.getLogger("nst.stage")

REPO = Path(__file__).resolve().parents[1]
STAMP = "config.json"

# Vocabulary of the declarations (tasks/*.py): config key groups and the source every model stage runs.
CORE = ("nst/config.py", "nst/errors.py", "nst/io.py", "nst/s3.py", "nst/secrets.py")  # s3: URIs in data sources
MODEL_CODE = CORE + ("models", "nst/checkpoint.py", "nst/data.py", "nst/distributed.py", "nst/labels.py",
                     "nst/scan.py", "nst/shards.py", "nst/train.py")
# Imported by stages but without effect on what they write (progress display, live tracking, this module):
# left out of the code versions, so editing them re-runs nothing. tests/test_contract.py checks the rest.
NO_EFFECT = ("nst/progress.py", "nst/settings.py", "nst/tracking.py", "nst/proc.py", "nst/validate.py", "tasks/spec.py",
             "tasks/__init__.py")
EVAL_KEYS = ["data.image_size", "data.transform", "data.crop_pct"]
TRAIN_KEYS = ["seed", "data.image_size", "data.transform", "data.rrc_scale", "data.hflip", "data.crop_pct",
              "distributed.world_size"]  # DDP keeps BatchNorm statistics per process: another model
# Values a stage reads that params.yaml does not spell out as one key: derived from the config here (DVC tracks
# their spelled-out parent, `distributed`: coarser, never wrong).
DERIVED = {"distributed.world_size": lambda cfg: cfg.distributed.world_size}
DERIVED_FROM = {"distributed.world_size": ["distributed.nnodes", "distributed.nproc_per_node"]}  # for DVC


def param_value(cfg: Config, dump: dict, key: str) -> Any:
    return DERIVED[key](cfg) if key in DERIVED else value_at(dump, key)

Paths = Callable[[Config, str], list[Path]]
Keys = Callable[[Config, str], list[str]]


def _none(cfg: Config, gen: str) -> list:
    return []


@dataclass(frozen=True, eq=False)
class Stage:
    """One stage, declared once. `gen` is "" for project-wide stages, else the model generation (g0, g1, ...).
    A stage is its name: on a Dask worker the declarations may arrive as copies (cloudpickle copies the lambdas),
    and `stage in TRAINING` must still hold there."""

    name: str                                   # CLI subcommand, DVC stage name prefix, Prefect task name
    fn: Callable[..., dict]                     # the stage's logic: fn(cfg, gen) -> JSON-able result
    params: Keys                                # config keys it reads (dotted; `generations.<i>` for its own item)
    deps: Paths                                 # files/folders it reads
    outs: Paths                                 # files/folders it writes (the stamp included)
    code: tuple[str, ...]                       # source it runs (paths relative to the repository)
    scope: str = "model"                        # "project" (no generation) | "model" (g0...) | "student" (g1...)
                                                # | "finetune" (gN-ft, finetune.enabled)
    model: bool = False                         # runs a model: its own process in the flow, tag `gpu`
    metrics: Paths = _none                      # DVC metrics (not cached, committed to git)
    plots: Paths = _none                        # DVC plots
    stamp: Callable[[Config, str], Path] | None = None  # default: <folder of the first output>/config.json
    exclude_from_shards: tuple[str, ...] = field(default=())  # params that do not change per-shard work

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stage) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def stamp_path(self, cfg: Config, gen: str) -> Path:
        if self.stamp is not None:
            return self.stamp(cfg, gen)
        first = self.outs(cfg, gen)[0]
        return (first if first.suffix == "" else first.parent) / STAMP

    def task_name(self, gen: str) -> str:
        return f"{gen}/{self.name}" if gen else self.name

    def _gen_arg(self, gen: str) -> list[str]:
        return [gen] if gen and self.name != "train-teacher" else []  # train-teacher is always g0

    def dvc_name(self, gen: str) -> str:
        return "-".join([self.name, *self._gen_arg(gen)])

    def argv(self, gen: str) -> list[str]:
        """The stage command's arguments after `nst` (what dvc.yaml runs and the flow launches)."""
        return [self.name, *self._gen_arg(gen)]


# ---- fingerprints ---------------------------------------------------------------------------------------------

@functools.cache
def code_version(code: tuple[str, ...]) -> str:
    """sha256 over the declared source files (folders: every .py file in them), computed once per process and
    never by parsing source: the declaration says what a stage runs, a test checks it against its imports."""
    h = hashlib.sha256()
    for rel in code:
        p = REPO / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p]
        for f in files:
            if "__pycache__" in f.parts:
                continue
            h.update(f.relative_to(REPO).as_posix().encode() + b"\0" + content_digest(f).encode() + b"\n")
    return h.hexdigest()


def path_digest(path: Path, cfg: Config) -> str:
    """Content digest of an input: a file's bytes, or a folder's (relative path, bytes) list (visible files, symlinked
    folders followed: nst.scan.walk_files). A manifest of images (a CSV/Parquet listing image paths,
    nst.data.manifest_images) is its bytes and the content of every image it lists: those are its data, as a
    folder's files are. Images go through the scan's persistent cache, so unchanged files are not read again, and
    are read in parallel as prepare reads them (a cold fingerprint comes first and would otherwise read them all)."""
    from nst.scan import HashCache, files_digest, tree_digest
    from nst.shards import is_s3, list_shards

    if is_s3(path):  # an S3 shard set: its listing (key, size, ETag), one LIST; the objects stay where they are
        return hashlib.sha256(json.dumps([[s.url, s.size, s.etag] for s in list_shards(path)]).encode()).hexdigest()
    if "{" in str(path):  # a local brace pattern: the files it names
        files = [s.url for s in list_shards(path)]
        with HashCache.for_out_dir(cfg.out_dir) as cache:
            return files_digest([cfg.rel(Path(f)) for f in files], files, cache, workers=cfg.data.scan_workers)
    if path.is_file():
        from nst.data import manifest_images

        listed = manifest_images(path)
        if listed is None:
            return content_digest(path)
        with HashCache.for_out_dir(cfg.out_dir) as cache:
            images = files_digest([w for w, _ in listed], [f for _, f in listed], cache, workers=cfg.data.scan_workers)
        return f"{content_digest(path)}+{images}"
    if not path.is_dir():
        return "missing"
    with HashCache.for_out_dir(cfg.out_dir) as cache:
        return tree_digest(path, cache, workers=cfg.data.scan_workers)


def _dep_name(cfg: Config, p: Path) -> str:
    """An input's name in a fingerprint: outputs relative to out_dir (so two out_dirs holding the same teacher -
    a study's arms - agree), anything else as params.yaml spells it."""
    try:
        return "$out/" + Path(p).relative_to(cfg.out_dir).as_posix()
    except ValueError:
        return cfg.rel(p)


def fingerprint(stage: Stage, cfg: Config, gen: str, *, exclude: tuple[str, ...] = ()) -> str:
    h = hashlib.sha256(f"{stage.name}\0{gen}\n".encode())
    dump = portable_dump(cfg)
    for key in stage.params(cfg, gen):
        if key.startswith(exclude) and exclude:
            continue
        h.update(f"{key}={json.dumps(param_value(cfg, dump, key), sort_keys=True)}\n".encode())
    for p in stage.deps(cfg, gen):
        h.update(f"{_dep_name(cfg, p)}:{path_digest(p, cfg)}\n".encode())
    h.update(code_version(stage.code).encode())
    return h.hexdigest()[:32]


def read_stamp(stage: Stage, cfg: Config, gen: str) -> dict | None:
    p = stage.stamp_path(cfg, gen)
    if not p.is_file():
        return None
    try:
        d = read_json(p)
    except ValueError:
        return None
    return d if isinstance(d, dict) else None


def outputs_exist(stage: Stage, cfg: Config, gen: str) -> bool:
    return all(p.exists() for p in stage.outs(cfg, gen) + stage.metrics(cfg, gen) + stage.plots(cfg, gen))


def up_to_date(stage: Stage, cfg: Config, gen: str, fp: str | None = None) -> bool:
    st = read_stamp(stage, cfg, gen)
    if st is None or not outputs_exist(stage, cfg, gen):
        return False
    return st.get("fingerprint") == (fp or fingerprint(stage, cfg, gen))


def write_stamp(stage: Stage, cfg: Config, gen: str, fp: str, result: dict | None = None) -> Path:
    """The effective config next to the outputs (timm-style) and the completion marker: written last."""
    from nst.config import config_hash

    dump = portable_dump(cfg)
    body = {"stage": stage.name, "generation": gen or None, "fingerprint": fp, "config_hash": config_hash(cfg),
            "params": {k: param_value(cfg, dump, k) for k in stage.params(cfg, gen)}, "config": dump,
            "outs": [_dep_name(cfg, p) for p in stage.outs(cfg, gen)], "result": result or {}}
    return atomic_write_json(stage.stamp_path(cfg, gen), body)


def execute(stage: Stage, cfg: Config, gen: str = "", *, step: Callable[[Config, str], dict] | None = None,
            **kwargs) -> dict:
    """Run a stage unless its outputs are up to date for its fingerprint; stamp it when done. `step` runs in place
    of the stage's function when its work already ran in pieces as separate commands and only its last step is
    left (the label stage's shard groups: `nst label gN --finish`, the flow's finishing task)."""
    fp = fingerprint(stage, cfg, gen)
    if up_to_date(stage, cfg, gen, fp):
        log.info("%s: up to date, skipping", stage.task_name(gen))
        return read_stamp(stage, cfg, gen).get("result", {}) | {"skipped": True}
    result = (step(cfg, gen) if step else stage.fn(cfg, gen, fingerprint=fp, **kwargs)) or {}
    if is_main_process():
        remove_stale_outs(stage, cfg, gen)
        write_stamp(stage, cfg, gen, fp, result)
    return result


def remove_stale_outs(stage: Stage, cfg: Config, gen: str) -> list[Path]:
    """Files the stage's previous stamp says it wrote and its declaration no longer lists (e.g. val.parquet once
    data.val is unset): removed, so no later stage trusts them. Nothing the stamp does not name is ever deleted."""
    old = read_stamp(stage, cfg, gen) or {}
    now = {_dep_name(cfg, p) for p in stage.outs(cfg, gen)}
    gone = []
    for name in old.get("outs") or []:
        if not isinstance(name, str) or not name.startswith("$out/") or name in now or ".." in name.split("/"):
            continue
        p = cfg.out_dir / name.removeprefix("$out/")
        if p.is_file() and not p.is_symlink():
            p.unlink()
            gone.append(p)
            log.info("%s: removed %s (written by an earlier run, no longer an output)", stage.task_name(gen),
                     cfg.rel(p))
    return gone


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- dvc.yaml ---------------------------------------------------------------------------------------------------

def _dvc_params(keys: list[str], raw: dict) -> list[str]:
    """DVC can only track keys that params.yaml spells out: a key left to its default is tracked through its
    nearest spelled-out parent (coarser, never wrong); one with no spelled-out parent is the code's default."""
    out: list[str] = []
    for key in [k for key in keys for k in DERIVED_FROM.get(key, [key])]:
        parts = key.split(".")
        while parts:
            try:
                value_at(raw, ".".join(parts))
                break
            except (KeyError, IndexError, TypeError, ValueError):
                parts.pop()
        k = ".".join(parts)
        if k and k not in out and not any(k.startswith(o + ".") for o in out):
            out = [o for o in out if not o.startswith(k + ".")] + [k]
    return out


def _dvc_deps(cfg: Config, p: Path) -> list[str]:
    """An input as DVC deps. DVC hashes only the files it is given, so a manifest of images also brings the folder
    its images share (coarser than the fingerprint, never blind to changed pixels); a folder that would hold
    out_dir (the project itself) cannot be a dep, and then DVC sees the manifest alone."""
    from nst.data import manifest_images
    from nst.shards import is_s3, pattern_folder

    if is_s3(p):  # DVC's external dependency: it checks the objects' ETags
        return [pattern_folder(p) + "/" if "{" in p else p]
    if "{" in str(p):  # a brace pattern: the folder of its shards
        return [cfg.rel(Path(pattern_folder(str(p))))]
    listed = manifest_images(p) if p.is_file() else None
    if not listed:
        return [cfg.rel(p)]
    common = Path(os.path.commonpath([os.path.dirname(os.path.abspath(f)) for _, f in listed]))
    out = Path(os.path.abspath(cfg.out_dir))
    if common == out or common in out.parents or out in common.parents:
        return [cfg.rel(p)]
    return [cfg.rel(p), cfg.rel(common)]


def dvc_stage(stage: Stage, cfg: Config, gen: str, raw_params: dict, params_file: str = "params.yaml") -> dict[str, Any]:
    """The stage's dvc.yaml entry; for a params file other than DVC's default params.yaml, the commands and the
    params both name it."""
    rel = cfg.rel
    cmd = "nst " + " ".join(stage.argv(gen))
    entry: dict[str, Any] = {"cmd": cmd if params_file == "params.yaml" else f"{cmd} -p {params_file}"}
    deps: list[str] = []
    for p in stage.deps(cfg, gen):
        deps += [d for d in _dvc_deps(cfg, p) if d not in deps]
    entry["deps"] = deps + list(stage.code)
    params = _dvc_params(stage.params(cfg, gen), raw_params)
    if params:
        entry["params"] = params if params_file == "params.yaml" else [{params_file: params}]
    entry["outs"] = [rel(p) for p in stage.outs(cfg, gen)]
    if metrics := stage.metrics(cfg, gen):
        entry["metrics"] = [{rel(p): {"cache": False}} for p in metrics]
    if plots := stage.plots(cfg, gen):
        entry["plots"] = [rel(p) for p in plots]
    return entry

