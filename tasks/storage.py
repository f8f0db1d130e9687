"""Where images come from and where Parquet goes: fsspec listing, reading and atomic writes.

Storage errors are translated to Python's own (FileNotFoundError, PermissionError, ...) here and
nowhere else, so the rest of the code never sees a backend-specific exception.
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.redaction import redact, strip_query

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom"}
)

# I/O errors that a second attempt can cure (a flaky disk, network or object store); anything else,
# e.g. a missing file, a permission problem or a full disk, needs a person and is not retried.
TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED}
)
READ_RETRY_DELAYS = (0.2, 1.0)  # seconds before the 2nd and 3rd attempt


@dataclass(frozen=True)
class Location:
    """A folder on some filesystem: the fsspec filesystem plus the path it understands."""

    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    @property
    def uri(self) -> str:
        return to_uri(self.fs, self.path)

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


@dataclass(frozen=True)
class DiscoveredFile:
    """One listed image: its URI, the filesystem path to read it and a content-version fingerprint."""

    uri: str
    path: str
    fingerprint: str
    size: int


def open_location(path_or_uri: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a local path, `file://` URI or `s3://bucket/prefix` into a Location."""
    if "://" not in path_or_uri:
        return Location(LocalFileSystem(), os.path.abspath(os.path.expanduser(path_or_uri)))
    fs, path = fsspec.core.url_to_fs(path_or_uri, **(storage_options or {}))
    return Location(fs, path.rstrip("/") if path != "/" else path)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of a path: `file:///abs/path` or `s3://bucket/key`; never a signed URL's query string.

    Bytes that are not UTF-8 (possible in local file names) are percent-encoded, so every URI is
    valid text for Parquet.
    """
    if isinstance(fs, LocalFileSystem):
        return "file://" + printable_path(path)
    return strip_query(fs.unstrip_protocol(path))


def printable_path(path: str) -> str:
    """A local path as valid UTF-8 text: undecodable bytes (kept by Python as surrogates) become %XX."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return _percent_encode_invalid(os.fsencode(path))


def _percent_encode_invalid(raw: bytes) -> str:
    text: list[str] = []
    position = 0
    while position < len(raw):
        try:
            text.append(raw[position:].decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            text.append(raw[position : position + exc.start].decode("utf-8"))
            text.extend(f"%{byte:02X}" for byte in raw[position + exc.start : position + exc.end])
            position += exc.end
    return "".join(text)


def is_image_name(name: str) -> bool:
    """True for non-hidden names with an image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(location: Location) -> Iterator[DiscoveredFile]:
    """Every image under `location`, recursively, in sorted URI order, skipping hidden files and folders."""
    if location.is_local:
        yield from sorted(_list_local(location.path), key=lambda f: f.uri)
    else:
        yield from sorted(_list_remote(location), key=lambda f: f.uri)


def _list_local(root: str) -> Iterator[DiscoveredFile]:
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder {root!r} does not exist or is not a folder; check the path")
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=True):
                    stack.append(entry.path)
                elif is_image_name(entry.name):
                    st = entry.stat()
                    if stat_module.S_ISREG(st.st_mode):
                        yield DiscoveredFile(
                            "file://" + printable_path(entry.path),
                            entry.path,
                            f"{st.st_size}:{st.st_mtime_ns}",
                            st.st_size,
                        )


def _list_remote(location: Location) -> Iterator[DiscoveredFile]:
    root = location.path.rstrip("/")
    for path, info in location.fs.find(root, detail=True).items():
        relative = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")) or not is_image_name(
            relative.rsplit("/", 1)[-1]
        ):
            continue
        size = int(info.get("size") or 0)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        fingerprint = f"{etag}:{size}" if etag else f"{size}:{info.get('mtime') or info.get('LastModified')}"
        yield DiscoveredFile(to_uri(location.fs, path), path, fingerprint, size)


def is_transient(error: BaseException) -> bool:
    """True for storage errors worth another attempt: timeouts, dropped connections, EIO-like errors."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(error, TimeoutError | ConnectionError):
        return True
    return isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole content of one file; transient errors are retried with backoff, others raised at once."""
    for delay in READ_RETRY_DELAYS:
        try:
            return _read(fs, path)
        except Exception as exc:
            if not is_transient(exc):
                raise
        time.sleep(delay)
    return _read(fs, path)


def _read(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_atomic(location: Location, relative_path: str, data: bytes) -> str:
    """Write `data` so that no reader ever sees a partial file; return the full path written.

    Local: write a hidden temporary file beside the target, fsync, rename over it. Object stores:
    one PUT, which the store makes visible whole or not at all. Readers skip the temporary names
    (pyarrow ignores names starting with '.', DuckDB's `*.parquet` glob does not match them).
    """
    target = location.join(relative_path)
    try:
        if location.is_local:
            _write_local(target, data)
        else:
            location.fs.pipe_file(target, data)
    except OSError as exc:
        raise output_error(exc, location.uri) from exc
    return target


def _write_local(target: str, data: bytes) -> None:
    folder, name = os.path.split(target)
    os.makedirs(folder, exist_ok=True)
    temporary = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        if os.path.lexists(temporary):
            os.remove(temporary)


def output_error(error: OSError, destination: str) -> OSError:
    """The same kind of OSError (so retry decisions still work), with a message that says what to do."""
    if error.errno == errno.ENOSPC:
        advice = "the output device is full; free space or choose another --output"
    elif isinstance(error, FileNotFoundError | NotADirectoryError | FileExistsError):
        advice = "the output location is gone or blocked by a file; check that --output exists and is a folder (or bucket)"
    elif isinstance(error, PermissionError):
        advice = "no permission to write there; fix the permissions or credentials for --output"
    else:
        advice = "check that --output is reachable and writable"
    reason = error.strerror or str(error) or type(error).__name__
    message = redact(
        f"cannot write to output {destination}: {reason}. {advice}, then re-run: shards already written "
        "are kept and skipped, nothing is written twice"
    )
    return OSError(error.errno, message) if error.errno else type(error)(message)
