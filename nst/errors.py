"""The user-facing error types. The CLI turns each into one `error:` line and exit code 2; anything else is an
internal error (exit 1, traceback behind `--debug`). Messages name the culprit (file, field, value)."""

from __future__ import annotations

import errno
import reprlib

MAX_QUOTE = 200  # characters of a bad value quoted in a message
# Exit codes of `nst` (documented in the README): 2 an NstError, 1 anything else, 3 finished with tracking incomplete.
EXIT_ERROR, EXIT_INTERNAL, EXIT_TRACKING = 2, 1, 3


class NstError(Exception):
    """An expected failure, already phrased for the user in one line."""


class ConfigError(NstError, ValueError):
    """A config problem (one line per problem)."""


class DataError(NstError, ValueError):
    """Bad input data: names the file and the problem."""


class Busy(NstError, RuntimeError):
    """Another process holds the lock."""


class StageError(NstError, RuntimeError):
    """A stage cannot run or failed in a way the user can fix (names the stage and the file)."""


def _bounded_repr(limit: int) -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 6, 6, 6, 6
    r.maxstring = r.maxother = r.maxlong = limit + 8
    return r


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """repr() of a bad value, cut to `limit` characters; bounded while it is built (a string is cut before it is
    quoted, a container shows its first items and levels), so a huge or alias-expanded value costs nothing."""
    if isinstance(value, (str, bytes)):
        r = repr(value[: limit + 1])
        cut = len(value) > limit
    else:
        r = _bounded_repr(limit).repr(value)
        cut = False
    if cut or len(r) > limit:
        return r[: limit - 3] + "..."
    return r


# OS errors a user can fix (disk full, read-only or missing folder, permissions): one line, exit 2.
USER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.EDQUOT, errno.ENAMETOOLONG}


def os_error_line(e: OSError) -> str:
    where = str(e.filename) if e.filename is not None else ""
    where = where if len(where) <= MAX_QUOTE else where[: MAX_QUOTE - 3] + "..."
    what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
            errno.EROFS: "read-only file system"}.get(e.errno, e.strerror or str(e))
    return f"{where}: {what}" if where else what
