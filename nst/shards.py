"""Image shards as a data source, read in place: WebDataset-compatible tar files (img2dataset's and LAION's layout),
in a local folder, as a brace pattern (`shards/{00000..00127}.tar`) or under `s3://bucket/prefix/`.

A sample is the tar members sharing a key (the member name up to the first dot of its base name): one image
(`.jpg`, `.png`, ...) and optionally `.cls` (the class index). A Parquet file of the same name beside a shard (the
sidecar img2dataset writes) may give the labels (`label`) and says which keys the tar holds (`key`, `status`).
Class names come from `data.classes` or a `classes.json` beside the shards.

`prepare` streams each shard once (an S3 object straight from its GET, never a local copy) and records each
sample's member offset, size and content digest; later stages read a member by (shard, offset, size): a local
shard with one `pread`, an S3 shard through a bounded local cache of whole shards (boto3's managed download,
conditioned on the ETag prepare saw, so a replaced object is refused, not trained on). A sample's id is its
address `<shard>#<member>`, stable for as long as the shard is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nst.errors import DataError

log = logging.getLogger("nst.shards")

SHARD_SUFFIX = ".tar"
SEP = "#"  # <shard>#<member>: a sample's address and id
_BRACE = re.compile(r"\{([^{}]*)\}")
_STREAM_ATTEMPTS = 3  # whole-shard re-reads in prepare after a dropped connection (botocore retries the GET itself)


def is_s3(src: object) -> bool:
    return isinstance(src, str) and src.startswith("s3://")


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar a/001.tar a/002.tar (zero padding kept); `{x,y}` lists; nested: all combinations."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
            raise DataError(f"{pattern}: bad brace range {{{body}}} (expected {{00000..00127}})")
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [e for o in options for e in expand_braces(pattern[:m.start()] + o + pattern[m.end():])]


def pattern_folder(pattern: str) -> str:
    """The folder a brace pattern's shards are in: `shards/{000..127}.tar` -> shards (s3:// URIs alike)."""
    return pattern.split("{", 1)[0].rsplit("/", 1)[0]


def is_shard_source(src: object) -> bool:
    """An S3 URI, a brace pattern, a .tar file, or a folder with .tar files in it (and so not an ImageFolder)."""
    if src is None:
        return False
    if is_s3(src):
        return True
    s = os.fspath(src)
    if "{" in s or s.endswith(SHARD_SUFFIX):
        return True
    p = Path(s)
    try:
        return p.is_dir() and any(e.name.endswith(SHARD_SUFFIX) and e.is_file() for e in os.scandir(p))
    except OSError:
        return False


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member path up to the first dot of its base name, the rest its extension."""
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


# ---- listing -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shard:
    url: str           # local path (absolute) or s3://bucket/key
    size: int
    etag: str | None   # S3's ETag (None for local files)


def _s3_client():
    from nst.s3 import make_client

    return make_client()


def list_shards(src: str | os.PathLike, what: str = "data source", client=None) -> list[Shard]:
    """The shards of a source in order (names sorted, or the brace pattern's order); a missing one is an error."""
    if is_s3(src):
        return _list_s3(str(src), what, client or _s3_client())
    s = os.fspath(src)
    if "{" in s:
        files = [Path(f) for f in expand_braces(s)]
    elif s.endswith(SHARD_SUFFIX):
        files = [Path(s)]
    else:
        files = sorted(p for p in Path(s).iterdir() if p.name.endswith(SHARD_SUFFIX) and p.is_file())
    out = []
    for f in files:
        try:
            out.append(Shard(str(f.resolve()), f.stat().st_size, None))
        except OSError as e:
            raise DataError(f"{f}: shard of {what} missing or unreadable ({e.strerror or e})") from None
    if not out:
        raise DataError(f"{s}: {what} has no {SHARD_SUFFIX} shards")
    return out


def _list_s3(uri: str, what: str, client) -> list[Shard]:
    from nst.s3 import S3PullError, _s3_reason, list_prefix, parse_s3_uri

    try:
        if "{" in uri:
            out = []
            for u in expand_braces(uri):
                bucket, key = parse_s3_uri(u)
                try:
                    h = client.head_object(Bucket=bucket, Key=key)
                except Exception as e:  # noqa: BLE001 - botocore's errors, named below
                    raise DataError(f"{u}: shard of {what} missing or unreadable ({_s3_reason(e)})") from None
                out.append(Shard(u, h["ContentLength"], h["ETag"]))
            return out
        bucket, prefix = parse_s3_uri(uri)
        out = [Shard(f"s3://{bucket}/{o.key}", o.size, o.etag) for o in list_prefix(client, bucket, prefix)
               if o.key.endswith(SHARD_SUFFIX) and "/" not in o.rel]  # the prefix's own shards, not sub-folders'
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - no bucket, no endpoint, no credentials: one line naming the URI
        raise S3PullError(f"{uri}: cannot list {what} ({_s3_reason(e)})") from None
    if not out:
        raise DataError(f"{uri}: {what} has no {SHARD_SUFFIX} shards")
    return sorted(out, key=lambda s: s.url)


def _beside(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


def read_small(url: str, client=None) -> bytes | None:
    """A small file beside the shards (a sidecar, classes.json), or None when there is none."""
    if is_s3(url):
        from nst.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(url)
        client = client or _s3_client()
        try:
            return client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except client.exceptions.NoSuchKey:
            return None
    p = Path(url)
    return p.read_bytes() if p.is_file() else None


def source_classes(src: str | os.PathLike, client=None) -> list[str] | None:
    """classes.json beside the shards (what `nst pack` writes), if any."""
    shards = list_shards(src, client=client)
    raw = read_small(_beside(shards[0].url, "classes.json"), client)
    if raw is None:
        return None
    names = json.loads(raw)
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise DataError(f"{_beside(shards[0].url, 'classes.json')}: not a JSON list of class names")
    return names


# ---- indexing (prepare) ----------------------------------------------------------------------------------------

INDEX_SCHEMA = None  # built on first use (pyarrow is imported lazily here)


def _index_schema():
    import pyarrow as pa

    global INDEX_SCHEMA
    if INDEX_SCHEMA is None:
        INDEX_SCHEMA = pa.schema([("key", pa.string()), ("name", pa.string()), ("offset", pa.int64()),
                                  ("size", pa.int64()), ("digest", pa.binary(16)), ("width", pa.int32()),
                                  ("height", pa.int32()), ("mode", pa.string()), ("error", pa.string()),
                                  ("label", pa.string())])
    return INDEX_SCHEMA


def _open_stream(shard: Shard, client):
    if not is_s3(shard.url):
        return open(shard.url, "rb")
    from nst.s3 import parse_s3_uri

    bucket, key = parse_s3_uri(shard.url)
    kw = {"IfMatch": shard.etag} if shard.etag else {}
    return client.get_object(Bucket=bucket, Key=key, **kw)["Body"]


def _members(shard: Shard, client) -> Iterator[tuple]:
    """(key, ext, name, offset, size, bytes) of the shard's regular members, streamed in order (tar's `r|` mode:
    an S3 object is read once from its GET body, nothing written to disk)."""
    stream = _open_stream(shard, client)
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                f = tf.extractfile(m)
                data = f.read() if f is not None else b""
                if len(data) != m.size:
                    raise tarfile.ReadError("unexpected end of data")
                key, ext = split_key(m.name)
                yield key, ext, m.name, m.offset_data, m.size, data
    finally:
        stream.close()


def index_shard(shard: Shard, verify: str, max_pixels: int | None, endpoint: str | None = None):
    """Every sample of one shard as one Arrow table (key, image member, offset, size, digest, header facts, the
    check's error, the `.cls` label): one sequential read of the shard, columns instead of an object per sample,
    so a million samples cost about what the manifest does. A dropped connection re-reads the shard (a few
    times), then fails naming it; a truncated tar names it too."""
    import pyarrow as pa

    from nst.scan import IMAGE_EXTS, check_bytes

    client = None
    if is_s3(shard.url):
        from nst.s3 import make_client

        client = make_client(endpoint)
    for attempt in range(_STREAM_ATTEMPTS):
        try:
            cols: dict[str, list] = {f: [] for f in _index_schema().names}
            seen: dict[str, int] = {}
            labels: dict[str, str] = {}
            end = 0
            for key, ext, name, offset, size, data in _members(shard, client):
                end = offset + -(-size // 512) * 512
                if "." + ext.rsplit(".", 1)[-1] in IMAGE_EXTS and key not in seen:
                    ck = check_bytes(name, data, max_pixels=max_pixels, verify=verify)
                    seen[key] = len(seen)
                    for f, v in (("key", key), ("name", name), ("offset", offset), ("size", size),
                                 ("digest", bytes.fromhex(ck.digest)), ("width", ck.width), ("height", ck.height),
                                 ("mode", ck.mode), ("error", ck.error), ("label", None)):
                        cols[f].append(v)
                elif ext == "cls":
                    labels[key] = data.decode("utf-8", "replace").strip()
            if end + 1024 > shard.size:  # tarfile reads a cut at a block boundary as the end of the archive
                raise tarfile.ReadError(f"no end-of-archive marker after byte {end} of {shard.size}")
            for key, lab in labels.items():
                if key in seen:
                    cols["label"][seen[key]] = lab
            return pa.table(cols, schema=_index_schema())
        except tarfile.ReadError as e:
            raise DataError(f"{shard.url}: truncated or not a tar shard ({e}); re-pack or replace it") from None
        except Exception as e:  # noqa: BLE001 - S3 and connection failures: retried, then named
            reason = _failure(e)
            if reason is None or attempt == _STREAM_ATTEMPTS - 1 or "changed in S3" in reason:
                raise DataError(f"{shard.url}: {reason or e}") from None
            log.warning("%s: read failed (%s); reading the shard again", shard.url, reason)
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def _failure(e: BaseException) -> str | None:
    """A one-line reason for an S3/connection failure, or None for an exception that is not one."""
    from botocore.exceptions import BotoCoreError, ClientError

    from nst.s3 import _s3_reason

    if isinstance(e, ClientError):
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("PreconditionFailed", "412"):
            return "changed in S3 since `nst prepare` (its ETag differs); run `nst prepare` again"
        if code in ("NoSuchKey", "404"):
            return "shard missing in S3 (deleted since `nst prepare`?)"
        return _s3_reason(e)
    if isinstance(e, (BotoCoreError, ConnectionError, TimeoutError, OSError)) or type(e).__name__ in (
            "ProtocolError", "IncompleteRead", "RetriesExceededError"):
        return f"connection failed ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    return None


def sidecar(shard: Shard, client=None) -> dict[str, str | None] | None:
    """{key: label text or None} of the shard's Parquet sidecar (rows whose `status` is not "success" left out, as
    img2dataset writes failed downloads), or None when the shard has no sidecar."""
    import io

    import pyarrow.parquet as pq

    url = shard.url[: -len(SHARD_SUFFIX)] + ".parquet"
    raw = read_small(url, client)
    if raw is None:
        return None
    t = pq.read_table(io.BytesIO(raw))
    if "key" not in t.column_names:
        raise DataError(f"{url}: sidecar without a 'key' column (columns: {t.column_names})")
    keys = [str(k) for k in t.column("key").to_pylist()]
    ok = t.column("status").to_pylist() if "status" in t.column_names else ["success"] * len(keys)
    labels = t.column("label").to_pylist() if "label" in t.column_names else [None] * len(keys)
    return {k: (None if lab is None else str(lab)) for k, s, lab in zip(keys, ok, labels) if s == "success"}


# ---- reading (training, evaluation, labelling) -------------------------------------------------------------------

_CACHED = re.compile(r"[0-9a-f]{24}\.tar")  # the names cache_key gives: the only files eviction ever deletes


def cache_key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:24] + SHARD_SUFFIX


class ShardCache:
    """Whole S3 shards in a local folder, at most `limit` bytes, least recently used evicted first. Fetches are
    boto3's managed downloads (multipart, retried) into a temp file renamed into place, conditioned on the ETag
    recorded at prepare time (a conditional HEAD: s3transfer takes no IfMatch); processes sharing the folder (DataLoader workers, DDP ranks) lock per shard."""

    def __init__(self, folder: Path, limit_mb: float, etags: dict[str, tuple[int, str | None]]):
        self.folder, self.limit_mb, self.limit, self.etags = Path(folder), limit_mb, int(limit_mb * 2**20), etags
        self._client, self._pid, self._lock = None, None, threading.Lock()
        self.fetched = 0

    def client(self):
        if self._client is None or self._pid != os.getpid():  # a forked worker makes its own
            self._client, self._pid = _s3_client(), os.getpid()
        return self._client

    def path(self, url: str) -> Path:
        p = self.folder / cache_key(url)
        try:
            os.utime(p)  # most recently used
            return p
        except FileNotFoundError:
            pass
        with self._lock:
            return self._fetch(url, p)

    def _fetch(self, url: str, p: Path) -> Path:
        from nst.io import file_lock

        size, etag = self.etags.get(url, (None, None))
        if size is not None and size > self.limit:
            raise DataError(f"{url}: a shard of {size / 2**20:.3g} MiB does not fit data.cache_limit_mb = "
                            f"{self.limit_mb:g}; raise the limit or pack smaller shards (nst pack --shard-size)")
        self.folder.mkdir(parents=True, exist_ok=True)
        with file_lock(self.folder / (p.name + ".lock")):
            if p.is_file():
                return p
            self._make_room(size or 0, keep=p.name)
            self._download(url, p, etag, size)
            self.fetched += 1
        return p

    def _make_room(self, need: int, keep: str) -> None:
        files = []
        for e in os.scandir(self.folder):
            if _CACHED.fullmatch(e.name) and e.name != keep:  # a user's own .tar in data.cache_dir is never touched
                st = e.stat()
                files.append((st.st_mtime_ns, st.st_size, e.path))
        used = sum(s for _, s, _ in files)
        for _, s, path in sorted(files):
            if used + need <= self.limit:
                break
            try:
                os.unlink(path)  # a reader holding it open keeps reading the old inode
            except FileNotFoundError:
                pass
            used -= s

    def _download(self, url: str, p: Path, etag: str | None, size: int | None) -> None:
        from boto3.s3.transfer import TransferConfig

        from nst.s3 import parse_s3_uri

        bucket, key = parse_s3_uri(url)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        try:
            if etag:  # s3transfer takes no IfMatch: a conditional HEAD first, then every member's digest on read
                self.client().head_object(Bucket=bucket, Key=key, IfMatch=etag)
            self.client().download_file(bucket, key, str(tmp),
                                        Config=TransferConfig(num_download_attempts=5, use_threads=False))
            got = tmp.stat().st_size
            if size is not None and got != size:
                raise DataError(f"{url}: {got} bytes arrived, prepare recorded {size}: changed since `nst prepare`")
            os.replace(tmp, p)
        except DataError:
            raise
        except OSError as e:
            if e.errno == 28:  # ENOSPC
                raise DataError(f"{self.folder}: disk full while caching {url}; free space there or lower "
                                f"data.cache_limit_mb") from None
            reason = _failure(e)
            raise DataError(f"{url}: {reason or e}") from None
        except Exception as e:  # noqa: BLE001 - botocore/s3transfer failures after their retries
            reason = _failure(e) or f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            raise DataError(f"{url}: download failed ({reason})") from None
        finally:
            tmp.unlink(missing_ok=True)


class ShardReader:
    """Member bytes by (shard, offset, size). Local shards are read with os.pread on descriptors kept open per
    process (no shared file offset between forked workers); S3 shards through the ShardCache."""

    def __init__(self, cache: ShardCache | None = None):
        self.cache = cache
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()

    def _fd(self, path: str) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            if len(self._fds) >= 64:
                os.close(self._fds.pop(next(iter(self._fds))))
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise DataError(f"{path}: shard missing or unreadable ({e.strerror or e})") from None
            self._fds[path] = fd
        return fd

    def read(self, shard: str, offset: int, size: int) -> bytes:
        if is_s3(shard):  # opened per read: a descriptor kept open would pin an evicted shard's disk space
            if self.cache is None:
                raise DataError(f"{shard}: an S3 shard, but no shard cache is configured")
            for attempt in (0, 1):
                try:
                    with open(self.cache.path(shard), "rb", buffering=0) as f:
                        data = os.pread(f.fileno(), size, offset)
                    break
                except FileNotFoundError:  # evicted by another process between its check and our open
                    if attempt:
                        raise DataError(f"{shard}: evicted from the shard cache as soon as fetched: "
                                        "data.cache_limit_mb is too small for the processes sharing it") from None
        else:
            data = os.pread(self._fd(shard), size, offset)
        if len(data) != size:
            raise DataError(f"{shard}: truncated (member at byte {offset} needs {size} bytes, {len(data)} there)")
        return data

    def prefetch(self, shards: list[str]) -> threading.Thread | None:
        """Fetch S3 shards into the cache in the background (the next shard group's read-ahead)."""
        todo = [s for s in dict.fromkeys(shards) if is_s3(s)]
        if not todo or self.cache is None:
            return None

        def run():
            for s in todo:
                try:
                    self.cache.path(s)
                except Exception as e:  # noqa: BLE001 - the read itself reports it, in the stage's own words
                    log.debug("prefetch of %s failed: %s", s, e)
                    return

        t = threading.Thread(target=run, daemon=True, name="shard-prefetch")
        t.start()
        return t
