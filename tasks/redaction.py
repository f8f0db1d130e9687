"""Keep secrets out of rows, logs and artifacts: signed-URL query strings, URL credentials, key=value secrets.

Every message that can carry a storage URL or a backend's error text (error rows, write failures, the
CLI's error line) goes through `redact` before it leaves the process; `install_log_redaction` does the
same for every log record, including third-party debug logs that print signed URLs (fsspec, aiohttp).
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"

# The query string of any http(s) URL: presigned S3/GCS/Azure URLs carry their signature there.
_HTTP_QUERY = re.compile(r"(?i)(https?://[^\s?#'\"<>]*)\?[^\s#'\"<>]*")
# user:password@ (or a bare token@) in any scheme://authority.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@'\"<>]+@")
# secret-looking key=value or key: value pairs, e.g. in botocore or signature error texts.
_KEY_VALUE = re.compile(
    r"(?i)\b((?:aws_)?(?:secret(?:_access)?_key|session_token|access_token|token|password|passwd|"
    r"signature|x-amz-signature|x-amz-credential|x-amz-security-token|sig|authorization)"
    r"['\"]?\s*[=:]\s*)['\"]?[^\s&'\",;]+"
)
# AWS access key ids (AKIA.../ASIA...), which name an account even without the secret.
_ACCESS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")


def redact(text: str) -> str:
    """`text` with URL query strings, URL credentials, secret key=value pairs and AWS key ids replaced."""
    text = _HTTP_QUERY.sub(rf"\1?{REDACTED}", text)
    text = _USERINFO.sub(rf"\1{REDACTED}@", text)
    text = _KEY_VALUE.sub(rf"\1{REDACTED}", text)
    return _ACCESS_KEY_ID.sub(REDACTED, text)


def strip_query(uri: str) -> str:
    """An http(s) URI without its query string and fragment (where signed URLs keep their signature).

    Other schemes are returned unchanged: in `file://` and `s3://` URIs a `?` is part of the name.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def has_credentials(uri: str) -> bool:
    """True when a URI embeds credentials or a signature that would end up in logs and run records."""
    return bool(_USERINFO.search(uri)) or ("://" in uri and redact(uri) != uri)


_install_lock = threading.Lock()
_installed = False


def install_log_redaction() -> None:
    """Redact every log record when it is created, whichever library logs it and wherever it goes."""
    global _installed
    with _install_lock:
        if _installed:
            return
        create = logging.getLogRecordFactory()

        def redacting_factory(*args: object, **kwargs: object) -> logging.LogRecord:
            return redact_record(create(*args, **kwargs))

        logging.setLogRecordFactory(redacting_factory)
        _installed = True


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with its message and traceback text redacted (formatted now, so args cannot leak)."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string is for the logging module to report
        return record
    record.msg, record.args = redact(message), ()
    if record.exc_info and record.exc_info[1] is not None:
        record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
    return record
