"""S3-compatible stores (AWS, MinIO, moto) with boto3: the client every part uses, URIs, listing, and
`nst data pull` / push of folders.

Transfers are boto3's managed ones (s3transfer: a temp file renamed into place, a stream cut mid-body read again,
multipart for large objects); API calls retry through botocore's retry config. What boto3 does not do is kept:
incremental pulls (a sidecar manifest, `.s3-manifest.json`, records the ETag and size of what is on disk, so a
re-pull fetches only objects that changed), refusing keys that would escape the destination, and one-line errors
naming the keys that failed. Credentials come only from boto3's usual chain and are never logged.
"""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nst.errors import ConfigError, DataError, NstError, quote
from nst.progress import Progress
from nst.secrets import redact

from nst.io import atomic_write_json, read_json

log = logging.getLogger(__name__)

MANIFEST_NAME = ".s3-manifest.json"
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-_]{1,253}[A-Za-z0-9]$")


class S3PullError(NstError, RuntimeError):
    """An S3 transfer failed for good (bad endpoint, missing bucket, no credentials, objects failing after
    retries); the message names the URI or the keys, one line, no credentials."""


def _s3_reason(e: BaseException) -> str:
    from botocore.exceptions import ClientError, NoCredentialsError

    if isinstance(e, NoCredentialsError):
        return "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile)"
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        return f"{err.get('Code', 'error')}: {err.get('Message', '')}".strip()
    return redact(_one_line(e))


@dataclass(frozen=True)
class S3Object:
    key: str
    rel: str  # key relative to the pulled prefix, '/'-separated
    size: int
    etag: str


# --------------------------------------------------------------------------------------------- client


def resolve_endpoint(endpoint_url: str | None = None) -> str | None:
    """Argument, else $NST_S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL, else None (real AWS)."""
    from nst.settings import s3_endpoint

    return endpoint_url or s3_endpoint()


def make_client(
    endpoint_url: str | None = None,
    *,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
    max_pool_connections: int = 10,
):
    """An S3 client with bounded retries and timeouts, so a dead endpoint fails fast instead of hanging."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        max_pool_connections=max_pool_connections,
    )
    # A private Session: boto3's default session is not safe to create clients from in several threads.
    return boto3.session.Session().client("s3", endpoint_url=resolve_endpoint(endpoint_url), config=config)


def _bad_uri(uri: object, problem: str) -> ConfigError:
    return ConfigError(redact(f"{quote(uri)}: {problem} (expected s3://bucket/prefix)"))


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix'); the prefix may be empty. A malformed URI is a
    one-line ConfigError naming it. '.' and '..' are not folders in S3 (a key is a name), so a prefix with them is
    a mistake, refused like the keys with them a pull refuses."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise _bad_uri(uri, "not an S3 URI")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise _bad_uri(uri, "no bucket name in the S3 URI")
    if not _BUCKET_RE.match(bucket):
        raise _bad_uri(uri, "bad bucket name in the S3 URI")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise _bad_uri(uri, "a '.' or '..' part in the prefix of the S3 URI")
    return bucket, prefix


def _dir_prefix(prefix: str) -> str:
    """Treat the prefix as a folder, so s3://b/data does not also match s3://b/database/..."""
    prefix = prefix.lstrip("/")
    return prefix if not prefix or prefix.endswith("/") else prefix + "/"


def _safe_rel(rel: str) -> bool:
    """A relative key that stays inside the destination folder and does not clash with the manifest."""
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False
    return rel != MANIFEST_NAME


# ----------------------------------------------------------------------------------------------- pull


def list_prefix(client, bucket: str, prefix: str, *, page_size: int | None = None) -> list[S3Object]:
    """All objects under the folder `prefix` (folder-marker keys ending in '/' are left out)."""
    dprefix = _dir_prefix(prefix)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": dprefix}
    if page_size:
        kwargs["PaginationConfig"] = {"PageSize": page_size}
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
        for item in page.get("Contents", []):
            key = item["Key"]
            if key.endswith("/"):
                continue
            out.append(S3Object(key=key, rel=key[len(dprefix) :], size=int(item["Size"]), etag=item["ETag"]))
    return out


def _download_one(client, bucket: str, obj: S3Object, path: Path, attempts: int) -> tuple[str, int]:
    """boto3's managed download of one object: the old local file survives a failure. Returns (etag, size)."""
    from boto3.s3.transfer import TransferConfig

    path.parent.mkdir(parents=True, exist_ok=True)
    client.download_file(bucket, obj.key, str(path),
                         Config=TransferConfig(use_threads=False, num_download_attempts=attempts))
    return obj.etag, path.stat().st_size


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_manifest(dest: Path) -> dict[str, dict]:
    try:
        data = read_json(dest / MANIFEST_NAME)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def pull_prefix(
    uri: str,
    dest_dir: str | os.PathLike,
    *,
    endpoint_url: str | None = None,
    max_workers: int = 8,
    client=None,
    page_size: int | None = None,
    attempts: int = 3,
    allow_empty: bool = False,
) -> dict[str, int]:
    """Mirror the folder `uri` into `dest_dir` (never deletes local files).

    Skips objects whose local file has the listed size and whose manifest ETag matches. `attempts`: reads of a
    stream cut mid-body (s3transfer's retries; botocore retries 5xx answers itself). Returns counts
    {listed, downloaded, skipped, failed, bytes}; raises S3PullError naming keys that still
    failed (the manifest is still written for the ones that succeeded). An empty prefix raises unless
    `allow_empty`, since it is almost always a wrong URI.
    """
    bucket, prefix = parse_s3_uri(uri)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    if client is None:
        client = make_client(endpoint_url, max_pool_connections=max(10, max_workers))

    from botocore.exceptions import BotoCoreError, ClientError

    try:
        objects = list_prefix(client, bucket, prefix, page_size=page_size)
    except (BotoCoreError, ClientError) as e:
        raise S3PullError(f"{uri}: cannot list objects ({_s3_reason(e)})") from None
    bad = [o.key for o in objects if not _safe_rel(o.rel)]
    if bad:
        shown = ", ".join(quote(k, 80) for k in bad[:5]) + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "")
        raise DataError(f"refusing to pull {uri}: {len(bad)} key(s) would escape or clash in {dest}: {shown}")
    if not objects and not allow_empty:
        raise S3PullError(f"no objects under {uri} (wrong bucket or prefix?)")

    old = _load_manifest(dest)
    new_manifest: dict[str, dict] = {}
    todo: list[S3Object] = []
    for o in objects:
        local = dest / o.rel
        rec = old.get(o.rel) or {}
        if local.is_file() and local.stat().st_size == o.size and rec.get("etag") == o.etag and rec.get("size") == o.size:
            new_manifest[o.rel] = {"etag": o.etag, "size": o.size}
        else:
            todo.append(o)

    counts = {"listed": len(objects), "downloaded": 0, "skipped": len(objects) - len(todo), "failed": 0, "bytes": 0}
    failed: dict[str, BaseException] = {}
    if todo:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(todo)))) as pool:
            futures = {pool.submit(_download_one, client, bucket, o, dest / o.rel, attempts): o for o in todo}
            bar = Progress(f"pull {uri}", total=sum(o.size for o in todo), unit="B", logger=log).__enter__()
            for fut in as_completed(futures):
                o = futures[fut]
                bar.advance(o.size)
                try:
                    etag, size = fut.result()
                except Exception as e:  # collected and reported together below
                    failed[o.key] = e
                    log.warning("s3 get %s failed for good: %s: %s", o.key, type(e).__name__, _one_line(e))
                    continue
                new_manifest[o.rel] = {"etag": etag, "size": size}
                counts["downloaded"] += 1
                counts["bytes"] += size
            bar.__exit__(None, None, None)

    atomic_write_json(dest / MANIFEST_NAME, dict(sorted(new_manifest.items())))
    counts["failed"] = len(failed)
    log.info("pulled %s -> %s: %s", uri, dest, counts)
    if failed:
        keys = sorted(failed)
        shown = ", ".join(keys[:10]) + (f" (+{len(keys) - 10} more)" if len(keys) > 10 else "")
        first = failed[keys[0]]
        raise S3PullError(
            f"pull {uri}: {len(keys)} of {len(objects)} object(s) failed: {shown} "
            f"(first error: {type(first).__name__}: {_s3_reason(first)})"
        )
    return counts


# ----------------------------------------------------------------------------------------------- push


def push_dir(
    local_dir: str | os.PathLike,
    uri: str,
    *,
    endpoint_url: str | None = None,
    max_workers: int = 8,
    client=None,
) -> dict[str, int]:
    """Upload every file under `local_dir` to the folder `uri` (the pull manifest is left out)."""
    from boto3.s3.transfer import TransferConfig

    bucket, prefix = parse_s3_uri(uri)
    src = Path(local_dir)
    if not src.is_dir():
        raise NotADirectoryError(f"not a folder: {src}")
    if client is None:
        client = make_client(endpoint_url, max_pool_connections=max(10, max_workers))
    dprefix = _dir_prefix(prefix)
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    transfer = TransferConfig(use_threads=False)  # parallelism comes from our own pool

    def upload(p: Path) -> int:
        key = dprefix + p.relative_to(src).as_posix()
        client.upload_file(str(p), bucket, key, Config=transfer)
        return p.stat().st_size

    counts = {"uploaded": 0, "bytes": 0}
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for size in pool.map(upload, files):
            counts["uploaded"] += 1
            counts["bytes"] += size
    log.info("pushed %s -> %s: %s", src, uri, counts)
    return counts
