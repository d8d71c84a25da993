"""A study: the paper's comparisons as one config - arms (noise on, input noise only, model noise only, no noise,
hard vs soft labels, ratios...) x seeds x generations - and its report (mean ± std table, per-seed table, plot).

Each (arm, seed) is one ordinary pipeline run with overrides; each seed's teacher is trained once (in
`<out_dir>/seed<S>/teacher`) and shared by every arm of that seed: its outputs are hard-linked into the arm's
out_dir, where the stages' fingerprints recognise them (they do not depend on the out_dir's name), so no arm
trains it again. Resumable like any pipeline run. Runners: tasks/study.py (processes) and flows/study.py (Prefect).
"""

from __future__ import annotations

import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from nst.config import ConfigError, _format_errors, _Strict, load_config
from nst.io import atomic_path, atomic_write_json, atomic_write_text, read_json
from nst.report import COLUMNS, columns
from nst.tracking import _client, _experiment_id, _git, _guarded, _params


class StudyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    params: Path = Field(description="The pipeline's params.yaml (relative to the study file).")
    out_dir: Path = Field(description="One folder per seed and arm (relative to the study file).")
    report_dir: Path | None = Field(None, description="Where <name>.md/.csv/.png go (e.g. docs/); null = out_dir.")
    seeds: list[int] = Field(min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="Dotted keys for every arm.")
    arms: dict[str, dict[str, Any]] = Field(min_length=1, description="arm name -> dotted overrides; `student.X` "
                                                                      "applies to every generation's student.")
    jobs: int | None = Field(None, ge=1, le=64, description="Pipelines run side by side; null = CPU cores / 2.")

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, v: dict) -> dict:
        import re

        for name in v:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,40}", name) or name == "teacher":
                raise ValueError(f"arm name {name!r}: letters, digits, '_', '-', '.'; not 'teacher'")
        return v


def load_study(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: study file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        st = StudyConfig.model_validate(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
    base = path.resolve().parent
    st.params = (base / st.params).resolve()
    st.out_dir = (base / st.out_dir).resolve()
    st.report_dir = (base / st.report_dir).resolve() if st.report_dir else st.out_dir
    for arm in st.arms:  # every arm's config must validate before anything runs
        for seed in st.seeds[:1]:
            load_config(st.params, run_overrides(st, arm, seed))
    return st


def _expand(st: StudyConfig, overrides: dict[str, Any]) -> dict[str, Any]:
    n = len((yaml.safe_load(st.params.read_text()) or {}).get("generations", []))
    out: dict[str, Any] = {}
    for k, v in overrides.items():
        if k.startswith("student."):
            out |= {f"generations.{i}.{k}": v for i in range(n)}
        else:
            out[k] = v
    return out


def teacher_dir(st: StudyConfig, seed: int) -> Path:
    return st.out_dir / f"seed{seed}" / "teacher"


def arm_dir(st: StudyConfig, arm: str, seed: int) -> Path:
    return st.out_dir / f"seed{seed}" / arm


def common_overrides(st: StudyConfig) -> dict[str, Any]:
    """The study's own overrides; and one tracking store for all its runs (the study's parent run and the arms'
    runs must meet in one place): without a configured URI, a SQLite file in the study's out_dir."""
    out = _expand(st, st.overrides)
    if not out.get("tracking.tracking_uri") and not os.environ.get("MLFLOW_TRACKING_URI"):
        raw = yaml.safe_load(st.params.read_text()) or {}
        if not (raw.get("tracking") or {}).get("tracking_uri"):
            out["tracking.tracking_uri"] = f"sqlite:///{st.out_dir / 'mlflow.db'}"
    return out


def teacher_overrides(st: StudyConfig, seed: int) -> dict[str, Any]:
    return common_overrides(st) | {"seed": seed, "out_dir": str(teacher_dir(st, seed)), "generations": []}


def run_overrides(st: StudyConfig, arm: str, seed: int) -> dict[str, Any]:
    return common_overrides(st) | _expand(st, st.arms[arm]) | {"seed": seed, "out_dir": str(arm_dir(st, arm, seed))}


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


def table(st: StudyConfig, rows: list[dict]) -> tuple[str, str]:
    """(Markdown, CSV): test top-1 mean ± sample std over seeds, per generation and arm; then per seed."""
    gens = sorted({r["generation"] for r in rows}, key=lambda g: int(g[1:]))
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
            cells.append(f"{m:.1f} ± {sd:.1f}" if len(v) > 1 else f"{m:.1f}")
            csv.append(f"{g},{model[g]},{arm},{m:.4f},{sd:.4f},{len(v)}," +
                       ",".join(f"{cell[(arm, g, s)] * 100:.4f}" if (arm, g, s) in cell else "" for s in st.seeds))
        md.append(f"| {g} | {model[g]} | " + " | ".join(cells) + " |")
    md += ["", "Per seed (test top-1 %, " + " / ".join(arms) + "):", "", "| seed | " + " | ".join(gens) + " |",
           "|---|" + "---|" * len(gens)]
    for s in st.seeds:
        md.append(f"| {s} | " + " | ".join(" / ".join(f"{cell[(a, g, s)] * 100:.1f}" if (a, g, s) in cell else "-"
                                                      for a in arms) for g in gens) + " |")
    extra = [k for k in ["test_ece", *columns(rows)[len(COLUMNS):]] if any(r.get(k) is not None for r in rows)]
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
    gens = sorted({r["generation"] for r in rows}, key=lambda g: int(g[1:]))
    for k, arm in enumerate(st.arms):
        xs, ms, sds = [], [], []
        for g in gens:
            v = [r["test_top1"] * 100 for r in rows if r["arm"] == arm and r["generation"] == g]
            if v:
                m, sd = _mean_std(v)
                xs.append(int(g[1:]) + (k - (len(st.arms) - 1) / 2) * 0.04)
                ms.append(m)
                sds.append(sd)
        ax.errorbar(xs, ms, yerr=sds, marker="o", capsize=4, label=arm)
    ax.set_xticks(range(len(gens)), [f"{g}\n({'teacher' if g == 'g0' else 'student'})" for g in gens])
    ax.set(ylabel="test top-1 (%)", title=f"{st.name}: mean ± std over {len(st.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def write_report(st: StudyConfig) -> dict[str, Path]:
    rows = collect(st)
    md, csv = table(st, rows)
    out = Path(st.report_dir)
    paths = {"md": atomic_write_text(out / f"{st.name}.md", md), "csv": atomic_write_text(out / f"{st.name}.csv", csv),
             "json": atomic_write_json(out / f"{st.name}.json", rows)}
    with atomic_path(out / f"{st.name}.png") as tmp:
        figure(st, rows).savefig(tmp, format="png")
    paths["png"] = out / f"{st.name}.png"
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
