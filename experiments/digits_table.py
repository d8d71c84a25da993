"""Reproduce the README's digits tables: teacher vs. each noisy-student generation, mean ± std over seeds, with
the same students trained with noise switched off (RandAugment, dropout, stochastic depth all 0).

    .venv/bin/python experiments/digits_table.py --labels 3 10 --seeds 0 1 2 --jobs 2   # accuracy table
    .venv/bin/python experiments/digits_table.py --labels 10 --seeds 0 --robustness      # robustness table

Each (labels, seed) trains one teacher; the noise-off arm reuses that exact teacher (copied, same config hash), so
the two arms differ only in the students' noise. Outputs land in outputs-digits/; tables in docs/. `--jobs N` runs
N (labels, seed) pairs at once, each in its own process with cores/N torch threads: these small CNNs keep two
single-threaded processes busier than one two-threaded one. A re-run skips every finished stage.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from nst.config import load_config
from nst.datasets import make_digits
from nst.io import atomic_write_text
from nst.pipeline import run_direct

ROOT = Path(__file__).resolve().parents[1]
NOISE_OFF = ["randaugment_n=0", "dropout=0.0", "drop_path=0.0"]


def overrides(k: int, seed: int, out: str, robustness: bool) -> list[str]:
    d = f"data/digits-{k}-s{seed}"
    ov = [f"seed={seed}", f"out_dir={out}", f"data.name=digits-{k}", f"data.labeled={d}/labeled",
          f"data.unlabeled={d}/unlabeled", f"data.test={d}/test", f"data.unlabeled_truth={d}/unlabeled_truth.csv",
          f"teacher.epochs={400 if k < 10 else 100}", "tracking.enabled=false"]
    if robustness:
        ov += ["evaluate.enabled=true", "evaluate.subset=300", "evaluate.adversarial_subset=200"]
    return ov


def run_arm(k: int, seed: int, noise: bool, robustness: bool) -> list[dict]:
    out = f"outputs-digits/k{k}-s{seed}-{'noised' if noise else 'nonoise'}{'-robust' if robustness else ''}"
    ov = overrides(k, seed, out, robustness)
    base = load_config(ROOT / "params-digits.yaml", ov)
    if not noise:
        ov += [f"generations.{i}.student.noise.{n}" for i in range(len(base.generations)) for n in NOISE_OFF]
        noised = ROOT / f"outputs-digits/k{k}-s{seed}-noised"
        for part in ("data", "g0"):  # the very same teacher: same config hash, so its stages are skipped
            if (noised / part).exists() and not (ROOT / out / part).exists():
                shutil.copytree(noised / part, ROOT / out / part)
    cfg = load_config(ROOT / "params-digits.yaml", ov)
    make_digits(ROOT / f"data/digits-{k}-s{seed}", labels_per_class=k, seed=seed)
    return run_direct(cfg)


def run_pair(k: int, seed: int, threads: int | None) -> dict[bool, list[dict]]:
    """Both arms of one (labels, seed): the noised one first, since the noise-off arm reuses its teacher."""
    if threads:
        import torch

        torch.set_num_threads(threads)
    out = {}
    for noise in (True, False):
        out[noise] = run_arm(k, seed, noise, False)
        print(k, seed, "noised" if noise else "noise-off",
              [(r["generation"], round(r["test_top1"], 4)) for r in out[noise]], flush=True)
    return out


def ms(v: list[float]) -> str:
    return f"{100 * statistics.mean(v):.1f} ± {100 * statistics.stdev(v):.1f}" if len(v) > 1 else f"{100 * v[0]:.1f}"


def accuracy_table(results: dict) -> str:
    ks = sorted({k for k, _, _ in results})
    gens = [r["generation"] for r in next(iter(results.values()))]
    models = {r["generation"]: r["model"] for r in next(iter(results.values()))}
    lines = ["| generation | model | " + " | ".join(f"{k} labels/class: noised | {k}: noise off" for k in ks) + " |",
             "|---|---|" + "---|---|" * len(ks)]
    for i, g in enumerate(gens):
        cells = []
        for k in ks:
            for noise in (True, False):
                vals = [rows[i]["test_top1"] for (kk, _, nz), rows in results.items() if kk == k and nz == noise]
                cells.append(ms(vals) if (g != "g0" or noise) else "(same teacher)")
        lines.append(f"| {g} {'teacher' if g == 'g0' else 'student'} | {models[g]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def robustness_table(out: Path) -> str:
    keys = [("test/top1", "clean top-1", 100), ("robust/mce", "mCE", 1), ("robust/relative_mce", "rel. mCE", 1),
            ("robust/mean_flip_rate", "mean flip rate %", 100)]
    first = json.loads((out / "g0" / "eval" / "metrics.json").read_text())
    keys += [(k, k.split("/")[1].replace("_acc_eps", " ε=").replace("_255", "/255"), 100)
             for k in sorted(first) if k.startswith(("robust/fgsm", "robust/pgd"))]
    keys += [("test/ece", "ECE", 1)]
    lines = ["| generation | " + " | ".join(k[1] for k in keys) + " |", "|---|" + "---|" * len(keys)]
    for gdir in sorted(p for p in out.iterdir() if p.name.startswith("g")):
        m = json.loads((gdir / "eval" / "metrics.json").read_text())
        lines.append(f"| {gdir.name} | " + " | ".join(f"{m[k] * s:.1f}" if s != 1 or "mce" in k else f"{m[k]:.3f}"
                                                    for k, _, s in keys) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--labels", type=int, nargs="+", default=[3, 10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--robustness", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="(labels, seed) pairs run at once, one process each")
    a = ap.parse_args()
    if a.robustness:
        k, seed = a.labels[0], a.seeds[0]
        run_arm(k, seed, True, True)
        table = robustness_table(ROOT / f"outputs-digits/k{k}-s{seed}-noised-robust")
        atomic_write_text(ROOT / "docs" / "digits_robustness.md", table)
        print(table)
        return
    pairs = [(k, seed) for k in a.labels for seed in a.seeds]
    if a.jobs > 1:
        threads = max(1, (os.cpu_count() or 1) // a.jobs)
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            done = list(pool.map(run_pair, *zip(*pairs), [threads] * len(pairs)))
    else:
        done = [run_pair(k, seed, None) for k, seed in pairs]
    results = {(k, seed, noise): rows for (k, seed), arms in zip(pairs, done) for noise, rows in arms.items()}
    table = accuracy_table(results)
    raw = {f"k{k}-s{s}-{'noised' if n else 'nonoise'}": rows for (k, s, n), rows in results.items()}
    atomic_write_text(ROOT / "docs" / "digits_results.json", json.dumps(raw, indent=1))
    atomic_write_text(ROOT / "docs" / "digits_results.md", table)
    print(table)


if __name__ == "__main__":
    main()
