"""What `oncoflow latest` / `report` cost to read DEST: time locally, requests and time on S3.

    PYTHONPATH=. .venv/bin/python bench/analytics_read.py --files 200 --rows-per-file 5000 --s3-files 28

Local: a dataset of FILES Parquet files (two model revisions, the real writer) is read three times
each way: through `tasks.analytics.connect` (the files as a pyarrow dataset, registered with DuckDB)
and through the documented `read_parquet` view of docs/analytics.md (DuckDB's own reader), each
running one query over `latest`. S3: S3_FILES small files on moto's S3 server (or --endpoint), read
through a counting HTTP proxy: the requests and time of `connect` + the same query. Compare against
DuckDB's fsspec bridge with `--s3-duckdb-bridge` (the documented view after `register_filesystem`).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import duckdb  # noqa: E402
import s3fs  # noqa: E402
from s3_listing import start_moto  # noqa: E402
from throughput import machine, publish  # noqa: E402

from tasks.analytics import connect  # noqa: E402
from tests.analytics_data import FIRST_DAY, NEW, OLD, rows, write  # noqa: E402
from tests.s3_fixtures import FaultyProxy  # noqa: E402

QUERY = "select count(*), sum(prob_malignant), max(processed_at) from latest"
DOCS = Path(__file__).resolve().parents[1] / "docs" / "analytics.md"


def make_files(dest: Path, files: int, rows_per_file: int) -> int:
    """FILES files over 5 days; the last 40% are a new revision reprocessing the first images."""
    old_files = max(1, int(files * 0.6))
    for number in range(files):
        revision = OLD if number < old_files else NEW
        start = (number % old_files) * rows_per_file
        day = FIRST_DAY + timedelta(days=number * 5 // files)
        table = rows(range(start, start + rows_per_file), revision, day, number, f"s{number:05d}")
        write(dest, table, revision, day, f"s{number:05d}")
    return files * rows_per_file


def documented(dest: str, bridge: s3fs.S3FileSystem | None = None) -> duckdb.DuckDBPyConnection:
    """The views as docs/analytics.md gives them for your own session (DuckDB's read_parquet)."""
    block = re.findall(r"^```sql\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)[0]
    connection = duckdb.connect()
    connection.execute("set TimeZone = 'UTC'")
    if bridge is not None:
        connection.register_filesystem(bridge)
    for statement in filter(str.strip, block.replace("DEST", dest).split(";")):
        connection.execute(statement)
    return connection


def timed(open_views: Any, repeats: int) -> tuple[float, Any]:
    best, answer = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        answer = open_views().execute(QUERY).fetchall()[0]
        best = min(best, time.perf_counter() - start)
    return best, answer


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rows-per-file", type=int, default=5000)
    parser.add_argument("--s3-files", type=int, default=28, help="0: no S3 part")
    parser.add_argument(
        "--s3-duckdb-bridge", action="store_true", help="also the documented view over fsspec"
    )
    parser.add_argument("--endpoint", help="an S3 endpoint instead of a local moto server")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as workdir:
        if args.files:
            dest = Path(workdir) / "dest"
            results["local rows"] = make_files(dest, args.files, args.rows_per_file)
            results["local files"] = args.files
            ours, answer = timed(lambda: connect(str(dest)), args.repeats)
            theirs, same = timed(lambda: documented(str(dest)), args.repeats)
            assert answer[0] == same[0] and abs(answer[1] - same[1]) < 1e-6, (answer, same)
            results["local latest via oncoflow connect, best s"] = round(ours, 3)
            results["local latest via read_parquet (docs view), best s"] = round(theirs, 3)
        if args.s3_files:
            endpoint = args.endpoint or start_moto()
            client = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            bucket = f"bench-{int(time.time())}"
            client.mkdir(bucket)
            local = Path(workdir) / "s3-dest"
            make_files(local, args.s3_files, 20)
            for path in local.rglob("*.parquet"):
                client.pipe_file(f"{bucket}/dest/{path.relative_to(local).as_posix()}", path.read_bytes())
            results["s3 files"] = args.s3_files
            ways: dict[str, Any] = {"oncoflow connect": None}
            if args.s3_duckdb_bridge:
                ways["duckdb fsspec bridge (docs view)"] = None
            for way in ways:
                with FaultyProxy(endpoint, every=10**9) as counter:
                    start = time.perf_counter()
                    if way == "oncoflow connect":
                        views = connect(f"s3://{bucket}/dest", {"endpoint_url": counter.url})
                    else:
                        bridge = s3fs.S3FileSystem(endpoint_url=counter.url, skip_instance_cache=True)
                        views = documented(f"s3://{bucket}/dest", bridge)
                    views.execute(QUERY).fetchall()
                    seconds = time.perf_counter() - start
                    requests = next(counter._count) - 1
                results[f"s3 {way}: requests (per file)"] = f"{requests} ({requests / args.s3_files:.1f})"
                results[f"s3 {way}: seconds"] = round(seconds, 2)
    publish(results, args.json)


if __name__ == "__main__":
    main()
