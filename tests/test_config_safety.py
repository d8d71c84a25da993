"""Configuration means what it says, or is refused in one line: a student spelled with any field is still noised,
an out_dir never overlaps the data, the YAML loader refuses what would silently go wrong (duplicate keys, alias
bombs, deep nesting), environment settings and DDP batch splits are checked when a command starts. Random YAML
documents and overrides either load or end in one `error:` line with exit 2 (property-based, Hypothesis)."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.main import main
from conftest import make_tiny_project
from nst.config import ConfigError, load_config
from nst.errors import quote
from test_failures import _err, _tree


def _write(project: Path, mutate) -> Path:
    p = project / "params.yaml"
    raw = yaml.safe_load(p.read_text())
    mutate(raw)
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


# ---- a partial student block is still the method ------------------------------------------------------------

def test_a_student_spelled_with_any_field_keeps_the_papers_noise(tiny_project):
    def partial(raw):
        raw["generations"][0]["student"] = {"model": "nst_cnn_s"}
        raw["generations"][1]["student"] = {"noise": {"dropout": 0.1}}
        raw["generations"].append({"name": "g3", "teacher": "g2"})
        raw["teacher"].pop("noise")
    cfg = load_config(_write(tiny_project.parent, partial))
    g1, g2, g3 = (cfg.generation(g).student.noise for g in ("g1", "g2", "g3"))
    for n in (g1, g3):
        assert (n.randaugment_n, n.randaugment_m, n.dropout, n.drop_path) == (2, 27, 0.5, 0.2)
    # field by field: only dropout was spelled, the rest are the student's defaults
    assert (g2.randaugment_n, g2.randaugment_m, g2.dropout, g2.drop_path) == (2, 27, 0.1, 0.2)
    assert cfg.teacher.noise.off  # the teacher's defaults stay un-noised


def test_a_teachers_partial_noise_block_keeps_the_teachers_defaults(tiny_project):
    cfg = load_config(_write(tiny_project.parent, lambda r: r["teacher"].update(noise={"randaugment_n": 2})))
    n = cfg.teacher.noise
    assert (n.randaugment_n, n.dropout, n.drop_path) == (2, 0.0, 0.0)


@pytest.mark.slow
def test_training_announces_and_records_the_effective_noise(tmp_path, capsys):
    params = make_tiny_project(tmp_path / "p", generations=1)

    def off(raw):
        raw["generations"][0]["student"]["noise"] = {"randaugment_n": 0, "dropout": 0.0, "drop_path": 0.0}
        raw["generations"][0]["student"]["epochs"] = 1
    _write(params.parent, off)
    assert main(["run", "--no-prefect", "-p", str(params)]) == 0
    err = capsys.readouterr().err
    assert "g0 (teacher) trains with noise: RandAugment off, dropout 0, stochastic depth 0" in err
    assert "g1 (student) trains with noise: RandAugment off, dropout 0, stochastic depth 0" in err
    warn = [ln for ln in err.splitlines() if " WARNING " in ln and "noise is all off" in ln]
    assert len(warn) == 1 and "g1:" in warn[0] and "ablation" in warn[0], err
    meta = json.loads((tmp_path / "p" / "outputs" / "g1" / "model" / "model.json").read_text())
    assert meta["noise"] == {"randaugment_n": 0, "randaugment_m": 27.0, "randaugment_mstd": 0.0, "dropout": 0.0,
                             "drop_path": 0.0, "randaugment_timm": None}


def test_mlflow_params_of_a_generation_carry_its_effective_noise(tiny_project):
    from nst.config import portable_dump
    from nst.tracking import _params, _train_section

    cfg = load_config(_write(tiny_project.parent, lambda r: r["generations"][0].update(student={"epochs": 1})))
    train, _ = _train_section(portable_dump(cfg), "g1")
    flat = dict((p.key, p.value) for p in _params({"train": train}))
    assert flat["train.noise.dropout"] == "0.5" and flat["train.noise.randaugment_n"] == "2", flat


# ---- out_dir apart from the data ------------------------------------------------------------------------------

def _manifest_project(root: Path) -> Path:
    """A user's own manifests in data/ (labeled, val, test, unlabeled) over the toy images."""
    params = make_tiny_project(root, generations=1)
    toy = root / "data" / "toy"
    for split, sub in (("labeled", "labeled"), ("val", "val"), ("test", "test"), ("unlabeled", "unlabeled")):
        rows = sorted(p for p in (toy / sub).rglob("*.png"))
        labels = [p.parent.name if split != "unlabeled" else "" for p in rows]
        pq.write_table(pa.table({"path": [p.relative_to(root / "data").as_posix() for p in rows], "label": labels}),
                       root / "data" / f"{split}.parquet")

    def use(raw):
        raw["data"].update({s: f"data/{s}.parquet" for s in ("labeled", "val", "test", "unlabeled")})
        raw["data"]["unlabeled_truth"] = None
    return _write(root, use)


@pytest.mark.parametrize("out_dir, where", [(".", "contains data.labeled"), ("data", "contains data.labeled"),
                                            ("data/toy/labeled/c0", "lies inside data.labeled")])
def test_an_out_dir_overlapping_the_data_is_refused_before_anything_is_written(tmp_path, capsys, out_dir, where):
    params = _manifest_project(tmp_path / "proj")
    if out_dir.startswith("data/toy"):
        _write(params.parent, lambda r: r["data"].update(labeled="data/toy/labeled"))
    before = _tree(params.parent)
    for argv in (["run", "--no-prefect"], ["prepare"]):
        assert main([*argv, "-p", str(params), "-S", f"out_dir={out_dir}"]) == 2
        err = _err(capsys)
        assert f"out_dir = '{out_dir}' {where}" in err and "outputs would overwrite the data" in err, err
    assert _tree(params.parent) == before  # the user's manifests byte for byte, nothing added


def test_prepare_deletes_only_what_its_stamp_says_it_wrote(tmp_path, capsys):
    params = _manifest_project(tmp_path / "proj")
    out = params.parent / "outputs" / "data"
    assert main(["prepare", "-p", str(params)]) == 0
    assert (out / "val.parquet").is_file()
    # data.val unset: the val manifest prepare wrote is stale and goes
    assert main(["prepare", "-p", str(params), "-S", "data.val=null"]) == 0
    assert not (out / "val.parquet").exists()
    # a file prepare never wrote is left alone, even where an output of another config would be
    (out / "val.parquet").write_bytes(b"the user's own file")
    assert main(["prepare", "-p", str(params), "-S", "data.val=null", "-S", "data.max_bad_fraction=0.5"]) == 0
    assert (out / "val.parquet").read_bytes() == b"the user's own file"
    capsys.readouterr()


# ---- the YAML loader ------------------------------------------------------------------------------------------

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] +
                 [f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]"
                  for p, c in zip("abcdefgh", "bcdefghi")] + ["seed: *i", ""])


def test_a_1kb_alias_bomb_is_one_line_within_a_memory_bound(tiny_project, capsys):
    assert len(BOMB) < 1024
    tiny_project.write_text(tiny_project.read_text().replace("seed: 0\n", "") + BOMB)
    tracemalloc.start()
    try:
        assert main(["prepare", "-p", str(tiny_project)]) == 2
        # as an override value too
        assert main(["prepare", "-p", str(make_tiny_project(tiny_project.parent / "q")), "-S",
                     "seed=" + "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak:,} bytes"
    out = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in out if ln.startswith("error:")]
    assert len(errors) == 2 and all("aliases expand to more than 100,000 values" in e for e in errors), out


@pytest.mark.parametrize("text, expect", [
    ("seed: 1\nteacher: {epochs: 1}\nteacher: {epochs: 2}\n", "key 'teacher' given twice in one mapping (line 3)"),
    ("teacher: {epochs: 1, epochs: 2}\n", "key 'epochs' given twice"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 64 levels"),
    ("a: &x [1, *x]\n", "refused: a recursive alias (line 1)"),  # would recurse forever in validation
    ("a: " + "{b: " * 100 + "1" + "}" * 100 + "\n", "nested deeper than 64 levels"),
])
def test_the_loader_refuses_what_would_silently_go_wrong(tmp_path, text, expect):
    p = tmp_path / "params.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}: ") and expect in msg, msg


def test_merge_keys_and_plain_aliases_still_load():
    from nst.config import parse_yaml

    doc = parse_yaml("base: &b {epochs: 1, lr: 0.1}\nteacher:\n  <<: *b\n  lr: 0.2\nother: *b\n", "t")
    assert doc["teacher"] == {"epochs": 1, "lr": 0.2} and doc["other"] == {"epochs": 1, "lr": 0.1}


def test_a_non_utf8_params_file_is_one_line(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_bytes(b"seed: 1\nname: \xff\xfe\n")
    with pytest.raises(ConfigError, match=r"params.yaml: not a UTF-8 text file \(byte 14\)"):
        load_config(p)


def test_quoting_is_bounded_while_it_is_built():
    nested: list = [0] * 9
    for _ in range(12):  # 9^13 elements if expanded
        nested = [nested] * 9
    q = quote(nested)
    assert len(q) <= 200 and q.startswith("[[[")
    assert quote("x" * 10**7) == "'" + "x" * 196 + "..."


# ---- environment settings and DDP splits, checked at start -----------------------------------------------------

@pytest.mark.parametrize("var, value, expect", [
    ("NST_MAX_WORKERS", "abc", "NST_MAX_WORKERS='abc': expected a whole number from 1 to 1024"),
    ("NST_MAX_WORKERS", "0", "NST_MAX_WORKERS='0': expected a whole number"),
    ("NST_MAX_WORKERS", "-1", "NST_MAX_WORKERS='-1': expected a whole number"),
    ("NST_TASK_RUNNER", "slurm", "NST_TASK_RUNNER='slurm': expected 'thread' or 'dask'"),
    ("NST_DASK_ADDRESS", "tcp://", "NST_DASK_ADDRESS='tcp://': expected a scheduler address"),
    ("NST_PROGRESS_EVERY_S", "soon", "NST_PROGRESS_EVERY_S='soon': expected seconds"),
    ("NST_PROGRESS", "fancy", "NST_PROGRESS='fancy': expected auto or plain"),
    ("NST_S3_ENDPOINT_URL", "localhost:9000", "NST_S3_ENDPOINT_URL='localhost:9000': expected an http(s)://"),
])
def test_a_bad_environment_setting_is_one_line_before_any_work(tiny_project, capsys, monkeypatch, var, value, expect):
    monkeypatch.setenv(var, value)
    assert main(["run", "--no-prefect", "-p", str(tiny_project)]) == 2
    assert _err(capsys).startswith(f"error: {expect}")
    assert not (tiny_project.parent / "outputs").exists()  # not even prepare ran


def test_a_batch_ddp_cannot_split_is_a_config_error(tiny_project):
    with pytest.raises(ConfigError) as e:
        load_config(tiny_project, ["distributed.nproc_per_node=3"])
    assert str(e.value) == (f"{tiny_project}: teacher.batch_size = 16: must be a multiple of the 3 training "
                            "processes (distributed.nnodes x nproc_per_node = 1 x 3)")
    with pytest.raises(ConfigError, match=r"multiple of the 3 training processes \(distributed.nnodes x "
                                          r"nproc_per_node = 3 x 1\)"):
        load_config(tiny_project, ["distributed.nnodes=3"])
    with pytest.raises(ConfigError, match=r"generations\[0\].student.batch_size x ratio = 34"):
        load_config(tiny_project, ["distributed.nproc_per_node=4", "generations.0.ratio=2.1"])
    assert load_config(tiny_project, ["distributed.nproc_per_node=2"]).distributed.nproc_per_node == 2


# ---- property: any document or override loads or is one line ------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                     st.text(max_size=30))
_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                        st.dictionaries(st.text(max_size=12), kids, max_size=4)),
                       max_leaves=20)
_KEYS = ["seed", "device", "out_dir", "threads", "data", "data.image_size", "data.labeled", "data.builtin",
         "teacher", "teacher.epochs", "teacher.noise", "teacher.noise.dropout", "generations", "generations.0",
         "generations.0.student", "generations.0.ratio", "generations.5.name", "filter.threshold", "pseudo_label",
         "distributed.nproc_per_node", "tracking", "nope", "data.nope.deeper", "teacher.0"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.one_of(_values, st.text(max_size=200)))
def test_any_yaml_document_loads_or_is_one_line(tmp_path_factory, doc):
    folder = tmp_path_factory.mktemp("h")
    p = folder / "params.yaml"
    p.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    try:
        load_config(p)
    except ConfigError as e:
        assert str(e).startswith(f"{p}: ") and len(str(e)) < 2000, str(e)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.one_of(st.sampled_from(_KEYS), st.text(max_size=20)),
       value=st.one_of(_values.map(lambda v: json.dumps(v, default=str)), st.text(max_size=40)))
def test_any_override_loads_or_is_one_error_line(tiny_project, capsys, key, value):
    capsys.readouterr()
    rc = main(["dvc-yaml", "--check", "-p", str(tiny_project), f"--set={key}={value}"])  # a key may start with "-"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    if rc != 0:  # one error: line; a config with several problems continues it with one line per problem
        lines = err.strip().splitlines()
        first = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
        assert rc == 2 and len(first) == 1, err
        assert all(ln.startswith(str(tiny_project)) for ln in lines[first[0] + 1:]), err
