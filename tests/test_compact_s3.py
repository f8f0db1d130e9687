"""Compaction on an object store: the real S3 API (the session's moto server), through s3fs."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import boto3
import pyarrow.dataset as ds
import pytest
import requests
import s3fs
from typer.testing import CliRunner

from flows.cli import app
from tasks.analytics import connect, fetched_files, listed_files, retry_while_compacting
from tasks.storage import open_location
from tests.analytics_data import make_dataset
from tests.s3_fixtures import FaultyProxy, free_port, upload_folder

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


def test_compact_on_s3_names_the_endpoint_or_permission_problem_before_any_work(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    """A wrong endpoint, and credentials that may read but not write: one line naming DEST and the
    fix, exit 1, no traceback, no file touched."""
    from prefect_aws import AwsCredentials

    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/dest")
    before = sorted(s3.find("preds/dest"))
    wrong = f"http://127.0.0.1:{free_port()}"
    unreachable = CliRunner().invoke(app, ["compact", "s3://preds/dest", "--s3-endpoint-url", wrong])
    text = " ".join(unreachable.output.split())
    assert unreachable.exit_code == 1 and f"cannot connect to the S3 endpoint {wrong}" in text, text
    assert "Traceback" not in unreachable.output

    iam = boto3.client("iam", endpoint_url=s3_server, region_name="us-east-1")
    user = f"reader-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    read_only = {"Effect": "Allow", "Action": ["s3:ListBucket", "s3:GetObject"], "Resource": "*"}
    policy = json.dumps({"Version": "2012-10-17", "Statement": [read_only]})
    iam.put_user_policy(UserName=user, PolicyName="read-only", PolicyDocument=policy)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    AwsCredentials(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]).save(
        user
    )
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        denied = CliRunner().invoke(app, ["compact", "s3://preds/dest", "--aws-credentials-block", user])
    finally:
        requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    text = " ".join(denied.output.split())
    assert denied.exit_code == 1 and "access denied to s3://preds/dest" in text, text
    assert "s3:PutObject" in text and "Traceback" not in denied.output
    s3.invalidate_cache()
    assert sorted(s3.find("preds/dest")) == before


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


def test_latest_and_report_write_their_file_to_s3(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    """An s3:// --output is an object in the bucket, not a local `./s3:/...` file; a bucket that
    does not exist fails naming it, and writes nothing locally either."""
    make_dataset(tmp_path / "dest")
    runner = CliRunner()
    local = tmp_path / "local.csv"
    assert runner.invoke(app, ["latest", str(tmp_path / "dest"), "-o", str(local)]).exit_code == 0
    s3.mkdir("exports")
    for command, key in (("latest", "exports/nightly/latest.csv"), ("report", "exports/nightly/r.html")):
        result = runner.invoke(
            app, [command, str(tmp_path / "dest"), "-o", f"S3://{key}"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
    s3.invalidate_cache()
    assert s3.cat_file("exports/nightly/latest.csv") == local.read_bytes()
    assert b"For research, not diagnosis" in s3.cat_file("exports/nightly/r.html")
    assert sorted(s3.ls("exports/nightly")) == ["exports/nightly/latest.csv", "exports/nightly/r.html"]

    result = runner.invoke(app, ["latest", str(tmp_path / "dest"), "-o", "s3://no-such-bucket/l.csv"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "s3://no-such-bucket/l.csv" in text, text
    result = runner.invoke(app, ["report", str(tmp_path / "dest"), "-o", "s3:///r.html"])
    assert result.exit_code == 2 and "names no bucket" in result.output
    assert not Path("s3:").exists()


def test_analytics_on_a_missing_s3_dataset_names_it(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    s3.mkdir("empty-bucket")
    result = CliRunner().invoke(app, ["latest", "s3://empty-bucket/nothing", "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 1
    assert "no Parquet files under 's3://empty-bucket/nothing'" in " ".join(result.output.split())


def test_latest_on_s3_reads_each_file_with_one_request(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    """The listing, then one GET per file, whatever the queries: DuckDB's own fsspec reading sent
    about 44 requests per file for the same connect + query."""
    make_dataset(tmp_path / "dest", shard_rows=5)
    files = len(upload_folder(s3, tmp_path / "dest", "preds/dest"))
    with FaultyProxy(s3_server, every=10**9) as counter:
        connection = connect("s3://preds/dest", {"endpoint_url": counter.url})
        assert connection.sql("select count(*) from latest").fetchall() == [(100,)]
        assert connection.sql("select count(*) from predictions").fetchall() == [(140,)]
        requests = next(counter._count) - 1
    assert files == 28 and requests <= files + 3, requests


def test_a_file_merged_away_before_it_is_fetched_is_read_again(s3: s3fs.S3FileSystem, tmp_path: Path) -> None:
    """A compaction writes the merged file, then deletes its inputs; a reader that listed an input
    before it went fails to fetch it, lists again and reruns."""
    make_dataset(tmp_path / "dest")
    upload_folder(s3, tmp_path / "dest", "preds/dest")
    location = open_location("s3://preds/dest")
    attempts: list[str] = []

    def read() -> int:
        files = listed_files(location)
        if not attempts:
            victim = files[2]
            s3.pipe_file(victim.replace("/part-", "/part-merged-"), s3.cat_file(victim))
            s3.rm(victim)
        attempts.append("attempt")
        dataset = fetched_files(location, files)
        return int(dataset.count_rows())

    assert retry_while_compacting(read) == 140 and len(attempts) == 2


def test_a_foreign_file_in_an_s3_dataset_is_named_at_once(
    s3: s3fs.S3FileSystem, s3_server: str, tmp_path: Path
) -> None:
    """Scanned from memory, a damaged file would be an anonymous buffer: the readers name it, and do
    not take it for a file merged away by a compaction (no retries)."""
    make_dataset(tmp_path / "dest")
    keys = upload_folder(s3, tmp_path / "dest", "preds/dest")
    s3.pipe_file(keys[3], b"garbage" * 50)
    result = CliRunner().invoke(app, ["latest", "s3://preds/dest", "-o", str(tmp_path / "l.csv")])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and f"s3://{keys[3]} is not a readable Parquet file" in text, text
