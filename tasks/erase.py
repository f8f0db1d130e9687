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
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.analytics import retry_while_compacting
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
from tasks.storage import (
    Location,
    check_output,
    counting_left_out,
    list_images,
    storage_call,
    to_uri,
    write_atomic,
)
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
    """Whether the nearest folder of `path` that exists, below `root`, is empty (hidden names aside)."""
    folder = os.path.dirname(path)
    while len(folder) > len(root) and not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    if len(folder) <= len(root):
        return False
    try:  # hidden names do not count: the listing skips them, and a mount point may hold a marker file
        with os.scandir(folder) as entries:
            return next((e for e in entries if not e.name.startswith(".")), None) is None
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


def source_selection(source: Location) -> Selection:
    """Rows under `source` whose image it no longer holds, among the rows written before the listing
    started. Every file it lists counts as present (one without an image extension is not opened to look
    for DICOM: a row for it means it was an image).

    IncompleteListing when the listing left anything out with a warning (an unreadable sub-folder, a
    broken link, ...: those images may well exist, and classify lists them again once readable) or
    found no image at all (an unmounted share holding a hidden marker file, a mistyped prefix that
    holds other objects); nothing is erased then."""
    listed_at = datetime.now(UTC)
    with counting_left_out() as left_out:
        present = frozenset(image.uri for image in list_images(source, known=lambda _uri: True))
    prefix = to_uri(source.fs, source.path).rstrip("/") + "/"
    if left_out[0]:
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

    def new_pass() -> Pass:
        report = EraseReport(applied=apply, images_listed=len(selection.present))
        return Pass(destination, Matcher(selection), report)

    if not apply:  # read only, without the lease: a file a compaction merged meanwhile means a new count

        def plan() -> EraseReport:
            state = new_pass()
            storage_call(fs, root, state.run)
            return state.finish()

        try:
            return retry_while_compacting(plan)
        except pa.ArrowInvalid as exc:  # a damaged or foreign file: name it, and what to do
            raise (find_unreadable_file(destination) or exc) from exc
    state = new_pass()
    try:
        check_output(destination)  # erasing writes files and deletes others
        run_id = run_id or f"erase-{uuid.uuid4().hex[:8]}"
        with acquire(destination, COMPACTION_LEASE, run_id, wait_seconds=0) as lease:

            def guard() -> None:  # before each write and delete: never alongside a compaction
                if lease.lost:
                    raise LeaseLost(lease.lost)

            state.guard = guard
            # A transient error is retried: the pass goes on where it stopped (what it did is counted
            # once), first finishing a file whose rewrite or deletion was under way.
            storage_call(fs, root, state.run)
        report = state.finish()
        dead = lease.previous
        if dead is not None and dead.run_id != run_id:
            report.superseded_run = dead.run_id
        return report
    except Exception as exc:
        failure = (find_unreadable_file(destination) or exc) if isinstance(exc, pa.ArrowInvalid) else exc
        if not state.changed:
            if failure is exc:
                raise
            raise failure from exc
        raise EraseInterrupted(
            f"{failure} — the erase stopped part way: {plural(len(state.changed), 'file')} had already been "
            "rewritten or deleted; fix this and run the same erase again to finish"
        ) from exc


@dataclass
class Pass:
    """One erase's pass over the dataset, resumable after a transient error: the files done, the one under
    way (`pending`: rewritten or about to be deleted, not yet counted) and the counts."""

    destination: Location
    matcher: Matcher
    report: EraseReport
    guard: Callable[[], None] | None = None  # apply: checks the lease before each write and delete
    seen: set[str] = field(default_factory=set)  # files read (and, applying, dealt with)
    folders: set[str] = field(default_factory=set)  # partition folders ever listed
    erased: set[str] = field(default_factory=set)  # images whose rows went (or would go)
    pending: dict[str, tuple[int, list[str], bool]] = field(
        default_factory=dict
    )  # path → rows, images, rewritten
    changed: set[str] = field(default_factory=set)  # files rewritten or deleted

    def run(self) -> None:
        """Every partition, then the files that appeared meanwhile, until a listing brings nothing new."""
        for path, (rows, images, rewritten) in list(self.pending.items()):  # a retry: finish it first
            self.remove(path)
            self.count(rows, images, rewritten)
            del self.pending[path]
        while True:
            partitions = parquet_files_by_partition(self.destination)
            self.folders.update(partitions)
            fresh = {folder: [p for p in files if p not in self.seen] for folder, files in partitions.items()}
            if not any(fresh.values()):
                return
            for folder, files in fresh.items():
                leftovers = leftover_inputs(self.destination, partitions[folder])
                for path in files:
                    if path in leftovers:
                        self.leftover(path)
                    else:
                        self.file(path)
                    self.seen.add(path)

    def read(self, path: str) -> tuple[pa.Table, pa.ChunkedArray, int]:
        table = pq.read_table(
            path, columns=self.matcher.columns(), filesystem=self.destination.fs, partitioning=None
        )
        mask = self.matcher.mask(table)
        return table, mask, pc.sum(pc.cast(mask, pa.int64())).as_py() or 0

    def leftover(self, path: str) -> None:
        """A file an interrupted erase or compaction left (another file lists it as its input): what
        deleting it erases is counted apart (a compaction's input holds rows its merged file holds too),
        the same in plan and apply."""
        table, mask, count = self.read(path)
        self.report.leftover_rows += count
        self.erased.update(pc.unique(pc.filter(table.column("image_uri"), mask)).to_pylist())
        if self.guard is not None:
            self.remove(path)
            self.report.leftovers_deleted += 1

    def file(self, path: str) -> None:
        table, mask, count = self.read(path)
        if not count:
            return
        images = pc.unique(pc.filter(table.column("image_uri"), mask)).to_pylist()
        rewritten = count < table.num_rows
        if self.guard is not None:
            if rewritten:
                self.guard()
                rewrite_without(self.destination, path, mask)
                self.changed.add(path)
            self.pending[path] = (count, images, rewritten)
            self.remove(path)
            del self.pending[path]
        self.count(count, images, rewritten)

    def remove(self, path: str) -> None:
        """Delete `path` (gone already: a delete that failed after the store had done it)."""
        assert self.guard is not None
        self.guard()
        fs = self.destination.fs
        if fs.exists(path):
            fs.rm(path)
        self.changed.add(path)

    def count(self, rows: int, images: list[str], rewritten: bool) -> None:
        self.erased.update(images)
        self.report.rows_erased += rows
        if rewritten:
            self.report.files_rewritten += 1
        else:
            self.report.files_deleted += 1

    def finish(self) -> EraseReport:
        report, matcher, selection = self.report, self.matcher, self.matcher.selection
        report.partitions = len(self.folders)
        report.images_erased = len(self.erased)
        report.images_still_there = matcher.count("there")
        report.images_under_empty_folders = matcher.count("empty folder")
        entries = sorted(selection.uris | set(selection.prefixes))
        report.entries = len(entries)
        report.entries_unmatched = [e for e in entries if e not in matcher.matched]
        if self.guard is None:
            report.examples = sorted(self.erased)[:EXAMPLES]
        return report


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
    if not report.rows_erased and not report.leftover_rows:
        if not report.partitions:
            return "no rows to erase: the dataset holds no rows yet"
        return f"no rows to erase: none of the {plural(report.partitions, 'partition')} holds a row of those images"
    line = (
        f"{'erased' if report.applied else 'would erase'} {plural(report.rows_erased, 'row')} of "
        f"{plural(report.images_erased, 'image')}: {plural(report.files_rewritten, 'file')} rewritten "
        f"without them, {report.files_deleted} deleted (of {plural(report.partitions, 'partition')})"
    )
    if report.leftover_rows:
        line += (
            f", and {plural(report.leftover_rows, 'row')} in files an interrupted erase or compaction left "
            + ("(deleted with them)" if report.applied else "(which --yes deletes)")
        )
    return line
