"""Credentials never leave the process that was given them.

A URI such as `http://user:pass@host` may reach us in `tracking.tracking_uri`, `$MLFLOW_TRACKING_URI` or an
S3 endpoint. Everything we write (logs, effective configs, MLflow params and tags, Prefect parameters and
artifacts, error files) goes through `redact`. For MLflow the credentials are moved out of the URI into
`MLFLOW_TRACKING_USERNAME/PASSWORD` (MLflow's own basic-auth variables), so the URI itself is clean everywhere.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

# scheme://userinfo@host - userinfo is everything up to the last '@' before the path
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"]+)@")
_KEYS = re.compile(r"(?i)((?:aws_secret_access_key|aws_session_token|password|secret|token)\s*[=:]\s*)([^\s,;'\"]+)")


def redact(text: Any) -> Any:
    """`scheme://user:pass@host` -> `scheme://***@host` (and `password=...` -> `password=***`) in a string;
    other values are returned unchanged."""
    if not isinstance(text, str):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}***@", text)
    return _KEYS.sub(lambda m: f"{m[1]}***", text)


def redact_tree(obj: Any) -> Any:
    """`redact` applied to every string in a JSON-like structure."""
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return redact(obj)


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, user, password)."""
    parts = urlsplit(uri)
    if not parts.username and not parts.password:
        return uri, None, None
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, unquote(parts.username) if parts.username else None, unquote(parts.password) if parts.password else None


def move_tracking_credentials(uri: str | None) -> str | None:
    """Strip userinfo from an MLflow URI into MLflow's basic-auth environment variables (inherited by child
    processes); return the clean URI."""
    if not uri:
        return uri
    clean, user, password = split_credentials(uri)
    if user is not None:
        os.environ["MLFLOW_TRACKING_USERNAME"] = user
    if password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = password
    return clean


class RedactingFilter(logging.Filter):
    """Rewrites a record's message with credentials removed; attach to every handler that writes somewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logging module's business
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = redact(str(record.exc_info[1]))
            if text != str(record.exc_info[1]):
                record.exc_info = None
                record.msg = f"{record.msg} ({text})"
        return True
