"""Where shard tasks run: a bounded thread pool here, a Dask cluster, or a Ray cluster.

The flows never change: the CLI picks a Prefect task runner and applies it with `flow.with_options`.
Shards are the unit of work; each worker process loads the model once (tasks.model caches it per
process) and keeps it for every shard it runs. Run one worker process per GPU, one thread each.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from prefect.context import FlowRunContext
from prefect.flows import Flow
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from flows.params import RunnerParams

SHARDS_IN_FLIGHT = 2  # local runner: one shard computes while the other reads, decodes or writes

F = TypeVar("F", bound=Flow[Any, Any])


def make_task_runner(params: RunnerParams) -> TaskRunner[Any]:
    """The Prefect task runner that `params` names."""
    if params.runner == "dask":
        from prefect_dask import DaskTaskRunner

        if params.dask_address:
            return DaskTaskRunner(address=params.dask_address)
        # No address: a LocalCluster of worker processes on this machine, one shard per worker at a time.
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": params.dask_workers or 1, "threads_per_worker": 1, "processes": True}
        )
    if params.runner == "ray":
        from prefect_ray import RayTaskRunner  # type: ignore[import-not-found]

        return RayTaskRunner(address=params.ray_address)  # type: ignore[no-any-return]
    return local_task_runner()


@contextmanager
def api_for_local_workers(params: RunnerParams) -> Iterator[None]:
    """Run the flow inside this: with `--runner dask` and no address, and no PREFECT_API_URL, start
    Prefect's temporary server here and name it in the settings, which Prefect hands to every task it
    sends to the LocalCluster's workers. Without that each worker process started a temporary server
    of its own (~5 s each, several servers writing one SQLite file). The server is stopped when this
    process exits, as Prefect's own temporary server is. A cluster given by address has workers on other
    machines, which need a server they can reach (PREFECT_API_URL): nothing to do for them here."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

    if params.runner != "dask" or params.dask_address or PREFECT_API_URL.value():
        yield
        return
    if not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        yield  # Prefect itself then says that PREFECT_API_URL is needed
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one Prefect would start for this process (one per port)
    server.start()
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield


def local_task_runner() -> Any:
    """The default: shards in a bounded thread pool of this process."""
    return ThreadPoolTaskRunner(max_workers=SHARDS_IN_FLIGHT)


def with_runner(flow: F, params: RunnerParams) -> F:
    """The same flow, with its shard tasks running where `params` says."""
    return flow.with_options(task_runner=make_task_runner(params))  # type: ignore[return-value]


def shards_run_here() -> bool:
    """True when the current flow run's shards execute in this process (the local thread-pool runner)."""
    context = FlowRunContext.get()
    return context is None or isinstance(context.task_runner, ThreadPoolTaskRunner)


def shard_slots() -> int:
    """How many shards the current flow run's task runner executes at once (worker threads in total)."""
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    if type(runner).__name__ == "DaskTaskRunner":
        return max(1, sum(runner.client.nthreads().values()))  # type: ignore[union-attr]
    if type(runner).__name__ == "RayTaskRunner":
        import ray  # type: ignore[import-not-found]

        resources = ray.cluster_resources()
        return max(1, int(resources.get("GPU") or resources.get("CPU") or 1))
    if isinstance(runner, ThreadPoolTaskRunner):
        return max(1, int(getattr(runner, "_max_workers", SHARDS_IN_FLIGHT) or SHARDS_IN_FLIGHT))
    return SHARDS_IN_FLIGHT
