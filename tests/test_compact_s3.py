"""Compaction on an object store: the real S3 API (the session's moto server), through s3fs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
import s3fs
from typer.testing import CliRunner

from flows.cli import app
from tasks.analytics import connect, retry_while_compacting
from tests.analytics_data import make_dataset
from tests.s3_fixtures import FaultyProxy, upload_folder

pytestmark = pytest.mark.s3


def test_compact_command_on_s3_keeps_every_row_once(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/dest")

    def rows() -> list[tuple]:
        dataset = ds.dataset("preds/dest", filesystem=s3, format="parquet", partitioning="hive")
        return sorted(tuple(map(str, row.values())) for row in dataset.to_table().to_pylist())

    before = rows()
    result = CliRunner().invoke(app, ["compact", "s3://preds/dest", "--target-rows", "1000"])
    assert result.exit_code == 0, result.output
    assert "merged 7 files into 3" in result.output
    s3.invalidate_cache()
    assert rows() == before and len(before) == 140
    assert len([p for p in s3.find("preds/dest") if p.endswith(".parquet")]) == 3


def test_latest_and_report_read_a_dataset_on_s3_through_the_given_endpoint(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/site")
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only --s3-endpoint-url says where the server is
    runner = CliRunner()
    local = tmp_path / "local.csv"
    assert runner.invoke(app, ["latest", str(tmp_path / "dest"), "-o", str(local)]).exit_code == 0

    remote = tmp_path / "remote.csv"
    result = runner.invoke(
        app, ["latest", "s3://preds/site", "-o", str(remote), "--s3-endpoint-url", s3_server]
    )
    assert result.exit_code == 0, result.output
    assert "wrote 100 rows (one per image)" in result.output
    assert remote.read_text() == local.read_text()

    report = tmp_path / "report.html"
    result = runner.invoke(
        app, ["report", "s3://preds/site", "-o", str(report), "--s3-endpoint-url", s3_server]
    )
    assert result.exit_code == 0, result.output
    assert (
        "oncoflow report: site" in report.read_text() and "For research, not diagnosis" in report.read_text()
    )

    result = runner.invoke(
        app, ["compact", "s3://preds/site", "--target-rows", "1000", "--s3-endpoint-url", s3_server]
    )
    assert result.exit_code == 0 and "merged 7 files into 3" in result.output, result.output


def test_analytics_on_a_missing_s3_dataset_names_it(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    s3.mkdir("empty-bucket")
    result = CliRunner().invoke(app, ["latest", "s3://empty-bucket/nothing", "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert "no Parquet files under 's3://empty-bucket/nothing'" in " ".join(result.output.split())


def test_latest_on_s3_reads_each_file_with_a_few_requests(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    """Listing once, then about three requests per file and scan (HEAD, footer, data): DuckDB's own
    fsspec reading sent about 44 per file for the same connect + query."""
    make_dataset(tmp_path / "dest", shard_rows=5)
    files = len(upload_folder(s3, tmp_path / "dest", "preds/dest"))
    with FaultyProxy(s3_server, every=10**9) as counter:
        rows = connect("s3://preds/dest", {"endpoint_url": counter.url}).sql("select count(*) from latest")
        assert rows.fetchall() == [(100,)]
        requests = next(counter._count) - 1
    assert files == 28 and requests <= 8 * files, requests


def test_a_file_merged_away_during_a_query_on_s3_is_read_again(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    """A compaction writes the merged file, then deletes its inputs; a query that listed an input
    before it went fails on it, and the readers list again and rerun."""
    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/dest")
    attempts: list[str] = []

    def read() -> list[tuple]:
        connection = connect("s3://preds/dest")
        if not attempts:
            victim = sorted(p for p in s3.find("preds/dest") if p.endswith(".parquet"))[2]
            s3.pipe_file(victim.replace("/part-", "/part-merged-"), s3.cat_file(victim))
            s3.rm(victim)
        attempts.append("attempt")
        return connection.sql("select count(*), sum(row_count) from revisions").fetchall()

    assert retry_while_compacting(read) == [(2, 140)] and len(attempts) == 2
