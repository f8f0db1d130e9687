"""The defaults and environment settings the CLI shows and checks before any work starts, and the error
categories of the output contract. Standard library only: `oncoflow --help` and a bad argument need no
torch, pyarrow or s3fs (tasks.inference, tasks.lease, tasks.images and tasks.compact use these).
"""

from __future__ import annotations

import os

# Pillow's own decompression-bomb limit (PIL.Image.MAX_IMAGE_PIXELS, 1024 * 1024 * 1024 // 4 // 3)
DEFAULT_MAX_PIXELS = 89_478_485

# Every error row's `error` column starts with one of these, then ": " and a message.
ERROR_CATEGORIES = (
    "empty",  # zero bytes
    "truncated",  # an image format's signature, but the data ends early or its header is damaged
    "not_an_image",  # no image format recognised (text, HTML, random bytes, a DICOM without pixels)
    "unsupported",  # a recognised format whose variant or codec cannot be decoded here
    "too_large",  # more pixels than --max-pixels (decompression bombs), refused before decoding
    "missing",  # older rows only: a file gone between listing and reading now gets no row (vanished)
    "read_failed",  # storage kept failing after retries, or refused access
)

# Readers want files of ~100 MB-1 GB: at 20-30 bytes per row (measured, docs/analytics.md) 4 million
# rows is ~80-120 MB; DuckDB, Spark and Athena then open 1 file per 4 million images instead of 4,000.
TARGET_ROWS = 4_000_000


def cuda_graphs_from_env() -> bool:
    """EngineOptions.cuda_graphs as the flows take it: ONCOFLOW_CUDA_GRAPHS=1 (or true/yes/on) turns
    them on; unset, empty or 0 (false/no/off) leaves them off."""
    value = os.environ.get("ONCOFLOW_CUDA_GRAPHS", "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(
        f"ONCOFLOW_CUDA_GRAPHS={value!r} is not 1 or 0; set 1 to replay the model's forward as a CUDA "
        "graph on GPUs, or unset it"
    )


def host_decode_share_from_env() -> float | None:
    """EngineOptions.host_decode_share as the flows take it: ONCOFLOW_HOST_DECODE_SHARE unset, empty or 0
    lets nvjpeg decode every JPEG (the fastest measured, and reruns on the same GPU are reproducible);
    `auto` adapts the share per batch; a number from 0 to 1 fixes it."""
    value = os.environ.get("ONCOFLOW_HOST_DECODE_SHARE", "0").strip().lower()
    if value == "":
        return 0.0
    if value == "auto":
        return None
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0.0 <= share <= 1.0:
        raise ValueError(
            f"ONCOFLOW_HOST_DECODE_SHARE={value!r} is not `auto` or a number from 0 to 1; unset it, or set "
            "0 to let nvjpeg decode every JPEG"
        )
    return share


DEFAULT_WAIT_SECONDS = 3600.0  # a nightly run waits this long behind a run still writing, then fails


def lease_wait_from_env() -> float:
    """ONCOFLOW_LEASE_WAIT_SECONDS (default DEFAULT_WAIT_SECONDS), checked: seconds, 0 or more."""
    value = os.environ.get("ONCOFLOW_LEASE_WAIT_SECONDS", "").strip()
    if not value:
        return DEFAULT_WAIT_SECONDS
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < float("inf"):
        raise ValueError(
            f"ONCOFLOW_LEASE_WAIT_SECONDS={value!r} is not a number of seconds (0 or more, e.g. 3600 for an "
            "hour); unset it for the default of 3600"
        )
    return seconds


def plural(count: int, noun: str) -> str:
    """`1 error`, `2 errors`, `0 errors`: counts in messages (nouns whose plural adds an s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"
