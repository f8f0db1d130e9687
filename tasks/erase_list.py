"""The erase list of `oncoflow erase --uris FILE`: which images' rows to erase (tasks/erase.py does it).
Standard library only: the CLI checks the list before any work."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from datetime import datetime

from tasks.uris import canonical_file_uri, file_uri_path, full_file_uri, printable_path


class EraseListError(ValueError):
    """An erase list that cannot be used as given; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Selection:
    """The rows to erase: image_uri in `uris`, or starting with one of `prefixes`, or (with
    `missing_under`) starting with it, not in `present` and written before `listed_at`."""

    uris: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()
    missing_under: str | None = None
    present: frozenset[str] = frozenset()
    listed_at: datetime | None = None  # with missing_under: only rows written before the listing count


def read_erase_list(path: str) -> Selection:
    """The images an erase list names, one per line: an image URI (`s3://...`, `file://...`) or a local
    path as classify writes it (relative paths are relative to the list's folder), or a prefix: a line
    ending in `/`, or naming an existing local folder, stands for every image under it. Blank lines and
    lines starting with `#` are skipped. A CSV whose header has an `image_uri` column (what `oncoflow
    latest` exports, filtered; delimited by `,`, `;` or tabs) is read by that column. A `file://` URI of
    an existing folder is a prefix like the folder's path."""
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise EraseListError(f"{path!r} cannot be read ({exc}); give a UTF-8 text file") from exc
    lines = text.splitlines()
    first = next((n for n, line in enumerate(lines) if line.strip()), 0)
    # A CSV: its image_uri column, whatever the delimiter (Excel writes `;` in many locales)
    for delimiter in ",;\t":
        header = [
            name.strip() for name in next(csv.reader(lines[first : first + 1], delimiter=delimiter), [])
        ]
        if "image_uri" in header:
            column = header.index("image_uri")
            rows = csv.reader(lines[first + 1 :], delimiter=delimiter)
            entries = [
                (first + 2 + n, row[column] if len(row) > column else "") for n, row in enumerate(rows)
            ]
            break
    else:  # plain lines
        entries = list(enumerate(lines, start=1))
    base = os.path.dirname(os.path.abspath(path))
    uris: set[str] = set()
    prefixes: set[str] = set()
    for number, raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        uri, is_prefix = entry_uri(entry, base, f"{path!r} line {number}")
        (prefixes if is_prefix else uris).add(uri)
    if not uris and not prefixes:
        raise EraseListError(f"{path!r} names no image: write one image URI, path or folder/ prefix per line")
    if "file:///" in prefixes:
        raise EraseListError(f"{path!r} names the filesystem root `/`; name the images or their folders")
    return Selection(uris=frozenset(uris), prefixes=tuple(sorted(prefixes)))


def entry_uri(entry: str, base: str, where: str) -> tuple[str, bool]:
    """(the URI classify wrote for `entry`, whether it is a prefix)."""
    entry = full_file_uri(entry)
    prefix = entry.endswith("/")
    if "://" in entry:
        scheme, rest = entry.split("://", 1)
        if scheme.lower() == "file":
            uri = canonical_file_uri(entry)
            local = file_uri_path(uri)
            prefix = prefix or (local is not None and os.path.isdir(local))  # a folder, like its path
            if len(uri) > len("file:///"):
                uri = uri.rstrip("/")
            if not uri.startswith("file:///"):
                raise EraseListError(
                    f"{where}: {entry!r} is not a local file:// URI; write file:///absolute/path"
                )
        elif scheme.lower() in {"s3", "s3a"}:
            if not rest.split("/", 1)[0]:
                raise EraseListError(f"{where}: {entry!r} names no bucket; write s3://BUCKET/key")
            uri = f"s3://{rest.rstrip('/')}"  # a key's text as given (it may hold a literal %20)
        else:
            raise EraseListError(
                f"{where}: {entry!r} is neither a path nor an s3:// or file:// URI; image_uri holds only those"
            )
    else:
        path = os.path.normpath(os.path.join(base, os.path.expanduser(entry)))
        prefix = prefix or os.path.isdir(path)
        uri = "file://" + printable_path(path)
    return (uri if uri.endswith("/") else uri + "/", True) if prefix else (uri, False)
