"""Flows over the output dataset: compaction (schedule it after the nightly classify run) and erasing
the rows of given images (`oncoflow erase`, tasks/erase.py).

`oncoflow latest` and `oncoflow report` read the dataset without Prefect; see docs/analytics.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from prefect import flow
from prefect.runtime import flow_run

from flows.credentials import storage_options
from flows.history import mark_crashed
from flows.logs import send_logs_to_prefect
from flows.params import EraseParams, flow_params
from tasks.compact import compact
from tasks.defaults import TARGET_ROWS
from tasks.erase import describe, erase, source_selection
from tasks.erase_list import read_erase_list
from tasks.lease import is_flow_run_id
from tasks.storage import check_source, open_location

logger = logging.getLogger(__name__)
send_logs_to_prefect()  # warnings (a lease wait, a skipped file) reach the run logs in the UI


def mark_superseded(dead: str, run_id: str) -> None:
    """Mark the run (a compaction or an erase) that died holding the compaction lease as Crashed."""
    if is_flow_run_id(dead):
        reason = f"process died holding the compaction lease; superseded by run {run_id}"
        if mark_crashed(dead, reason)[0]:
            logger.warning(
                "marked run %s, which died holding the compaction lease (a compaction or an erase), as "
                "Crashed: it died without reporting",
                dead,
            )


@flow(name="compact", log_prints=True)
def compact_dataset(
    dest: str,
    target_rows: int = TARGET_ROWS,
    s3_endpoint_url: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict[str, Any]:
    """Merge each partition's small Parquet files into files of up to `target_rows` rows."""
    run_id = str(flow_run.get_id() or "")
    report = compact(
        open_location(dest, storage_options(aws_credentials_block, s3_endpoint_url)),
        target_rows,
        run_id=run_id,
    )
    mark_superseded(report.superseded_run, run_id)
    print(
        f"compacted {report.files_merged} files into {report.files_written} "
        f"({report.rows_merged} rows) across {report.partitions} partitions"
    )
    return asdict(report)


@flow(name="erase", log_prints=True)
def erase_rows(
    dest: str,
    uris: str | None = None,
    missing_from: str | None = None,
    apply: bool = False,
    s3_endpoint_url: str | None = None,
    aws_credentials_block: str | None = None,
) -> dict[str, Any]:
    """Erase every row of the images an erase list (`uris`, a local file) names, or of those under
    `missing_from` that it no longer holds; with `apply=False` only count them. The run's parameters and
    logs name the list's file and the counts, never the images."""
    params = flow_params(EraseParams, **locals())
    options = storage_options(aws_credentials_block, s3_endpoint_url)
    if params.uris is not None:
        selection = read_erase_list(params.uris)
    else:
        source = open_location(str(params.missing_from), options)
        check_source(source)  # an unmounted share or a mistyped prefix would hold no image: all rows go
        selection = source_selection(source)
    run_id = str(flow_run.get_id() or "")
    report = erase(open_location(params.dest, options), selection, apply=apply, run_id=run_id)
    mark_superseded(report.superseded_run, run_id)
    print(describe(report))
    return asdict(report)
