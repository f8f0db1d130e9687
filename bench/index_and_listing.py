"""Figures behind docs/scaling.md: local listing speed and the incremental index's cost.

PYTHONPATH=. python bench/index_and_listing.py --files 20000 --rows 1000000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.sink import SCHEMA, known_uris, read_index
from tasks.storage import list_images, open_location


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--rows", type=int, default=1_000_000)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="oncoflow-index-")
    for n in range(args.files):
        folder = os.path.join(work, "scans", f"site-{n % 10}", f"day-{n % 30:02d}")
        os.makedirs(folder, exist_ok=True)
        open(os.path.join(folder, f"scan_{n:08d}.jpg"), "wb").close()
    started = time.perf_counter()
    listed = sum(1 for _ in list_images(open_location(os.path.join(work, "scans"))))
    seconds = time.perf_counter() - started
    print(f"listing: {listed} local files in {seconds:.2f} s = {listed / seconds:,.0f} files/s")

    n = args.rows
    uris = pa.array([f"s3://archive/site-{i % 10}/2026/03/{i % 30:02d}/scan_{i:010d}.jpg" for i in range(n)])
    table = pa.table({name: pa.nulls(n, SCHEMA.field(name).type) for name in SCHEMA.names}).set_column(
        0, "image_uri", uris
    )
    table = table.set_column(1, "fingerprint", pa.array([f"{i:032x}:{100_000 + i % 999}" for i in range(n)]))
    table = table.set_column(SCHEMA.names.index("model_revision"), "model_revision", pa.array(["rev"] * n))
    out = os.path.join(work, "out", "model_slug=m-rev", "date=2026-03-01")
    os.makedirs(out)
    pq.write_table(table, os.path.join(out, "part-x.parquet"), compression="zstd")
    started = time.perf_counter()
    index = read_index(open_location(os.path.join(work, "out")), "rev")
    seconds = time.perf_counter() - started
    print(
        f"read_index: {index.num_rows:,} rows in {seconds:.2f} s, {index.nbytes / n:.0f} bytes/row in memory"
    )
    started = time.perf_counter()
    known = known_uris(index)
    known("s3://archive/not-there")  # the lookup is built on the first question
    seconds = time.perf_counter() - started
    print(f"known_uris: lookup over {n:,} rows (all named .jpg: none kept) built in {seconds:.2f} s")
    dicom_listing(work, args.files)


def dicom_listing(work: str, files: int) -> None:
    """A CD-export-like archive of DICOM files without extension: listed once opening each file (a first
    run), then with the output's rows known (every later night)."""
    header = b"\0" * 128 + b"DICM"
    root = os.path.join(work, "dicom")
    for n in range(files):
        folder = os.path.join(root, f"PA{n % 10}", f"ST{n % 30:02d}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"IM{n:06d}"), "wb") as handle:
            handle.write(header)
    location = open_location(root)
    started = time.perf_counter()
    uris = [file.uri for file in list_images(location)]
    opened = time.perf_counter() - started
    known = known_uris(pa.table({"image_uri": uris}))
    started = time.perf_counter()
    again = sum(1 for _ in list_images(location, known=known))
    skipped = time.perf_counter() - started
    print(
        f"DICOM without extension: {len(uris)} files listed in {opened:.2f} s opening each, {again} in "
        f"{skipped:.2f} s with the output's rows known (lookup built included)"
    )


if __name__ == "__main__":
    main()
