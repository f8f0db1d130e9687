"""Where images come from and where Parquet goes: fsspec listing, reading and atomic writes.

Storage errors are translated to Python's own (FileNotFoundError, PermissionError, ConnectionError)
here and nowhere else (`storage_call`), so the rest of the code never sees a backend-specific
exception. Transient object-store errors are retried here too, at three levels: botocore retries each
HTTP request (5xx, SlowDown, dropped connections), s3fs retries truncated reads, and `storage_call`
retries the whole operation with capped exponential backoff. Local filesystems (NFS and SMB mounts
included) are retried on EIO-like errors, untranslated. Messages are redacted (tasks/redaction.py):
they may end up in Prefect's run records, which logging filters never see.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import random
import stat as stat_module
import struct
import tempfile
import time
import urllib.parse
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, replace
from http.client import IncompleteRead as HttpIncompleteRead
from typing import Any, TypeVar

import aiohttp
import fsspec
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    CredentialRetrievalError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.exceptions import SSLError as BotocoreSSLError
from botocore.parsers import ResponseParserError
from fsspec.asyn import sync
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem
from s3fs.core import _error_wrapper as s3_error_wrapper  # s3fs's retry of truncated reads
from s3fs.errors import translate_boto_error
from urllib3.exceptions import IncompleteRead as UrllibIncompleteRead

from tasks.redaction import redact, strip_query
from tasks.uris import printable_path

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif", ".dcm", ".dicom"}
)

S3_DEFAULTS: dict[str, Any] = {
    # A long-running worker (`prefect serve`) must see objects added since its last run.
    "use_listings_cache": False,
    # Per-request retries with capped exponential backoff and jitter (botocore's "standard" mode).
    "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 4}},
}
RETRY_ATTEMPTS = 3  # whole-operation attempts in storage_call, on top of the per-request retries
RETRY_BASE_SECONDS = 0.5
RETRY_CAP_SECONDS = 8.0
WRITE_CHECK_NAME = ".oncoflow-write-check"  # hidden: pyarrow and DuckDB's *.parquet glob skip it
WRITE_CHECK_BODY = b"oncoflow write check\n"  # not empty: a store that takes 0-byte objects may refuse data

TRANSIENT_ERRORS = (  # timeouts (socket, asyncio, fsspec) are all TimeoutError
    TimeoutError,
    HTTPClientError,
    BotocoreConnectionError,
    ResponseParserError,
    aiohttp.ClientError,
    UrllibIncompleteRead,
    HttpIncompleteRead,
)
TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)})  # s3fs: 503, 500
# Local I/O errors that a second attempt can cure (a flaky disk or network mount); a missing file, a
# permission problem or a full disk needs a person instead.
LOCAL_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EAGAIN, errno.EINTR, errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED}
)

T = TypeVar("T")

logger = logging.getLogger(__name__)
# What a listing left out with a warning, counted for whoever asks (tasks.erase refuses such a listing):
# counted here, not read back from the log, which a logging setup may silence.
LEFT_OUT_COUNT: ContextVar[list[int] | None] = ContextVar("oncoflow_left_out", default=None)


def left_out(count: int) -> dict[str, Any]:
    """Count `count` entries left out of a listing (see LEFT_OUT_COUNT); the warning's `extra`."""
    counter = LEFT_OUT_COUNT.get()
    if counter is not None:
        counter[0] += count
    return {"oncoflow_left_out": count}


@contextmanager
def counting_left_out() -> Iterator[list[int]]:
    """`[n]`: how many entries the listings inside the block left out with a warning."""
    counter = [0]
    token = LEFT_OUT_COUNT.set(counter)
    try:
        yield counter
    finally:
        LEFT_OUT_COUNT.reset(token)


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

    @property
    def shown(self) -> str:
        """How messages name it: a local folder by its path (as typed, made absolute), not its file://
        URI with percent-escapes; an object store's prefix by its URI."""
        if self.is_local:  # bytes of a file name that are not UTF-8 as \xNN (printable, unambiguous)
            return os.fsencode(self.path).decode("utf-8", "backslashreplace")
        return self.uri

    def join(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])


@dataclass(frozen=True)
class DiscoveredFile:
    """One listed image: its URI, the filesystem path to read it and a content-version fingerprint."""

    uri: str
    path: str
    fingerprint: str
    size: int
    etag_listed: bool = False  # the fingerprint is `ETag:size` (an object store listing that gave one)


def open_location(path_or_uri: str, storage_options: dict[str, Any] | None = None) -> Location:
    """Resolve a local path, `file://` URI or `s3://bucket/prefix` into a Location.

    For S3, credentials come from `storage_options` (key/secret/token) or else the standard AWS chain;
    the endpoint from `storage_options["endpoint_url"]`, else AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL.
    """
    if "://" not in path_or_uri:
        return Location(LocalFileSystem(), os.path.abspath(os.path.expanduser(path_or_uri)))
    options = dict(storage_options or {})
    if path_or_uri.startswith(("s3://", "s3a://")):
        options = s3_options(options)
    fs, path = fsspec.core.url_to_fs(path_or_uri, **options)
    return Location(fs, path.rstrip("/") if path != "/" else path)


def s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """`options` plus oncoflow's S3 defaults and the endpoint from the standard environment variables.

    The endpoint is resolved here rather than left to botocore so that it is part of fsspec's
    instance-cache key: a process that switches endpoints never reuses a client for the old one.
    """
    merged = {**S3_DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
    endpoint = (
        merged.get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
    if endpoint:
        merged["endpoint_url"] = endpoint
    return merged


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of a path: `file:///abs/path` or `s3://bucket/key`; never a signed URL's query string.

    Local paths are spelled by printable_path: `%` and bytes that are not UTF-8 (possible in local file
    names) are percent-encoded, so every URI is valid text for Parquet and no two files share one.
    """
    if isinstance(fs, LocalFileSystem):
        return "file://" + printable_path(path)
    return strip_query(fs.unstrip_protocol(path))


def is_image_name(name: str) -> bool:
    """True for non-hidden names with an image extension (case-insensitive)."""
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def list_images(
    location: Location, skipped: Counter[str] | None = None, known: Callable[[str], bool] | None = None
) -> Iterator[DiscoveredFile]:
    """Every image under `location`, recursively, in sorted URI order, skipping hidden files and folders.
    `skipped` counts the other (not hidden) files by extension (`name_extension`). `known(uri)`: the
    output already has rows for it, so a local file without an image extension is an image without
    being opened to look for DICOM (a nightly run over an NFS archive of `IM000001` files would open
    every one of them each night)."""
    if location.is_local:
        yield from sorted(_list_local(location.path, skipped, known), key=lambda f: f.uri)
    else:
        yield from sorted(_list_remote(location, skipped, known), key=lambda f: f.uri)


def name_extension(name: str) -> str:
    """`.svs` for `slide.SVS`; "no extension" for `IM000001` and `1.2.840.113619.2.55.3.17` (how DICOM
    exports often name their files: no extension, or the SOP instance UID, whose last part is a number)."""
    extension = os.path.splitext(name)[1].lower()
    return extension if extension and not extension[1:].isdigit() else "no extension"


# DICOM files named otherwise than .dcm: no extension (CD exports: IM000001; PACS dumps: the SOP instance
# UID, whose last part is a number), Siemens .IMA, .dc3. Read by content (S3: a ranged GET).
PROBED_EXTENSIONS = frozenset({"no extension", ".ima", ".dc3"})
DICOM_HEAD_BYTES = 1024  # preamble, DICM, and the file meta group up to its Media Storage SOP Class UID
# DICOM objects that are not images to classify: DICOMDIR's class, structured reports and key object
# selections, presentation states, encapsulated documents (PDF, CDA, 3D models), waveforms, raw data,
# registrations and segmentations, real world value maps, ophthalmic measurements and visual fields,
# protocols, and the RT objects other than RT Image (dose, structure sets, plans, records, ...). A study
# dump holds them beside its images; listed, each was an error row.
NON_IMAGE_SOP_CLASSES = ("1.2.840.10008.1.3.10",) + tuple(
    f"1.2.840.10008.5.1.4.1.1.{suffix}"
    for suffix in ("88.", "11.", "104.", "9.", "66", "67", "78.", "79.", "80.", "200.", "481.")
)
RT_IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.1"
DICOM_WITHOUT_IMAGES = "DICOM without images"  # how the skipped files of those classes are counted


def dicom_kind(entry: os.DirEntry[str]) -> str | None:
    """For a regular file without an image extension (`IM000001`, a UID, `.IMA`): "image" when it is a
    DICOM image (the `DICM` marker at byte 128 and an image SOP class), "no image" for DICOMDIR and
    the other DICOM objects (NON_IMAGE_SOP_CLASSES), None otherwise. One read of the first kB,
    unbuffered (a network file system's buffer is MBs), only for such names; PermissionError when this
    account may not open it."""
    if name_extension(entry.name) not in PROBED_EXTENSIONS:
        return None
    try:
        if not entry.is_file(follow_symlinks=True):  # a FIFO would block the read
            return None
        if entry.name.upper() == "DICOMDIR":
            return "no image"
        descriptor = os.open(entry.path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError:
        raise
    except OSError:  # gone meanwhile
        return None
    try:
        head = os.pread(descriptor, DICOM_HEAD_BYTES, 0)
    except OSError:  # replaced by something that cannot be read at an offset
        return None
    finally:
        os.close(descriptor)
    return head_kind(head)


def head_kind(head: bytes) -> str | None:
    """dicom_kind from a file's first kB: "image", "no image" or None (not DICOM)."""
    if head[128:132] != b"DICM":
        return None
    sop_class = media_storage_sop_class(head)
    if sop_class and sop_class != RT_IMAGE_SOP_CLASS and sop_class.startswith(NON_IMAGE_SOP_CLASSES):
        return "no image"
    return "image"


def media_storage_sop_class(head: bytes) -> str | None:
    """(0002,0002) from a DICOM file's meta group (explicit VR little endian, right after `DICM`); None
    when it is not within `head`."""
    position = 132
    while position + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, position)
        if group != 2:
            return None
        if head[position + 4 : position + 6] in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            if position + 12 > len(head):
                return None
            length, start = struct.unpack_from("<I", head, position + 8)[0], position + 12
        else:
            length, start = struct.unpack_from("<H", head, position + 6)[0], position + 8
        if element == 2:
            value = head[start : start + length]
            return value.rstrip(b"\0 ").decode("ascii", "replace") if start + length <= len(head) else None
        position = start + length
    return None


def describe_skipped(skipped: Counter[str], shown: int = 5) -> str:
    """`.xml 120, .txt 3, no extension 1`: the most frequent first."""
    parts = [f"{extension} {count}" for extension, count in skipped.most_common(shown)]
    if len(skipped) > shown:
        parts.append(f"{len(skipped) - shown} more kinds")
    return ", ".join(parts)


def _list_local(
    root: str, skipped: Counter[str] | None = None, known: Callable[[str], bool] | None = None
) -> Iterator[DiscoveredFile]:
    """Walk the tree, following folder links but entering each real folder once: a link loop (`a/up -> ..`)
    or a second link to a folder already scanned neither hangs discovery nor lists an image twice. File
    links are listed last, each image once: a link to an image listed at its own path (a `by-patient/`
    tree of links into `by-date/`) is left out, and of several links to one image outside SOURCE the
    first in path order is listed (as with folder links). Hard links are separate names, each listed.

    An image name that cannot be stat-ed (a broken link, a file deleted during the listing) and a
    sub-folder that cannot be opened, and an image this process may not read, are left out with a
    warning instead of failing the whole run; only the source folder itself must open. Such a name is not listed as a `missing` row: it has no size or
    mtime to fingerprint, and an error row is final, so a made-up fingerprint would record a file that
    never had content. Left out, a repaired link or a readable folder or file is simply classified next
    run.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"source folder {root!r} does not exist or is not a folder; check the path")
    root_stat = os.stat(root)
    visited = {(root_stat.st_dev, root_stat.st_ino)}
    stack = [root]
    # Links to folders wait until every folder reachable without them is walked, then go in path order:
    # an image under a real folder always keeps its real path as URI, also when a link to its folder
    # (or to one above it) is added later, which would otherwise re-classify it under a new URI.
    links: list[tuple[str, tuple[int, int]]] = []
    file_links: list[tuple[str, tuple[int, int], DiscoveredFile]] = []
    listed: defaultdict[int, array[int]] = defaultdict(lambda: array("Q"))  # device → inodes yielded
    unreadable: list[str] = []
    unopened: list[str] = []  # named without an image extension; may not be opened to look for DICOM
    while stack or links:
        if not stack:
            link, identity = heapq.heappop(links)
            if identity in visited:
                continue
            visited.add(identity)
            stack.append(link)
        folder = stack.pop()
        try:
            with os.scandir(folder) as scanned:
                entries = sorted(scanned, key=lambda e: e.name)
        except OSError as exc:
            if folder == root:
                raise
            _warn_left_out(folder, exc)
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            st = _followed_stat(entry, skipped, unopened, known)
            if st is None:
                continue
            if stat_module.S_ISDIR(st.st_mode):
                if entry.is_symlink():
                    heapq.heappush(links, (entry.path, (st.st_dev, st.st_ino)))
                elif (st.st_dev, st.st_ino) not in visited:
                    visited.add((st.st_dev, st.st_ino))
                    stack.append(entry.path)
            elif stat_module.S_ISREG(st.st_mode):
                if not os.access(entry.path, os.R_OK, effective_ids=True):
                    unreadable.append(entry.path)
                    continue
                found = DiscoveredFile(
                    "file://" + printable_path(entry.path), entry.path, local_fingerprint(st), st.st_size
                )
                if entry.is_symlink():
                    file_links.append((entry.path, (st.st_dev, st.st_ino), found))
                    continue
                listed[st.st_dev].append(st.st_ino)
                yield found
            else:  # a FIFO, socket or device named like an image: reading it could block or never end
                logger.warning(
                    "left %s out of the listing: it is a %s, not a regular file",
                    printable_path(entry.path),
                    SPECIAL_FILE_KINDS.get(stat_module.S_IFMT(st.st_mode), "special file"),
                    extra=left_out(1),
                )
    yield from _unlisted_targets(file_links, listed)
    if unreadable:
        _warn_unreadable(unreadable)
    if unopened:
        _warn_unopened(unopened)


def _unlisted_targets(
    file_links: list[tuple[str, tuple[int, int], DiscoveredFile]], listed: dict[int, array[int]]
) -> Iterator[DiscoveredFile]:
    """The file links whose image was not listed yet, first in path order; the inodes of every listed
    file are kept as 8-byte integers (a million files: 8 MB), looked at only when there are file links."""
    targets: defaultdict[int, set[int]] = defaultdict(set)
    for _, (device, inode), _ in file_links:
        targets[device].add(inode)
    seen = {
        (device, inode)
        for device, inodes in targets.items()
        for inode in inodes.intersection(listed.get(device, ()))
    }
    for _, identity, found in sorted(file_links, key=lambda link: link[0]):
        if identity not in seen:
            seen.add(identity)
            yield found


def _warn_unreadable(paths: list[str]) -> None:
    """One warning for the images this process may not read (an exporter's umask 077, a cron job that
    fixes permissions later). Left out, not recorded: an error row would be final (chmod keeps the
    mtime, so the fingerprint), and the image would never be classified once readable."""
    logger.warning(
        "left %d unreadable image file(s) out of the listing (Permission denied): %s; make them readable "
        "by this user, and the next run lists and classifies them",
        len(paths),
        examples(paths),
        extra=left_out(len(paths)),
    )


UNREADABLE_EXAMPLES = 5


def examples(paths: list[str]) -> str:
    """The first UNREADABLE_EXAMPLES paths in order, `and N more` for the rest."""
    shown = ", ".join(printable_path(path) for path in sorted(paths)[:UNREADABLE_EXAMPLES])
    return shown + (
        f" and {len(paths) - UNREADABLE_EXAMPLES} more" if len(paths) > UNREADABLE_EXAMPLES else ""
    )


def _warn_unopened(paths: list[str]) -> None:
    """One warning for the files named without an image extension that this process may not open to see
    whether they are DICOM images (most are not images at all: no promise that they will be listed)."""
    logger.warning(
        "could not open %d file(s) without an image extension to see whether they are DICOM images "
        "(Permission denied): %s; if they are, make them readable by this user",
        len(paths),
        examples(paths),
        extra=left_out(len(paths)),
    )


SPECIAL_FILE_KINDS = {
    stat_module.S_IFIFO: "named pipe (FIFO)",
    stat_module.S_IFSOCK: "socket",
    stat_module.S_IFCHR: "character device",
    stat_module.S_IFBLK: "block device",
}


def local_fingerprint(st: os.stat_result) -> str:
    """A local file's content version: size and modification time (ns)."""
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_file(file: DiscoveredFile, fs: fsspec.AbstractFileSystem) -> tuple[bytes, DiscoveredFile]:
    """The whole content of `file`, and the file with the fingerprint of the version read.

    A file replaced between listing and reading would otherwise get a row pairing the listed (old)
    fingerprint with the new content's prediction, and the next run a second row for the new one.
    Local files: a stat after the read (a few µs). S3: one GET, whose ETag names the version it
    returned (s3fs's own full read would HEAD first and, over 50 MB, fetch ranges that could mix two
    versions of an object replaced meanwhile). Other stores keep the listed fingerprint."""
    if isinstance(fs, S3FileSystem):
        data, etag = s3_get(fs, file.path)
        # Only where the listing gave an ETag: a store that lists without one fingerprints by
        # `size:mtime`, which the next listing must find again.
        fingerprint = f"{etag}:{len(data)}" if etag and file.etag_listed else file.fingerprint
    else:
        data = read_bytes(fs, file.path)
        if not isinstance(fs, LocalFileSystem):
            return data, file
        try:
            fingerprint = local_fingerprint(os.stat(file.path))
        except OSError:
            return data, file
    return data, file if fingerprint == file.fingerprint else replace(file, fingerprint=fingerprint)


def s3_get(fs: S3FileSystem, path: str, size: int | None = None) -> tuple[bytes, str]:
    """One S3 GET (retried by storage_call): the body (its first `size` bytes, if given) and the ETag
    of the version it returned."""
    return storage_call(fs, path, lambda: sync(fs.loop, _s3_get, fs, path, size))


async def _s3_get(fs: S3FileSystem, path: str, size: int | None) -> tuple[bytes, str]:
    """One S3 GET: the body and the ETag of the version it returned (s3fs retries truncated bodies).

    The key is the listed path as it is: s3fs's own split_path would cut a key that holds the text
    `?versionId=` (legal in a key) and read another object, or none."""
    bucket, _, key = fs._strip_protocol(path).lstrip("/").partition("/")

    async def get_and_read() -> tuple[bytes, str]:
        extra = {"Range": f"bytes=0-{size - 1}"} if size else {}
        response = await fs._call_s3("get_object", Bucket=bucket, Key=key, **extra)
        try:
            return await response["Body"].read(), str(response.get("ETag") or "").strip('"')
        finally:
            response["Body"].close()

    return await s3_error_wrapper(get_and_read, retries=fs.retries)


def _followed_stat(
    entry: os.DirEntry[str],
    skipped: Counter[str] | None,
    unopened: list[str],
    known: Callable[[str], bool] | None = None,
) -> os.stat_result | None:
    """The stat of a folder or image `entry` points to, links followed; None for failures (warned about)
    and other names (counted in `skipped`: by extension, DICOM objects without images apart; those this
    account may not open to see whether they are DICOM go to `unopened`).

    A broken link with no image extension is not an image and is skipped quietly (is_dir says False)."""
    try:
        if entry.is_dir(follow_symlinks=True):
            return os.stat(entry.path)
        if is_image_name(entry.name):
            return entry.stat()
    except OSError as exc:
        _warn_left_out(entry.path, exc)
        return None
    kind: str | None = None
    probed = name_extension(entry.name) in PROBED_EXTENSIONS
    if probed and known is not None and known("file://" + printable_path(entry.path)):
        kind = "image"  # classified before: no need to open it again
    else:
        try:
            kind = dicom_kind(entry)
        except PermissionError:
            unopened.append(entry.path)
    if kind == "image":
        try:
            return entry.stat()
        except OSError as exc:
            _warn_left_out(entry.path, exc)
            return None
    if skipped is not None:
        skipped[DICOM_WITHOUT_IMAGES if kind == "no image" else name_extension(entry.name)] += 1
    return None


def _warn_left_out(path: str, error: OSError) -> None:
    if os.path.islink(path) and (isinstance(error, FileNotFoundError) or error.errno == errno.ELOOP):
        fix = "it is a broken link: repair or remove it (a repaired link is classified by the next run)"
    elif isinstance(error, FileNotFoundError):
        fix = "it was deleted while the source was being listed"
    else:
        fix = "make it readable; the next run then lists it"
    logger.warning(
        "left %s out of the listing (%s): %s",
        printable_path(path),
        error.strerror or error,
        fix,
        extra=left_out(1),
    )


def _list_remote(
    location: Location, skipped: Counter[str] | None = None, known: Callable[[str], bool] | None = None
) -> Iterator[DiscoveredFile]:
    root = location.path.rstrip("/")
    # s3fs pages through the listing (1,000 keys a request), without a delimiter: one request a page.
    listing = storage_call(location.fs, root, lambda: location.fs.find(root, detail=True))
    unnamed: list[DiscoveredFile] = []  # objects without an image extension that may be DICOM
    archived: list[str] = []  # ... in an archive storage class: not readable, so not known as either
    for path, info in listing.items():
        relative = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        name = relative.rsplit("/", 1)[-1]
        if not name or info.get("type") == "directory":  # a folder marker
            continue
        size = int(info.get("size") or 0)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        fingerprint = f"{etag}:{size}" if etag else f"{size}:{info.get('mtime') or info.get('LastModified')}"
        found = DiscoveredFile(to_uri(location.fs, path), path, fingerprint, size, etag_listed=bool(etag))
        probed = name_extension(name) in PROBED_EXTENSIONS and name.upper() != "DICOMDIR" and size > 132
        if is_image_name(name) or (probed and known is not None and known(found.uri)):  # rows: no GET
            yield found
        elif probed:
            if info.get("StorageClass") in ARCHIVED_STORAGE_CLASSES:  # a GET would be refused
                archived.append(found.uri)
            else:
                unnamed.append(found)
        elif skipped is not None:
            skipped[DICOM_WITHOUT_IMAGES if name.upper() == "DICOMDIR" else name_extension(name)] += 1
    if archived:
        logger.warning(
            "left %d object(s) without an image extension unread: they are in an archive storage class "
            "(GLACIER, DEEP_ARCHIVE), so whether they are DICOM images cannot be seen: %s; restore them if "
            "they are, and the next run looks again",
            len(archived),
            examples(archived),
            extra=left_out(len(archived)),
        )
    yield from _dicom_objects(location, unnamed, skipped)


OBJECT_PROBES = 16  # ranged GETs of object heads at once


def _dicom_objects(
    location: Location, unnamed: list[DiscoveredFile], skipped: Counter[str] | None
) -> Iterator[DiscoveredFile]:
    """The objects named without an image extension that are DICOM images, by their first kB (one
    ranged GET each, OBJECT_PROBES at once; a PACS's object store names them by UID, without
    extension). Objects that cannot be read (access denied, an archive tier of Intelligent-Tiering) are
    left out with one warning; their next listing looks again."""

    def kind(file: DiscoveredFile) -> str | None:
        try:
            return head_kind(read_bytes(location.fs, file.path, DICOM_HEAD_BYTES))
        except PermissionError:
            return "unopened"
        except FileNotFoundError:  # deleted since the listing
            return None

    unopened = []
    with ThreadPoolExecutor(max_workers=OBJECT_PROBES) as pool:
        for file, found in zip(unnamed, pool.map(kind, unnamed), strict=True):
            if found == "image":
                yield file
            elif found == "unopened":
                unopened.append(file.uri)
            elif skipped is not None:
                name = file.path.rsplit("/", 1)[-1]
                skipped[DICOM_WITHOUT_IMAGES if found == "no image" else name_extension(name)] += 1
    if unopened:
        logger.warning(
            "could not read %d object(s) without an image extension to see whether they are DICOM images "
            "(access denied, or an archive tier of Intelligent-Tiering): %s; if they are, make them readable "
            "(or restore them), and the next run looks again",
            len(unopened),
            examples(unopened),
            extra=left_out(len(unopened)),
        )


def fetch_whole(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    """The whole content of one file: one GET on S3 (s3fs's cat_file sends a HEAD first)."""
    return s3_get(fs, path)[0] if isinstance(fs, S3FileSystem) else read_bytes(fs, path)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str, size: int | None = None) -> bytes:
    """The whole content of one file, or its first `size` bytes (one GET, ranged, on object stores)."""
    if type(fs) is LocalFileSystem:  # plain local paths: skip fsspec's per-call path handling (~15 µs)
        return storage_call(fs, path, lambda: _read_local(path, -1 if size is None else size))
    if isinstance(fs, S3FileSystem):
        return s3_get(fs, path, size)[0]
    return storage_call(fs, path, lambda: fs.cat_file(path, start=None if size is None else 0, end=size))


def _read_local(path: str, size: int) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


def write_atomic(location: Location, relative_path: str, data: bytes) -> str:
    """Write `data` so that no reader ever sees a partial file; return the full path written.

    Local: write a hidden temporary file beside the target, fsync, rename over it. Object stores:
    one PUT, which the store makes visible whole or not at all. Readers skip the temporary names
    (pyarrow ignores names starting with '.', DuckDB's `*.parquet` glob does not match them).
    """
    target = location.join(relative_path)
    if not location.is_local:
        storage_call(location.fs, target, lambda: location.fs.pipe_file(target, data))
        return target
    try:
        _write_local(target, data)
    except OSError as exc:
        raise output_error(exc, location.uri) from exc
    return target


@contextmanager
def staged_file(output: str, storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local path to write one output file (an export, a report) to; when the block ends without an
    error it becomes OUTPUT whole: renamed over a local file, or uploaded to an object store (s3fs puts
    a large file in parts, visible only once complete). A failed block leaves OUTPUT as it was.
    An object-store output is staged in the temporary folder (TMPDIR): it needs room for the file."""
    if "://" in output:
        location = open_location(output, storage_options)
        with tempfile.TemporaryDirectory(prefix="oncoflow-") as folder:
            staged = os.path.join(folder, os.path.basename(location.path))
            yield staged
            fs = location.fs
            storage_call(fs, location.path, lambda: fs.put_file(staged, location.path))
        return
    target = os.path.abspath(os.path.expanduser(output))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staged = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.tmp-{uuid.uuid4().hex}")
    try:
        yield staged
        os.replace(staged, target)
    finally:
        if os.path.lexists(staged):
            os.remove(staged)


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
    # The rename is recorded in the folder, which needs its own fsync or a power loss can undo it.
    # Best effort: some filesystems (network mounts among them) cannot fsync a folder, and a write-only
    # folder cannot be opened; the file's content is already synced either way.
    with suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def output_error(error: OSError, destination: str) -> OSError:
    """The same kind of OSError (so retry decisions still work), with a message that says what to do and,
    when a path inside the output is in the way, which."""
    where = None
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "the output device is full (or this account's disk quota is); free space or choose another --output"
    elif isinstance(error, NotADirectoryError | FileExistsError):
        advice = "a file stands where a folder of the output must be; move it away"
        where = existing_part(str(error.filename)) if error.filename else None
    elif isinstance(error, FileNotFoundError):
        advice = "the output location is gone; check that --output exists (a network share not mounted?)"
    elif isinstance(error, PermissionError):
        advice = "no permission to write there; fix the permissions of --output"
        where = str(error.filename) if error.filename else None
        if where and os.path.basename(where).startswith("."):  # a temporary file: its folder
            where = os.path.dirname(where)
    else:
        advice = "check that --output is reachable and writable"
    reason = error.strerror or str(error) or type(error).__name__
    at = f" ({printable_path(where)})" if where else ""
    message = (
        f"cannot write to output {destination}: {reason}{at}; {advice}, then run again: the files already "
        "written are kept, and nothing is written twice"
    )
    return OSError(error.errno, message) if error.errno else type(error)(message)


def existing_part(path: str) -> str:
    """The longest leading part of `path` that exists: the file that stands where a folder must be."""
    while not os.path.lexists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    return path


def probe_local_folder(path: str) -> None:
    """Raise OSError unless the local folder `path` exists or can be created, and a file can be written
    in it. Leaves nothing behind: a probe file and the folders made for it are removed again (an empty
    folder another process made at the same moment may go with them; the run makes it again)."""
    target = os.path.abspath(os.path.expanduser(path))
    made = []  # deepest first
    folder = target
    while not os.path.lexists(folder) and folder != os.path.dirname(folder):
        made.append(folder)
        folder = os.path.dirname(folder)
    try:
        os.makedirs(target, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".oncoflow-write-check-", dir=target)
        os.close(descriptor)
        os.remove(probe)
    finally:
        for created in made:
            with suppress(OSError):
                os.rmdir(created)


def check_source(location: Location) -> None:
    """Fail fast, before any work, when a source is empty or unreadable: an S3 prefix with no objects (or
    a missing or unlistable bucket) or whose first object cannot be read, a local folder with no entries. An unmounted share is an empty folder,
    and a nightly run that classified nothing must not look like a success."""
    if location.is_local:
        with os.scandir(location.path) as entries:
            if next(entries, None) is None:
                raise FileNotFoundError(
                    f"source folder {location.path!r} is empty: if it is a network share or a mount point, "
                    "mount it; otherwise check the path"
                )
        return
    if not isinstance(location.fs, S3FileSystem):
        return
    bucket, _, prefix = location.path.partition("/")
    fs = location.fs
    start = prefix and prefix + "/"
    listing = storage_call(  # one page: up to 1,000 keys
        fs, location.path, lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=start)
    )
    if not listing.get("KeyCount"):
        endpoint = endpoint_name(fs)
        if prefix and is_one_object(fs, location.path, bucket, prefix):  # not "no objects"
            parent = location.uri.rsplit("/", 1)[0]
            raise FileNotFoundError(
                f"{location.uri!r} is one object, not a prefix; give the prefix that holds it ({parent})"
            )
        raise FileNotFoundError(
            f"nothing under {location.uri!r} at {endpoint}: the prefix holds no objects (object stores "
            "have no empty folders); check the bucket and prefix, and the endpoint (--s3-endpoint-url, "
            "AWS_ENDPOINT_URL)"
        )
    # Credentials that may list but not read (s3:GetObject missing, a KMS key not granted) would turn
    # every image into a final read_failed row: read one byte of the page's first image now instead.
    # Not of a hidden or non-image object (its own ACL or key says nothing of the images), nor of one
    # a lifecycle rule archived (it is not read again once classified).
    probe = next((item for item in listing.get("Contents", []) if probe_candidate(item, start)), None)
    if probe is None:
        return
    try:
        s3_get(fs, f"{bucket}/{probe['Key']}", 1)
    except PermissionError as exc:
        if s3_error_code(exc) != "InvalidObjectState":  # archived by Intelligent-Tiering: not a denial
            raise


ARCHIVED_STORAGE_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})


def is_one_object(fs: S3FileSystem, path: str, bucket: str, key: str) -> bool:
    """True when `key` is an object's whole key (a SOURCE naming one image instead of its prefix)."""
    listing = storage_call(
        fs, path, lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    )
    return bool(listing.get("Contents")) and listing["Contents"][0].get("Key") == key


def probe_candidate(item: dict[str, Any], start: str) -> bool:
    """A listed object that the image listing keeps and that a GET can read at once."""
    relative = str(item["Key"])[len(start) :]
    names = relative.split("/")
    return (
        bool(item.get("Size"))
        and item.get("StorageClass") not in ARCHIVED_STORAGE_CLASSES
        and not any(name.startswith(".") for name in names)
        and is_image_name(names[-1])
    )


def s3_error_code(error: BaseException) -> str | None:
    """The S3 error code (or HTTP status) behind an error, looked up along its chain of causes
    (storage_call's translation, s3fs's, botocore's ClientError); None when no server answered."""
    cause: BaseException | None = error
    while cause is not None:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(code or status) if code or status else None
        cause = cause.__cause__
    return None


def check_output(location: Location, write: bool = True) -> None:
    """Fail fast, before any work, when an S3 output's bucket is missing or not writable.

    Writes and deletes one small hidden object, the only reliable test of write permission; with
    `write=False` (a dry run, which only reads the output) checks the bucket only.
    """
    if not isinstance(location.fs, S3FileSystem):
        return
    fs = location.fs
    bucket = location.path.split("/", 1)[0]
    probe = location.join(WRITE_CHECK_NAME)
    # Errors name the output as given, not the bucket or the probe.
    try:
        storage_call(fs, location.path, lambda: fs.call_s3("head_bucket", Bucket=bucket))
    except FileNotFoundError as exc:
        raise FileNotFoundError(bucket_not_found(location)) from exc
    if not write:
        return
    storage_call(fs, location.path, lambda: fs.pipe_file(probe, WRITE_CHECK_BODY))
    # A store may allow writing but not deleting; the probe has a fixed name, so at most one remains.
    with suppress(PermissionError):
        storage_call(fs, location.path, lambda: fs.rm_file(probe))


def storage_call(fs: fsspec.AbstractFileSystem, path: str, operation: Callable[[], T]) -> T:
    """Run one storage operation on `path`: retry transient errors, translate the rest.

    The one boundary where backend exceptions become FileNotFoundError, PermissionError or
    ConnectionError with a message naming the URI and the likely fix (the original is kept as
    `__cause__`, the message is redacted). Local filesystems are retried but not translated.
    """
    local = isinstance(fs, LocalFileSystem)
    attempt = 0
    while True:
        try:
            try:
                return operation()
            except Exception as exc:
                translated = exc if local else translate_error(exc, fs, path)
                if translated is exc:
                    raise
                raise translated from exc
        except Exception as exc:
            attempt += 1
            # botocore already retried the connection itself: an endpoint that never answers is wrong.
            unreachable = isinstance(
                exc.__cause__,
                EndpointConnectionError | ConnectTimeoutError | BotocoreSSLError | aiohttp.ClientSSLError,
            )
            if unreachable or attempt >= RETRY_ATTEMPTS or not is_transient(exc):
                raise
            pause = min(RETRY_CAP_SECONDS, RETRY_BASE_SECONDS * 2**attempt) * random.uniform(0.5, 1.0)
            # Said, so that a store that stalls (each request waits for botocore's timeouts) shows in the log.
            logger.warning(
                "storage error on %s (attempt %d of %d), trying again in %.1f s: %s",
                to_uri(fs, path),
                attempt,
                RETRY_ATTEMPTS,
                pause,
                exc,
            )
            time.sleep(pause)


def is_transient(error: BaseException) -> bool:
    """True for storage errors worth another attempt: dropped connections, timeouts, EIO-like errors."""
    if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    return isinstance(error, OSError) and error.errno in LOCAL_TRANSIENT_ERRNOS


def translate_error(error: Exception, fs: fsspec.AbstractFileSystem, path: str) -> Exception:
    """Python's own exception for a storage error on `path`, naming the URI and the likely fix.

    Backend texts can quote signed URLs or credentials: the new message is redacted.
    """
    translated = _translate_error(error, fs, path)
    if translated is error or redact(str(translated)) == str(translated):
        return translated
    return type(translated)(redact(str(translated)))


def endpoint_name(fs: fsspec.AbstractFileSystem) -> str:
    """The object store's endpoint as messages name it: `the S3 endpoint URL`, or AWS's default."""
    url = getattr(fs, "endpoint_url", None)
    if not url:
        return "the default AWS S3 endpoint"
    parts = urllib.parse.urlsplit(url)
    if parts.path.strip("/"):
        # Kept (a reverse proxy may serve S3 under a path), but requests go to URL/bucket/key: a
        # bucket written into the endpoint (http://minio:9000/scans) makes every bucket "not found".
        server = f"{parts.scheme}://{parts.netloc}"
        return (
            f"the S3 endpoint {url} (its path {parts.path!r} comes before every bucket name in the "
            f"requests; an endpoint is usually the server alone, {server}, with the bucket in s3://)"
        )
    return f"the S3 endpoint {url}"


def missing_bucket(location: Location) -> str | None:
    """A message naming the bucket when an S3 location's bucket cannot be found (a typo, another
    endpoint, credentials that cannot see it); None when it exists or the location is not on S3."""
    if not isinstance(location.fs, S3FileSystem):
        return None
    bucket = location.path.split("/", 1)[0]
    try:
        if storage_call(location.fs, bucket, lambda: location.fs.exists(bucket)):
            return None
    except OSError:  # ConnectionError, PermissionError: the caller's own error says more
        return None
    return bucket_not_found(location)


def bucket_not_found(location: Location) -> str:
    bucket = location.path.split("/", 1)[0]
    return (
        f"bucket {bucket!r} (of {location.uri!r}) was not found at {endpoint_name(location.fs)}; check "
        "the bucket name, --s3-endpoint-url (AWS_ENDPOINT_URL) and that the credentials can see it"
    )


def _translate_error(error: Exception, fs: fsspec.AbstractFileSystem, path: str) -> Exception:
    uri = to_uri(fs, path)
    endpoint = endpoint_name(fs)
    if isinstance(error, ClientError):
        error = translate_boto_error(error)
    if isinstance(error, NoCredentialsError | PartialCredentialsError | CredentialRetrievalError):
        return PermissionError(
            f"no usable AWS credentials for {uri} ({error}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role, or pass --aws-credentials-block"
        )
    if isinstance(error, BotocoreSSLError | aiohttp.ClientSSLError):
        return ConnectionError(
            f"the TLS handshake with {endpoint} failed for {uri} ({error}); check the "
            "endpoint's scheme (http:// for a server without TLS) and its certificate (AWS_CA_BUNDLE)"
        )
    if isinstance(error, EndpointConnectionError | ConnectTimeoutError):
        return ConnectionError(
            f"cannot connect to {endpoint} for {uri}; check --s3-endpoint-url, "
            "AWS_ENDPOINT_URL and that the server is up and reachable"
        )
    if isinstance(error, FileNotFoundError):
        return FileNotFoundError(
            f"{uri} not found at {endpoint} ({error}); check the bucket name and prefix, "
            "and the endpoint (--s3-endpoint-url, AWS_ENDPOINT_URL)",
        )
    if isinstance(error, PermissionError):
        return PermissionError(
            f"access denied to {uri} ({error}); check that the credentials (AWS_ACCESS_KEY_ID, "
            "AWS_PROFILE, role or --aws-credentials-block) and the bucket policy allow this "
            "(reading needs s3:ListBucket and s3:GetObject; writing the output also s3:PutObject, and "
            "compact s3:DeleteObject)",
        )
    if isinstance(error, TRANSIENT_ERRORS) or (
        isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS
    ):
        return ConnectionError(f"transient storage error on {uri} at {endpoint}: {error}")
    return error
