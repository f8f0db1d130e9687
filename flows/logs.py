"""oncoflow's own log records (the `tasks` and `flows` loggers) in the Prefect run's logs.

Prefect sends only its own loggers to the API; a run waiting for the output lease, or skipping a broken
link, would otherwise say so on the worker's terminal only, and the UI would show a silent "Running".
Records emitted outside a flow or task run (the CLI's own lines, engine threads) stay on the console,
unless they name their flow run (the S3 lease heartbeat's warnings do).
Setting PREFECT_LOGGING_EXTRA_LOGGERS=tasks,flows does the same; the handler is then not added twice.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from tasks.lease import is_flow_run_id

LOGGERS = ("tasks", "flows")


class RunLogHandler(APILogHandler):
    """Prefect's API log handler, for records emitted inside a flow or task run, or naming their run
    (`extra={"flow_run_id": ...}`, as the S3 lease's heartbeat thread does) only."""

    def emit(self, record: logging.LogRecord) -> None:
        in_run = FlowRunContext.get() is not None or TaskRunContext.get() is not None
        if in_run or names_a_run(record):
            super().emit(record)


def names_a_run(record: logging.LogRecord) -> bool:
    """The record carries a flow run id (a UUID): anything else would start a server or fail to send."""
    return is_flow_run_id(str(getattr(record, "flow_run_id", "")))


def send_logs_to_prefect() -> None:
    """Add RunLogHandler to oncoflow's loggers, once per process."""
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
            logger.addHandler(RunLogHandler())
