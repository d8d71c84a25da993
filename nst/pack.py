"""`nst pack SOURCE DEST`: loose images (an ImageFolder, a CSV/Parquet manifest, or an S3 prefix of files) into
WebDataset-compatible tar shards with img2dataset's layout (`00000.tar` + `00000.parquet` sidecar, 9-digit keys,
`.cls` class indexes, `classes.json`), locally or on S3.

Deterministic: the same input gives the same bytes (input order kept, tar headers without times or owners), so
a re-pack changes no fingerprint. Resumable: `pack.json` records what each shard holds; a re-run keeps the shards
that already hold their planned input and writes the rest, in parallel, each atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nst.errors import ConfigError, DataError
from nst.progress import Progress
from nst.shards import SHARD_SUFFIX, is_s3

log = logging.getLogger("nst.pack")

PLAN = "pack.json"
_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "k": 1 << 10, "mb": 1 << 20, "m": 1 << 20, "gb": 1 << 30, "g": 1 << 30}
DEFAULT_SHARD_SIZE = "256MB"


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--shard-size {text!r}: expected a size such as 256MB, 1GB or 65536")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass(frozen=True)
class Input:
    path: str            # local path or s3:// URI
    name: str            # as shown in the sidecar (relative to the source)
    size: int
    label: str | None


def _inputs(source: str) -> list[Input]:
    if is_s3(source):
        from nst.s3 import list_prefix, make_client, parse_s3_uri
        from nst.scan import IMAGE_EXTS

        bucket, prefix = parse_s3_uri(source)
        objs = [o for o in list_prefix(make_client(), bucket, prefix)
                if os.path.splitext(o.key)[1].lower() in IMAGE_EXTS]
        return [Input(f"s3://{bucket}/{o.key}", o.rel, o.size, o.rel.split("/")[0] if "/" in o.rel else None)
                for o in sorted(objs, key=lambda o: o.key)]
    from nst.data import scan_source

    src = Path(source)
    base = src if src.is_dir() else src.parent
    out = []
    for it in scan_source(src, "pack source"):
        try:
            size = os.stat(it.path).st_size
        except OSError as e:
            raise DataError(f"{it.path}: cannot read image ({e.strerror or e})") from None
        try:
            name = Path(it.path).resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            name = it.path
        out.append(Input(it.path, name, size, it.label_name))
    return out


def _tar_bytes(size: int) -> int:
    return 512 + -(-size // 512) * 512


def plan(inputs: list[Input], shard_size: int, classes: list[str] | None) -> list[list[tuple[int, Input]]]:
    """Consecutive inputs per shard, each shard at most `shard_size` bytes of tar (a larger image gets its own)."""
    shards, cur, used = [], [], 0
    for i, inp in enumerate(inputs):
        need = _tar_bytes(inp.size) + (1024 if classes else 0)
        if cur and used + need > shard_size:
            shards.append(cur)
            cur, used = [], 0
        cur.append((i, inp))
        used += need
    if cur:
        shards.append(cur)
    return shards


def _digest(members: list[tuple[int, Input]], classes: list[str] | None) -> str:
    h = hashlib.sha256(json.dumps(classes).encode())
    for i, inp in members:
        h.update(f"{i}\0{inp.path}\0{inp.size}\0{inp.label}\n".encode())
    return h.hexdigest()


def _read(inp: Input, client) -> bytes:
    if is_s3(inp.path):
        from nst.s3 import _s3_reason, parse_s3_uri

        bucket, key = parse_s3_uri(inp.path)
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:  # noqa: BLE001 - botocore's errors, after its retries
            raise DataError(f"{inp.path}: cannot read ({_s3_reason(e)})") from None
    try:
        return Path(inp.path).read_bytes()
    except OSError as e:
        raise DataError(f"{inp.path}: cannot read image ({e.strerror or e})") from None


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
    tf.addfile(ti, io.BytesIO(data))


def write_shard(path: Path, members: list[tuple[int, Input]], classes: list[str] | None, client) -> int:
    """One shard and its sidecar, each written to a temp file and renamed: a shard that exists is whole."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nst.io import atomic_path

    index = {c: k for k, c in enumerate(classes or [])}
    keys, names, labels, sizes, sha = [], [], [], [], []
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i, inp in members:
                data = _read(inp, client)
                key = f"{i:09d}"
                ext = os.path.splitext(inp.path)[1].lower() or ".img"
                _add(tf, key + ext, data)
                if classes and inp.label is not None:
                    _add(tf, key + ".cls", str(index[inp.label]).encode())
                keys.append(key)
                names.append(inp.name)
                labels.append(inp.label)
                sizes.append(len(data))
                sha.append(hashlib.sha256(data).hexdigest())
    table = pa.table({"key": keys, "status": ["success"] * len(keys), "path": names,
                      "label": pa.array(labels, pa.string()), "size": pa.array(sizes, pa.int64()), "sha256": sha})
    with atomic_path(path.with_suffix(".parquet")) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return len(members)


class _Dest:
    """A local folder or an S3 prefix, as the pack writes it: shards are built in a local temp folder and uploaded
    with boto3's managed transfer (multipart for large shards)."""

    def __init__(self, dest: str):
        self.dest = dest.rstrip("/")
        self.client = None
        if is_s3(dest):
            from nst.s3 import make_client, parse_s3_uri

            self.client = make_client()
            self.bucket, prefix = parse_s3_uri(dest)
            self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
            self.tmp = tempfile.TemporaryDirectory(prefix="nst-pack-")
            self.local = Path(self.tmp.name)
        else:
            self.local = Path(dest)
            self.local.mkdir(parents=True, exist_ok=True)

    def exists(self, name: str) -> bool:
        if self.client is None:
            return (self.local / name).is_file()
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + name)
            return True
        except self.client.exceptions.ClientError:
            return False

    def read(self, name: str) -> bytes | None:
        from nst.shards import read_small

        if self.client is None:
            return read_small(str(self.local / name))
        return read_small(f"s3://{self.bucket}/{self.prefix}{name}", self.client)

    def remove(self, name: str) -> None:
        if self.client is None:
            (self.local / name).unlink(missing_ok=True)
        else:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def publish(self, name: str) -> None:
        """A file written under self.local goes to its place (S3: uploaded, then removed locally)."""
        if self.client is None:
            return
        from boto3.s3.transfer import TransferConfig

        p = self.local / name
        self.client.upload_file(str(p), self.bucket, self.prefix + name, Config=TransferConfig(use_threads=False))
        p.unlink()

    def write_json(self, name: str, obj) -> None:
        from nst.io import atomic_write_json

        atomic_write_json(self.local / name, obj)
        self.publish(name)


def pack(source: str, dest: str, *, shard_size: int | str = DEFAULT_SHARD_SIZE, workers: int | None = None) -> dict:
    shard_size = parse_size(shard_size) if isinstance(shard_size, str) else shard_size
    inputs = _inputs(source)
    if not inputs:
        raise DataError(f"{source}: no images to pack")
    named = sorted({i.label for i in inputs if i.label is not None})
    if named and any(i.label is None for i in inputs):
        first = next(i for i in inputs if i.label is None)
        raise DataError(f"{source}: {first.path}: unlabeled image among labeled ones (class folders or a label column "
                        "for all, or for none)")
    classes = named or None
    shards = plan(inputs, shard_size, classes)
    width = max(5, len(str(len(shards) - 1)))
    names = [f"{k:0{width}d}{SHARD_SUFFIX}" for k in range(len(shards))]
    digests = [_digest(m, classes) for m in shards]
    out = _Dest(dest)
    old = out.read(PLAN)
    old_digests = {s["name"]: s["inputs"] for s in json.loads(old)["shards"]} if old else {}
    keep = {n for n, d in zip(names, digests) if old_digests.get(n) == d and out.exists(n)
            and out.exists(n[: -len(SHARD_SUFFIX)] + ".parquet")}
    for n in old_digests:  # stale shards go before the new plan names them (a crash then cannot bless one)
        if n not in keep:
            out.remove(n)
            out.remove(n[: -len(SHARD_SUFFIX)] + ".parquet")
    out.write_json(PLAN, {"source": source, "shard_size": shard_size, "classes": classes, "images": len(inputs),
                          "shards": [{"name": n, "inputs": d, "images": len(m)}
                                     for n, d, m in zip(names, digests, shards)]})
    if classes:
        out.write_json("classes.json", classes)
    todo = [k for k, n in enumerate(names) if n not in keep]
    read_client = None
    if is_s3(source):
        from nst.s3 import make_client

        read_client = make_client()

    def one(k: int) -> int:
        n = write_shard(out.local / names[k], shards[k], classes, read_client)
        out.publish(names[k])
        out.publish(names[k][: -len(SHARD_SUFFIX)] + ".parquet")
        return n

    with Progress("pack", total=sum(len(shards[k]) for k in todo), unit="img", logger=log) as bar:
        with ThreadPoolExecutor(max(1, workers or min(8, os.cpu_count() or 1))) as ex:
            for n in ex.map(one, todo):
                bar.advance(n)
    return {"shards": len(shards), "images": len(inputs), "written": len(todo), "kept": len(keep),
            "classes": len(classes or []), "dest": dest}
