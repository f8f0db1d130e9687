"""Merge a partition's small shard files into files sized for readers, without losing or doubling a row.

Protocol, per partition folder (model_slug=.../date=...):
1. Small files (fewer than `target_rows` rows) are grouped, in name order, into bins of at most
   `target_rows` rows; only files with the same schema share a bin.
2. Each bin becomes one merged file, `part-c<hash of its input names>.parquet`, written atomically
   (temporary name + rename, or one PUT). Its Parquet metadata lists the inputs
   (`oncoflow.compacted_from`). Only then are the inputs deleted.
3. Every run first finishes interrupted compactions: inputs still listed by a merged file are deleted.

At every instant every row is in at least one visible file (the merged file exists before any input
goes). Between steps 2 and 3 a row can be in two files, with the same (image_uri, fingerprint,
model_revision) key; the `predictions` and `latest` views (tasks/analytics.py) keep one row per key,
so counts through them are exact at every instant. Re-running is safe: the merged name depends only
on its inputs, so a retried bin overwrites its own file.

One compaction at a time per dataset: it holds the lease `DEST/_leases/compaction.lease` (tasks/lease.py;
a second one fails at once with LeaseBusy). Two that overlapped could each merge a file the other had
already merged, leaving rows in two files for good.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import posixpath
import re
import time
import uuid
from collections import defaultdict
from contextlib import suppress
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.defaults import TARGET_ROWS
from tasks.lease import LEASE_FOLDER, Lease, LeaseLost, acquire
from tasks.sink import SCHEMA_VERSION, dataset_files, find_unreadable_file
from tasks.storage import Location, check_output, missing_bucket, storage_call, write_atomic

ROW_GROUP_ROWS = 256_000  # readers skip row groups by min/max statistics; ~50 MB of Arrow in memory
COMPACTED_FROM = b"oncoflow.compacted_from"
MERGED_PREFIX = "part-c"
# merged_name's form: a shard file is `part-<20 hex>.parquet`, so one in 16 also starts with `part-c`.
MERGED_FILE = re.compile(MERGED_PREFIX + r"[0-9a-f]{20}\.parquet")
# Hidden temporaries of writes killed before their rename (tasks.storage._write_local) that are older
# than this belong to no live writer: a shard or merged file is written in seconds to minutes.
STALE_TEMPORARY_SECONDS = 24 * 3600
TEMPORARY_FILE = re.compile(r"\.part-[^/]*\.parquet\.tmp-[0-9a-f]{32}")


@dataclass
class CompactionReport:
    """What one compaction run did."""

    partitions: int = 0
    files_merged: int = 0
    files_written: int = 0
    rows_merged: int = 0
    leftovers_deleted: int = 0
    temporaries_deleted: int = 0
    superseded_run: str = ""  # the run id of a compaction that died holding the lease, if any
    written: list[str] = field(default_factory=list)


def parquet_files_by_partition(destination: Location) -> dict[str, list[str]]:
    """The dataset's Parquet files (tasks.sink.dataset_files), grouped by their folder, names sorted."""
    if not destination.fs.exists(destination.path):
        raise FileNotFoundError(
            missing_bucket(destination) or f"dataset {destination.shown!r} does not exist; check the path"
        )
    partitions: dict[str, list[str]] = defaultdict(list)
    for path in dataset_files(destination):
        partitions[posixpath.dirname(path)].append(path)
    return dict(partitions)


def merged_name(inputs: list[str]) -> str:
    """Content-addressed by the inputs' names: a retried merge of the same files overwrites itself."""
    digest = hashlib.sha256("\n".join(sorted(posixpath.basename(p) for p in inputs)).encode())
    return f"{MERGED_PREFIX}{digest.hexdigest()[:20]}.parquet"


def finish_interrupted(destination: Location, files: list[str]) -> int:
    """Delete inputs that a merged file in the same folder already holds; return how many."""
    leftovers = leftover_inputs(destination, files)
    for path in leftovers:
        destination.fs.rm(path)
    return len(leftovers)


def leftover_inputs(destination: Location, files: list[str]) -> set[str]:
    """The files among `files` that a merged file in the same folder already holds (an interrupted
    compaction's inputs), each of whose rows is therefore in two files."""
    present, leftovers = set(files), set()
    for path in files:
        # An input of a merged file found above is not read: its own list was done with it.
        if path in leftovers or not MERGED_FILE.fullmatch(posixpath.basename(path)):
            continue
        metadata = pq.read_metadata(path, filesystem=destination.fs).metadata or {}
        for name in json.loads(metadata.get(COMPACTED_FROM, b"[]")):
            leftover = posixpath.join(posixpath.dirname(path), name)
            if leftover in present and leftover != path:
                leftovers.add(leftover)
    return leftovers


def local_partition_folders(destination: Location) -> list[str]:
    """Every `model_slug=*/date=*` folder of a local dataset, Parquet files in it or not, named as
    parquet_files_by_partition names them; none on object stores (no folders, no temporaries)."""
    if not destination.is_local:
        return []
    pattern = posixpath.join(glob.escape(destination.path.rstrip("/")), "model_slug=*", "date=*")
    return sorted(path for path in glob.glob(pattern) if os.path.isdir(path))


def remove_stale_temporaries(destination: Location, folder: str, now: float | None = None) -> int:
    """Delete hidden `.part-*.parquet.tmp-*` files older than STALE_TEMPORARY_SECONDS in a local
    partition folder (a classify or compaction killed between writing and renaming); return how many.
    Object stores have none: a file there is one PUT."""
    if not destination.is_local:
        return 0
    cutoff = (time.time() if now is None else now) - STALE_TEMPORARY_SECONDS
    deleted = 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if TEMPORARY_FILE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with suppress(FileNotFoundError):
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.remove(entry.path)
                        deleted += 1
    return deleted


def plan_bins(destination: Location, files: list[str], target_rows: int) -> list[list[str]]:
    """Groups of ≥2 small files with one schema, each group at most `target_rows` rows."""
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for path in files:
        info = pq.read_metadata(path, filesystem=destination.fs)
        if info.num_rows < target_rows:
            groups[info.schema.to_arrow_schema().remove_metadata().to_string()].append((path, info.num_rows))
    bins: list[list[str]] = []
    for members in groups.values():
        current: list[str] = []
        rows = 0
        for path, count in members:
            if current and rows + count > target_rows:
                bins.append(current)
                current, rows = [], 0
            current.append(path)
            rows += count
        bins.append(current)
    return [group for group in bins if len(group) >= 2]


def merge_bin(destination: Location, inputs: list[str]) -> tuple[str, int]:
    """Write one merged file holding every row of `inputs`, atomically; the inputs stay. Returns (path, rows)."""
    fs = destination.fs
    first = pq.read_schema(inputs[0], filesystem=fs)
    metadata = dict(first.metadata or {})
    metadata.setdefault(b"oncoflow.schema_version", SCHEMA_VERSION.encode())
    metadata[COMPACTED_FROM] = json.dumps([posixpath.basename(p) for p in inputs]).encode()
    schema = first.with_metadata(metadata)
    buffer = io.BytesIO()
    rows = 0
    pending: list[pa.Table] = []
    # At most one row group of inputs in memory; the compressed output is the only thing that grows.
    with pq.ParquetWriter(buffer, schema, compression="zstd") as writer:
        for path in inputs:
            pending.append(pq.read_table(path, filesystem=fs, partitioning=None).cast(schema))
            rows += pending[-1].num_rows
            if sum(table.num_rows for table in pending) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(pending))
                pending.clear()
        if pending:
            writer.write_table(pa.concat_tables(pending))
    folder = posixpath.dirname(inputs[0])
    relative = posixpath.relpath(posixpath.join(folder, merged_name(inputs)), destination.path)
    return write_atomic(destination, relative, buffer.getvalue()), rows


def check_dataset(destination: Location) -> None:
    """FileNotFoundError, before any lease or work, unless `destination` exists and holds partition
    folders or a lease folder (not the image SOURCE given by mistake; the lease is written into it).
    Storage errors (endpoint, credentials, permissions) become one message naming DEST and the fix
    (tasks.storage.storage_call)."""
    fs, root = destination.fs, destination.path
    if not storage_call(fs, root, lambda: fs.exists(root)):  # before the lease, which would create DEST
        raise FileNotFoundError(
            missing_bucket(destination) or f"dataset {destination.shown!r} does not exist; check the path"
        )
    names = storage_call(
        fs, root, lambda: [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    )
    # A classify run that found no image yet leaves only its lease folder: a dataset with no rows.
    if not any(name.startswith("model_slug=") or name == LEASE_FOLDER for name in names):
        raise FileNotFoundError(
            f"{destination.shown!r} holds no model_slug=… partition folders, so it is no classify output (the "
            "image SOURCE given by mistake?); give the --output folder of `oncoflow classify`"
        )


COMPACTION_LEASE = "compaction"  # model leases are named <model>-<hash>, so this one cannot collide


def compact(destination: Location, target_rows: int = TARGET_ROWS, run_id: str = "") -> CompactionReport:
    """Merge small files in every partition of the dataset at `destination`, holding its compaction lease."""
    if target_rows < 2:
        raise ValueError(f"target_rows must be at least 2, got {target_rows}")
    fs, root = destination.fs, destination.path
    check_dataset(destination)
    check_output(destination)  # compaction writes merged files and deletes their inputs
    run_id = run_id or f"compact-{uuid.uuid4().hex[:8]}"
    with acquire(destination, COMPACTION_LEASE, run_id, wait_seconds=0) as lease:
        # A transient error is retried from the top: each step is safe to repeat (finish_interrupted).
        try:
            report = storage_call(fs, root, lambda: _compact(destination, target_rows, lease))
        except pa.ArrowInvalid as exc:  # a damaged or foreign file: name it, and what to do
            raise (find_unreadable_file(destination) or exc) from exc
    dead = lease.previous
    if dead is not None and dead.run_id != run_id:
        report.superseded_run = dead.run_id
    return report


def _compact(destination: Location, target_rows: int, lease: Lease | None = None) -> CompactionReport:
    report = CompactionReport()
    partitions = parquet_files_by_partition(destination)
    for folder in local_partition_folders(destination):
        if folder not in partitions:  # a day whose only shard was killed before its rename
            report.temporaries_deleted += remove_stale_temporaries(destination, folder)
    for folder, files in partitions.items():
        report.partitions += 1
        report.leftovers_deleted += finish_interrupted(destination, files)
        report.temporaries_deleted += remove_stale_temporaries(destination, folder)
        files = [path for path in files if destination.fs.exists(path)]
        for inputs in plan_bins(destination, files, target_rows):
            # An object store's lease lost (renewals failed): another compaction or erase may hold it now.
            if lease is not None and lease.lost:
                raise LeaseLost(lease.lost)
            path, rows = merge_bin(destination, inputs)
            for leftover in inputs:
                destination.fs.rm(leftover)
            report.files_merged += len(inputs)
            report.files_written += 1
            report.rows_merged += rows
            report.written.append(path)
    return report
