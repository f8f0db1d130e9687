"""What a run holds while it works: the output lease (exactly once) and a GPU slot (no oversubscription).

GPU slot decision: a run whose model sits on a CUDA device holds one slot of the Prefect global
concurrency limit named by ONCOFLOW_GPU_LIMIT (default `gpu`) for its whole inference phase; CPU runs
hold none. A missing limit is created with 1 slot (one GPU, one run at a time); raise it with
`prefect gcl update gpu --limit N` for N GPUs, or give each machine its own limit name when several
GPU machines share one Prefect server. ONCOFLOW_GPU_LIMIT="" turns the slot off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows.credentials import storage_options
from flows.history import mark_crashed
from flows.params import ClassifyParams
from tasks.defaults import lease_wait_from_env
from tasks.lease import Lease, LeaseLost, acquire, lease_key
from tasks.storage import open_location

logger = logging.getLogger(__name__)

DEFAULT_GPU_LIMIT = "gpu"


@contextmanager
def exclusive_output(params: ClassifyParams, run_id: str, revision: str) -> Iterator[Lease]:
    """Hold the output lease for this model revision; a run that died holding it is marked Crashed in
    Prefect."""
    wait = lease_wait_from_env()
    output = open_location(
        params.output, storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    )
    with acquire(output, lease_key(revision), run_id, wait_seconds=wait) as lease:
        dead = lease.previous
        if dead is not None and dead.run_id != run_id:
            reason = f"process died holding the output lease; superseded by run {run_id}"
            if mark_crashed(dead.run_id, reason)[0]:
                logger.warning("marked %s as Crashed: it died without reporting", dead.describe())
        yield lease
        if lease.lost:
            raise LeaseLost(lease.lost)


def gpu_limit_name() -> str:
    return os.environ.get("ONCOFLOW_GPU_LIMIT", DEFAULT_GPU_LIMIT)


def gpu_slot(device_type: str) -> AbstractContextManager[None]:
    """One slot of the GPU limit while a CUDA model runs; nothing on CPU or when turned off."""
    name = gpu_limit_name()
    if device_type != "cuda" or not name:
        return nullcontext()
    ensure_limit(name, slots=1)
    return concurrency(name, occupy=1, strict=True)


def ensure_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit if it does not exist yet (an existing one is left as set)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            logger.info("created the global concurrency limit %r with %d slot(s)", name, slots)
        except ObjectAlreadyExists:  # another run created it at the same moment
            pass
