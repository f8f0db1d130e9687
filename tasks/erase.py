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
It holds the compaction lease, so it never runs alongside a compaction. Classify runs may write
meanwhile: they only add files. An image still present in a SOURCE is classified again by the next
run of that SOURCE (it has no row any more): remove the image first.

What it does not reach: the images themselves, Prefect's logs and artifacts (a warning naming a
corrupt file, a dry run's examples: `oncoflow prune` deletes old runs), exports written earlier
(`latest`, `report`, `evaluate`'s report folders) and copies or backups of DEST.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.compact import (
    COMPACTED_FROM,
    COMPACTION_LEASE,
    ROW_GROUP_ROWS,
    check_dataset,
    finish_interrupted,
    leftover_inputs,
    merged_name,
    parquet_files_by_partition,
)
from tasks.defaults import plural
from tasks.erase_list import Selection
from tasks.lease import acquire
from tasks.sink import SCHEMA_VERSION, find_unreadable_file
from tasks.storage import Location, check_output, list_images, storage_call, to_uri, write_atomic

EXAMPLES = 5


class Matcher:
    """A Selection as Arrow value sets, built once per erase: mask(image_uri) selects its rows."""

    def __init__(self, selection: Selection) -> None:
        self.selection = selection
        self.uris = pa.array(sorted(selection.uris), pa.string())
        self.present = pa.array(sorted(selection.present), pa.string())

    def mask(self, image_uri: pa.ChunkedArray) -> pa.ChunkedArray:
        selected = pc.is_in(image_uri, value_set=self.uris)
        for prefix in self.selection.prefixes:
            selected = pc.or_(selected, pc.starts_with(image_uri, prefix))
        if self.selection.missing_under is not None:
            gone = pc.invert(pc.is_in(image_uri, value_set=self.present))
            under = pc.starts_with(image_uri, self.selection.missing_under)
            selected = pc.or_(selected, pc.and_(under, gone))
        return pc.fill_null(selected, False)


@dataclass
class EraseReport:
    """What one erase did (`applied`) or would do."""

    applied: bool = False
    partitions: int = 0
    files_rewritten: int = 0
    files_deleted: int = 0
    rows_erased: int = 0
    images_erased: int = 0
    images_listed: int = 0  # with a SOURCE: the images it holds, whose rows stay
    leftovers_deleted: int = 0
    examples: list[str] = field(default_factory=list)  # the first image URIs, a plan only


class IncompleteListing(OSError):
    """SOURCE's listing left entries out: the images in them may exist, so their rows must stay."""


class _LeftOut(logging.Handler):
    """Counts the warnings the listing gives for what it leaves out (tasks.storage: a sub-folder or image
    it may not read, a broken link, a special file, an archived object it cannot look into)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def source_selection(source: Location) -> Selection:
    """Rows under `source` whose image it no longer holds. Every file it lists counts as present (one
    without an image extension is not opened to look for DICOM: a row for it means it was an image).

    IncompleteListing when the listing left anything out with a warning (an unreadable sub-folder, a
    broken link, ...): those images may well exist, and classify would list them again once readable,
    so their rows are not to be erased; nothing is erased then."""
    listing_log = logging.getLogger(list_images.__module__)
    left_out = _LeftOut()
    listing_log.addHandler(left_out)
    try:
        present = frozenset(image.uri for image in list_images(source, known=lambda _uri: True))
    finally:
        listing_log.removeHandler(left_out)
    if left_out.count:
        raise IncompleteListing(
            f"the listing of {source.shown!r} left entries out (the warnings above: unreadable folders or "
            "files, broken links, ...), and the rows of the images in them would be erased although they "
            "may still be there; make them readable (or remove them) and run again, or name the images "
            "with --uris. Nothing was erased"
        )
    return Selection(missing_under=to_uri(source.fs, source.path).rstrip("/") + "/", present=present)


def erase(destination: Location, selection: Selection, apply: bool = False, run_id: str = "") -> EraseReport:
    """Erase (apply) or count (plan) the selected rows of the dataset at `destination`."""
    check_dataset(destination)
    report = EraseReport(applied=apply, images_listed=len(selection.present))
    erased: set[str] = set()
    fs, root = destination.fs, destination.path
    try:
        if not apply:
            storage_call(fs, root, lambda: _erase(destination, selection, report, erased, apply=False))
        else:
            check_output(destination)  # erasing writes files and deletes others
            with acquire(
                destination, COMPACTION_LEASE, run_id or f"erase-{uuid.uuid4().hex[:8]}", wait_seconds=0
            ):
                # A transient error is retried from the top: each file is counted once it is done, and
                # a file rewritten but not yet deleted is finished by finish_interrupted.
                storage_call(fs, root, lambda: _erase(destination, selection, report, erased, apply=True))
    except pa.ArrowInvalid as exc:  # a damaged or foreign file: name it, and what to do
        raise (find_unreadable_file(destination) or exc) from exc
    report.images_erased = len(erased)
    if not apply:
        report.examples = sorted(erased)[:EXAMPLES]
    return report


def _erase(
    destination: Location, selection: Selection, report: EraseReport, erased: set[str], apply: bool
) -> None:
    fs, matcher = destination.fs, Matcher(selection)
    partitions = parquet_files_by_partition(destination)
    report.partitions = len(partitions)
    for files in partitions.values():
        if apply:
            report.leftovers_deleted += finish_interrupted(destination, files)
            files = [path for path in files if fs.exists(path)]
        else:  # a plan reads what is there: an interrupted compaction's inputs are rows counted twice
            leftovers = leftover_inputs(destination, files)
            files = [path for path in files if path not in leftovers]
        for path in files:
            uris = pq.read_table(path, columns=["image_uri"], filesystem=fs, partitioning=None).column(0)
            mask = matcher.mask(uris)
            count = pc.sum(pc.cast(mask, pa.int64())).as_py() or 0
            if not count:
                continue
            if apply:
                if count < len(uris):
                    rewrite_without(destination, path, mask)
                fs.rm(path)
            erased.update(pc.unique(pc.filter(uris, mask)).to_pylist())
            report.rows_erased += count
            if count < len(uris):
                report.files_rewritten += 1
            else:
                report.files_deleted += 1


def rewrite_without(destination: Location, path: str, mask: pa.ChunkedArray) -> str:
    """Write the rows of `path` that `mask` does not select to `part-c<hash of its name>.parquet`,
    listing `path` as its input; `path` stays (the caller deletes it)."""
    fs = destination.fs
    table = pq.read_table(path, filesystem=fs, partitioning=None)
    metadata = dict(table.schema.metadata or {})
    metadata.setdefault(b"oncoflow.schema_version", SCHEMA_VERSION.encode())
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
    if not report.rows_erased:
        return f"no rows to erase: none of the {plural(report.partitions, 'partition')} holds a row of those images"
    return (
        f"{'erased' if report.applied else 'would erase'} {plural(report.rows_erased, 'row')} of "
        f"{plural(report.images_erased, 'image')}: {plural(report.files_rewritten, 'file')} rewritten "
        f"without them, {report.files_deleted} deleted (of {plural(report.partitions, 'partition')})"
    )
