"""The stage contract and the shape of the code: one declaration per stage, from which the skip check, the Prefect
cache key and dvc.yaml all come; one pipeline order; imports that point one way; no import-time side effects."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nst.config import load_config
from tasks.pipeline import STAGES, dvc_yaml, steps
from tasks.spec import DERIVED_FROM, NO_EFFECT, REPO, fingerprint

PACKAGES = ("nst", "tasks", "flows", "models", "cli")
# who may import whom: library -> stages -> orchestration / CLI
ALLOWED = {"models": set(), "nst": {"models"}, "tasks": {"nst", "models"}, "flows": {"nst", "tasks", "models"},
           "cli": {"nst", "tasks", "flows", "models"}}


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    for cand in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
        if cand.is_file():
            return cand
    return None


def _imports(path: Path, name: str) -> set[str]:
    """Project modules imported anywhere in a file (function bodies included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{mod}" if mod else base
            found.add(mod)
            found |= {f"{mod}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES and _module_file(m)}


def _closure(module: str) -> set[Path]:
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if name in seen or path is None:
            continue
        seen[name] = path
        if str(path.relative_to(REPO)) in NO_EFFECT:
            continue  # not followed: what it imports is there for its own (effect-free) job
        todo += list(_imports(path, name))
        parts = name.split(".")  # a package's __init__ runs too
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
    return {p.relative_to(REPO) for p in seen.values()}


def _declared(code: tuple[str, ...]) -> set[Path]:
    out: set[Path] = set()
    for rel in code:
        p = REPO / rel
        out |= {f.relative_to(REPO) for f in p.rglob("*.py")} if p.is_dir() else {Path(rel)}
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_a_stages_declared_code_covers_everything_it_imports(name):
    """The code version in a stage's fingerprint (and its dvc.yaml deps) is the declared list: editing any module
    the stage imports must change it. Modules without effect on outputs (progress display, live tracking) are
    deliberately left out, and package __init__ files that only hold a docstring."""
    stage = STAGES[name]
    used = _closure(stage.fn.__module__) - {Path(p) for p in NO_EFFECT}
    used = {p for p in used if not (p.name == "__init__.py" and p.parent.name in PACKAGES and
                                    p.parent.name != "models")}
    missing = sorted(str(p) for p in used - _declared(stage.code))
    assert missing == [], f"stage {name} imports modules its declaration does not list: {missing}"


def test_packages_import_one_way_and_without_cycles():
    bad = []
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            mod = ".".join(f.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            for imp in _imports(f, mod):
                top = imp.split(".")[0]
                if top != pkg and top not in ALLOWED[pkg]:
                    bad.append(f"{mod} imports {imp}")
    assert bad == []


def test_importing_the_library_changes_no_process_state():
    code = ("import os, importlib, pkgutil, json\n"
            "env = dict(os.environ); old = os.umask(0o022); os.umask(old)\n"
            "import nst\n"
            "for m in pkgutil.iter_modules(nst.__path__): importlib.import_module('nst.' + m.name)\n"
            "import tasks.pipeline, flows.noisy_student, cli.main\n"
            "now = os.umask(0o022); os.umask(now)\n"
            "changed = {k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)}\n"
            "print(json.dumps({'env': sorted(changed), 'umask_same': now == old}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=True).stdout.strip().splitlines()[-1]
    res = json.loads(out)
    assert res == {"env": [], "umask_same": True}


def test_dvc_yaml_is_generated_from_the_declarations(tmp_path):
    """The committed dvc.yaml is exactly what `nst dvc-yaml` writes (a stale one fails here), and each entry is the
    stage's declaration: its command, its inputs + code as deps, its config keys as params, its outputs."""
    from cli.main import main

    assert main(["dvc-yaml", "--check", "-p", str(REPO / "params.yaml")]) == 0
    cfg = load_config(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = [s.stage.dvc_name(s.gen) for s in steps(cfg) if s.stage]
    assert list(spec) == names  # the pipeline order, written once
    for s in steps(cfg):
        if s.stage is None:
            continue
        entry = spec[s.stage.dvc_name(s.gen)]
        assert entry["cmd"] == "nst " + " ".join(s.stage.argv(s.gen))
        assert set(entry["deps"]) == {cfg.rel(p) for p in s.stage.deps(cfg, s.gen)} | set(s.stage.code)
        assert entry["outs"] == [cfg.rel(p) for p in s.stage.outs(cfg, s.gen)]
        for key in entry.get("params", []):
            declared = [d for k in s.stage.params(cfg, s.gen) for d in DERIVED_FROM.get(k, [k])]
            assert any(k == key or k.startswith(key + ".") for k in declared), key
    # a stale file is caught
    stale = tmp_path / "dvc.yaml"
    stale.write_text((REPO / "dvc.yaml").read_text().replace("nst prepare", "nst prepare --fast"))
    assert main(["dvc-yaml", "--check", "-p", str(REPO / "params.yaml"), "-o", str(stale)]) == 2
    assert dvc_yaml(cfg, raw)["stages"] == spec


def test_dvc_yaml_without_optional_splits_needs_no_hand_edits(tiny_project):
    cfg = load_config(tiny_project, ["data.val=null", "data.unlabeled_truth=null"])
    raw = yaml.safe_load(tiny_project.read_text())
    deps = [d for e in dvc_yaml(cfg, raw)["stages"].values() for d in e["deps"]]
    assert not [d for d in deps if d.endswith(("val.parquet", "/val", "unlabeled_truth.csv"))], deps
    assert "plots" not in dvc_yaml(cfg, raw)  # the val-accuracy plot needs a val split


def test_the_prefect_cache_key_is_the_stages_fingerprint(tiny_project):
    from flows.noisy_student import _stage_key

    cfg = load_config(tiny_project)
    spec = {"params_path": str(tiny_project), "overrides": {}}
    key = _stage_key(None, {"spec": spec, "stage_name": "prepare", "gen": ""})
    assert key == f"prepare-{fingerprint(STAGES['prepare'], cfg, '')}"
    other = load_config(tiny_project, ["data.max_bad_fraction=0.5"])
    assert fingerprint(STAGES["prepare"], other, "") != fingerprint(STAGES["prepare"], cfg, "")
    assert fingerprint(STAGES["train-teacher"], other, "g0") == fingerprint(STAGES["train-teacher"], cfg, "g0")


def test_training_state_bytes_do_not_depend_on_the_temp_file_name(tmp_path):
    import torch

    from nst.checkpoint import save_state

    obj = {"epoch": 1, "w": torch.arange(5.0)}
    save_state(tmp_path / "a" / "train_state.pt", obj)
    save_state(tmp_path / "b" / "train_state.pt", obj)
    assert (tmp_path / "a" / "train_state.pt").read_bytes() == (tmp_path / "b" / "train_state.pt").read_bytes()


def test_builtin_digits_are_generated_per_seed(tmp_path):
    """`-S seed=1` must not silently train on seed 0's labeled subset."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"builtin": "digits-3"}}))
    a = load_config(tmp_path / "params.yaml", check_models=False)
    b = load_config(tmp_path / "params.yaml", ["seed=1"], check_models=False)
    assert a.builtin_dir() != b.builtin_dir() and a.data.labeled != b.data.labeled
    from tasks.builtin_data import DATA

    assert fingerprint(DATA, a, "") != fingerprint(DATA, b, "")
