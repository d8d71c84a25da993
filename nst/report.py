"""The generation table: what users look at first after a run (also written as JSON/Markdown next to outputs)."""

from __future__ import annotations

from pathlib import Path

from nst.checkpoint import is_complete, read_meta
from nst.config import Config, ConfigError
from nst.io import atomic_write_json, atomic_write_text, read_json

COLUMNS = ["generation", "role", "model", "params", "test_top1", "delta_vs_teacher", "test_ece", "kept_fraction"]
ROBUST_KEYS = ("robust/mce", "robust/relative_mce", "robust/mean_flip_rate")


def robust_summary(metrics: dict) -> dict:
    """The robustness numbers worth a column (when `robustness.enabled`): mCE, relative mCE, flip rate, attacks."""
    return {k: v for k, v in metrics.items()
            if k in ROBUST_KEYS or k.startswith(("robust/fgsm_acc", "robust/pgd_acc"))}


def columns(rows: list[dict]) -> list[str]:
    extra = sorted({k for r in rows for k in r if k.startswith("robust/")},
                   key=lambda k: (k not in ROBUST_KEYS, ROBUST_KEYS.index(k) if k in ROBUST_KEYS else 0, k))
    return COLUMNS + extra


def generation_rows(cfg: Config) -> list[dict]:
    rows, prev = [], None
    for name in cfg.model_names():
        mdir, mfile = cfg.model_dir(name), cfg.eval_dir(name) / "metrics.json"
        if not (is_complete(mdir) and mfile.is_file()):
            continue
        meta, m = read_meta(mdir), read_json(mfile)
        stats_f = cfg.balanced_dir(name) / "stats.json"
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


def write_csv(rows: list[dict], path: str | Path) -> Path:
    import csv
    import io

    cols = columns(rows) + ["run_id"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})
    return atomic_write_text(path, buf.getvalue())


def labels_report(cfg: Config, gen: str, csv_path: str | None = None) -> str:
    """`nst labels gN`: what the student gN trained on, per class - what to open first when a student
    disappoints. With `csv_path`, also the selected rows (image path, class, confidence, copies, hidden label)."""
    import pyarrow.parquet as pq

    g = cfg.generation(gen)
    sf = cfg.balanced_dir(gen) / "stats.json"
    if not sf.is_file():
        raise FileNotFoundError(f"{sf}: no balanced pseudo-labels yet; run `nst filter-balance {gen}`")
    s = read_json(sf)
    head = ["class", "predicted", "dropped", "capped", "duplicated", "final", "mean conf", "acc (hidden labels)"]
    lines = [f"{gen}: pseudo-labels made by {g.teacher} - {s['total']:,} labelled, {s['dropped']:,} below "
             f"{s['threshold']:g}, {s['capped']:,} capped, {s['duplicated']:,} duplicated -> {s['final']:,} "
             f"(K = {s['target_per_class']} per class)", ""]
    cells = [head]
    bal = pq.read_table(cfg.balanced_dir(gen) / "balanced.parquet", columns=["row", "pred", "conf", "copies"])
    classes = list(s["per_class"])
    import numpy as np

    pred, copies = bal.column("pred").to_numpy().astype(np.int64), bal.column("copies").to_numpy().astype(np.float64)
    conf_sum = np.bincount(pred, weights=bal.column("conf").to_numpy().astype(np.float64) * copies,
                           minlength=len(classes))
    copies_sum = np.bincount(pred, weights=copies, minlength=len(classes))
    for i, c in enumerate(classes):
        v = s["per_class"][c]
        acc = v.get("pseudo_label_acc")
        cells.append([c, f"{v['predicted']:,}", f"{v['below_threshold']:,}", f"{v['capped']:,}",
                      f"{v['duplicated']:,}", f"{v['final']:,}",
                      f"{conf_sum[i] / copies_sum[i]:.3f}" if copies_sum[i] else "-",
                      "-" if acc is None else f"{100 * acc:.1f}%"])
    widths = [max(len(r[j]) for r in cells) for j in range(len(head))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    if csv_path:
        import pyarrow as pa
        import pyarrow.csv as pacsv

        from nst.io import atomic_path

        man = pq.read_table(cfg.data_dir / "unlabeled.parquet", columns=["path", "label"])
        rows = pa.array(bal.column("row").to_numpy())
        names = pa.array(classes)
        truth = man.column("label").take(rows).to_numpy()
        out = pa.table({"path": man.column("path").take(rows), "pseudo_label": names.take(bal.column("pred")),
                        "confidence": pa.array(bal.column("conf").to_numpy().astype("float32")),
                        "copies": bal.column("copies"),
                        "hidden_label": pa.array([classes[t] if t >= 0 else None for t in truth], pa.string())})
        with atomic_path(csv_path) as tmp:
            pacsv.write_csv(out, tmp)
        lines += ["", f"rows: {csv_path} ({out.num_rows:,} images)"]
    return "\n".join(lines)


def summary_markdown(cfg: Config, gen: str) -> str:
    """One generation's card (a Prefect artifact): model, test top-1, change vs its teacher, the pseudo-labels it
    trained on per class."""
    row = next((r for r in generation_rows(cfg) if r["generation"] == gen), None)
    if row is None:
        return f"### {gen}\n\nno evaluated model yet\n"
    teacher = "-" if gen == "g0" else cfg.generation(gen).teacher
    lines = [f"### {gen}: {row['role']} `{row['model']}` ({row['params']:,} parameters)", "",
             "| test top-1 | change vs teacher | teacher | test ECE |", "|---|---|---|---|",
             f"| {_fmt('test_top1', row['test_top1'])} | {_fmt('delta_vs_teacher', row['delta_vs_teacher'])} "
             f"| {teacher} | {_fmt('test_ece', row['test_ece'])} |"]
    stats_f = cfg.balanced_dir(gen) / "stats.json"
    if stats_f.is_file():
        s = read_json(stats_f)
        lines += ["", f"Pseudo-labels: {s['total']} labelled, {s['dropped']} dropped below {s['threshold']:g}, "
                      f"{s['capped']} capped, {s['duplicated']} duplicated -> {s['final']} "
                      f"(K = {s['target_per_class']} per class)"]
        if "pseudo_label_acc_kept" in s:
            lines[-1] += f"; accuracy of kept pseudo-labels {_fmt('pseudo_label_acc_kept', s['pseudo_label_acc_kept'])}"
        lines += ["", "| class | predicted | dropped | kept | capped | duplicated | final |", "|---|---|---|---|---|---|---|"]
        for c, v in s["per_class"].items():
            lines.append(f"| {c} | {v['predicted']} | {v['below_threshold']} | {v['unique']} | {v['capped']} "
                         f"| {v['duplicated']} | {v['final']} |")
    return "\n".join(lines) + "\n"


def compare_rows(cfg: Config, run_id: str | None = None):
    """(parent run, generation rows) read back from the tracking server, in the columns of `nst.report`."""
    from nst.secrets import redact
    from nst.tracking import _client, tracking_uri

    client = _client(cfg)
    if run_id:
        parent = client.get_run(run_id)
    else:
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        runs = client.search_runs([exp.experiment_id], "tags.kind = 'pipeline'", max_results=1,
                                  order_by=["attributes.start_time DESC"]) if exp else []
        if not runs:
            raise ConfigError(f"no pipeline runs in experiment {cfg.tracking.experiment!r} at {redact(tracking_uri(cfg))}")
        parent = runs[0]
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  max_results=1000)
    rows, prev = [], None
    for r in sorted(children, key=lambda r: int(r.data.tags.get("generation", "g0")[1:])):
        m, t = r.data.metrics, r.data.tags
        top1 = m.get("test/top1")
        rows.append({"generation": t.get("generation"), "role": t.get("role"), "model": t.get("model"),
                     "params": int(m["model/params"]) if "model/params" in m else None, "test_top1": top1,
                     "delta_vs_teacher": top1 - prev["test/top1"] if prev and top1 is not None
                     and "test/top1" in prev else None,
                     "test_ece": m.get("test/ece"),
                     "kept_fraction": prev.get("labeler/kept_fraction") if prev else None,
                     "run_id": r.info.run_id, "status": r.info.status, **robust_summary(m)})
        prev = m
    return parent, rows
