"""The generation table: what users look at first after a run (also written as JSON/Markdown next to outputs)."""

from __future__ import annotations

from pathlib import Path

from nst.checkpoint import is_complete, read_meta
from nst.config import Config, ConfigError, model_order
from nst.errors import DataError, StageError, quote
from nst.io import atomic_write_json, atomic_write_text, prepared, read_json

COLUMNS = ["generation", "role", "model", "params", "test_top1", "delta_vs_teacher", "test_ece", "kept_fraction"]
ROBUST_KEYS = ("robust/mce", "robust/relative_mce", "robust/mean_flip_rate")
METRIC_KEYS = ("test/top1", "test/nll", "test/ece")  # what the table and the model registry read of metrics.json


def read_record(path: Path, keys: tuple[str, ...], made_by: str) -> dict:
    """A JSON object a stage wrote, with the numbers its readers need. One edited by hand or by a tool that lost
    one is a one-line error naming the file and the key (the stage's stamp does not cover its own outputs' content,
    so deleting the file is what makes `made_by` write it again)."""
    d = read_json(path)
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(d).__name__}; delete it and run `{made_by}`")
    for k in keys:
        if k not in d:
            raise DataError(f"{path}: no {k!r} key; delete the file and run `{made_by}` to write it again")
        if isinstance(d[k], bool) or not isinstance(d[k], (int, float)):
            raise DataError(f"{path}: {k!r} = {quote(d[k], 80)}: expected a number; delete the file and run "
                            f"`{made_by}` to write it again")
    return d


def read_metrics(cfg: Config, name: str) -> dict:
    return read_record(cfg.eval_dir(name) / "metrics.json", METRIC_KEYS, f"nst evaluate {name}")


def robust_summary(metrics: dict) -> dict:
    """The robustness numbers worth a column (when `robustness.enabled`): mCE, relative mCE, flip rate, attacks."""
    return {k: v for k, v in metrics.items()
            if k in ROBUST_KEYS or k.startswith(("robust/fgsm_acc", "robust/pgd_acc"))}


def columns(rows: list[dict]) -> list[str]:
    """The table's columns; the resolution ones (`image_size`, `test_top1@N`) only when models were evaluated at
    a test resolution or fine-tuned, the robustness ones only when the suite ran."""
    cols = list(COLUMNS)
    if any("image_size" in r for r in rows):
        cols.insert(cols.index("params") + 1, "image_size")
    at = cols.index("test_top1") + 1
    cols[at:at] = sorted({k for r in rows for k in r if k.startswith("test_top1@")})
    extra = sorted({k for r in rows for k in r if k.startswith("robust/")},
                   key=lambda k: (k not in ROBUST_KEYS, ROBUST_KEYS.index(k) if k in ROBUST_KEYS else 0, k))
    return cols + extra


def resolution_columns(metrics: dict, image_size: int | None) -> dict:
    """A model's resolution and its test top-1 at evaluate.image_size (`test_at_size/*`), as row keys."""
    out = {"image_size": image_size}
    if "test_at_size/top1" in metrics:
        out[f"test_top1@{int(metrics['test_at_size/image_size'])}"] = metrics["test_at_size/top1"]
    return out


def generation_rows(cfg: Config) -> list[dict]:
    rows, top1 = [], {}
    sized = cfg.evaluate.image_size is not None or cfg.finetune.enabled
    for name in cfg.evaluated_models():
        mdir, mfile = cfg.model_dir(name), cfg.eval_dir(name) / "metrics.json"
        if not (is_complete(mdir) and mfile.is_file()):
            continue
        meta, m = read_meta(mdir), read_metrics(cfg, name)
        stats_f = cfg.balanced_dir(name) / "stats.json"
        ref = top1.get(cfg.made_from(name))  # a student's teacher, a fine-tune's base model
        row = {
            "generation": name, "role": cfg.role(name), "model": meta["model"],
            "params": meta["params"], "test_top1": m["test/top1"],
            "delta_vs_teacher": None if ref is None else m["test/top1"] - ref,
            "test_ece": m["test/ece"],
            "kept_fraction": read_record(stats_f, ("kept_fraction",), f"nst filter-balance {name}")["kept_fraction"]
            if stats_f.is_file() else None,
            **(resolution_columns(m, meta.get("image_size")) if sized else {}),
            **robust_summary(m),
        }
        rows.append(row)
        top1[name] = m["test/top1"]
    return rows


def finished_rows(cfg: Config) -> list[dict]:
    """The rows of the evaluated models, for commands that only read outputs (`nst table`, `nst track`): with
    nothing evaluated - often a mistyped out_dir - a one-line error naming out_dir, and nothing written."""
    if not cfg.out_dir.is_dir():
        raise StageError(f"out_dir {cfg.out_dir}: does not exist, nothing has run there (check out_dir, or run "
                         "`nst run`)")
    rows = generation_rows(cfg)
    if not rows:
        raise StageError(f"out_dir {cfg.out_dir}: no evaluated model yet (run `nst run`, or check out_dir)")
    return rows


def _fmt(col: str, v) -> str:
    if v is None:
        return "-"
    if col == "params":
        return f"{v:,}"
    if col == "delta_vs_teacher":
        return f"{100 * v:+.1f} pt"
    if col in ("kept_fraction", "robust/mean_flip_rate") or col.startswith("test_top1") or "_acc" in col:
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
    sf, bf = cfg.balanced_dir(gen) / "stats.json", cfg.balanced_dir(gen) / "balanced.parquet"
    for f in (sf, bf):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing, no balanced pseudo-labels yet; run `nst filter-balance {gen}`")
    s = read_json(sf)
    head = ["class", "predicted", "dropped", "capped", "duplicated", "final", "mean conf", "acc (hidden labels)"]
    lines = [f"{gen}: pseudo-labels made by {g.teacher} - {s['total']:,} labelled, {s['dropped']:,} below "
             f"{s['threshold']:g}, {s['capped']:,} capped, {s['duplicated']:,} duplicated -> {s['final']:,} "
             f"(K = {s['target_per_class']} per class)", ""]
    cells = [head]
    bal = pq.read_table(bf, columns=["row", "pred", "conf", "copies"])
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

        man = pq.read_table(prepared(cfg.data_dir / "unlabeled.parquet"), columns=["path", "label"])
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
    source, of = cfg.made_from(gen) or "-", "base model" if row["role"] == "finetune" else "teacher"
    size = f" at {row['image_size']} px" if row.get("image_size") else ""
    lines = [f"### {gen}: {row['role']} `{row['model']}` ({row['params']:,} parameters)", "",
             f"| test top-1{size} | change vs {of} | {of} | test ECE |", "|---|---|---|---|",
             f"| {_fmt('test_top1', row['test_top1'])} | {_fmt('delta_vs_teacher', row['delta_vs_teacher'])} "
             f"| {source} | {_fmt('test_ece', row['test_ece'])} |"]
    lines += [f"\nTest top-1 at {k.split('@')[1]} px: {_fmt(k, v)}" for k, v in row.items() if k.startswith("test_top1@")]
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

    client = _client(cfg, read_only=True)
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
    rows, by_gen = [], {}
    sized = any("test_at_size/top1" in r.data.metrics or r.data.tags.get("role") == "finetune" for r in children)
    for r in sorted(children, key=lambda r: model_order(r.data.tags.get("generation", "g0"))):
        m, t = r.data.metrics, r.data.tags
        top1, ref = m.get("test/top1"), by_gen.get(t.get("teacher_generation") or t.get("base_generation"))
        size = int(m["model/image_size"]) if "model/image_size" in m else None
        rows.append({"generation": t.get("generation"), "role": t.get("role"), "model": t.get("model"),
                     "params": int(m["model/params"]) if "model/params" in m else None, "test_top1": top1,
                     "delta_vs_teacher": top1 - ref["test/top1"] if ref and top1 is not None
                     and "test/top1" in ref else None,
                     "test_ece": m.get("test/ece"),  # a student trains on its teacher's kept pseudo-labels
                     "kept_fraction": ref.get("labeler/kept_fraction") if ref and t.get("role") == "student" else None,
                     **(resolution_columns(m, size) if sized else {}),
                     "run_id": r.info.run_id, "status": r.info.status, **robust_summary(m)})
        by_gen[t.get("generation")] = m
    return parent, rows
