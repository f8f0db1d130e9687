"""Compaction on an object store: a real S3 API (moto's server on 127.0.0.1), through s3fs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from tasks.compact import compact
from tasks.storage import Location, open_location
from tests.analytics_data import make_dataset

pytestmark = pytest.mark.s3


@pytest.fixture
def s3_bucket() -> Iterator[Location]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    options = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
    }
    location = open_location("s3://predictions/dest", options)
    location.fs.mkdir("predictions")
    try:
        yield location
    finally:
        server.stop()


def test_compaction_on_s3_keeps_every_row_once(s3_bucket: Location, tmp_path: Path) -> None:
    make_dataset(tmp_path / "dest")
    s3_bucket.fs.put(str(tmp_path / "dest") + "/", s3_bucket.path + "/", recursive=True)

    def rows() -> list[tuple]:
        dataset = ds.dataset(s3_bucket.path, filesystem=s3_bucket.fs, format="parquet", partitioning="hive")
        return sorted(tuple(map(str, row.values())) for row in dataset.to_table().to_pylist())

    before = rows()
    report = compact(s3_bucket, target_rows=1000)
    assert report.files_merged == 7 and report.files_written == 3
    assert rows() == before and len(before) == 140
    assert len([p for p in s3_bucket.fs.find(s3_bucket.path) if p.endswith(".parquet")]) == 3
