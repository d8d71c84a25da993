"""The generation table: what users look at first after a run (also written as JSON/Markdown next to outputs)."""

from __future__ import annotations

from pathlib import Path

from nst.checkpoint import is_complete, read_meta
from nst.config import Config
from nst.io import atomic_write_json, atomic_write_text, read_json

COLUMNS = ["generation", "role", "model", "params", "test_top1", "delta_vs_teacher", "test_ece", "kept_fraction"]
ROBUST_KEYS = ("robust/mce", "robust/relative_mce", "robust/mean_flip_rate")


def robust_summary(metrics: dict) -> dict:
    """The robustness numbers worth a column (when `evaluate.enabled`): mCE, relative mCE, flip rate, attacks."""
    return {k: v for k, v in metrics.items()
            if k in ROBUST_KEYS or k.startswith(("robust/fgsm_acc", "robust/pgd_acc"))}


def columns(rows: list[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r if k.startswith("robust/")},
                   key=lambda k: (k not in ROBUST_KEYS, ROBUST_KEYS.index(k) if k in ROBUST_KEYS else 0, k))
    return COLUMNS + extra


def generation_rows(cfg: Config) -> list[dict]:
    rows, prev = [], None
    for name in ["g0"] + [g.name for g in cfg.generations]:
        mdir, mfile = cfg.model_dir(name), cfg.gen_dir(name) / "eval" / "metrics.json"
        if not (is_complete(mdir) and mfile.is_file()):
            continue
        meta, m = read_meta(mdir), read_json(mfile)
        stats_f = cfg.gen_dir(name) / "balanced" / "stats.json"
        row = {
            "generation": name, "role": "teacher" if name == "g0" else "student", "model": meta["model"],
            "params": meta["params"], "test_top1": m["test/top1"],
            "delta_vs_teacher": None if prev is None else m["test/top1"] - prev,  # vs. this generation's teacher
            "test_ece": m["test/ece"],
            "kept_fraction": read_json(stats_f)["kept_fraction"] if stats_f.is_file() else None,
            **robust_summary(m),
        }
        rows.append(row)
        prev = m["test/top1"]
    return rows


def _fmt(col: str, v) -> str:
    if v is None:
        return "-"
    if col == "params":
        return f"{v:,}"
    if col == "delta_vs_teacher":
        return f"{100 * v:+.1f} pt"
    if col in ("test_top1", "kept_fraction", "robust/mean_flip_rate") or "_acc" in col:
        return f"{100 * v:.1f}%"
    if col in ("robust/mce", "robust/relative_mce"):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(c, r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def text_table(rows: list[dict]) -> str:
    cols = columns(rows)
    cells = [cols] + [[_fmt(c, r.get(c)) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    out = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def write_summary(cfg: Config) -> tuple[list[dict], Path]:
    rows = generation_rows(cfg)
    atomic_write_json(cfg.out_dir / "summary.json", rows)
    atomic_write_text(cfg.out_dir / "summary.md", markdown_table(rows))
    return rows, cfg.out_dir / "summary.json"
