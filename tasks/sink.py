"""The output dataset: the row schema (docs/design.md's contract), shard paths, atomic Parquet writes and the
incremental index of what DEST already holds.

Layout: DEST/model_slug=<model>-<revision>/date=<YYYY-MM-DD>/part-<shard id>.parquet. The partition key
is `model_slug`, not `model`, because a Hive partition named like a file column silently replaces that
column's values in pyarrow and DuckDB.
"""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.storage import IMAGE_EXTENSIONS, DiscoveredFile, Location, storage_call, to_uri, write_atomic

# 1: the contract columns + shard_id, precision, image_width/height; 2: + decoder.
SCHEMA_VERSION = "2"

SCHEMA = pa.schema(
    [
        ("image_uri", pa.string()),
        ("fingerprint", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("confidence", pa.float64()),
        ("prob_malignant", pa.float64()),
        ("threshold", pa.float64()),
        ("model", pa.string()),
        ("model_revision", pa.string()),
        ("run_id", pa.string()),
        ("processed_at", pa.timestamp("us", tz="UTC")),
        ("status", pa.string()),
        ("error", pa.string()),
        # Beyond the contract: where the row came from and how it was computed.
        ("shard_id", pa.string()),
        ("precision", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("decoder", pa.string()),
    ],
    metadata={"oncoflow.schema_version": SCHEMA_VERSION},
)

INDEX_COLUMNS = ["image_uri", "fingerprint"]
INDEX_PASSES = 100  # read passes while a compaction merges files under the reader
INDEX_READERS = 16  # files read at once when the index is read file by file


def model_slug(model: str, revision: str) -> str:
    """A filesystem-safe partition value naming the model and its revision."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]).strip("-.") or "model"
    short = re.sub(r"[^A-Za-z0-9]+", "", revision.split(":")[-1])[:12]
    return f"{name}-{short}"


def shard_id(files: Sequence[DiscoveredFile], revision: str) -> str:
    """Identity of a shard: its files, their versions and the model revision, nothing else.

    A retried or re-run shard therefore overwrites its own file instead of adding a second one.
    """
    digest = hashlib.sha256(revision.encode())
    for file in files:
        digest.update(f"\n{file.uri}\t{file.fingerprint}".encode())
    return digest.hexdigest()[:20]


def shard_path(slug: str, day: datetime, shard: str) -> str:
    return f"model_slug={slug}/date={day:%Y-%m-%d}/part-{shard}.parquet"


def write_shard(destination: Location, relative_path: str, table: pa.Table) -> str:
    """Write one shard's rows as one Parquet file, atomically; return its full path."""
    buffer = io.BytesIO()
    pq.write_table(table.cast(SCHEMA), buffer, compression="zstd")
    return write_atomic(destination, relative_path, buffer.getvalue())


class DatasetFileError(ValueError):
    """A file in DEST's partition folders that is not a readable Parquet file."""


def not_parquet(uri: str, reason: object) -> DatasetFileError:
    """The error for a dataset file pyarrow cannot read: which file, and what to do about it."""
    return DatasetFileError(
        f"{uri} is not a readable Parquet file ({reason}); oncoflow writes each file under a temporary "
        "name and renames it when complete, so another tool truncated it or put it there: move it out of "
        "DEST (look inside first if it may hold rows), or delete it if it is damaged, then run again"
    )


def find_unreadable_file(destination: Location, files: list[str] | None = None) -> DatasetFileError | None:
    """After a whole-dataset read failed on a damaged file (pyarrow's message may name none): the first
    of `files` (default: every dataset file) whose Parquet footer cannot be read, as an error."""
    for path in dataset_files(destination) if files is None else files:
        try:
            pq.read_metadata(path, filesystem=destination.fs)
        except FileNotFoundError:
            continue  # merged away by a concurrent compaction: not damaged
        except (pa.ArrowException, OSError) as exc:
            return not_parquet(to_uri(destination.fs, path), exc)
    return None


def read_index(destination: Location, revision: str) -> pa.Table:
    """(image_uri, fingerprint, threshold, exif) of every row DEST already holds for this model revision.

    A file can vanish between listing and reading: a concurrent `oncoflow compact` merged it, and the
    merged file was written before its inputs were deleted, so a listing taken after the vanishing
    holds its rows. The read then goes on file by file: it re-lists and reads the files it has not read
    yet, until a pass sees nothing vanish. Each pass reads only new files, so a compaction in progress
    (however long, on however many partitions) slows the read down but never fails it. A row read
    twice (from an input and its merged file) is kept once.
    """
    try:
        return storage_call(destination.fs, destination.path, lambda: _read_index(destination, revision))
    except FileNotFoundError:
        return _read_index_around_compaction(destination, revision)
    except pa.ArrowInvalid as exc:  # a damaged or foreign file: name it, and what to do
        raise (find_unreadable_file(destination) or exc) from exc


def _read_index_around_compaction(destination: Location, revision: str) -> pa.Table:
    done: set[str] = set()
    tables = [_empty_index()]
    for _ in range(INDEX_PASSES):
        listed = storage_call(destination.fs, destination.path, lambda: dataset_files(destination))
        todo = [path for path in listed if path not in done]
        done.update(todo)
        with ThreadPoolExecutor(max_workers=INDEX_READERS) as pool:
            read = list(pool.map(lambda path: _read_index_file(destination, revision, path), todo))
        tables += [table for table in read if table is not None]
        if all(table is not None for table in read):
            index = pa.concat_tables(tables)
            return index.group_by(index.column_names, use_threads=False).aggregate([])
    raise RuntimeError(
        f"the index of {destination.uri} kept changing over {INDEX_PASSES} reads (files merged by "
        "`oncoflow compact` vanish as they are read); run classify again once the compaction is done"
    )


def _read_index_file(destination: Location, revision: str, path: str) -> pa.Table | None:
    """One dataset file's index rows; None if it vanished (merged by a concurrent compaction)."""
    try:
        return storage_call(destination.fs, path, lambda: _read_index(destination, revision, [path]))
    except FileNotFoundError:
        return None


PARTITION_FILE = re.compile(r"model_slug=[^/]+/date=([^/]+)/[^./][^/]*\.parquet")
DATASET_GLOB = "model_slug=*/date=*/*.parquet"  # the same files, for DuckDB and other readers


def top_level_entries(destination: Location) -> tuple[int, int]:
    """(partition folders, other entries) at DEST's top level, classify's own (`_leases`, hidden files)
    not counted: one listing; (0, 0) when DEST is missing or cannot be listed here."""
    try:
        names = storage_call(
            destination.fs, destination.path, lambda: destination.fs.ls(destination.path, detail=False)
        )
    except (OSError, ValueError):
        return 0, 0
    names = [posixpath.basename(str(name).rstrip("/")) for name in names]
    partitions = sum(name.startswith("model_slug=") for name in names)
    return partitions, sum(not name.startswith(("_", ".", "model_slug=")) for name in names)


def dataset_files(destination: Location) -> list[str]:
    """The dataset's Parquet files: `model_slug=…/date=…/*.parquet`, no hidden temporaries, sorted.

    Only these are read, so a stray file in DEST (a report or an export saved there) cannot break a run.
    A DEST that does not exist has no files.
    """
    root = destination.path.rstrip("/")
    if not destination.fs.exists(root):
        return []
    paths = (path for path in destination.fs.find(root) if path.startswith(root + "/"))
    files = []
    for path in paths:
        if match := PARTITION_FILE.fullmatch(path[len(root) + 1 :]):
            check_partition_date(destination, path, match.group(1))
            files.append(path)
    return sorted(files)


def check_partition_date(destination: Location, path: str, value: str) -> None:
    """DatasetFileError for a `date=` folder whose value is no YYYY-MM-DD date (a copied or renamed
    partition, `date=2026-11-29 (copy)`): every reader would fail on it, naming neither it nor the fix."""
    try:
        valid = bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value) and datetime.strptime(value, "%Y-%m-%d"))
    except ValueError:
        valid = False
    if not valid:
        folder = to_uri(destination.fs, path.rsplit("/", 1)[0])
        raise DatasetFileError(
            f"{folder} is not a partition oncoflow writes: date={value!r} is not a YYYY-MM-DD date (a copied "
            "or renamed folder?); move it out of DEST (look inside first: it may hold rows), then run again"
        )


PARTITIONS = pa.schema([("model_slug", pa.string()), ("date", pa.date32())])
PARTITIONING = ds.partitioning(PARTITIONS, flavor="hive")
DATASET_SCHEMA = pa.unify_schemas([SCHEMA, PARTITIONS])  # a row as readers see it: the file's + the folders'


def open_dataset(
    destination: Location, files: list[str] | None = None, schema: pa.Schema | None = None
) -> ds.Dataset | None:
    """The dataset at `destination` over its partition files only (dataset_files, unless `files` are
    given); None when it has none.

    `model_slug` and `date` come from the two folders below DEST only (partition_base_dir), never from
    `key=value` folders above it. With `schema` (DATASET_SCHEMA), every file is read as that schema: a
    column an older file lacks is null, and `date` is a date; without it, the first file's."""
    files = dataset_files(destination) if files is None else files
    if not files:
        return None
    return ds.dataset(
        files,
        schema=schema,
        filesystem=destination.fs,
        format="parquet",
        partitioning="hive" if schema is None else PARTITIONING,
        partition_base_dir=destination.path.rstrip("/"),
        exclude_invalid_files=False,
    )


EXIF_SUFFIX = "+exif_orientation"  # ends a row's decoder when --exif-orientation rotated its pixels


def _empty_index() -> pa.Table:
    columns = {name: pa.array([], pa.string()) for name in INDEX_COLUMNS}
    return pa.table(
        {
            **columns,
            "threshold": pa.array([], pa.float64()),
            "exif": pa.array([], pa.bool_()),
            "processed_at": pa.array([], SCHEMA.field("processed_at").type),
            "run_id": pa.array([], pa.string()),
            "error_category": pa.array([], pa.string()),
        }
    )


def _read_index(destination: Location, revision: str, files: list[str] | None = None) -> pa.Table:
    """The index rows of `files` (default: every dataset file) for this model revision. `exif`: whether
    the row's pixels were made with --exif-orientation (null for error rows and rows of files written
    before the decoder column existed)."""
    empty = _empty_index()
    dataset = open_dataset(destination, files, DATASET_SCHEMA)
    if dataset is None:
        return empty
    columns = {name: pc.field(name) for name in [*INDEX_COLUMNS, "threshold"]}
    columns["exif"] = pc.ends_with(pc.field("decoder"), pattern=EXIF_SUFFIX)
    columns.update(processed_at=pc.field("processed_at"), run_id=pc.field("run_id"), error=pc.field("error"))
    table = dataset.to_table(columns=columns, filter=pc.field("model_revision") == revision)
    # "category: message" → category (null for ok rows): all that --retry-errors needs of the text
    category = pc.struct_field(pc.extract_regex(table.column("error"), pattern=r"^(?P<c>[a-z_]+):"), [0])
    table = table.drop_columns(["error"]).append_column("error_category", category)
    return table.cast(empty.schema)


def rows_with_other_exif(index: pa.Table, exif_orientation: bool) -> int:
    """Rows of the index whose pixels were made with the other --exif-orientation setting. Like
    --threshold, the option applies to new and changed images only: these keep theirs."""
    return pc.sum(pc.equal(index.column("exif"), not exif_orientation)).as_py() or 0


def earlier_thresholds(index: pa.Table, threshold: float) -> dict[float, int]:
    """Rows of the index decided at a threshold other than `threshold`, counted per threshold (error
    rows have none). A new --threshold applies to new and changed images only: these keep theirs."""
    counts = pc.value_counts(index.column("threshold").drop_null()).to_pylist()
    return {c["values"]: c["counts"] for c in counts if c["values"] != threshold}


def newest_fingerprints(index: pa.Table, retry_errors: Collection[str] = ()) -> pa.Table:
    """(image_uri, fingerprint, retry) of each image's newest row in the index: latest processed_at, then
    run_id, the order the `latest` view and evaluate read rows in. `retry`: that row is an error of a
    category in `retry_errors`."""
    ordered = index.sort_by([("processed_at", "ascending"), ("run_id", "ascending")])
    aggregations: list[tuple] = [("fingerprint", "last")]
    if retry_errors:  # the newest row's category, null for an ok row (by default "last" skips nulls)
        aggregations.append(("error_category", "last", pc.ScalarAggregateOptions(skip_nulls=False)))
    newest = ordered.group_by("image_uri", use_threads=False).aggregate(aggregations)
    if retry_errors:
        categories = pa.array(sorted(retry_errors), pa.string())
        retry = pc.fill_null(pc.is_in(newest.column("error_category_last"), categories), False)
    else:
        retry = pa.array([False] * newest.num_rows, pa.bool_())
    return pa.table(
        {
            "image_uri": newest.column("image_uri"),
            "fingerprint": newest.column("fingerprint_last"),
            "retry": retry,
        }
    )


def select_new(
    files: Iterable[DiscoveredFile], index: pa.Table, retry_errors: Collection[str] = ()
) -> list[DiscoveredFile]:
    """The files whose fingerprint is not that of their newest row in the index, in their original order.

    Not "any row": a file put back to a version classified before (a restore from backup, `cp -p`, the
    same bytes uploaded again: same ETag) is classified again, or `latest` would keep showing the
    prediction of the version it replaced. With `retry_errors` (error categories), a file whose newest
    row is an error of one of them is classified again too (a decoder installed, access granted)."""
    return select_files(files, index, retry_errors).files


IMAGE_NAME = "(" + "|".join(re.escape(extension) for extension in sorted(IMAGE_EXTENSIONS)) + ")$"


def known_uris(index: pa.Table) -> Callable[[str], bool]:
    """Whether the index has a row for a URI named without an image extension (those the listing would
    open to look for DICOM). Built on the first question (a listing without such files asks none): the
    hashes of such URIs, sorted, 8 bytes each; two URIs of one hash (odds of 1 in 10^7 for a million of
    each) would list a file that is no image as one, giving an error row, never a lost image."""
    hashes: np.ndarray | None = None

    def known(uri: str) -> bool:
        nonlocal hashes
        if hashes is None:
            named = pc.match_substring_regex(index.column("image_uri"), IMAGE_NAME, ignore_case=True)
            uris = index.column("image_uri").filter(pc.invert(named)).to_pylist()
            hashes = np.unique(np.fromiter(map(hash, uris), np.int64, len(uris)))
        position = int(np.searchsorted(hashes, hash(uri)))
        return position < len(hashes) and int(hashes[position]) == hash(uri)

    return known


class Selection(NamedTuple):
    """What a run classifies: `files` (select_new's), of which `retried` are there only through
    `retry_errors` and `changed` have rows of an earlier version (another size, mtime or ETag)."""

    files: list[DiscoveredFile]
    retried: int
    changed: int


def select_files(
    files: Iterable[DiscoveredFile], index: pa.Table, retry_errors: Collection[str] = ()
) -> Selection:
    """select_new's files, and how many of them are retried or changed: one diff."""
    files = list(files)
    if not files or index.num_rows == 0:
        return Selection(files, 0, 0)
    listed = pa.table(
        {
            "image_uri": [f.uri for f in files],
            "fingerprint": [f.fingerprint for f in files],
            "position": pa.array(range(len(files)), pa.int64()),
        }
    )
    newest = newest_fingerprints(index, retry_errors)
    unchanged = listed.join(newest, keys=INDEX_COLUMNS, join_type="inner")
    kept = unchanged.filter(pc.invert(unchanged.column("retry")))  # classified already, and no retry
    skipped = pc.is_in(listed.column("position"), value_set=kept.column("position").combine_chunks())
    positions = pc.indices_nonzero(pc.invert(skipped)).to_pylist()
    known = pc.sum(pc.is_in(listed.column("image_uri"), value_set=newest.column("image_uri"))).as_py() or 0
    return Selection(
        [files[i] for i in positions], unchanged.num_rows - kept.num_rows, known - unchanged.num_rows
    )
