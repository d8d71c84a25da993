"""nst.scan: header-only bomb rejection, content digests, the stat-keyed cache and its recovery, worker processes."""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nst import scan
from nst.scan import (
    FileCheck,
    HashCache,
    ImageError,
    check_files,
    check_pixels,
    image_size,
    tree_digest,
)

ROOT = Path(__file__).resolve().parents[1]
PIL_DEFAULT = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS, and data.max_image_pixels' default
BOMB_MSG = "image is 20000x20000 = 400,000,000 pixels > data.max_image_pixels = 89,478,485"


def _permissions_bypassed() -> bool:
    """Root (CAP_DAC_OVERRIDE) reads mode-000 files and writes into read-only folders: probe instead of asking uid."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "probe"
        p.write_bytes(b"x")
        p.chmod(0)
        try:
            p.read_bytes()
            return True
        except PermissionError:
            return False
        finally:
            p.chmod(0o600)


IS_ROOT = _permissions_bypassed()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A real, all-black 1-bit PNG, compressed row by row: the 20000x20000 one is ~50 KB and never exists in memory
    as pixels (PIL's Image.new("1", ...) would allocate 400 MB in the test process itself)."""
    row = b"\0" + bytes((width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts, block = [], 256
    for start in range(0, height, block):
        parts.append(z.compress(row * min(block, height - start)))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", b"".join(parts))
            + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("bomb") / "bomb.png"
    p.write_bytes(bilevel_png(20000, 20000))
    return p


def _jpeg(path: Path, seed: int, size=(48, 40)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=90)
    return path


def _bmp_bytes(seed: int) -> bytes:
    """Uncompressed: two different images of one size have byte-identical lengths."""
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(b, "BMP")
    return b.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


@pytest.fixture
def tree(tmp_path) -> Path:
    """A small dataset with one of each kind of bad file."""
    d = tmp_path / "data"
    (d / "cat").mkdir(parents=True)
    (d / "dog").mkdir()
    for i in range(4):
        _jpeg(d / "cat" / f"{i}.jpg", i)
        _jpeg(d / "dog" / f"{i}.jpg", 10 + i)
    good = (d / "cat" / "0.jpg").read_bytes()
    (d / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "dog" / "notes.jpg").write_text("not an image\n")
    (d / "dog" / "empty.png").write_bytes(b"")
    return d


def _files(d: Path) -> list[str]:
    return sorted(str(p) for p in d.rglob("*") if p.is_file())


class OpenCounter:
    """Counts every open of the given files through Python (builtins.open, io.open, os.open): workers=1 runs
    in-process, so a read the cache should have saved shows up here."""

    def __init__(self, monkeypatch, files):
        self.watched = {os.path.abspath(f) for f in files}
        self.opened: list[str] = []
        real_open, real_os_open = builtins.open, os.open

        def counted_open(file, *a, **k):
            self._note(file)
            return real_open(file, *a, **k)

        def counted_os_open(file, *a, **k):
            self._note(file)
            return real_os_open(file, *a, **k)

        monkeypatch.setattr(builtins, "open", counted_open)
        monkeypatch.setattr(io, "open", counted_open)
        monkeypatch.setattr(os, "open", counted_os_open)

    def _note(self, file):
        if isinstance(file, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(file)) in self.watched:
            self.opened.append(os.fsdecode(file))


# ---- header and decompression bombs -----------------------------------------------------------------------------

def test_bilevel_png_is_a_real_png():
    im = Image.open(io.BytesIO(bilevel_png(67, 45)))
    im.load()
    assert (im.size, im.mode, im.getextrema()) == ((67, 45), "1", (0, 0))


def test_bomb_is_small_and_rejected_from_the_header(bomb):
    assert bomb.stat().st_size < 100_000
    assert image_size(bomb) == (20000, 20000) == image_size(bomb.read_bytes())
    t0 = time.perf_counter()
    [c] = check_files([bomb], max_pixels=PIL_DEFAULT, verify="decode")
    assert time.perf_counter() - t0 < 1.0
    assert c.error == BOMB_MSG
    assert (c.width, c.height, c.digest) == (20000, 20000, _sha(bomb.read_bytes()))


def test_bomb_check_does_not_allocate_the_pixels(bomb):
    """In a fresh process (the test process's own peak RSS may already be high): decoding would cost >= 400 MB."""
    code = (
        "import json, resource, sys, time\n"
        "from nst.scan import check_files\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t = time.perf_counter()\n"
        f"[c] = check_files([sys.argv[1]], max_pixels={PIL_DEFAULT}, verify='decode')\n"
        "t = time.perf_counter() - t\n"
        "r1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'grew_kb': r1 - r0, 'peak_kb': r1, 's': t, 'error': c.error}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    r = json.loads(out.strip().splitlines()[-1])
    assert r["error"] == BOMB_MSG
    assert r["grew_kb"] < 50_000, r  # KB on Linux; the absolute peak is not usable: Linux keeps ru_maxrss across
    # exec, so a child forked from a large pytest process starts with that process's peak
    assert r["s"] < 1.0, r


def test_limit_is_ours_not_pils(bomb):
    """Above 2 x PIL's MAX_IMAGE_PIXELS, Image.open itself refuses; a configured limit above that still applies."""
    [c] = check_files([bomb], max_pixels=10**9)
    assert (c.error, c.width, c.height) == (None, 20000, 20000)
    [c] = check_files([bomb], max_pixels=None)
    assert c.ok


def test_check_pixels_boundary():
    check_pixels(100, 50, 5000)
    check_pixels(10**6, 10**6, None)
    with pytest.raises(ImageError, match=r"image is 100x51 = 5,100 pixels > data.max_image_pixels = 5,000"):
        check_pixels(100, 51, 5000)


def test_image_size_of_non_image(tmp_path):
    with pytest.raises(ImageError, match="^cannot identify image file$"):
        image_size(b"hello")
    p = tmp_path / "x.png"
    p.write_text("hello")
    with pytest.raises(ImageError, match=f"^{p}: cannot identify image file$"):
        image_size(p)


def test_bad_files_become_errors_not_exceptions(tree, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    paths = [tree / "dog" / "notes.jpg", tree / "dog" / "empty.png", tree / "missing.jpg", tree / "cat", fifo,
             tree / "cat" / "1.jpg"]
    got = check_files(paths, max_pixels=PIL_DEFAULT, verify="decode")
    assert [c.error for c in got] == ["cannot identify image file", "empty file",
                                      "cannot read file (No such file or directory)", "not a regular file",
                                      "not a regular file", None]
    assert [c.path for c in got] == [str(p) for p in paths]
    assert got[0].digest == _sha(b"not an image\n") and got[2].digest is None
    assert got[5].size == (tree / "cat" / "1.jpg").stat().st_size and (got[5].width, got[5].height) == (48, 40)


@pytest.mark.skipif(IS_ROOT, reason="root reads any file")
def test_permission_denied_is_an_error(tree):
    p = tree / "cat" / "0.jpg"
    p.chmod(0)
    try:
        [c] = check_files([p], max_pixels=PIL_DEFAULT)
    finally:
        p.chmod(0o644)
    assert c.error == "cannot read file (Permission denied)"


def test_truncated_jpeg_fails_the_header_check_damaged_pixels_fail_decode(tree):
    p = tree / "dog" / "truncated.jpg"
    [h] = check_files([p], max_pixels=PIL_DEFAULT, verify="header")
    assert h.error == "truncated or corrupt (no JPEG end-of-image marker after the image data)"
    assert (h.width, h.height) == (48, 40)
    # damaged inside, its structure intact: only a full decode tells
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(b, "PNG")
    data = bytearray(b.getvalue())
    at = data.index(b"IDAT") + 24
    data[at:at + 40] = bytes(x ^ 0x5A for x in data[at:at + 40])
    p = tree / "dog" / "damaged.png"
    p.write_bytes(data)
    [h] = check_files([p], max_pixels=PIL_DEFAULT, verify="header")
    [d] = check_files([p], max_pixels=PIL_DEFAULT, verify="decode")
    assert h.ok and (h.width, h.height) == (48, 40)
    assert d.error.startswith("truncated or corrupt (decode failed: broken data stream")
    assert len(d.error) <= 200 and "\n" not in d.error
    assert h.digest == d.digest


# ---- content digests and fingerprints ---------------------------------------------------------------------------

def test_digest_follows_content_and_the_cache_follows_stat(tmp_path):
    a, b = _bmp_bytes(1), _bmp_bytes(2)
    assert len(a) == len(b) and a != b
    p = tmp_path / "img.bmp"
    p.write_bytes(a)
    cache = HashCache(tmp_path / "cache.sqlite")
    [c1] = check_files([p], max_pixels=PIL_DEFAULT, cache=cache)
    assert c1.digest == _sha(a)

    st = p.stat()
    with open(p, "r+b") as f:  # same inode, same size, different pixels ...
        f.write(b)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime
    assert (p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    # The documented limitation (as DVC): same stat => the cached digest; this also proves the file was not read.
    assert check_files([p], max_pixels=PIL_DEFAULT, cache=cache)[0].digest == _sha(a)
    assert check_files([p], max_pixels=PIL_DEFAULT)[0].digest == _sha(b)  # no cache: the content

    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a real rewrite changes the mtime
    assert check_files([p], max_pixels=PIL_DEFAULT, cache=cache)[0].digest == _sha(b)

    with open(p, "ab") as f:  # a size change with the mtime put back is noticed too
        f.write(b"\0")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert check_files([p], max_pixels=PIL_DEFAULT, cache=cache)[0].digest == _sha(b + b"\0")


def test_fingerprint_is_the_same_in_a_fresh_clone(tree, tmp_path, monkeypatch):
    """tree_digest, the content identity a stage's fingerprint takes of an image folder: no mtimes, inodes or
    absolute paths in it, so a fresh clone of the same data anywhere agrees; pixels and names change it."""
    fp = tree_digest(tree)

    clone = tmp_path / "elsewhere" / "clone"
    shutil.copytree(tree, clone, copy_function=shutil.copy)  # new mtimes and inodes
    assert (clone / "cat" / "0.jpg").stat().st_mtime_ns != (tree / "cat" / "0.jpg").stat().st_mtime_ns
    assert tree_digest(clone) == fp

    monkeypatch.chdir(clone)  # relative paths and root give the same answer
    assert tree_digest(".") == fp

    _jpeg(clone / "cat" / "2.jpg", 99)  # different pixels
    assert tree_digest(clone) != fp
    _jpeg(clone / "cat" / "2.jpg", 2)  # the same pixels again, new mtime: the same fingerprint
    assert tree_digest(clone) == fp
    (clone / "cat" / "2.jpg").rename(clone / "cat" / "2b.jpg")  # a renamed file
    assert tree_digest(clone) != fp


# ---- the cache ------------------------------------------------------------------------------------------------

def test_second_call_reads_no_file(tree, tmp_path, monkeypatch):
    files = _files(tree)
    cache = HashCache.for_out_dir(tmp_path / "out")
    assert cache.path == tmp_path / "out" / ".nst" / "file-cache.sqlite" and cache.enabled
    first = check_files(files, max_pixels=PIL_DEFAULT, cache=cache)
    counter = OpenCounter(monkeypatch, files)
    cache.close()
    cache = HashCache.for_out_dir(tmp_path / "out")  # a new run
    assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == first
    assert counter.opened == []
    monkeypatch.undo()
    # the counter is not blind: without the cache every file is opened
    counter = OpenCounter(monkeypatch, files)
    check_files(files, max_pixels=PIL_DEFAULT)
    assert sorted(counter.opened) == sorted(files)


@pytest.mark.skipif(IS_ROOT, reason="root reads files with mode 000")
def test_second_call_reads_no_file_even_in_workers(tree, tmp_path):
    files = _files(tree)
    cache = HashCache(tmp_path / "c.sqlite")
    first = check_files(files, max_pixels=PIL_DEFAULT, cache=cache, workers=2, chunk=2)
    for f in files:
        os.chmod(f, 0)
    try:
        assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache, workers=2, chunk=2) == first
    finally:
        for f in files:
            os.chmod(f, 0o644)


def test_decode_reads_again_only_what_was_never_decoded(tree, tmp_path, monkeypatch, bomb):
    files = _files(tree) + [str(bomb)]
    cache = HashCache(tmp_path / "c.sqlite")
    check_files(files, max_pixels=PIL_DEFAULT, cache=cache, verify="header")
    counter = OpenCounter(monkeypatch, files)
    decoded = check_files(files, max_pixels=PIL_DEFAULT, cache=cache, verify="decode")
    # images within the limit are read again to decode; non-images, truncated files and the bomb are settled by
    # the header
    assert sorted(counter.opened) == sorted(f for f in files if f.endswith(".jpg") and "notes" not in f
                                            and "truncated" not in f)
    counter.opened.clear()
    again = check_files(files, max_pixels=PIL_DEFAULT, cache=cache, verify="decode")
    assert again == decoded and counter.opened == []
    assert [c.error is None for c in again] == [c.error is None for c in check_files(files, max_pixels=PIL_DEFAULT,
                                                                                      verify="decode")]
    assert any(c.error and c.error.startswith("truncated or corrupt") for c in again)


def test_changing_the_limit_needs_no_read(bomb, tmp_path, monkeypatch):
    cache = HashCache(tmp_path / "c.sqlite")
    assert check_files([bomb], max_pixels=PIL_DEFAULT, cache=cache)[0].error == BOMB_MSG
    counter = OpenCounter(monkeypatch, [bomb])
    [c] = check_files([bomb], max_pixels=10**9, cache=cache)
    assert c.ok and counter.opened == []


def test_corrupt_cache_file_is_set_aside(tree, tmp_path, monkeypatch, caplog):
    files = _files(tree)
    expected = check_files(files, max_pixels=PIL_DEFAULT)
    path = tmp_path / "out" / ".nst" / "file-cache.sqlite"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not a database" * 500)
    with caplog.at_level(logging.WARNING, logger="nst.scan"):
        cache = HashCache(path)
    assert cache.enabled and "moved to" in caplog.text
    assert [p.name.startswith("file-cache.sqlite.corrupt-") for p in path.parent.iterdir() if p != path] == [True]
    assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == expected
    counter = OpenCounter(monkeypatch, files)  # and the fresh cache works
    assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == expected and counter.opened == []


def test_cache_corrupted_mid_run_is_set_aside(tree, tmp_path, caplog):
    files = _files(tree)
    path = tmp_path / "c.sqlite"
    cache = HashCache(path)
    expected = check_files(files, max_pixels=PIL_DEFAULT, cache=cache)
    size = path.stat().st_size
    with open(path, "r+b") as f:  # clobbered under an open connection
        f.write(os.urandom(size))
    with caplog.at_level(logging.WARNING, logger="nst.scan"):
        assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == expected
    assert "file cache" in caplog.text
    assert any(p.name.startswith("c.sqlite.corrupt-") for p in tmp_path.iterdir())
    assert cache.get_many([]) == {}  # still usable


def test_cache_that_cannot_be_created_is_skipped(tree, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="nst.scan"):
        cache = HashCache(blocker / "sub" / "cache.sqlite")
    assert not cache.enabled and "unavailable" in caplog.text
    files = _files(tree)
    assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == check_files(files, max_pixels=PIL_DEFAULT)


@pytest.mark.skipif(IS_ROOT, reason="root writes into read-only folders")
def test_read_only_cache_folder_reads_but_does_not_write(tree, tmp_path):
    files = _files(tree)
    d = tmp_path / "ro"
    d.mkdir()
    first = check_files(files[:3], max_pixels=PIL_DEFAULT, cache=HashCache(d / "c.sqlite"))
    d.chmod(0o555)
    (d / "c.sqlite").chmod(0o444)
    try:
        cache = HashCache(d / "c.sqlite")
        assert cache.enabled and not cache.writable
        assert check_files(files[:3], max_pixels=PIL_DEFAULT, cache=cache) == first
        check_files(files, max_pixels=PIL_DEFAULT, cache=cache)  # no error from put_many
    finally:
        d.chmod(0o755)


# ---- processes --------------------------------------------------------------------------------------------------

def test_workers_give_the_same_results(tree, tmp_path, bomb, monkeypatch):
    contexts = []
    real = scan.multiprocessing.get_context
    monkeypatch.setattr(scan.multiprocessing, "get_context", lambda m=None: contexts.append(m) or real(m))
    files = _files(tree) + [str(bomb), str(tree / "missing.jpg"), _files(tree)[0]]  # a path twice
    for verify in ("header", "decode"):
        progress = []
        one = check_files(files, max_pixels=PIL_DEFAULT, verify=verify, workers=1, chunk=2)
        two = check_files(files, max_pixels=PIL_DEFAULT, verify=verify, workers=2, chunk=2,
                          on_progress=lambda d, t: progress.append((d, t)))
        assert two == one
        assert all(isinstance(c, FileCheck) for c in two)
        assert progress[-1] == (len(files), len(files)) and len(progress) > 3
        assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert contexts == ["forkserver", "forkserver"]
    assert sum(c.ok for c in one) == 9 and one[-1] == one[0]  # 8 good JPEGs, one listed twice
    # a warm cache filled by workers answers the in-process run without reads
    cache = HashCache(tmp_path / "c.sqlite")
    assert check_files(files, max_pixels=PIL_DEFAULT, workers=2, chunk=2, cache=cache, verify="decode") == one
    counter = OpenCounter(monkeypatch, files)
    assert check_files(files, max_pixels=PIL_DEFAULT, workers=1, cache=cache, verify="decode") == one
    assert counter.opened == []


def test_unwritable_cache_is_used_read_only_not_set_aside(tree, tmp_path, monkeypatch, caplog):
    """What a read-only folder does to sqlite, simulated (root writes anywhere): the intact file is kept and read."""
    files = _files(tree)
    path = tmp_path / "c.sqlite"
    first = check_files(files[:3], max_pixels=PIL_DEFAULT, cache=HashCache(path))
    real_connect = HashCache._connect

    def connect(self, read_only):
        if not read_only:
            raise scan.sqlite3.OperationalError("unable to open database file")
        return real_connect(self, read_only)

    monkeypatch.setattr(HashCache, "_connect", connect)
    with caplog.at_level(logging.WARNING, logger="nst.scan"):
        cache = HashCache(path)
    assert cache.enabled and not cache.writable and "read-only" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.sqlite", "data"]  # nothing set aside
    counter = OpenCounter(monkeypatch, files)
    assert check_files(files[:3], max_pixels=PIL_DEFAULT, cache=cache) == first and counter.opened == []
    check_files(files, max_pixels=PIL_DEFAULT, cache=cache)  # misses are read; put_many writes nothing, no error
    counter.opened.clear()
    check_files(files[3:], max_pixels=PIL_DEFAULT, cache=cache)
    assert len(counter.opened) == len(files) - 3


def test_blocks_share_one_pool_and_keep_order(tree, bomb, monkeypatch):
    monkeypatch.setattr(scan, "_BLOCK_MIN", 1)  # chunk=1, workers=2: blocks of 8 paths
    contexts = []
    real = scan.multiprocessing.get_context
    monkeypatch.setattr(scan.multiprocessing, "get_context", lambda m=None: contexts.append(m) or real(m))
    files = _files(tree) + [str(bomb), str(tree / "missing.jpg")] + _files(tree)[:5]
    assert len(files) > 16
    progress = []
    got = check_files(files, max_pixels=PIL_DEFAULT, workers=2, chunk=1, on_progress=lambda d, t: progress.append(d))
    assert got == check_files(files, max_pixels=PIL_DEFAULT)
    assert contexts == ["forkserver"] and progress[-1] == len(files)


def test_interrupted_scan_keeps_its_progress(tree, tmp_path, monkeypatch):
    files = _files(tree)
    cache = HashCache(tmp_path / "c.sqlite")

    def stop(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        check_files(files, max_pixels=PIL_DEFAULT, cache=cache, chunk=2, on_progress=stop)
    expected = check_files(files, max_pixels=PIL_DEFAULT)
    counter = OpenCounter(monkeypatch, files)
    assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache) == expected
    assert len(counter.opened) == len(files) - 4  # the 4 files checked before the interrupt are not read again


def test_cache_that_stops_accepting_writes_is_kept(tree, tmp_path, caplog):
    """A write failing mid-run for an operational reason (disk full, read-only remount) must not cost the file."""
    files = _files(tree)
    path = tmp_path / "c.sqlite"
    cache = HashCache(path)
    first = check_files(files[:3], max_pixels=PIL_DEFAULT, cache=cache)
    real = cache._db

    class Failing:
        def __getattr__(self, name):
            return getattr(real, name)

        def __enter__(self):
            return real.__enter__()

        def __exit__(self, *a):
            return real.__exit__(*a)

        def executemany(self, *a):
            raise scan.sqlite3.OperationalError("database or disk is full")

    cache._db = Failing()
    with caplog.at_level(logging.WARNING, logger="nst.scan"):
        assert check_files(files, max_pixels=PIL_DEFAULT, cache=cache)[:3] == first
    assert "used read-only" in caplog.text and cache.enabled and not cache.writable
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.sqlite", "data"]
    assert len(cache.get_many([scan.Stat(os.path.abspath(f), c.size, c.mtime_ns, os.stat(f).st_ino)
                               for f, c in zip(files, first)])) == 3
