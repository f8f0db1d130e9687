"""The output dataset as analysts read it: DuckDB views `predictions`, `revisions` and `latest`.

- `predictions`: every row once. A row's identity is (image_uri, fingerprint, model_revision): the
  incremental index never classifies a key twice, and a key can sit in two files only for the moment
  between a compaction's write and its deletions (tasks/compact.py), or when a shard task was retried
  after its file was compacted. The view keeps one of the copies, which hold the same prediction.
- `revisions`: each model_revision with `first_seen`, the earliest processed_at of its rows, and `model`
  as its first row spelled it. A revision is its weights and configs (tasks.model_files.weights_revision, or
  the hub commit), whatever path or name loaded it: `/models/A`, `/models/A/` and `./A` are one
  revision, and re-running it under another spelling does not make it newest again.
- `latest`: one row per image_uri: the row of the revision first seen most recently that has a row for
  that image, and within that revision the newest row (max processed_at, i.e. the newest content
  version). Error rows count: if the newest revision could not read an image, `latest` says so
  (filter `status = 'ok'` for predictions). Images a new revision has not reached yet keep the older
  revision's row, so `latest` is complete while a reprocess is half way.

The views read `prediction_files`: the dataset's listed files as one pyarrow dataset (fetched_files),
registered with DuckDB. `model_slug` and `date` come from each file's two folders below DEST, never
from `key=value` folders above it (`s3://lake/project=onco/preds`, `.../status=x/...`), which
DuckDB's own hive partitioning would turn into columns overwriting the rows' values. Reading through
pyarrow rather than DuckDB's `read_parquet`:
- on S3 each file is fetched once, one GET, whatever the queries; DuckDB's fsspec bridge, given the
  listed files, sent about 44 requests per file for `connect` + one `latest` query
  (bench/analytics_read.py on the moto server, 28 files: 1,235 requests and 7.8 s before, 31 and
  0.6 s now). Locally the pyarrow path is slower than DuckDB's reader was (1M rows in 200 files:
  0.83 s against 0.62 s), a cost paid for one reader on both stores;
- the listed paths are used as they are: DuckDB globs every entry of a `read_parquet` list, so a DEST
  named with `?`, `*`, `[` or `\\` had to be escaped, and on S3 an escaped pattern was listed again
  from above its first `[`.
docs/analytics.md gives the same views over `read_parquet` for your own DuckDB session.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.sink import (
    DATASET_SCHEMA,
    PARTITIONING,
    dataset_files,
    not_parquet,
    open_dataset,
    top_level_entries,
)
from tasks.storage import (
    Location,
    fetch_whole,
    missing_bucket,
    open_location,
    staged_file,
    storage_call,
    to_uri,
)

T = TypeVar("T")

VIEWS_SQL = """\
create or replace view predictions as
select *
from prediction_files
qualify row_number() over (
    partition by image_uri, fingerprint, model_revision
    order by processed_at desc, run_id desc
) = 1;

create or replace view revisions as
select arg_min(model, processed_at) as model, model_revision, min(processed_at) as first_seen,
       count(*) as row_count
from predictions
group by model_revision;

create or replace view latest as
with current_content as (
    select image_uri, fingerprint
    from predictions
    qualify row_number() over (partition by image_uri order by processed_at desc, run_id desc) = 1
)
select p.*
from predictions p
join current_content c using (image_uri, fingerprint)
join revisions r using (model_revision)
qualify row_number() over (
    partition by p.image_uri
    order by r.first_seen desc, p.processed_at desc, p.model_revision desc
) = 1;
"""

VANISHED_FILE = re.compile(
    # not a bare "not found": "Parquet magic bytes not found" is a corrupt file, not a compaction
    r"no such file|no files found|filenotfounderror|nosuchkey|file not found",
    re.IGNORECASE,
)
FETCHERS = 16  # object-store files fetched at once by the analytics readers
READ_ATTEMPTS = 10  # whole-query attempts of the analytics readers while a compaction deletes files


def retry_while_compacting(read: Callable[[], T]) -> T:
    """`read()` (a query over the dataset's files), run again when a file it listed vanished under it.

    A concurrent `oncoflow compact` deletes the files it merged, after writing the merged file; the
    next attempt lists the merged file instead. Used by `latest`, `report` and `evaluate`, whose
    queries read every file: during a compaction about one query in four hits a deleted file
    (measured locally with a compaction every second)."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            return read()
        except (FileNotFoundError, duckdb.IOException, duckdb.InvalidInputException) as exc:
            # InvalidInputException: the pyarrow scan of `prediction_files` failed (its message says why)
            if isinstance(exc, NoDatasetFiles):
                raise
            vanished = isinstance(exc, FileNotFoundError) or VANISHED_FILE.search(str(exc))
            if not vanished or attempt == READ_ATTEMPTS:
                raise
            time.sleep(min(2.0, 0.1 * attempt))
    raise AssertionError("unreachable")


EXPORT_FORMATS = {".parquet": "(format parquet, compression zstd)", ".csv": "(format csv, header true)"}


class NoDatasetFiles(FileNotFoundError):
    """DEST holds no dataset file at all: a wrong path, not a compaction under way (never retried)."""


def prediction_files(location: Location) -> ds.Dataset:
    """Every visible Parquet file of the dataset as one pyarrow dataset of DATASET_SCHEMA: the row
    columns (null where an older file lacks one), then `model_slug` and `date`."""
    return fetched_files(location, listed_files(location))


def listed_files(location: Location) -> list[str]:
    """The dataset's files (tasks.sink.dataset_files); NoDatasetFiles when there are none."""
    try:
        files = storage_call(location.fs, location.path, lambda: dataset_files(location))
    except FileNotFoundError:
        files = []
    if not files:
        if bucket := missing_bucket(location):
            raise NoDatasetFiles(bucket)
        if top_level_entries(location)[1]:
            raise NoDatasetFiles(
                f"no Parquet files under {location.shown!r}, only other files: it is no classify output (the "
                "image SOURCE given by mistake?); give the --output folder of `oncoflow classify`"
            )
        check = "" if location.is_local else ", or check --s3-endpoint-url and the credentials"
        raise NoDatasetFiles(
            f"no Parquet files under {location.shown!r}; run `oncoflow classify SOURCE --output "
            f"{shlex.quote(location.shown)}` first{check}"
        )
    return files


def fetched_files(location: Location, files: list[str]) -> ds.Dataset:
    """`files` as a pyarrow dataset that arrow scans without calling back into Python.

    Local files are read by pyarrow's own filesystem. Files on an object store are fetched whole here
    (one GET each, FETCHERS at a time; a file that vanished raises FileNotFoundError, for
    retry_while_compacting) and scanned from memory: the process holds the dataset's compressed size.
    pyarrow scanning through an fsspec filesystem calls Python from its own threads, and when a file
    had vanished that error path deadlocked with DuckDB, which starts a scan holding the GIL (seen
    with pyarrow 26 and duckdb 2.0 in the S3 compaction test)."""
    if location.is_local:
        dataset = open_dataset(location, files, schema=DATASET_SCHEMA)
        assert dataset is not None
        return dataset
    root = location.path.rstrip("/") + "/"
    with ThreadPoolExecutor(max_workers=FETCHERS) as pool:
        contents = list(pool.map(lambda path: fetch_whole(location.fs, path), files))
    for path, data in zip(files, contents, strict=True):  # scanned from memory, an error names no file
        try:
            pq.read_metadata(pa.BufferReader(data))
        except pa.ArrowException as exc:
            raise not_parquet(to_uri(location.fs, path), exc) from exc
    parquet = ds.ParquetFileFormat()
    fragments = [
        parquet.make_fragment(
            pa.BufferReader(pa.py_buffer(data)),
            partition_expression=PARTITIONING.parse(os.path.dirname(path[len(root) :]) + "/"),
        )
        for path, data in zip(files, contents, strict=True)
    ]
    return ds.FileSystemDataset(fragments, DATASET_SCHEMA, parquet)


def connect(destination: str, storage: dict[str, Any] | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the `predictions`, `revisions` and `latest` views over DEST.

    The dataset's files are listed once, here: files a later classify run adds are not in the views of
    this connection. Local files are read by pyarrow's own filesystem; on S3 they are fetched here,
    through the same fsspec filesystem (endpoint, credentials block) the flows use, and held in memory
    (their compressed size) for the connection's life: no httpfs extension (a download) is needed.
    """
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    connection.register("prediction_files", prediction_files(open_location(destination, storage or {})))
    for statement in VIEWS_SQL.split(";"):
        if statement.strip():
            connection.execute(statement)
    return connection


def export_latest(destination: str, output: str, storage: dict[str, Any] | None = None) -> int:
    """Write the `latest` view to OUTPUT (.parquet or .csv; a local file or an s3:// key, written
    whole or not at all); return the row count."""
    extension = os.path.splitext(output)[1].lower()
    if extension not in EXPORT_FORMATS:
        raise ValueError(f"--output {output!r} must end in .parquet or .csv")
    with staged_file(output, storage) as staged:

        def export() -> int:  # one pass over the dataset's files; the count comes from the copy itself
            written = connect(destination, storage).execute(
                f"copy (select * from latest order by image_uri) to '{staged.replace(chr(39), chr(39) * 2)}' "
                + EXPORT_FORMATS[extension]
            )
            rows: int = written.fetchall()[0][0]
            return rows

        return retry_while_compacting(export)
