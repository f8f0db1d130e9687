"""Compaction on an object store: the real S3 API (the session's moto server), through s3fs."""

from __future__ import annotations

from pathlib import Path

import pyarrow.dataset as ds
import pytest
import s3fs
from typer.testing import CliRunner

from flows.cli import app
from tests.analytics_data import make_dataset
from tests.s3_fixtures import upload_folder

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
