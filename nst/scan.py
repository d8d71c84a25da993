"""Checking many image files fast: one read per file (content digest + header), a stat-keyed cache, worker processes.

`prepare` has to vouch for up to millions of images. Decoding each one with torchvision on one core takes hours and
proves little more than the header does, while the header alone already tells the size that matters for memory: a
48 KB PNG can declare 20000x20000 pixels and cost ~1 GB to decode (torchvision ignores PIL's MAX_IMAGE_PIXELS), so
such files are rejected from the header, before anything decodes them. Each file's bytes are hashed on the same read,
so the manifest can record *content* (not mtimes) and a fresh clone of the same data fingerprints identically. A
cache keyed by (path, size, mtime, inode), as DVC keeps one, lets an unchanged file skip even that one read. The same
read also checks that JPEG, PNG and WebP data reach their end (a truncated file passes a header check otherwise, and
stops training or labelling much later).

This module imports neither torch nor nst.data: worker processes start in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import io
import logging
import multiprocessing
import os
import sqlite3
import stat as stat_mod
import struct
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, NamedTuple, Sequence

from PIL import Image, UnidentifiedImageError

from nst.errors import DataError

log = logging.getLogger("nst.scan")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
DIGEST_CHARS = 32  # 128 bits of sha256: collision-free for any dataset, half the bytes in every manifest row
LIMIT_NAME = "data.max_image_pixels"
_MAX_ERROR = 200
_CACHE_SCHEMA = 2  # 2: the truncation check and the pixel mode
_BLOCK_MIN = 16384  # paths stat-ed and looked up at a time


class ImageError(ValueError):
    """A file that is not a usable image; the message is a one-line reason."""


@dataclass(slots=True)  # a million of them are held at once
class FileCheck:
    path: str  # as given
    size: int | None
    mtime_ns: int | None
    digest: str | None  # first DIGEST_CHARS hex chars of sha256(file bytes); None when the file could not be read
    width: int | None
    height: int | None
    error: str | None = None  # one line, <= 200 chars; None = usable
    mode: str | None = None  # the header's pixel mode (PIL's name; "RGB;16": 16 bits per sample), see pixel_mode

    @property
    def ok(self) -> bool:
        return self.error is None


class Stat(NamedTuple):
    """A cache key. `path` is absolute so the cache does not depend on the working directory."""
    path: str
    size: int
    mtime_ns: int
    inode: int


class Entry(NamedTuple):
    """What one read of a file established. `header_error` never holds the pixel-limit verdict: that depends on the
    configured limit and is re-derived from width x height, so changing the limit needs no re-read."""
    path: str
    size: int
    mtime_ns: int
    inode: int
    digest: str
    width: int | None
    height: int | None
    header_error: str | None
    decode_ok: bool | None  # None: never decoded (verify="header", or the header already failed)
    decode_error: str | None
    mode: str | None = None


def _one_line(text: object, limit: int = _MAX_ERROR) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ---- header ----------------------------------------------------------------------------------------------------

def _open_unchecked(fp: BinaryIO) -> Image.Image:
    """Image.open without PIL's own bomb check, which raises above 2 x PIL.Image.MAX_IMAGE_PIXELS without telling
    the dimensions (and would reject images our own, configured limit allows). Same plugin registry and probing
    as Image.open; only reached for images above PIL's limit."""
    Image.init()
    fp.seek(0)
    prefix = fp.read(16)
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        try:
            ok = (not accept) or accept(prefix)
            if isinstance(ok, str) or not ok:
                continue
            fp.seek(0)
            return factory(fp, "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    raise ImageError("cannot identify image file")


def _open_image(fp: BinaryIO) -> Image.Image:
    """Parse the header only (PIL opens lazily); any failure becomes an ImageError with a one-line reason."""
    with warnings.catch_warnings():
        # PIL's DecompressionBombWarning and plugin chatter: the verdict is ours (check_pixels) and goes in `error`.
        warnings.simplefilter("ignore")
        try:
            try:
                im = Image.open(fp)
            except Image.DecompressionBombError:
                im = _open_unchecked(fp)
        except (ImageError, MemoryError):  # out of memory says nothing about the file: fail the scan, cache nothing
            raise
        except UnidentifiedImageError:
            raise ImageError("cannot identify image file") from None
        except Exception as e:  # noqa: BLE001 - any parser failure means "not a usable image"
            raise ImageError(_one_line(f"cannot read image header ({type(e).__name__}: {e})")) from None
    if im.width <= 0 or im.height <= 0:
        raise ImageError(f"image has no pixels ({im.width}x{im.height})")
    return im


def open_header(data: bytes) -> Image.Image:
    """The image in `data`, its header parsed and no pixel decoded (PIL opens lazily), whatever its declared size:
    the caller applies the pixel limit before anything loads it."""
    return _open_image(io.BytesIO(data))


def pixel_mode(im: Image.Image, data: bytes) -> str:
    """PIL's mode, except that a PNG with 16 bits per sample, which PIL opens as 8-bit "RGB"/"RGBA" (keeping each
    sample's high byte), is told apart as "RGB;16"/"RGBA;16": prepare reports what decoding converts."""
    if im.format == "PNG" and im.mode in ("RGB", "RGBA") and len(data) > 24 and data[24] == 16:  # IHDR bit depth
        return im.mode + ";16"
    return im.mode


def _jpeg_complete(data: bytes) -> bool:
    """Past the header segments (each says its length) to the first scan; an end-of-image marker (FF D9) must follow.
    Entropy-coded data never holds FF D9 (a data byte FF is stuffed as FF 00), so a file cut short has none; bytes
    after the marker (camera trailers, padding) are allowed."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:  # junk between segments: skipped, as PIL's parser does
            i += 1
            continue
        marker = data[i + 1]
        if marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9") > i  # from the end: found at once in a complete file
        if marker == 0xFF or marker == 0x01 or 0xD0 <= marker <= 0xD8:  # fill byte, markers without a length
            i += 1 if marker == 0xFF else 2
            continue
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _png_complete(data: bytes) -> bool:
    """The chunk lengths, followed from the signature, reach an IEND chunk."""
    i, n = 8, len(data)
    while i + 8 <= n:
        if data[i + 4:i + 8] == b"IEND":
            return True
        i += 12 + int.from_bytes(data[i:i + 4], "big")
    return False


def end_error(im: Image.Image, data: bytes) -> str | None:
    """Why the file stops before its image data ends (None: complete, or a format without a cheap check). Costs a
    walk over the segment or chunk headers of bytes already read, not a decode."""
    fmt = im.format
    if fmt == "JPEG" and not _jpeg_complete(data):
        return "truncated or corrupt (no JPEG end-of-image marker after the image data)"
    if fmt == "PNG" and not _png_complete(data):
        return "truncated or corrupt (the PNG ends before its IEND chunk)"
    if fmt == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        return "truncated or corrupt (the WebP file is shorter than its RIFF header says)"
    return None


def image_size(data: bytes | str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the header alone, without decoding: cheap even for a decompression bomb."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return _open_image(io.BytesIO(data)).size
    with open(data, "rb") as f:
        try:
            return _open_image(f).size
        except ImageError as e:
            raise ImageError(f"{os.fspath(data)}: {e}") from None


def check_pixels(width: int, height: int, max_pixels: int | None) -> None:
    """Raise ImageError when decoding would need more than `max_pixels` pixels (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(f"image is {width}x{height} = {width * height:,} pixels > {LIMIT_NAME} = {max_pixels:,}")


def _pixel_error(width: int | None, height: int | None, max_pixels: int | None) -> str | None:
    try:
        check_pixels(width or 0, height or 0, max_pixels)
    except ImageError as e:
        return str(e)
    return None


# ---- reading one file (in a worker or in-process) -----------------------------------------------------------------

def _read(path: str) -> tuple[os.stat_result, bytes]:
    with open(path, "rb", buffering=0) as f:
        st = os.fstat(f.fileno())  # the stat of what was actually read: the cache key then matches the digest
        return st, f.readall()


def _inode(st: os.stat_result) -> int:
    return st.st_ino - (1 << 64) if st.st_ino >= (1 << 63) else st.st_ino  # sqlite integers are signed 64-bit


def _examine(path: str, verify: str, max_pixels: int | None) -> Entry | str:
    """One read: digest, header, and (verify="decode", within the pixel limit) a full decode of the same bytes.
    Returns the error text instead of an Entry when the file cannot be read at all."""
    try:
        st, data = _read(path)
    except OSError as e:
        return _one_line(f"cannot read file ({e.strerror or e})")
    return Entry(path, st.st_size, st.st_mtime_ns, _inode(st), *_inspect(data, verify, max_pixels))


def check_bytes(name: str, data: bytes, *, max_pixels: int | None, verify: str = "header") -> FileCheck:
    """The check of one file's bytes already in memory (a shard member): the same verdicts as check_files."""
    digest, width, height, header_error, decode_ok, decode_error, mode = _inspect(data, verify, max_pixels)
    e = Entry(name, len(data), 0, 0, digest, width, height, header_error, decode_ok, decode_error, mode)
    return _to_check(name, e, verify, max_pixels)


def _inspect(data: bytes, verify: str, max_pixels: int | None) -> tuple:
    """(digest, width, height, header_error, decode_ok, decode_error, mode) of an image's bytes."""
    digest = hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]
    width = height = header_error = decode_ok = decode_error = mode = None
    try:
        if not data:
            raise ImageError("empty file")
        im = open_header(data)
        width, height = im.size
        mode, header_error = pixel_mode(im, data), end_error(im, data)
    except ImageError as e:
        header_error = str(e)
    if verify == "decode" and header_error is None and _pixel_error(width, height, max_pixels) is None:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
            decode_ok = True
        except MemoryError:  # the machine's state, not the file's: never cache it as "corrupt"
            raise
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the file cannot be used
            decode_ok, decode_error = False, _one_line(f"truncated or corrupt (decode failed: {e})")
    return digest, width, height, header_error, decode_ok, decode_error, mode


def _examine_chunk(paths: list[str], verify: str, max_pixels: int | None) -> list[Entry | str]:
    """The unit of work sent to a worker process: a chunk amortises the round trip over many files."""
    return [_examine(p, verify, max_pixels) for p in paths]


# ---- the cache ------------------------------------------------------------------------------------------------------

def _is_corrupt(exc: object) -> bool:
    """Not a database, malformed pages, a foreign schema: only these justify moving the file aside. Operational
    errors (locked, read-only, unable to open, I/O) say nothing about the file's content."""
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    if isinstance(exc, sqlite3.OperationalError):
        return "no such" in str(exc) or "schema" in str(exc)
    return True


class HashCache:
    """(absolute path, size, mtime_ns, inode) -> what one read of the file established, in a sqlite3 file.

    As with DVC's state database, a file rewritten in place with the same size and the same mtime (restored with
    os.utime, or two writes within the file system's timestamp granularity) keeps its cached digest; anything that
    changes size, mtime or inode is read again. A cache is never a reason to fail: an unreadable or corrupt file is
    renamed aside and recreated (with a warning); where it cannot be created (read-only folder), lookups use an
    existing file read-only or nothing, and nothing is written. One process at a time: the caller holds a lock.
    """

    BATCH = 500  # keys per SELECT ... IN (...), below sqlite's bound-parameter limit everywhere

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.writable = False
        self._db: sqlite3.Connection | None = None
        self._open()

    @classmethod
    def for_out_dir(cls, out_dir: str | os.PathLike) -> HashCache:
        return cls(Path(out_dir) / ".nst" / "file-cache.sqlite")

    @property
    def enabled(self) -> bool:
        return self._db is not None

    # -- opening and recovering
    def _connect(self, read_only: bool) -> sqlite3.Connection:
        if read_only:
            db = sqlite3.connect(f"{self.path.absolute().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        else:
            db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _CACHE_SCHEMA):
                if read_only:
                    raise sqlite3.DatabaseError(f"cache schema {version}, expected {_CACHE_SCHEMA}")
                db.execute("DROP TABLE IF EXISTS files")
            if not read_only:
                db.execute(
                    "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                    " mtime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, digest TEXT NOT NULL, width INTEGER,"
                    " height INTEGER, header_error TEXT, decode_ok INTEGER, decode_error TEXT, mode TEXT)"
                    " WITHOUT ROWID")
                # Always written: sqlite opens an unwritable file read-only without a word, and this is how we learn.
                db.execute(f"PRAGMA user_version={_CACHE_SCHEMA}")
                db.commit()
            db.execute("SELECT path, size, mtime_ns, inode, digest, width, height, header_error, decode_ok,"
                       " decode_error, mode FROM files LIMIT 1").fetchall()
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db, self.writable = self._connect(read_only=False), True
            return
        except sqlite3.DatabaseError as e:  # includes OperationalError: read-only folder or file, corrupt file
            reason = e
        except OSError as e:  # the folder cannot be created
            reason = e
        if self.path.is_file() and self._set_aside(reason):  # corrupt: start afresh
            try:
                self._db, self.writable = self._connect(read_only=False), True
                return
            except (sqlite3.DatabaseError, OSError) as e:
                reason = e
        if self.path.is_file():
            try:
                self._db = self._connect(read_only=True)
                log.warning("%s: file cache is read-only (%s): files checked now will be read again next time",
                            self.path, _one_line(reason))
                return
            except sqlite3.DatabaseError:
                pass
        log.warning("%s: file cache unavailable (%s): every file is read", self.path, _one_line(reason))

    def _set_aside(self, reason: object) -> bool:
        """Move a corrupt cache out of the way (kept for inspection, never deleted). False if it cannot be moved."""
        if not _is_corrupt(reason):
            return False  # locked, read-only, disk full: intact, so keep it (and maybe read it) rather than lose it
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        try:
            os.replace(self.path, aside)
            for suffix in ("-journal", "-wal", "-shm"):
                side = self.path.with_name(self.path.name + suffix)
                if side.exists():
                    os.replace(side, aside.with_name(aside.name + suffix))
        except OSError:
            return False
        log.warning("%s: file cache unreadable (%s); moved to %s and started afresh", self.path, _one_line(reason),
                    aside.name)
        return True

    def _recover(self, exc: BaseException) -> None:
        """A cache that breaks mid-run is set aside when corrupt, else (disk full, read-only after all) kept for
        reading only; the scan carries on either way."""
        self.close()
        if self.writable and self._set_aside(exc):
            try:
                self._db = self._connect(read_only=False)
                return
            except (sqlite3.DatabaseError, OSError):
                pass
        self.writable = False
        if not _is_corrupt(exc) and self.path.is_file():
            try:
                self._db = self._connect(read_only=True)
                log.warning("%s: file cache not writable (%s): used read-only", self.path, _one_line(exc))
                return
            except sqlite3.DatabaseError:
                pass
        log.warning("%s: file cache disabled for this run (%s)", self.path, _one_line(exc))
        self._db = None

    # -- use
    def get_many(self, stats: Iterable[Stat]) -> dict[str, Entry]:
        """Entries whose stored (size, mtime_ns, inode) equal the given ones, by absolute path."""
        if self._db is None:
            return {}
        want = {s.path: s for s in stats}
        keys, found = list(want), {}
        try:
            for i in range(0, len(keys), self.BATCH):
                batch = keys[i:i + self.BATCH]
                rows = self._db.execute(
                    "SELECT path, size, mtime_ns, inode, digest, width, height, header_error, decode_ok, decode_error,"
                    f" mode FROM files WHERE path IN ({','.join('?' * len(batch))})", batch).fetchall()
                for row in rows:
                    s = want[row[0]]
                    if (row[1], row[2], row[3]) == (s.size, s.mtime_ns, s.inode):
                        ok = row[8]
                        found[row[0]] = Entry(*row[:8], None if ok is None else bool(ok), *row[9:])
        except sqlite3.DatabaseError as e:
            self._recover(e)
            return {}
        return found

    def put_many(self, entries: Iterable[Entry]) -> None:
        """One transaction per call: callers batch (thousands of rows), a commit per file would dominate the run."""
        if self._db is None or not self.writable:
            return
        rows = [(e.path, e.size, e.mtime_ns, e.inode, e.digest, e.width, e.height, e.header_error,
                 None if e.decode_ok is None else int(e.decode_ok), e.decode_error, e.mode) for e in entries]
        if not rows:
            return
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO files VALUES (?,?,?,?,?,?,?,?,?,?,?)", rows)
        except sqlite3.DatabaseError as e:
            self._recover(e)

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None

    def __enter__(self) -> HashCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- checking many files ------------------------------------------------------------------------------------------

def _to_check(path: str, e: Entry, verify: str, max_pixels: int | None) -> FileCheck:
    error = e.header_error or _pixel_error(e.width, e.height, max_pixels)
    if error is None and verify == "decode" and e.decode_ok is False:
        error = e.decode_error
    return FileCheck(path, e.size, e.mtime_ns, e.digest, e.width, e.height, error, e.mode)


def _settled(e: Entry, verify: str, max_pixels: int | None) -> bool:
    """Whether a cached entry answers this check without reading the file."""
    if verify == "header" or e.decode_ok is not None or e.header_error is not None:
        return True
    return _pixel_error(e.width, e.height, max_pixels) is not None  # too large: rejected without a decode anyway


def check_files(paths: Sequence[str | os.PathLike], *, max_pixels: int | None, verify: str = "header",
                workers: int = 1, cache: HashCache | None = None, chunk: int = 256,
                on_progress: Callable[[int, int], None] | None = None) -> list[FileCheck]:
    """Check every file, in input order; a bad file is a FileCheck with `error`, never an exception.

    verify="header" proves the file is an image of acceptable size; "decode" also decodes it fully (PIL), which
    costs ~10x more per file. Files the cache vouches for are not read; the rest are read once each, in chunks of
    `chunk` paths spread over `workers` processes ("forkserver": forking a process that runs threads, as the
    orchestrator does, can deadlock). No pool is started while what is left to read fits one chunk. Paths go
    through in blocks of thousands (stat, cache lookup, reads), so a million files never hold a million stat
    records and cache entries at once, and the cache is written as the scan goes: an interrupted scan keeps its
    progress.
    """
    if verify not in ("header", "decode"):
        raise ValueError(f"verify must be 'header' or 'decode', not {verify!r}")
    paths = [os.fspath(p) for p in paths]
    total, cwd, chunk = len(paths), os.getcwd(), max(1, chunk)
    block = max(_BLOCK_MIN, 4 * chunk * max(1, workers))
    results: list[FileCheck | None] = [None] * total
    to_write: list[Entry] = []
    done = 0
    pool = _Pool(workers, verify, max_pixels)
    try:
        for b0 in range(0, total, block):
            pending = _settle_block(paths, range(b0, min(b0 + block, total)), results, cwd, cache, verify,
                                    max_pixels)
            done += min(block, total - b0) - sum(len(v) for v in pending.values())
            if on_progress is not None:
                on_progress(done, total)

            def finish(chunk_paths: list[str], out: list[Entry | str]) -> None:
                nonlocal done
                for ap, r in zip(chunk_paths, out):
                    for i in pending[ap]:
                        results[i] = (FileCheck(paths[i], None, None, None, None, None, r) if isinstance(r, str)
                                      else _to_check(paths[i], r, verify, max_pixels))
                    if not isinstance(r, str):
                        to_write.append(r)
                    done += len(pending[ap])
                if cache is not None and len(to_write) >= 4096:
                    cache.put_many(to_write)
                    to_write.clear()
                if on_progress is not None:
                    on_progress(done, total)

            todo = list(pending)
            chunks = [todo[i:i + chunk] for i in range(0, len(todo), chunk)]
            if pool.wanted(len(chunks)):
                pool.run(chunks, finish)
            else:
                for c in chunks:
                    finish(c, _examine_chunk(c, verify, max_pixels))
    finally:  # an interrupted scan keeps what it established
        pool.close()
        if cache is not None and to_write:
            cache.put_many(to_write)
    return results  # type: ignore[return-value]


def _settle_block(paths: list[str], idx: range, results: list, cwd: str, cache: HashCache | None, verify: str,
                  max_pixels: int | None) -> dict[str, list[int]]:
    """Stat a block of paths and answer what stat or the cache can; returns absolute path -> input positions still
    to read (a path listed twice is read once)."""
    stats: dict[int, Stat] = {}
    for i in idx:
        p = paths[i]
        try:
            st = os.stat(p)
        except OSError as e:
            results[i] = FileCheck(p, None, None, None, None, None, _one_line(f"cannot read file ({e.strerror or e})"))
            continue
        if not stat_mod.S_ISREG(st.st_mode):  # a FIFO would block the read forever
            results[i] = FileCheck(p, st.st_size, st.st_mtime_ns, None, None, None, "not a regular file")
            continue
        stats[i] = Stat(os.path.normpath(os.path.join(cwd, p)), st.st_size, st.st_mtime_ns, _inode(st))
    hits = cache.get_many(stats.values()) if cache is not None else {}
    pending: dict[str, list[int]] = {}
    for i, s in stats.items():
        e = hits.get(s.path)
        if e is not None and _settled(e, verify, max_pixels):
            results[i] = _to_check(paths[i], e, verify, max_pixels)
        else:
            pending.setdefault(s.path, []).append(i)
    return pending


def _pool_can_start() -> bool:
    """forkserver children re-import the parent's __main__ from its file; a script read from stdin has none."""
    import sys

    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) is not None:
        return True
    main_file = getattr(main, "__file__", None)
    if main_file is None or os.path.isfile(main_file):
        return True
    log.warning("__main__ (%s) is not a file worker processes can import: checking files in this process",
                main_file)
    return False


class _Pool:
    """Worker processes, started on first need and kept for the rest of the scan (starting costs ~50-100 ms)."""

    def __init__(self, workers: int, verify: str, max_pixels: int | None):
        self.workers, self.verify, self.max_pixels = workers, verify, max_pixels
        self.ex: ProcessPoolExecutor | None = None
        self.usable: bool | None = None

    def wanted(self, n_chunks: int) -> bool:
        if self.workers <= 1 or n_chunks == 0 or (self.ex is None and n_chunks <= 1):
            return False
        if self.usable is None:
            self.usable = _pool_can_start()
        return self.usable

    def run(self, chunks: list[list[str]], finish: Callable[[list[str], list[Entry | str]], None]) -> None:
        if self.ex is None:
            self.ex = ProcessPoolExecutor(max_workers=min(self.workers, len(chunks)),
                                          mp_context=multiprocessing.get_context("forkserver"))
        # A few chunks in flight per worker: progress stays honest and memory flat however many files there are.
        queue, running = iter(chunks), {}

        def submit() -> None:
            c = next(queue, None)
            if c is not None:
                running[self.ex.submit(_examine_chunk, c, self.verify, self.max_pixels)] = c

        for _ in range(4 * self.workers):
            submit()
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                c = running.pop(fut)
                try:
                    out = fut.result()
                except BrokenProcessPool as e:
                    raise RuntimeError(
                        f"a file-check worker process died (killed for memory, a crashing image decoder, or it "
                        f"could not start: see any traceback above) while checking one of {len(c)} files starting "
                        f"with {c[0]}") from e
                finish(c, out)
                submit()

    def close(self) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
            self.ex = None


def walk_files(folder: str | os.PathLike) -> list[Path]:
    """Every visible file under `folder` (no name on the way starting with "."), sorted, as paths under `folder`: the
    one walk of a data folder, for the scan and the fingerprint alike. Symbolic links to folders are followed (a
    dataset assembled from links, `labeled/cats -> /data/cats`, is that dataset; Path.rglob would drop those
    classes without a word), except a link back to a folder it is inside: that loop is skipped with a warning, since
    everything in it is walked already. A dangling link is listed (the check then reports it unreadable)."""
    folder = Path(folder)
    try:
        st = folder.stat()
    except OSError as e:
        raise DataError(f"{folder}: cannot read folder ({e.strerror or e})") from None
    out: list[Path] = []
    todo = [(folder, frozenset([(st.st_dev, st.st_ino)]))]  # a folder and the real folders on its path
    while todo:
        d, above = todo.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"{d}: cannot list folder ({e.strerror or e})") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            p = d / entry.name
            if entry.is_dir():  # follows links
                st = entry.stat()
                if (st.st_dev, st.st_ino) in above:
                    log.warning("%s: links back to the folder %s it is inside: not followed (a loop)", p,
                                os.path.realpath(p))
                    continue
                todo.append((p, above | {(st.st_dev, st.st_ino)}))
            elif entry.is_file() or (entry.is_symlink() and not os.path.exists(p)):
                out.append(p)
    return sorted(out)  # Path order, as the rglob this replaces: fingerprints of existing folders stay the same


def files_digest(names: Sequence[str], files: Sequence[str | os.PathLike], cache: HashCache | None = None,
                 workers: int = 1) -> str:
    """sha256 over (name, content digest) of each file, in the given order; unchanged files come from the cache, so
    checking a large image set again costs a stat per file."""
    checks = check_files(files, max_pixels=None, verify="header", workers=workers, cache=cache)
    h = hashlib.sha256()
    for name, ck in zip(names, checks):
        h.update(f"{name}\0{ck.digest or 'unreadable'}\n".encode())
    return h.hexdigest()


def tree_digest(folder: str | os.PathLike, cache: HashCache | None = None, workers: int = 1) -> str:
    """Content digest of a folder: (relative path, content digest) of every file `walk_files` finds, in order."""
    folder = Path(folder)
    files = walk_files(folder)
    return files_digest([p.relative_to(folder).as_posix() for p in files], files, cache, workers)
