"""A study: the paper's comparisons as one config - arms (noise on, input noise only, model noise only, no noise,
hard vs soft labels, ratios...) x seeds x generations - and its report (mean ± std table, per-seed table, plot).

Each (arm, seed) is one ordinary pipeline run with overrides; each seed's teacher is trained once (in
`<out_dir>/seed<S>/teacher`) and shared by every arm of that seed: its outputs are hard-linked into the arm's
out_dir, where the stages' fingerprints recognise them (they do not depend on the out_dir's name), so no arm
trains it again. Resumable like any pipeline run. Runners: tasks/study.py (processes) and flows/study.py (Prefect).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator, model_validator

from nst.config import ConfigError, _format_errors, _Strict, load_config, model_order, raw_config, read_yaml
from nst.errors import StageError, quote
from nst.io import atomic_write_bytes, dumps, file_sha256, read_json
from nst.report import columns
from nst.tracking import _client, _experiment_id, _git, _guarded, _params

# Keys the study sets for every run (its seed from `seeds`, its own out_dir): an override of them would be replaced.
PER_RUN = ("seed", "out_dir")


class StudyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    params: Path = Field(description="The pipeline's params.yaml (relative to the study file).")
    out_dir: Path = Field(description="One folder per seed and arm (relative to the study file).")
    report_dir: Path | None = Field(None, description="Where <name>.md/.csv/.json/.png go (e.g. docs/); null = "
                                                      "out_dir. Files there that this study did not write are "
                                                      "never overwritten.")
    seeds: list[int] = Field(min_length=1, description="Distinct seeds; each runs every arm.")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted keys for every arm (not seed or "
                                                                        "out_dir: the study sets those per run).")
    arms: dict[str, dict[str, Any]] = Field(min_length=1, description="arm name -> dotted overrides; `student.X` "
                                                                      "applies to every generation's student, "
                                                                      "those the study's overrides add included.")
    jobs: int | None = Field(None, ge=1, le=64, description="Pipelines run side by side; null = CPU cores / 2.")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v: dict) -> dict:
        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", name) or name == "teacher":
                raise ValueError(f"arm name {name!r}: letters, digits, '_', '-', '.'; not 'teacher'")
        return v

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        twice = [s for i, s in enumerate(v) if s in v[:i]]
        if twice:  # the same seed twice is the same run twice: a std of 0 that measures nothing
            raise ValueError(f"seed {twice[0]} is listed twice; seeds must be distinct")
        return v

    @model_validator(mode="after")
    def _no_per_run_keys(self) -> "StudyConfig":
        for where, o in [("overrides", self.overrides), *((f"arms.{a}", o) for a, o in self.arms.items())]:
            for k in o:
                if k in PER_RUN:
                    raise ValueError(f"{where}.{k} = {quote(o[k])}: the study sets {k} for every run (seed from "
                                     f"`seeds`, out_dir under the study's out_dir); remove it")
        return self


def load_study(path: str | Path) -> StudyConfig:
    """Read and check a study file and every run it makes, before anything runs."""
    path = Path(path)
    raw = read_yaml(path, "study file")  # the project's bounded loader: a malformed file is one line
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a study file is a mapping (name, params, out_dir, seeds, arms), got "
                          f"{'nothing' if raw is None else type(raw).__name__}")
    try:
        st = StudyConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
    base = path.resolve().parent
    st.params = (base / st.params).resolve()
    st.out_dir = (base / st.out_dir).resolve()
    st.report_dir = (base / st.report_dir).resolve() if st.report_dir else st.out_dir
    for i, seed in enumerate(st.seeds):  # every run's config must validate before anything runs
        load_config(st.params, teacher_overrides(st, seed), check_models=i == 0)
        for arm in st.arms:
            load_config(st.params, run_overrides(st, arm, seed), check_models=i == 0)
    return st


def _put(out: dict[str, Any], key: str, value: Any) -> None:
    """Set `key` last: overrides apply in order, so the key set last wins over what an earlier one set."""
    out.pop(key, None)
    out[key] = value


def _layered(st: StudyConfig, *layers: dict[str, Any]) -> dict[str, Any]:
    """A run's overrides - the study's, then an arm's - as one ordered dict (a key set later wins). `student.X`
    stands for every generation's student of the run's effective config: params.yaml with the whole keys of all
    layers applied, so the generations a study's `generations:` adds count too (counting params.yaml's alone left
    them noised in a no-noise arm). A layer's keys of one generation (`generations.<i>.…`) follow its `student.X`:
    the more specific key wins within a layer, a later layer over an earlier one."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if not k.startswith(("student.", "generations.")):
                _put(out, k, v)
    gens = raw_config(st.params, out).get("generations") or []
    n = len(gens) if isinstance(gens, list) else 0
    for layer in layers:
        for k, v in layer.items():
            if k.startswith("student."):
                for i in range(n):
                    _put(out, f"generations.{i}.{k}", v)
        for k, v in layer.items():
            if k.startswith("generations."):
                _put(out, k, v)
    return out


def teacher_dir(st: StudyConfig, seed: int) -> Path:
    return st.out_dir / f"seed{seed}" / "teacher"


def arm_dir(st: StudyConfig, arm: str, seed: int) -> Path:
    return st.out_dir / f"seed{seed}" / arm


def _store(st: StudyConfig) -> dict[str, Any]:
    """One tracking store for all the study's runs (the study's parent run and the arms' runs must meet in one
    place): without a URI in params.yaml, the study's overrides or the environment, a SQLite file in out_dir."""
    uri = (raw_config(st.params, _layered(st, st.overrides)).get("tracking") or {}).get("tracking_uri")
    if uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return {}
    return {"tracking.tracking_uri": f"sqlite:///{st.out_dir / 'mlflow.db'}"}


def common_overrides(st: StudyConfig) -> dict[str, Any]:
    """The study's own overrides (what every run shares) and its tracking store."""
    return _layered(st, st.overrides) | _store(st)


def teacher_overrides(st: StudyConfig, seed: int) -> dict[str, Any]:
    """The seed's teacher run: the study's overrides but those of generations (it trains g0 alone)."""
    out = {k: v for k, v in common_overrides(st).items() if not k.startswith("generations.")}
    return out | {"seed": seed, "out_dir": str(teacher_dir(st, seed)), "generations": []}


def run_overrides(st: StudyConfig, arm: str, seed: int) -> dict[str, Any]:
    out = _layered(st, st.overrides, st.arms[arm]) | _store(st)
    return out | {"seed": seed, "out_dir": str(arm_dir(st, arm, seed))}


def share_teacher(st: StudyConfig, arm: str, seed: int) -> None:
    """Hard-link the seed's prepared data and teacher into the arm's out_dir (copy across file systems). Only
    what the arm does not have yet; atomic writes replace a link, so an arm never changes the shared files."""
    src, dst = teacher_dir(st, seed), arm_dir(st, arm, seed)
    for part in ("data", "g0"):
        if not (src / part).is_dir() or (dst / part).exists():
            continue
        tmp = dst / f".{part}.linking"
        shutil.rmtree(tmp, ignore_errors=True)

        def link(s: str, d: str) -> None:
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)

        shutil.copytree(src / part, tmp, copy_function=link)
        tmp.rename(dst / part)


# ---- report -----------------------------------------------------------------------------------------------------

def collect(st: StudyConfig) -> list[dict]:
    """One row per (arm, seed, generation) from the finished runs' summaries."""
    rows = []
    for arm in st.arms:
        for seed in st.seeds:
            f = arm_dir(st, arm, seed) / "summary.json"
            if f.is_file():
                rows += [{"arm": arm, "seed": seed, **r} for r in read_json(f)]
    return rows


def _mean_std(v: list[float]) -> tuple[float, float]:
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _cell(v: list[float]) -> str:
    """mean ± sample std of one table cell's values (one seed: the value; none: -)."""
    if not v:
        return "-"
    m, sd = _mean_std(v)
    return f"{m:.1f} ± {sd:.1f}" if len(v) > 1 else f"{m:.1f}"


def table(st: StudyConfig, rows: list[dict]) -> tuple[str, str]:
    """(Markdown, CSV): test top-1 mean ± sample std over seeds, per generation and arm; then per seed."""
    gens = sorted({r["generation"] for r in rows}, key=model_order)
    arms = list(st.arms)
    cell = {(r["arm"], r["generation"], r["seed"]): r["test_top1"] for r in rows}
    model = {r["generation"]: r["model"] for r in rows}
    md = [f"Test top-1 (%), mean ± sample std over seeds {', '.join(map(str, st.seeds))}:", "",
          "| generation | model | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
    csv = ["generation,model,arm,mean_top1,std_top1,n_seeds," + ",".join(f"seed{s}" for s in st.seeds)]
    for g in gens:
        cells = []
        for arm in arms:
            v = [cell[(arm, g, s)] * 100 for s in st.seeds if (arm, g, s) in cell]
            if not v:
                cells.append("-")
                continue
            m, sd = _mean_std(v)
            cells.append(_cell(v))
            csv.append(f"{g},{model[g]},{arm},{m:.4f},{sd:.4f},{len(v)}," +
                       ",".join(f"{cell[(arm, g, s)] * 100:.4f}" if (arm, g, s) in cell else "" for s in st.seeds))
        md.append(f"| {g} | {model[g]} | " + " | ".join(cells) + " |")
    md += ["", "Per seed (test top-1 %, " + " / ".join(arms) + "):", "", "| seed | " + " | ".join(gens) + " |",
           "|---|" + "---|" * len(gens)]
    for s in st.seeds:
        md.append(f"| {s} | " + " | ".join(" / ".join(f"{cell[(a, g, s)] * 100:.1f}" if (a, g, s) in cell else "-"
                                                      for a in arms) for g in gens) + " |")
    for key in [k for k in columns(rows) if k.startswith("test_top1@")]:  # evaluate.image_size was set
        md += ["", f"Test top-1 (%) at the test resolution, {key.split('@')[1]} px (`evaluate.image_size`; the "
                   "table above has each model at its own resolution, a -ft model at the one it was fine-tuned at):",
               "",
               "| generation | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms)]
        for g in gens:
            md.append(f"| {g} | " + " | ".join(_cell([r[key] * 100 for r in rows if r["arm"] == arm
                                                       and r["generation"] == g and r.get(key) is not None])
                                               for arm in arms) + " |")
    extra = [k for k in ["test_ece", *(c for c in columns(rows) if c.startswith("robust/"))]
             if any(r.get(k) is not None for r in rows)]
    if any(k.startswith("robust/") for k in extra):  # the robustness suite ran: its numbers per arm and generation
        md += ["", "Calibration and robustness (mean over seeds; mCE relative to the g0 teacher = 100):", "",
               "| arm | generation | " + " | ".join(k.removeprefix("robust/") for k in extra) + " |",
               "|---|---|" + "---|" * len(extra)]
        for arm in arms:
            for g in gens:
                vals = []
                for k in extra:
                    v = [r[k] for r in rows if r["arm"] == arm and r["generation"] == g and r.get(k) is not None]
                    m = statistics.fmean(v) if v else None
                    pct = k.startswith(("robust/fgsm", "robust/pgd", "robust/mean_flip"))
                    vals.append("-" if m is None else f"{100 * m:.1f}" if pct else f"{m:.3f}" if k == "test_ece"
                                else f"{m:.1f}")
                md.append(f"| {arm} | {g} | " + " | ".join(vals) + " |")
    return "\n".join(md) + "\n", "\n".join(csv) + "\n"


def figure(st: StudyConfig, rows: list[dict]):
    """Accuracy per generation per arm, mean with ±std error bars (a matplotlib Figure, no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.0), dpi=110)
    ax = fig.add_subplot()
    gens = sorted({r["generation"] for r in rows}, key=model_order)
    for k, arm in enumerate(st.arms):
        xs, ms, sds = [], [], []
        for g in gens:
            v = [r["test_top1"] * 100 for r in rows if r["arm"] == arm and r["generation"] == g]
            if v:
                m, sd = _mean_std(v)
                xs.append(gens.index(g) + (k - (len(st.arms) - 1) / 2) * 0.04)
                ms.append(m)
                sds.append(sd)
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=4, label=arm)
    roles = {r["generation"]: r["role"] for r in rows}
    ax.set_xticks(range(len(gens)), [f"{g}\n({roles[g]})" for g in gens])
    ax.set(ylabel="test top-1 (%)", title=f"{st.name}: mean ± std over {len(st.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def report_paths(st: StudyConfig) -> dict[str, Path]:
    return {ext: Path(st.report_dir) / f"{st.name}.{ext}" for ext in ("md", "csv", "json", "png")}


def _stamp_path(st: StudyConfig) -> Path:
    """Records the sha256 of each report file the study wrote: a file at a report path is ours only when its
    content is one we wrote (report_dir may be a folder of the user's, e.g. docs/)."""
    return Path(st.report_dir) / f".{st.name}.study-report.json"


def _refuse(p: Path, what: str) -> StageError:
    return StageError(f"{p}: exists and {what}; refusing to overwrite it - move it away or set the study's "
                      f"report_dir")


def check_report_paths(st: StudyConfig) -> dict[str, str]:
    """Refuse a report path that holds a file the study did not write (or one changed since), before the study
    runs and again before it writes; returns the sha256 of our files there now."""
    stamp, written = _stamp_path(st), {}
    if stamp.exists():
        try:
            d = json.loads(stamp.read_bytes()) if stamp.is_file() else None
        except (ValueError, UnicodeDecodeError):
            d = None
        if not (isinstance(d, dict) and d.get("study") == st.name and isinstance(d.get("files"), dict)):
            raise _refuse(stamp, f"is not the report stamp of study {st.name!r}")
        written = d["files"]
    now = {}
    for p in report_paths(st).values():
        if p.exists() or p.is_symlink():
            now[p.name] = file_sha256(p) if p.is_file() and not p.is_symlink() else ""
            if now[p.name] not in written.get(p.name, []):
                raise _refuse(p, f"was not written by study {st.name!r} (or was changed since)")
    return now


def _write_stamp(st: StudyConfig, files: dict[str, list[str]]) -> None:
    atomic_write_bytes(_stamp_path(st), dumps({"study": st.name, "written_by": "nst study", "files": files}).encode())


def write_report(st: StudyConfig) -> dict[str, Path]:
    rows = collect(st)
    md, csv = table(st, rows)
    png = io.BytesIO()
    figure(st, rows).savefig(png, format="png")
    paths = report_paths(st)
    data = {"md": md.encode(), "csv": csv.encode(), "json": dumps(rows).encode(), "png": png.getvalue()}
    new = {paths[k].name: hashlib.sha256(b).hexdigest() for k, b in data.items()}
    now = check_report_paths(st)
    # The stamp claims the old and the new contents before the first write and only the new ones after the last:
    # a crash in between leaves every file claimed, whichever of the two it holds.
    _write_stamp(st, {n: sorted({h, now.get(n, h)}) for n, h in new.items()})
    for k, b in data.items():
        atomic_write_bytes(paths[k], b)
    _write_stamp(st, {n: [h] for n, h in new.items()})
    return paths


# ---- tracking: the study's parent run -------------------------------------------------------------------

@_guarded("start_study")
def start_study(cfg, study: StudyConfig) -> str:
    """The parent run of a study; each (arm, seed) pipeline run is its child, tagged arm and seed."""
    client = _client(cfg)
    tags = {"kind": "study", "study": study.name, "mlflow.source.name": "nst study"} | _git(cfg.root)
    run = client.create_run(_experiment_id(client, cfg), tags=tags, run_name=f"study-{study.name}")
    client.log_batch(run.info.run_id, params=_params({"study": {"seeds": study.seeds, "arms": study.arms,
                                                                "overrides": study.overrides}}))
    return run.info.run_id


@_guarded("finish_study")
def finish_study(cfg, run_id: str | None, report: dict, status: str = "FINISHED") -> None:
    if run_id is None:
        return
    client = _client(cfg)
    for p in report.values():
        client.log_artifact(run_id, str(p), "report")
    client.set_terminated(run_id, status)
