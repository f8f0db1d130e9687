"""Where images come from and where Parquet goes: fsspec listing, reading and atomic writes.

Storage errors are translated to Python's own (FileNotFoundError, PermissionError, ...) here and
nowhere else, so the rest of the code never sees a backend-specific exception.
"""

from __future__ import annotations

import os
import stat as stat_module
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"})


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
    """The full URI of a path: `file:///abs/path` or `s3://bucket/key`."""
    if isinstance(fs, LocalFileSystem):
        return "file://" + path
    return fs.unstrip_protocol(path)


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
                            "file://" + entry.path, entry.path, f"{st.st_size}:{st.st_mtime_ns}", st.st_size
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


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole content of one file."""
    with fs.open(path, "rb") as handle:
        return handle.read()


def write_atomic(location: Location, relative_path: str, data: bytes) -> str:
    """Write `data` so that no reader ever sees a partial file; return the full path written.

    Local: write a hidden temporary file beside the target, fsync, rename over it. Object stores:
    one PUT, which the store makes visible whole or not at all. Readers skip the temporary names
    (pyarrow ignores names starting with '.', DuckDB's `*.parquet` glob does not match them).
    """
    target = location.join(relative_path)
    if not location.is_local:
        location.fs.pipe_file(target, data)
        return target
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
        if os.path.exists(temporary):
            os.remove(temporary)
    return target
