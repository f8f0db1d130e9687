"""Erase the rows of given images from the dataset: a subject who withdrew consent, images deleted at
the source under a retention policy, files classified by mistake.

Which rows: those whose `image_uri` is in a list (exact URIs, or prefixes ending in `/`: every image
under a folder or key prefix), or, with a SOURCE, those under SOURCE whose image is no longer there.
Every row of such an image goes, of every model revision and every run.

How, per Parquet file holding such rows (the compaction protocol of tasks/compact.py, so every reader
and every later compaction already understands the intermediate states):
1. A file whose every row is erased is deleted.
2. Otherwise its other rows are written to `part-c<hash of its name>.parquet` (atomically: temporary
   name + rename, or one PUT), whose metadata lists it as the one input (`oncoflow.compacted_from`);
   only then is the old file deleted. A crash between the two leaves both: the views keep one row per
   (image_uri, fingerprint, model_revision), and the next `erase` or `compact` deletes the old file
   (finish_interrupted) before anything else.
It holds the compaction lease, so it never runs alongside a compaction (and stops, LeaseLost, if an
object store's lease is lost meanwhile). Classify runs may write meanwhile: they only add files; the
files that appear during the pass are read too, but a run still going on after it may write a row of
an image it listed before the image was removed: erase when no classify run is in progress, or run it
again. An image still present in a SOURCE is classified again by the next run of that SOURCE (it has
no row any more): remove the image first.

With a SOURCE, a row goes only when its image is certainly gone: the listing must be whole (nothing
left out with a warning) and hold at least one image; only rows written before the listing started are
candidates (a concurrent run may classify an image added since); and a candidate under a hidden folder
(never listed), or whose local file still exists (reached through a link the listing did not follow
to it), stays.

What it does not reach: the images themselves, Prefect's logs and artifacts (a warning naming a
corrupt file, a dry run's examples: `oncoflow prune` deletes old runs), exports written earlier
(`latest`, `report`, `evaluate`'s report folders) and copies or backups of DEST.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.compact import (
    COMPACTED_FROM,
    COMPACTION_LEASE,
    ROW_GROUP_ROWS,
    check_dataset,
    leftover_inputs,
    merged_name,
    parquet_files_by_partition,
)
from tasks.defaults import plural
from tasks.erase_list import Selection
from tasks.lease import LeaseLost, acquire
from tasks.sink import find_unreadable_file
from tasks.storage import Location, check_output, list_images, storage_call, to_uri, write_atomic
from tasks.uris import file_uri_path

EXAMPLES = 5


class Matcher:
    """A Selection as Arrow value sets, built once per erase: mask(table) selects its rows. It remembers
    which entries of an erase list matched a row, and which SOURCE candidates it kept as still there."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.uris = pa.array(sorted(selection.uris), pa.string())
        self.present = pa.array(sorted(selection.present), pa.string())
        self.matched: set[str] = set()  # entries of the list (URIs, prefixes) that matched a row
        # SOURCE candidates checked: why the row stays ("there", "empty folder"), or None: it goes
        self.there: dict[str, str | None] = {}

    def columns(self) -> list[str]:
        return ["image_uri", "processed_at"] if self.selection.missing_under else ["image_uri"]

    def mask(self, table: pa.Table) -> pa.ChunkedArray:
        image_uri = table.column("image_uri")
        selected = pc.fill_null(pc.is_in(image_uri, value_set=self.uris), False)
        self.matched.update(pc.unique(pc.filter(image_uri, selected)).to_pylist())
        for prefix in self.selection.prefixes:
            hit = pc.fill_null(pc.starts_with(image_uri, prefix), False)
            if pc.any(hit).as_py():
                self.matched.add(prefix)
                selected = pc.or_(selected, hit)
        under = self.selection.missing_under
        if under is not None and self.selection.listed_at is not None:
            listed_at = pa.scalar(self.selection.listed_at, table.column("processed_at").type)
            candidates = pc.and_(
                pc.and_(
                    pc.starts_with(image_uri, under), pc.invert(pc.is_in(image_uri, value_set=self.present))
                ),
                pc.less(table.column("processed_at"), listed_at),  # a row of an image added since: stays
            )
            candidates = pc.fill_null(candidates, False)
            staying = [
                uri
                for uri in pc.unique(pc.filter(image_uri, candidates)).to_pylist()
                if self.still_there(uri)
            ]
            if staying:
                candidates = pc.and_(
                    candidates, pc.invert(pc.is_in(image_uri, value_set=pa.array(staying, pa.string())))
                )
            selected = pc.or_(selected, candidates)
        return selected

    def still_there(self, uri: str) -> bool:
        """Whether an image under SOURCE that its listing did not name may exist all the same: under a
        hidden folder (never listed), a local file that exists (behind a link to a folder listed under
        its own path), or under an empty folder (where a share per patient or per year is mounted:
        unmounted, it is empty; a retention job that leaves empty folders behind must remove them)."""
        if uri not in self.there:
            under = self.selection.missing_under or ""
            relative = uri[len(under) :]
            hidden = any(part.startswith(".") for part in relative.split("/")[:-1])
            path = file_uri_path(uri) if uri.startswith("file://") else None
            reason = "there" if hidden or (path is not None and os.path.lexists(path)) else None
            if reason is None and path is not None:
                reason = (
                    "empty folder"
                    if under_empty_folder(path, file_uri_path(under.rstrip("/")) or "/")
                    else None
                )
            self.there[uri] = reason
        return self.there[uri] is not None

    def count(self, reason: str) -> int:
        return sum(1 for why in self.there.values() if why == reason)


def under_empty_folder(path: str, root: str) -> bool:
    """Whether the nearest folder of `path` that exists, below `root`, is empty."""
    folder = os.path.dirname(path)
    while len(folder) > len(root) and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    if len(folder) <= len(root):
        return False
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is None
    except OSError:  # unreadable: the listing said so already
        return False


@dataclass
class EraseReport:
    """What one erase did (`applied`) or would do."""

    applied: bool = False
    partitions: int = 0
    files_rewritten: int = 0
    files_deleted: int = 0
    rows_erased: int = 0
    images_erased: int = 0
    images_listed: int = 0  # with a SOURCE: the images its listing names, whose rows stay
    images_still_there: int = 0  # with a SOURCE: unlisted, but there (a hidden folder, a link): kept
    leftovers_deleted: int = 0  # files an interrupted erase or compaction left
    leftover_rows: int = 0  # rows to erase in those files (counted apart: some are in two files)
    images_under_empty_folders: int = 0  # with a SOURCE: unlisted, under an empty folder (unmounted?): kept
    superseded_run: str = ""  # the run id of an erase or compaction that died holding the lease, if any
    entries: int = 0  # with --uris: the list's entries (URIs and prefixes)
    entries_unmatched: list[str] = field(default_factory=list)  # the first entries that matched no row
    examples: list[str] = field(default_factory=list)  # the first image URIs, a plan only


class EraseInterrupted(OSError):
    """An erase that failed after it had rewritten or deleted files: run it again to finish."""


class IncompleteListing(OSError):
    """SOURCE's listing left entries out, or found no image: the images may exist, so their rows stay."""


class _LeftOut(logging.Handler):
    """Counts the warnings the listing gives for what it leaves out (tasks.storage: a sub-folder or image
    it may not read, a broken link, a special file, an archived object it cannot look into)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "oncoflow_left_out", False):  # not a retried storage error, for one
            self.count += 1


def source_selection(source: Location) -> Selection:
    """Rows under `source` whose image it no longer holds, among the rows written before the listing
    started. Every file it lists counts as present (one without an image extension is not opened to look
    for DICOM: a row for it means it was an image).

    IncompleteListing when the listing left anything out with a warning (an unreadable sub-folder, a
    broken link, ...: those images may well exist, and classify lists them again once readable) or
    found no image at all (an unmounted share holding a hidden marker file, a mistyped prefix that
    holds other objects); nothing is erased then."""
    listing_log = logging.getLogger(list_images.__module__)
    left_out, level = _LeftOut(), listing_log.level
    listing_log.addHandler(left_out)
    if listing_log.getEffectiveLevel() > logging.WARNING:  # a quieter logging setup must not hide them
        listing_log.setLevel(logging.WARNING)
    listed_at = datetime.now(UTC)
    try:
        present = frozenset(image.uri for image in list_images(source, known=lambda _uri: True))
    finally:
        listing_log.removeHandler(left_out)
        listing_log.setLevel(level)
    prefix = to_uri(source.fs, source.path).rstrip("/") + "/"
    if left_out.count:
        raise IncompleteListing(
            f"the listing of {source.shown!r} left entries out (the warnings above: unreadable folders or "
            "files, broken links, ...), and the rows of the images in them would be erased although they "
            "may still be there; make them readable (or remove them) and run again, or name the images "
            "with --uris. Nothing was erased"
        )
    if not present:
        raise IncompleteListing(
            f"the listing of {source.shown!r} holds no image, so every row under it would be erased (an "
            "unmounted share? a mistyped path?). Nothing was erased. If every image under it is really "
            f"gone, erase their rows with --uris and a file holding the line {prefix}"
        )
    return Selection(missing_under=prefix, present=present, listed_at=listed_at)


def erase(destination: Location, selection: Selection, apply: bool = False, run_id: str = "") -> EraseReport:
    """Erase (apply) or count (plan) the selected rows of the dataset at `destination`."""
    check_dataset(destination)
    fs, root = destination.fs, destination.path
    done: dict[str, tuple[int, list[str]]] = {}  # rewritten, not yet deleted: old path → (rows, images)
    changed: list[str] = []
    try:
        if not apply:
            return storage_call(fs, root, lambda: _erase(destination, selection, done))
        check_output(destination)  # erasing writes files and deletes others
        run_id = run_id or f"erase-{uuid.uuid4().hex[:8]}"
        with acquire(destination, COMPACTION_LEASE, run_id, wait_seconds=0) as lease:

            def guard() -> None:  # before each write and delete: never alongside a compaction
                if lease.lost:
                    raise LeaseLost(lease.lost)

            # A transient error is retried from the top, with a fresh count: a file rewritten but not
            # yet deleted is finished by the retry, and counted from `done`.
            report = storage_call(fs, root, lambda: _erase(destination, selection, done, guard, changed))
        dead = lease.previous
        if dead is not None and dead.run_id != run_id:
            report.superseded_run = dead.run_id
        return report
    except Exception as exc:
        failure = (find_unreadable_file(destination) or exc) if isinstance(exc, pa.ArrowInvalid) else exc
        if not changed:
            if failure is exc:
                raise
            raise failure from exc
        raise EraseInterrupted(
            f"{failure} — the erase stopped part way: {plural(len(changed), 'file')} had already been "
            "rewritten or deleted (those rows are gone); fix this and run the same erase again to finish"
        ) from exc


def _erase(
    destination: Location,
    selection: Selection,
    done: dict[str, tuple[int, list[str]]],
    guard: Callable[[], None] | None = None,
    changed: list[str] | None = None,
) -> EraseReport:
    """One pass (apply when `guard` is given): every partition, then the files that appeared meanwhile."""
    fs, matcher = destination.fs, Matcher(selection)
    changed = [] if changed is None else changed  # the files rewritten or deleted so far, every attempt
    report = EraseReport(applied=guard is not None, images_listed=len(selection.present))
    erased: set[str] = set()
    seen: set[str] = set()
    while True:
        partitions = parquet_files_by_partition(destination)
        report.partitions = len(partitions)
        fresh = {folder: [p for p in files if p not in seen] for folder, files in partitions.items()}
        if not any(fresh.values()):
            break
        for folder, files in fresh.items():
            seen.update(files)
            leftovers = leftover_inputs(destination, partitions[folder])
            for path in [p for p in files if p in leftovers]:
                if path in done:  # rewritten by the attempt a transient error interrupted: finish it
                    assert guard is not None
                    guard()
                    fs.rm(path)
                    changed.append(path)
                    rows, images = done[path]
                    report.rows_erased += rows
                    report.files_rewritten += 1
                    erased.update(images)
                    continue
                # Left by an interrupted erase or compaction: what deleting it erases is counted apart
                # (a compaction's input holds rows its merged file holds too), the same in plan and apply.
                table = pq.read_table(path, columns=matcher.columns(), filesystem=fs, partitioning=None)
                mask = matcher.mask(table)
                report.leftover_rows += pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
                erased.update(pc.unique(pc.filter(table.column("image_uri"), mask)).to_pylist())
                if guard is not None:
                    guard()
                    fs.rm(path)
                    changed.append(path)
                    report.leftovers_deleted += 1
            for path in [p for p in files if p not in leftovers]:
                _erase_file(destination, path, matcher, report, erased, done, guard, changed)
    report.images_erased = len(erased)
    report.images_still_there = matcher.count("there")
    report.images_under_empty_folders = matcher.count("empty folder")
    entries = sorted(selection.uris | set(selection.prefixes))
    report.entries = len(entries)
    report.entries_unmatched = [e for e in entries if e not in matcher.matched]
    if guard is None:
        report.examples = sorted(erased)[:EXAMPLES]
    return report


def _erase_file(
    destination: Location,
    path: str,
    matcher: Matcher,
    report: EraseReport,
    erased: set[str],
    done: dict[str, tuple[int, list[str]]],
    guard: Callable[[], None] | None,
    changed: list[str],
) -> None:
    fs = destination.fs
    table = pq.read_table(path, columns=matcher.columns(), filesystem=fs, partitioning=None)
    mask = matcher.mask(table)
    count = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
    if not count:
        return
    images = pc.unique(pc.filter(table.column("image_uri"), mask)).to_pylist()
    if guard is not None:
        guard()
        if count < table.num_rows:
            rewrite_without(destination, path, mask)
            done[path] = (count, images)  # a retry that finds it left over counts it from here
        guard()
        fs.rm(path)
        changed.append(path)
    erased.update(images)
    report.rows_erased += count
    if count < table.num_rows:
        report.files_rewritten += 1
    else:
        report.files_deleted += 1


def rewrite_without(destination: Location, path: str, mask: pa.ChunkedArray) -> str:
    """Write the rows of `path` that `mask` does not select to `part-c<hash of its name>.parquet`,
    listing `path` as its input; `path` stays (the caller deletes it). Its metadata is kept as it is
    (its schema version included), plus that list."""
    fs = destination.fs
    table = pq.read_table(path, filesystem=fs, partitioning=None)
    metadata = dict(table.schema.metadata or {})
    metadata[COMPACTED_FROM] = json.dumps([posixpath.basename(path)]).encode()
    kept = table.filter(pc.invert(mask)).replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(kept, buffer, compression="zstd", row_group_size=ROW_GROUP_ROWS)
    relative = posixpath.relpath(
        posixpath.join(posixpath.dirname(path), merged_name([path])), destination.path
    )
    return write_atomic(destination, relative, buffer.getvalue())


def describe(report: EraseReport) -> str:
    """One line: what was (or would be) erased."""
    if not report.partitions:
        return "no rows to erase: the dataset holds no rows yet"
    if not report.rows_erased and not report.leftover_rows:
        return f"no rows to erase: none of the {plural(report.partitions, 'partition')} holds a row of those images"
    line = (
        f"{'erased' if report.applied else 'would erase'} {plural(report.rows_erased, 'row')} of "
        f"{plural(report.images_erased, 'image')}: {plural(report.files_rewritten, 'file')} rewritten "
        f"without them, {report.files_deleted} deleted (of {plural(report.partitions, 'partition')})"
    )
    if report.leftover_rows:
        line += (
            f", and {plural(report.leftover_rows, 'row')} in files an interrupted erase or compaction left "
            "(deleted with them)"
        )
    return line
