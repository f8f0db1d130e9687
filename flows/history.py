"""Run history through the Prefect client: recent runs, marking dead runs as crashed, pruning old runs.

Prefect keeps every flow run, task run, state, log and artifact until told otherwise; `oncoflow prune`
(or the server's own vacuum service, docs/operations.md) keeps the database small.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterEndTime,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.states import Crashed

SUMMARY_KEYS = ("classify-summary",)
FINAL_STATES = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]


@dataclass(frozen=True)
class RunRow:
    """One line of `oncoflow history`."""

    flow: str
    name: str
    state: str
    start: datetime | None
    seconds: float | None
    images: int | None
    errors: int | None
    run_id: str
    model: str | None = None  # the model parameter as given (train: its base model)


PAGE = 200  # the Prefect server's largest page (PREFECT_API_DEFAULT_LIMIT)


def recent_runs(limit: int = 20) -> list[RunRow]:
    """The latest `limit` flow runs, newest first, with image and error counts from their summary artifact."""
    runs: list[FlowRun] = []
    summaries: dict[str, dict[str, int]] = {}
    with get_client(sync_client=True) as client:
        while len(runs) < limit:  # in pages: the API returns at most PAGE runs (or artifacts) per call
            wanted = min(PAGE, limit - len(runs))
            page = client.read_flow_runs(  # started runs only: the nightly schedule's future runs are not history
                flow_run_filter=FlowRunFilter(start_time=FlowRunFilterStartTime(is_null_=False)),
                sort=FlowRunSort.START_TIME_DESC,
                limit=wanted,
                offset=len(runs),
            )
            runs += page
            summaries |= read_summaries(client, [run.id for run in page])
            if len(page) < wanted:
                break
        flows = {flow_id: client.read_flow(flow_id).name for flow_id in {run.flow_id for run in runs}}
        parents = parent_flows(client, runs, flows)
    return [
        RunRow(
            flow=flows[run.flow_id]
            + (f" (in {parents[run.id]})" if run.id in parents else "")
            + (" (dry run)" if run.parameters.get("dry_run") else "")
            + (" (plan)" if run.parameters.get("apply") is False else ""),
            name=run.name,
            state=run.state_name or "unknown",
            start=run.start_time,
            seconds=duration(run),
            images=summaries.get(str(run.id), {}).get("images_classified"),
            errors=summaries.get(str(run.id), {}).get("errors"),
            run_id=str(run.id),
            model=run_model(run.parameters),
        )
        for run in runs
    ]


def run_model(parameters: dict[str, Any]) -> str | None:
    """The model a run was given: `model` (train: `base_model`); none for `evaluate --predictions`,
    which scores rows already written (its `model` parameter is only the default, unused)."""
    if parameters.get("predictions"):
        return None
    return parameters.get("model") or parameters.get("base_model")


def parent_flows(client: Any, runs: list[FlowRun], flows: dict[Any, str]) -> dict[Any, str]:
    """run id → the flow a subflow run ran inside (`evaluate --data` classifies through the classify
    flow: its run is not a nightly one); runs that are not subflows are left out. `flows`: flow names
    known already, by flow id (filled in here)."""
    names: dict[Any, str] = {}
    for run in runs:
        if run.parent_task_run_id is None:
            continue
        try:
            parent_run = client.read_task_run(run.parent_task_run_id).flow_run_id
            if parent_run is None:  # run from a task outside any flow run
                names[run.id] = "another run"
                continue
            flow_id = client.read_flow_run(parent_run).flow_id
            if flow_id not in flows:
                flows[flow_id] = client.read_flow(flow_id).name
            names[run.id] = flows[flow_id]
        except ObjectNotFound:  # pruned meanwhile
            names[run.id] = "another run"
    return names


def duration(run: FlowRun) -> float | None:
    if run.start_time is None:
        return None
    if run.end_time is not None:
        return (run.end_time - run.start_time).total_seconds()
    return (datetime.now(UTC) - run.start_time).total_seconds()


def read_summaries(client: Any, run_ids: list[Any]) -> dict[str, dict[str, int]]:
    """run id → integer metrics of its summary table artifact (images_classified, errors, ...)."""
    if not run_ids:
        return {}
    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=run_ids), key=ArtifactFilterKey(any_=list(SUMMARY_KEYS))
        )
    )
    summaries: dict[str, dict[str, int]] = {}
    for artifact in artifacts:
        table = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
        metrics = {row["metric"]: row["value"] for row in table or [] if isinstance(row, dict)}
        summaries[str(artifact.flow_run_id)] = {
            key: int(value) for key, value in metrics.items() if str(value).isdigit()
        }
    return summaries


def mark_crashed(run_id: str, reason: str) -> tuple[bool, str | None]:
    """Set a run that is still PENDING or RUNNING to Crashed: (whether it was changed, the name of the
    state it was found in, None when this backend has no such run)."""
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)  # type: ignore[arg-type]
        except ObjectNotFound:
            return False, None
        if run.state is None or run.state.type not in (StateType.RUNNING, StateType.PENDING):
            return False, run.state_name
        client.set_flow_run_state(run_id, Crashed(message=reason), force=True)
        return True, run.state_name


def prune_runs(older_than: timedelta, dry_run: bool = False) -> int:
    """Delete finished flow runs that ended before now - older_than, with their task runs and artifacts."""
    cutoff = datetime.now(UTC) - older_than
    deleted = 0
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    end_time=FlowRunFilterEndTime(before_=cutoff),  # type: ignore[arg-type]  # pendulum alias
                    state=FlowRunFilterState(type=FlowRunFilterStateType(any_=FINAL_STATES)),
                ),
                limit=200,
                offset=deleted if dry_run else 0,
            )
            if not runs:
                return deleted
            for run in runs:
                if not dry_run:
                    for artifact in client.read_artifacts(
                        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
                    ):
                        client.delete_artifact(artifact.id)
                    client.delete_flow_run(run.id)
                deleted += 1


def parse_age(text: str) -> timedelta:
    """`30d`, `12h`, `90m` → a timedelta; anything else is a ValueError naming the accepted forms.

    `m` is minutes (as in `sleep 90m`), never months: the CLI says the age in words before it deletes."""
    units = {"d": "days", "h": "hours", "m": "minutes"}
    number, unit = text[:-1], text[-1:]  # lower case only: `1M` could mean a month
    if unit in units and number.isdigit() and int(number) == 0:
        raise ValueError(
            f"--older-than {text!r} would delete every finished run, the one that just ended too; give at least 1m"
        )
    if unit not in units or not number.isdigit() or not 0 < int(number) <= 36500 * 24 * 60:
        raise ValueError(
            f"--older-than {text!r} is not an age; write e.g. 30d, 12h or 90m (lower case; at most 100 years)"
        )
    age = timedelta(**{units[unit]: int(number)})
    if age > timedelta(days=36500):
        raise ValueError(f"--older-than {text!r} is more than 100 years; write e.g. 30d")
    return age


def describe_age(age: timedelta) -> str:
    """An age in words, the unit spelled out: `1 minute`, `30 days`, `12 hours`."""
    seconds = int(age.total_seconds())
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} seconds"
