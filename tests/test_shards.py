"""Image shards (nst/shards.py, nst/pack.py): `nst pack` is deterministic and resumable; a pipeline on local
shards and on shards in a real S3-compatible server (the session's moto server, over HTTP) writes the same model
bytes as on folders, through a bounded cache; img2dataset's layout is read as it is; and each fault of a shard
set is caused for real: a truncated or missing shard, an object replaced after prepare, a connection cut mid-shard
(through a proxy in front of moto), a cache too small, a sidecar that disagrees with its tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_tiny_project
from servers import FaultProxy

from nst.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("labeled", "val", "test", "unlabeled")
MODELS = ("g0", "g1", "g2")


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _s3_env(moto_s3, endpoint: str | None = None) -> dict[str, str]:
    return {"NST_S3_ENDPOINT_URL": endpoint or moto_s3.endpoint_url, "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3_env(moto_s3, monkeypatch):
    for k, v in _s3_env(moto_s3).items():
        monkeypatch.setenv(k, v)
    return moto_s3


def _nst(args: list[str], cwd: Path, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=os.environ | (env or {}), timeout=900)
    if check:
        assert p.returncode == 0, f"nst {' '.join(map(str, args))}: {p.stderr[-3000:]}"
    return p


# ---- nst pack ---------------------------------------------------------------------------------------------------

def test_pack_is_deterministic_resumable_and_readable_by_tarfile(tmp_path):
    from nst.pack import pack

    proj = make_tiny_project(tmp_path / "p").parent
    src = proj / "data" / "toy" / "labeled"
    a = pack(str(src), str(tmp_path / "a"), shard_size="8KB", workers=2)
    b = pack(str(src), str(tmp_path / "b"), shard_size="8KB", workers=1)
    assert a["shards"] > 2 and a["images"] == 40 and a["written"] == a["shards"]
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    fa.pop("pack.json"), fb.pop("pack.json")  # names its destination; the shards themselves are the same bytes
    assert fa == fb
    # what a WebDataset reader sees: <key>.png + <key>.cls per sample, the class index of its folder
    classes = json.loads(fa["classes.json"])
    with tarfile.open(tmp_path / "a" / "00000.tar") as tf:
        names = tf.getnames()
        first_cls = int(tf.extractfile(names[1]).read())
    assert names[0].endswith(".png") and names[1] == names[0][:-4] + ".cls"
    side = pq.read_table(tmp_path / "a" / "00000.parquet")
    assert side.column("path")[0].as_py().split("/")[0] == classes[first_cls]

    # resumable: a lost shard is written again, the others are kept, and the bytes are the same
    (tmp_path / "a" / "00001.tar").unlink()
    again = pack(str(src), str(tmp_path / "a"), shard_size="8KB")
    assert again["written"] == 1 and again["kept"] == a["shards"] - 1
    assert (tmp_path / "a" / "00001.tar").read_bytes() == fb["00001.tar"]


def test_pack_from_an_s3_prefix_of_loose_files_matches_the_local_pack(tmp_path, s3_env, s3_bucket):
    from nst.pack import pack

    proj = make_tiny_project(tmp_path / "p").parent
    src = proj / "data" / "toy" / "test"
    for f in sorted(src.rglob("*.png")):
        s3_env.client().upload_file(str(f), s3_bucket, f"raw/{f.relative_to(src).as_posix()}")
    here = pack(str(src), str(tmp_path / "local"), shard_size="8KB")
    there = pack(f"s3://{s3_bucket}/raw", str(tmp_path / "from-s3"), shard_size="8KB")
    assert here["images"] == there["images"] == 40 and here["shards"] == there["shards"]
    a, b = _files(tmp_path / "local"), _files(tmp_path / "from-s3")
    assert {k: v for k, v in a.items() if k.endswith(".tar")} == {k: v for k, v in b.items() if k.endswith(".tar")}
    assert a["classes.json"] == b["classes.json"]


# ---- one result whatever the storage ------------------------------------------------------------------------------

def _shard_params(copy: Path, sources: dict[str, str], out: str, extra: dict | None = None) -> list[str]:
    over = [f"data.{s}={v}" for s, v in sources.items()] + ["data.unlabeled_truth=null", f"out_dir={out}"]
    return sum((["-S", o] for o in over + [f"{k}={v}" for k, v in (extra or {}).items()]), [])


@pytest.mark.slow
def test_folder_local_shards_and_s3_shards_train_the_same_bytes(tiny_trained, s3_env, s3_bucket, tmp_path):
    """The reproducibility contract over storage: the shared folder-trained project's g0-g2 weights, again from
    local shards and from shards that exist only in a bucket, read through a cache smaller than the data."""
    from nst.pack import pack

    params = tiny_trained.copy(tmp_path / "proj")
    proj = params.parent
    want = {g: _sha(proj / "outputs" / g / "model" / "model.safetensors") for g in MODELS}
    for split in SPLITS:
        pack(str(proj / "data" / "toy" / split), str(proj / "shards" / split), shard_size="6KB")
        pack(str(proj / "data" / "toy" / split), f"s3://{s3_bucket}/toy/{split}", shard_size="6KB")
    total = sum(p.stat().st_size for p in (proj / "shards").rglob("*.tar"))

    _nst(["run", "--no-prefect", "-p", params] + _shard_params(proj, {s: f"shards/{s}" for s in SPLITS}, "out-local"),
         proj)
    local = {g: _sha(proj / "out-local" / g / "model" / "model.safetensors") for g in MODELS}
    assert local == want

    limit_mb = round(total / 3 / 2**20, 4)  # a third of the shard bytes: evictions, never a full copy
    cache = proj / "shard-cache"
    r = _nst(["run", "--no-prefect", "-p", params]
             + _shard_params(proj, {s: f"s3://{s3_bucket}/toy/{s}/" for s in SPLITS}, "out-s3",
                             {"data.cache_dir": cache, "data.cache_limit_mb": limit_mb}), proj)
    remote = {g: _sha(proj / "out-s3" / g / "model" / "model.safetensors") for g in MODELS}
    assert remote == want
    assert "ERROR" not in r.stderr and "Traceback" not in r.stderr
    cached = sum(p.stat().st_size for p in cache.glob("*.tar"))
    assert 0 < cached <= limit_mb * 2**20 < total
    man = pq.read_table(proj / "out-s3" / "data" / "unlabeled.parquet")
    assert man.column("path")[0].as_py().startswith(f"s3://{s3_bucket}/toy/unlabeled/00000.tar#")
    assert not (proj / "out-s3" / "data" / "toy").exists()


# ---- img2dataset's layout, as it is --------------------------------------------------------------------------------

def _png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _img2dataset_shard(folder: Path, shard: int, n: int, failed: set[int] = frozenset(), extra_in_tar: int = 0,
                       labels: bool = True) -> None:
    """What img2dataset writes: NNNNN.tar with <key>.jpg/.png, .json, .txt per sample, and NNNNN.parquet with every
    attempted key, its status and the metadata (here a label column)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tf:
        for i in range(n + extra_in_tar):
            key = f"{shard:05d}{i:04d}"
            ok = i not in failed
            if i < n:
                rows.append({"key": key, "status": "success" if ok else "failed_to_download",
                             "caption": f"img {i}", "label": ["cat", "dog"][i % 2] if labels else None})
            if not ok:
                continue
            for ext, data in (("png", _png(shard * 1000 + i)), ("json", b'{"caption": "x"}'), ("txt", b"x")):
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    pq.write_table(pa.Table.from_pylist(rows), folder / f"{shard:05d}.parquet")


def _cfg(tmp_path: Path, **data) -> "object":
    from nst.config import config_from_dict

    raw = {"device": "cpu", "out_dir": str(tmp_path / "out"), "tracking": {"enabled": False},
           "data": {"labeled": str(tmp_path / "lab"), "unlabeled": str(tmp_path / "lab"),
                    "test": str(tmp_path / "lab"), "prepare_workers": 1} | data}
    return config_from_dict(raw, base=tmp_path, check_models=False)


def test_img2dataset_shards_are_read_as_they_are(tmp_path):
    from nst.data import open_split
    from tasks.prepare import prepare

    _img2dataset_shard(tmp_path / "lab", 0, 10, failed={3})
    _img2dataset_shard(tmp_path / "lab", 1, 6)
    cfg = _cfg(tmp_path, labeled=str(tmp_path / "lab" / "{00000..00001}.tar"))
    res = prepare(cfg)
    assert res["classes"] == ["cat", "dog"] and res["metrics"]["n_labeled"] == 15 and res["metrics"]["n_bad"] == 0
    man = pq.read_table(cfg.data_dir / "labeled.parquet")
    assert man.column("path")[0].as_py() == "lab/00000.tar#000000000.png"
    assert man.column("label").to_pylist()[:4] == [0, 1, 0, 0]  # the failed download (key 3, a dog) is absent
    ds, labels = open_split(cfg, "labeled")
    assert len(ds) == 15 and ds.raw(0).shape == (3, 32, 32)


# ---- faults ---------------------------------------------------------------------------------------------------------

def test_truncated_and_missing_shards_are_one_line_errors(tmp_path):
    from tasks.prepare import prepare

    _img2dataset_shard(tmp_path / "lab", 0, 8)
    _img2dataset_shard(tmp_path / "lab", 1, 8)
    data = (tmp_path / "lab" / "00001.tar").read_bytes()
    (tmp_path / "lab" / "00001.tar").write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError) as ei:
        prepare(_cfg(tmp_path))
    assert "00001.tar: truncated" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(DataError, match=r"00002.tar: shard of data.labeled missing"):
        prepare(_cfg(tmp_path, labeled=str(tmp_path / "lab" / "{00000..00002}.tar")))


def test_sidecar_that_disagrees_with_its_tar_is_named(tmp_path):
    from tasks.prepare import prepare

    _img2dataset_shard(tmp_path / "lab", 0, 40, extra_in_tar=1)  # one sample the sidecar does not list
    res = prepare(_cfg(tmp_path, max_bad_fraction=0.05))
    bad = json.loads((tmp_path / "out" / "data" / "bad_images.json").read_text())["labeled"]
    assert res["metrics"]["n_labeled"] == 40
    assert bad == [{"path": "lab/00000.tar#000000040.png", "error": "in the tar, not in the sidecar"}]
    with pytest.raises(DataError, match=r"1 of 41 images unreadable .*in the tar, not in the sidecar"):
        prepare(_cfg(tmp_path, max_bad_fraction=0.0))


def _s3_shards(s3, bucket: str, tmp_path: Path, n_shards: int = 2) -> str:
    for k in range(n_shards):
        _img2dataset_shard(tmp_path / "src", k, 8)
    for f in sorted((tmp_path / "src").iterdir()):
        s3.client().upload_file(str(f), bucket, f"lab/{f.name}")
    return f"s3://{bucket}/lab/"


def test_shard_replaced_in_s3_after_prepare_is_refused(tmp_path, s3_env, s3_bucket):
    from nst.data import open_split
    from tasks.prepare import prepare

    uri = _s3_shards(s3_env, s3_bucket, tmp_path)
    cfg = _cfg(tmp_path, labeled=uri, unlabeled=uri, test=uri)
    prepare(cfg)
    _img2dataset_shard(tmp_path / "other", 1, 8, failed={2})  # the same names, one sample less
    s3_env.client().upload_file(str(tmp_path / "other" / "00001.tar"), s3_bucket, "lab/00001.tar")
    with pytest.raises(DataError) as ei:
        open_split(cfg, "test")  # a small split: decoded whole into RAM at once
    assert f"s3://{s3_bucket}/lab/00001.tar: download failed (changed in S3 since `nst prepare`" in str(ei.value)
    assert not list((cfg.shard_cache_dir).glob("*.tmp"))


def test_connection_cut_mid_shard_is_retried_then_named(tmp_path, s3_env, s3_bucket, monkeypatch):
    from tasks.prepare import prepare

    uri = _s3_shards(s3_env, s3_bucket, tmp_path)
    proxy = FaultProxy(s3_env.endpoint_url, f"/{s3_bucket}/lab/00001.tar", times=1, mode="cut", exact=True)
    try:
        monkeypatch.setenv("NST_S3_ENDPOINT_URL", proxy.url)
        cfg = _cfg(tmp_path, labeled=uri, unlabeled=uri, test=uri)
        assert prepare(cfg)["metrics"]["n_labeled"] == 16 and proxy.failed >= 1  # cut once, read again
        proxy.times, proxy.failed = 10**6, 0
        with pytest.raises(DataError) as ei:
            prepare(_cfg(tmp_path, labeled=uri, unlabeled=uri, test=uri, verify="decode"))
        assert str(ei.value).startswith(f"s3://{s3_bucket}/lab/00001.tar: connection failed")
        assert "\n" not in str(ei.value)
    finally:
        proxy.stop()


def test_shard_larger_than_the_cache_is_a_clear_error(tmp_path, s3_env, s3_bucket):
    from nst.data import open_split
    from tasks.prepare import prepare

    uri = _s3_shards(s3_env, s3_bucket, tmp_path, n_shards=1)
    cfg = _cfg(tmp_path, labeled=uri, unlabeled=uri, test=uri, cache_limit_mb=0.001)
    prepare(cfg)  # prepare streams, it needs no cache
    with pytest.raises(DataError, match=r"00000.tar: a shard of 0.0\d+ MiB does not fit data.cache_limit_mb = 0.001; raise"):
        open_split(cfg, "test")


# ---- what the stages declare ---------------------------------------------------------------------------------------

def test_s3_and_brace_sources_in_fingerprints_and_dvc(tmp_path, s3_env, s3_bucket):
    from tasks.prepare import PREPARE
    from tasks.spec import dvc_stage, fingerprint

    uri = _s3_shards(s3_env, s3_bucket, tmp_path)
    cfg = _cfg(tmp_path, labeled=uri, unlabeled=str(tmp_path / "src" / "{00000..00001}.tar"), test=uri)
    entry = dvc_stage(PREPARE, cfg, "", {"data": {"labeled": uri}})
    assert uri in entry["deps"] and "src" in entry["deps"]
    before = fingerprint(PREPARE, cfg, "")
    assert fingerprint(PREPARE, cfg, "") == before
    s3_env.client().upload_file(str(tmp_path / "src" / "00000.parquet"), s3_bucket, "lab/00002.tar")  # a new shard
    assert fingerprint(PREPARE, cfg, "") != before


def test_a_full_cache_disk_is_one_line_and_leaves_no_partial_shard(tmp_path, s3_env, s3_bucket):
    """A real full disk: the cache on a 64 KiB tmpfs (mounting needs root, as CI has), a shard larger than that."""
    from nst.data import open_split
    from tasks.prepare import prepare

    small = tmp_path / "small-disk"
    small.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        uri = _s3_shards(s3_env, s3_bucket, tmp_path, n_shards=1)
        big = tmp_path / "src" / "00000.tar"
        with tarfile.open(big, "a") as tf:  # the same samples plus 200 KB of padding: larger than the disk
            ti = tarfile.TarInfo("padding.bin")
            ti.size = 200_000
            tf.addfile(ti, io.BytesIO(os.urandom(ti.size)))
        s3_env.client().upload_file(str(big), s3_bucket, "lab/00000.tar")
        cfg = _cfg(tmp_path, labeled=uri, unlabeled=uri, test=uri, cache_dir=str(small))
        prepare(cfg)
        with pytest.raises(DataError) as ei:
            open_split(cfg, "test")
        assert str(ei.value) == (f"{small}: disk full while caching s3://{s3_bucket}/lab/00000.tar; free space "
                                 "there or lower data.cache_limit_mb")
        assert [p.name for p in small.iterdir() if not p.name.endswith(".lock")] == []  # nothing half-written
    finally:
        subprocess.run(["umount", str(small)], check=False)
