"""nst.s3 against a real moto S3 server over HTTP; faults are real ones, injected by an HTTP proxy in front of it
(tests/servers.py: FaultProxy): a stream cut mid-body, 403 and 500 answers."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import FaultProxy

from nst.s3 import MANIFEST_NAME, S3PullError, make_client, parse_s3_uri, pull_prefix, push_dir
from nst.io import read_json


def _make_tree(root: Path, n: int = 25) -> dict[str, bytes]:
    """n small files, some nested, with distinct deterministic contents."""
    files = {}
    for i in range(n):
        rel = f"img_{i:03d}.bin" if i % 3 else f"class_{i % 4}/sub/img_{i:03d}.bin"
        data = (f"object {i}\n".encode() * (i + 1))[: 50 + 7 * i]
        files[rel] = data
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME}


@pytest.fixture
def seeded(tmp_path, moto_s3, s3_bucket):
    src = tmp_path / "src"
    files = _make_tree(src)
    uri = f"s3://{s3_bucket}/datasets/toy"
    client = moto_s3.client()
    assert push_dir(src, uri, client=client) == {"uploaded": len(files), "bytes": sum(map(len, files.values()))}
    return uri, files, client


@contextmanager
def proxied(moto_s3, key: str, times: int, mode: str = "cut", status: int = 503):
    """A client whose requests for `key` go through a FaultProxy (cut mid-body, or answered with `status`)."""
    import boto3
    from botocore.config import Config

    proxy = FaultProxy(moto_s3.endpoint_url, key, times=times, mode=mode, status=status)
    try:
        yield proxy, boto3.client("s3", endpoint_url=proxy.url, aws_access_key_id="testing",
                                  aws_secret_access_key="testing", region_name="us-east-1",
                                  config=Config(retries={"max_attempts": 3, "mode": "standard"}))
    finally:
        proxy.stop()


def test_pull_paginates_and_matches_bytes(tmp_path, seeded):
    uri, files, client = seeded
    pages = []
    client.meta.events.register("before-call.s3.ListObjectsV2", lambda **kw: pages.append(1))
    dest = tmp_path / "dest"

    counts = pull_prefix(uri, dest, client=client, page_size=10, max_workers=4)

    assert len(pages) == 3  # 25 objects at 10 per page
    assert counts == {"listed": 25, "downloaded": 25, "skipped": 0, "failed": 0,
                      "bytes": sum(map(len, files.values()))}
    assert _local_files(dest) == files
    manifest = read_json(dest / MANIFEST_NAME)
    assert sorted(manifest) == sorted(files)
    assert all(v["size"] == len(files[k]) and v["etag"] for k, v in manifest.items())
    assert not list(dest.rglob("*.tmp"))


def test_repull_skips_then_fetches_only_changed(tmp_path, seeded):
    uri, files, client = seeded
    dest = tmp_path / "dest"
    pull_prefix(uri, dest, client=client, page_size=10)

    again = pull_prefix(uri, dest, client=client, page_size=10)
    assert (again["downloaded"], again["skipped"], again["bytes"]) == (0, 25, 0)

    bucket, prefix = parse_s3_uri(uri)
    changed = "class_0/sub/img_000.bin"
    new = b"new contents of the same length!"[: len(files[changed])].ljust(len(files[changed]), b"!")
    assert len(new) == len(files[changed]) and new != files[changed]  # same size: only the ETag tells
    client.put_object(Bucket=bucket, Key=f"{prefix}/{changed}", Body=new)

    third = pull_prefix(uri, dest, client=client, page_size=10)
    assert (third["downloaded"], third["skipped"]) == (1, 24)
    assert (dest / changed).read_bytes() == new


def test_local_file_with_wrong_size_is_refetched(tmp_path, seeded):
    uri, files, client = seeded
    dest = tmp_path / "dest"
    pull_prefix(uri, dest, client=client)
    (dest / "img_001.bin").write_bytes(b"truncated")
    counts = pull_prefix(uri, dest, client=client)
    assert (counts["downloaded"], counts["skipped"]) == (1, 24)
    assert (dest / "img_001.bin").read_bytes() == files["img_001.bin"]


def test_broken_stream_is_retried(tmp_path, seeded, moto_s3):
    uri, files, _ = seeded
    bucket, prefix = parse_s3_uri(uri)
    dest = tmp_path / "dest"
    with proxied(moto_s3, f"/{bucket}/{prefix}/img_002.bin", times=1) as (proxy, client):
        counts = pull_prefix(uri, dest, client=client)
    assert proxy.failed == 1 and proxy.hits == 2  # cut once, read again
    assert counts["failed"] == 0 and counts["downloaded"] == 25
    assert _local_files(dest) == files


def test_permanent_failure_names_key_and_leaves_no_partial_file(tmp_path, seeded, moto_s3):
    uri, files, client = seeded
    bucket, prefix = parse_s3_uri(uri)
    rel = "class_1/sub/img_009.bin"
    dest = tmp_path / "dest"
    with proxied(moto_s3, f"/{bucket}/{prefix}/{rel}", times=99) as (proxy, faulty):
        with pytest.raises(S3PullError) as ei:
            pull_prefix(uri, dest, client=faulty, attempts=3)
    msg = str(ei.value)
    assert "\n" not in msg and f"{prefix}/{rel}" in msg and "1 of 25" in msg
    assert proxy.failed == 3
    assert not (dest / rel).exists()
    assert [p.name for p in dest.rglob("*") if p.is_file() and p.name.startswith("img_009")] == []
    assert rel not in read_json(dest / MANIFEST_NAME)
    others = {k: v for k, v in files.items() if k != rel}
    assert _local_files(dest) == others

    # Once the fault is gone, a re-pull fetches just the missing object.
    counts = pull_prefix(uri, dest, client=client)
    assert (counts["downloaded"], counts["skipped"]) == (1, 24)
    assert _local_files(dest) == files


def test_failed_update_keeps_old_local_copy(tmp_path, seeded, moto_s3):
    uri, files, client = seeded
    bucket, prefix = parse_s3_uri(uri)
    rel = "img_004.bin"
    dest = tmp_path / "dest"
    pull_prefix(uri, dest, client=client)
    client.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=b"version two")

    with proxied(moto_s3, f"/{bucket}/{prefix}/{rel}", times=99) as (_, faulty):
        with pytest.raises(S3PullError):
            pull_prefix(uri, dest, client=faulty)
    assert (dest / rel).read_bytes() == files[rel]  # atomic: old version intact, not half of the new one

    assert pull_prefix(uri, dest, client=client)["downloaded"] == 1
    assert (dest / rel).read_bytes() == b"version two"


def test_non_transient_error_is_not_retried(tmp_path, seeded, moto_s3):
    uri, _, _ = seeded
    bucket, prefix = parse_s3_uri(uri)
    with proxied(moto_s3, f"/{bucket}/{prefix}/img_005.bin", times=99, mode="status", status=403) as (proxy, c):
        with pytest.raises(S3PullError, match="403"):
            pull_prefix(uri, tmp_path / "dest", client=c)
    assert proxy.hits == 1


def test_server_500_is_retried(tmp_path, seeded, moto_s3):
    uri, files, _ = seeded
    bucket, prefix = parse_s3_uri(uri)
    with proxied(moto_s3, f"/{bucket}/{prefix}/img_007.bin", times=2, mode="status", status=500) as (proxy, c):
        pull_prefix(uri, tmp_path / "dest", client=c)
    assert proxy.failed == 2 and proxy.hits == 4  # two 500s retried by botocore, then HEAD + GET
    assert _local_files(tmp_path / "dest") == files


def test_prefix_is_a_folder_and_empty_prefix_is_an_error(tmp_path, moto_s3, s3_bucket):
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="data/a.txt", Body=b"a")
    client.put_object(Bucket=s3_bucket, Key="database/b.txt", Body=b"b")
    client.put_object(Bucket=s3_bucket, Key="data/marker/", Body=b"")

    counts = pull_prefix(f"s3://{s3_bucket}/data", tmp_path / "d", client=client)
    assert counts["listed"] == 1 and _local_files(tmp_path / "d") == {"a.txt": b"a"}

    with pytest.raises(S3PullError, match="no objects under"):
        pull_prefix(f"s3://{s3_bucket}/nothing-here", tmp_path / "e", client=client)
    assert pull_prefix(f"s3://{s3_bucket}/nothing-here", tmp_path / "e", client=client,
                       allow_empty=True)["listed"] == 0


def test_keys_escaping_dest_are_rejected(tmp_path, moto_s3, s3_bucket):
    client = moto_s3.client()
    client.put_object(Bucket=s3_bucket, Key="p/ok.txt", Body=b"ok")
    client.put_object(Bucket=s3_bucket, Key="p/../../evil.txt", Body=b"evil")
    listed = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket, Prefix="p/")["Contents"]]
    assert "p/../../evil.txt" in listed  # the store really holds the hostile key

    dest = tmp_path / "a" / "dest"
    with pytest.raises(ValueError, match=r"escape.*evil\.txt"):
        pull_prefix(f"s3://{s3_bucket}/p", dest, client=client)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert not (dest / "ok.txt").exists()  # refused before downloading anything


@pytest.mark.parametrize("uri", ["", "bucket/key", "http://bucket/key", "s3://", "s3:///prefix", "s3://a/x",
                                 "s3://bad bucket/x"])
def test_bad_uri(uri):
    with pytest.raises(ValueError, match=r"S3 URI \(expected s3://bucket/prefix\)") as ei:
        parse_s3_uri(uri)
    assert "\n" not in str(ei.value)


def test_parse_uri():
    assert parse_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")


def test_endpoint_from_env(tmp_path, seeded, monkeypatch, moto_s3):
    uri, files, _ = seeded
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("NST_S3_ENDPOINT_URL", moto_s3.endpoint_url)
    assert make_client().meta.endpoint_url == moto_s3.endpoint_url
    pull_prefix(uri, tmp_path / "dest")  # no client: built from the environment
    assert _local_files(tmp_path / "dest") == files
