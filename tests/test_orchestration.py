"""Orchestration against the real Prefect test server: the output lease, deployments, GPU slots, retries,
reprocessing, history and pruning."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import pyarrow.dataset as ds
import pytest
from fsspec.implementations.local import LocalFileSystem
from moto.server import ThreadedMotoServer
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.concurrency.sync import concurrency
from typer.testing import CliRunner

from flows.classify import classify
from flows.cli import app
from flows.guards import gpu_slot
from flows.history import prune_runs, recent_runs
from flows.serve import build_deployments
from tasks.lease import LeaseBusy, acquire, lease_key
from tasks.model_files import weights_revision
from tasks.storage import RETRY_ATTEMPTS, open_location
from tests.s3_fixtures import FaultyProxy

REPO = Path(__file__).resolve().parent.parent
runner = CliRunner()


def rows(output: Path) -> list[dict]:
    return ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()


# --- the output lease ---------------------------------------------------------------------------------


def test_local_lease_excludes_a_second_holder_until_released(tmp_path: Path) -> None:
    location = open_location(str(tmp_path / "out"))
    with acquire(location, "m", "run-a", wait_seconds=0) as first:
        assert first.previous is None
        with pytest.raises(LeaseBusy, match="run-a"):
            acquire(location, "m", "run-b", wait_seconds=0)
        acquire(location, "other-model", "run-c", wait_seconds=0).release()  # other models are not blocked
    with acquire(location, "m", "run-b", wait_seconds=0) as second:
        assert second.previous is None  # released cleanly: nobody died holding it
    assert not list((tmp_path / "out").rglob("*.parquet")) and lease_key("a/b") != lease_key("a/c")


def test_local_lease_of_a_killed_process_is_free_and_names_the_dead_run(tmp_path: Path) -> None:
    code = (
        "import sys, time; from tasks.lease import acquire; from tasks.storage import RETRY_ATTEMPTS, open_location; "
        "acquire(open_location(sys.argv[1]), 'm', 'run-dead', wait_seconds=0); print('held', flush=True); "
        "time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    with pytest.raises(LeaseBusy, match="run-dead"):
        acquire(open_location(str(tmp_path)), "m", "run-next", wait_seconds=0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with acquire(open_location(str(tmp_path)), "m", "run-next", wait_seconds=0) as lease:
        assert lease.previous is not None and lease.previous.run_id == "run-dead"


@pytest.mark.s3
def test_object_store_lease_uses_conditional_writes_and_expires(lease_server: str) -> None:
    location = open_location("s3://leases/out", {"client_kwargs": {"endpoint_url": lease_server}})
    first = acquire(location, "m", "run-a", wait_seconds=0, ttl_seconds=2)
    with pytest.raises(LeaseBusy, match="run-a"):
        acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=2)
    time.sleep(1.5)  # the heartbeat renews at ttl/4: still held after most of a ttl
    with pytest.raises(LeaseBusy):
        acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=2)
    first.stopped.set()  # the holder hangs: no more renewals
    first.heartbeat.join()
    time.sleep(2.1)
    with acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=2) as second:
        assert second.previous is not None and second.previous.run_id == "run-a"
    assert not location.fs.exists("leases/out/_leases/m.lease")  # released: deleted


@pytest.mark.s3
def test_object_lease_of_a_process_killed_on_this_machine_is_taken_at_once(lease_server: str) -> None:
    """kill -9 of a run holding an S3 lease: the rerun on the same machine takes the lease over at once
    instead of waiting up to the TTL (10 minutes), and names the dead run. A record from another
    machine or container (another scope) is never judged dead: it is waited for."""
    options = {"client_kwargs": {"endpoint_url": lease_server}}
    code = (
        "import sys, time; from tasks.lease import acquire; from tasks.storage import open_location; "
        f"acquire(open_location('s3://leases/killed', {options!r}), 'm', 'run-dead', wait_seconds=0); "
        "print('held', flush=True); time.sleep(120)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    location = open_location("s3://leases/killed", options)
    with pytest.raises(LeaseBusy, match="run-dead"):  # alive: held
        acquire(location, "m", "run-next", wait_seconds=0)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with acquire(location, "m", "run-next", wait_seconds=0) as lease:
        assert lease.previous is not None and lease.previous.run_id == "run-dead"

    elsewhere = {
        "run_id": "run-far",
        "host": "other",
        "pid": holder.pid,
        "since": "x",
        "scope": "another/boot",
    }
    record = {**elsewhere, "expires": time.time() + 600}
    location.fs.pipe_file("leases/killed/_leases/m.lease", json.dumps(record).encode())
    with pytest.raises(LeaseBusy, match="run-far"):
        acquire(location, "m", "run-next", wait_seconds=0)


@pytest.fixture
def lease_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A moto S3 server of its own with a `leases` bucket; yields its URL."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = open_location("s3://leases", {"client_kwargs": {"endpoint_url": f"http://{host}:{port}"}}).fs
        with contextlib.suppress(FileExistsError):  # moto's state is per process, shared by its servers
            fs.mkdir("leases")
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.mark.s3
def test_a_renewal_whose_answer_was_lost_keeps_the_lease(lease_server: str) -> None:
    """A renewal that reached the store but whose answer never came leaves the holder's own record
    under an ETag the lease does not know: the next renewal's condition fails, and that is no loss.
    Another run's record in its place is."""
    from tasks.lease import Holder, _record

    location = open_location("s3://leases/lost-answer", {"client_kwargs": {"endpoint_url": lease_server}})
    path = "leases/lost-answer/_leases/m.lease"
    lease = acquire(location, "m", "run-a", wait_seconds=0, ttl_seconds=2)
    location.fs.pipe_file(path, _record(lease.holder, 2))
    time.sleep(2.5)  # renewals every 0.5 s, past the 2 s the old ETag's record was valid for
    assert lease.lost is None and lease.heartbeat.is_alive()
    with pytest.raises(LeaseBusy, match="run-a"):
        acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=2)

    location.fs.pipe_file(path, _record(Holder.me("run-b"), 2))  # taken over
    lease.heartbeat.join(timeout=5)
    assert lease.lost is not None and "could not be renewed" in lease.lost
    lease.release()


@pytest.mark.s3
def test_object_lease_survives_server_errors_and_names_itself_when_they_persist(lease_server: str) -> None:
    """A 500 now and then is retried; a store that keeps failing fails the run naming the lease's URI
    (not a bare `[Errno 121] internal error`)."""
    with FaultyProxy(lease_server, every=3, faults=("internal",)) as proxy:
        location = open_location("s3://leases/flaky", {"client_kwargs": {"endpoint_url": proxy.url}})
        with acquire(location, "m", "run-a", wait_seconds=0, ttl_seconds=30) as lease:
            assert lease.previous is None
        assert proxy.injected["internal"] > 0
        proxy.every = 1  # every request fails from now on
        with pytest.raises(ConnectionError, match="s3://leases/flaky/_leases/m.lease"):
            acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=30)


@pytest.mark.s3
def test_object_lease_on_a_store_that_answers_412_without_its_condition(lease_server: str) -> None:
    """SeaweedFS answers a failed If-None-Match PUT with a bare 412: still 'held by another run'."""
    with FaultyProxy(lease_server, every=10**9, bare_412=True) as proxy:
        location = open_location("s3://leases/bare-412", {"client_kwargs": {"endpoint_url": proxy.url}})
        with (
            acquire(location, "m", "run-a", wait_seconds=0, ttl_seconds=30),
            pytest.raises(LeaseBusy, match="run-a"),
        ):
            acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=30)
        with acquire(location, "m", "run-b", wait_seconds=0, ttl_seconds=30) as second:
            assert second.previous is None  # run-a released it cleanly


@pytest.mark.slow
@pytest.mark.s3
def test_an_outage_longer_than_the_ttl_loses_the_lease_loudly(lease_server: str) -> None:
    """Renewals that keep failing (connection errors, not OSErrors) mark the lease lost before it
    expires, so the run fails with LeaseLost instead of writing on without it."""
    with FaultyProxy(lease_server, every=10**9, faults=("drop",)) as proxy:
        location = open_location("s3://leases/outage", {"client_kwargs": {"endpoint_url": proxy.url}})
        lease = acquire(location, "m", "run-a", wait_seconds=0, ttl_seconds=4)
        proxy.every = 1  # every request is dropped from now on
        lease.heartbeat.join(timeout=120)
        assert not lease.heartbeat.is_alive() and lease.lost and "could not be renewed" in lease.lost
        proxy.every = 10**9
        lease.release()


def test_every_spelling_and_copy_of_a_local_model_takes_the_same_lease(
    tmp_path: Path, tiny_model: str
) -> None:
    """The lease is the revision's: the same rows, whichever folder or spelling the run was given."""
    models = tmp_path / "models"
    shutil.copytree(tiny_model, models / "vit-v2")
    shutil.copytree(tiny_model, models / "copy-on-gpu-2")
    (models / "current").symlink_to(models / "vit-v2")
    spellings = ["vit-v2", "current", "vit-v2/", "vit-v2/../copy-on-gpu-2", "copy-on-gpu-2"]
    keys = {lease_key(weights_revision(str(models / spelling))) for spelling in spellings}
    assert keys == {lease_key(weights_revision(tiny_model))}
    assert lease_key("sha256:0123456789abcdef").startswith("sha256-0123456789abcdef-")


def test_a_second_compaction_of_the_same_dataset_fails_at_once(tmp_path: Path) -> None:
    """Two overlapping compactions could each merge a file the other merged: one at a time."""
    from tasks.compact import COMPACTION_LEASE
    from tests.analytics_data import make_dataset

    dest = tmp_path / "dest"
    make_dataset(dest)
    before = sorted(p.name for p in dest.rglob("*.parquet"))
    with acquire(open_location(str(dest)), COMPACTION_LEASE, "compaction-in-progress", wait_seconds=0):
        result = CliRunner().invoke(app, ["compact", str(dest)])
    assert result.exit_code == 1 and "compaction-in-progress" in result.output, result.output
    assert sorted(p.name for p in dest.rglob("*.parquet")) == before  # nothing touched
    result = CliRunner().invoke(app, ["compact", str(dest)])
    assert result.exit_code == 0 and "merged" in result.output, result.output


def test_time_spent_waiting_for_the_lease_is_reported_apart(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    import logging
    import threading

    output = tmp_path / "preds"
    # Held for another copy of the same model: same revision, same rows, so the run waits for it.
    other_copy = shutil.copytree(tiny_model, tmp_path / "model-copy")
    key = lease_key(weights_revision(str(other_copy)))
    holder = acquire(open_location(str(output)), key, "run-before", wait_seconds=0)

    class ReleaseOnceWaiting(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:  # "... waiting up to 3600 s ..."
            if "waiting up to" in record.getMessage():
                threading.Timer(3.0, holder.release).start()

    lease_log = logging.getLogger("tasks.lease")
    handler = ReleaseOnceWaiting()
    lease_log.addHandler(handler)
    try:
        summary = classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    finally:
        lease_log.removeHandler(handler)
    assert summary["images_classified"] == 6 and summary["lease_wait_seconds"] >= 3.0
    # The rate counts the working time only: well above the rate over the whole run, wait included.
    assert summary["images_per_second"] > 1.5 * 6 / summary["seconds"]


# --- deployments --------------------------------------------------------------------------------------


def read_deployment(name: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_served_deployments_register_with_schedule_and_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Relative local paths are stored absolute: a run may start anywhere, and the UI's form shows them."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "vit").mkdir(parents=True)
    for deployment in build_deployments("/data/scans", "out", "models/vit", timezone="Europe/Berlin"):
        deployment.apply()
    nightly = read_deployment("classify/classify-nightly")
    assert nightly.parameters == {
        "source": "/data/scans",
        "output": str(tmp_path / "out"),
        "model": str(tmp_path / "models" / "vit"),
    }  # no device given: none stored (the run form shows the flow's default, auto)
    [schedule] = nightly.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert set(nightly.parameter_openapi_schema["properties"]) >= {"source", "output", "model", "threshold"}
    archive = read_deployment("reprocess/reprocess-archive")
    assert archive.schedules == [] and "model" in archive.parameter_openapi_schema["required"]
    scoring = read_deployment("evaluate/evaluate")
    assert scoring.schedules == [] and scoring.parameters == {"predictions": str(tmp_path / "out")}


def test_serve_options_become_the_parameters_of_the_deployments(
    image_folder: Path, tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch, prefect_server: str
) -> None:
    """`oncoflow serve --threshold ... --max-error-rate ...`: the nightly runs (and reprocess-archive) get
    them, evaluate the storage ones; options left at their defaults are not stored."""
    import flows.serve

    served: list = []
    monkeypatch.setattr(
        flows.serve, "serve_deployments", lambda deployments, limit=None: served.extend(deployments)
    )
    monkeypatch.setenv("PREFECT_API_URL", prefect_server)
    output = str(tmp_path / "preds")
    common = ["serve", "--source", str(image_folder), "-o", output, "--model", tiny_model, "--device", "cpu"]
    options = ["--threshold", "0.3", "--max-error-rate", "0.05", "--max-pixels", "200000000"]
    result = runner.invoke(
        app, [*common, *options, "--exif-orientation", "--s3-endpoint-url", "http://s3.lan:9000"]
    )
    assert result.exit_code == 0, result.output
    for deployment in served:
        deployment.apply()
    chosen = {
        "threshold": 0.3,
        "max_error_rate": 0.05,
        "max_pixels": 200_000_000,
        "exif_orientation": True,
        "s3_endpoint_url": "http://s3.lan:9000",
    }
    nightly = read_deployment("classify/classify-nightly")
    assert (
        nightly.parameters
        == {"source": str(image_folder), "output": output, "model": tiny_model, "device": "cpu"} | chosen
    )
    archive = read_deployment("reprocess/reprocess-archive")
    not_threshold = {key: value for key, value in chosen.items() if key != "threshold"}  # another model's
    assert (
        archive.parameters == {"source": str(image_folder), "output": output, "device": "cpu"} | not_threshold
    )
    scoring = read_deployment("evaluate/evaluate")
    assert scoring.parameters == {"predictions": output, "s3_endpoint_url": "http://s3.lan:9000"}
    refused = runner.invoke(app, [*common, "--threshold", "2"])
    assert refused.exit_code == 2 and "--threshold" in refused.output
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    unreachable = ["--s3-endpoint-url", "http://127.0.0.1:9"]  # nothing answers there: a warning
    warned = runner.invoke(
        app, ["serve", "--source", "s3://scans/in", "-o", "s3://preds/out", *common[5:], *unreachable]
    )
    text = " ".join(warned.output.split())
    assert warned.exit_code == 0 and "warning:" in text and "127.0.0.1:9" in text and "Serving anyway" in text


@pytest.mark.slow
def test_deploy_script_deploys_to_the_files_pool_or_the_one_given(prefect_server: str) -> None:
    """deployments/deploy.sh, as docs/operations.md runs it: the file's process pool by default; with
    --pool and --job-variable (the GPU recipe) every deployment lands there, which `prefect deploy
    --all` would silently ignore."""
    env = {
        **os.environ,
        "PREFECT_API_URL": prefect_server,
        "PYTHON": sys.executable,
        "ONCOFLOW_REPO": str(REPO),
        "ONCOFLOW_SOURCE": "/data/scans",
        "ONCOFLOW_OUTPUT": "/data/predictions",
        "ONCOFLOW_MODEL": "Shivamnegi92/cancer-classification-vit",
        "ONCOFLOW_TIMEZONE": "America/New_York",
    }

    def run(*command: str, **changes: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, env={**env, **changes}, cwd=REPO, capture_output=True, text=True, timeout=300
        )

    for pool in ("oncoflow-local", "oncoflow-gpu"):
        created = run(
            sys.executable, "-m", "prefect", "work-pool", "create", pool, "--type", "process", "--overwrite"
        )
        assert created.returncode == 0, created.stdout + created.stderr
    done = run("deployments/deploy.sh")
    assert done.returncode == 0, done.stdout + done.stderr
    nightly = read_deployment("classify/classify-nightly")
    assert nightly.work_pool_name == "oncoflow-local"
    assert (
        nightly.parameters["source"] == "/data/scans" and nightly.parameters["output"] == "/data/predictions"
    )
    assert [(s.schedule.cron, s.schedule.timezone) for s in nightly.schedules] == [
        ("0 2 * * *", "America/New_York")
    ]
    assert read_deployment("reprocess/reprocess-archive").schedules == []
    assert read_deployment("evaluate/evaluate").parameters == {"predictions": "/data/predictions"}

    done = run(
        "deployments/deploy.sh",
        "--pool",
        "oncoflow-gpu",
        "--job-variable",
        "image=registry.example.org/oncoflow:1.0",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("classify/classify-nightly", "reprocess/reprocess-archive", "evaluate/evaluate"):
        deployment = read_deployment(name)
        assert deployment.work_pool_name == "oncoflow-gpu", name
        assert deployment.job_variables["image"] == "registry.example.org/oncoflow:1.0", name

    for changes, named in (
        ({"ONCOFLOW_TIMEZONE": ""}, "set ONCOFLOW_TIMEZONE"),
        ({"ONCOFLOW_TIMEZONE": "Berlin"}, "not an IANA"),
        ({"ONCOFLOW_REPO": "."}, "ONCOFLOW_REPO=.: give absolute paths"),
        ({"ONCOFLOW_SOURCE": "data/scans", "ONCOFLOW_OUTPUT": "~/preds"}, "ONCOFLOW_OUTPUT=~/preds: give"),
        ({"ONCOFLOW_MODEL": "deployments"}, "ONCOFLOW_MODEL=deployments: give"),  # a folder, relative
    ):
        refused = run("deployments/deploy.sh", **changes)
        assert refused.returncode == 2 and named in refused.stderr, refused.stderr


def test_oncoflow_warnings_reach_the_run_logs_and_bad_parameters_stay_secret(
    tmp_path: Path, tiny_model: str
) -> None:
    """What the UI shows for a deployment run: oncoflow's own warnings among the run's logs, and a bad
    parameter's state message without the credentials it held."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from tests.conftest import make_image

    source = tmp_path / "scans"
    make_image(source / "a.png")
    (source / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    state = classify(str(source), str(tmp_path / "out"), model=tiny_model, device="cpu", return_state=True)
    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    # A thread outside the run context (the S3 lease heartbeat) names its run to be heard.
    heartbeat = threading.Thread(
        target=lambda: logging.getLogger("tasks.lease").warning(
            "renewal probe", extra={"flow_run_id": str(run_id)}
        )
    )
    heartbeat.start()
    heartbeat.join()
    APILogHandler().flush()  # the run logs are sent in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    assert any("gone.jpg" in log.message and "broken link" in log.message for log in logs)
    assert any(log.message == "renewal probe" for log in logs)

    leaky = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY@bucket/scans"
    state = classify(leaky, str(tmp_path / "out"), model=tiny_model, return_state=True)
    with get_client(sync_client=True) as client:
        stored = client.read_flow_run(state.state_details.flow_run_id).state
    assert stored is not None and stored.is_failed() and "invalid parameter source" in str(stored.message)
    assert "AKIA" not in str(stored.message) and "EXAMPLEKEY" not in str(stored.message)


# --- GPU slot and retries -----------------------------------------------------------------------------


def test_gpu_slot_creates_the_limit_and_serialises_holders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ONCOFLOW_GPU_LIMIT", "gpu-test")
    with gpu_slot("cpu"):  # CPU runs never touch the limit
        pass
    with get_client(sync_client=True) as client:
        assert "gpu-test" not in {limit.name for limit in client.read_global_concurrency_limits()}
    with gpu_slot("cuda"):
        with get_client(sync_client=True) as client:
            assert client.read_global_concurrency_limit_by_name("gpu-test").limit == 1
        with pytest.raises(TimeoutError), concurrency("gpu-test", timeout_seconds=1, strict=True):
            pass  # a second run waits while the slot is held
    with concurrency("gpu-test", timeout_seconds=5, strict=True):
        pass  # free again once the first run let go


class OutageFileSystem(LocalFileSystem):
    """The local filesystem reached as `outage://`, except that opening one chosen file fails like a
    dropped connection a set number of times: the storage layer's retries give up, the shard fails,
    and only Prefect's task retry can complete the run."""

    protocol = ("outage",)
    cachable = False
    failing_path = ""
    failures_left = 0

    def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        if path == OutageFileSystem.failing_path and OutageFileSystem.failures_left > 0:
            OutageFileSystem.failures_left -= 1
            raise ConnectionError("connection reset by peer")
        return super()._open(path, mode, **kwargs)


def test_a_transient_failure_in_a_shard_is_retried_and_the_run_completes(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    fsspec.register_implementation("outage", OutageFileSystem, clobber=True)
    OutageFileSystem.failing_path = str(image_folder / "a.jpg")
    OutageFileSystem.failures_left = RETRY_ATTEMPTS  # every attempt of the shard's first run fails
    retried = classify(f"outage://{image_folder}", str(tmp_path / "preds"), model=tiny_model, device="cpu")
    assert OutageFileSystem.failures_left == 0
    assert retried["images_classified"] == 6 and retried["errors"] == 0
    assert len(rows(tmp_path / "preds")) == 6
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[retried["run_id"]]))
        )
    assert max(run.run_count for run in task_runs if run.name.startswith("classify-shard")) == 2


def test_a_bad_model_is_not_retried(image_folder: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    result = runner.invoke(
        app, ["classify", str(image_folder), "-o", str(tmp_path / "o"), "--model", "org/none"]
    )
    assert result.exit_code == 1 and time.monotonic() - started < 30  # no retry delays of 5 s and 30 s


# --- reprocess, history, prune ------------------------------------------------------------------------


def test_reprocess_adds_a_new_models_rows_and_leaves_the_old_ones(
    image_folder: Path, tmp_path: Path, tiny_model: str, tiny_model_imagenet: str
) -> None:
    """--prefix through a link inside SOURCE (`latest` → `sub`) narrows to the real folder: its images
    keep the URIs a full run gives them, so the full run after it resumes instead of doubling them."""
    output = tmp_path / "preds"
    (image_folder / "latest").symlink_to("sub", target_is_directory=True)
    classify(str(image_folder), str(output), model=tiny_model, device="cpu")
    before = {(r["image_uri"], r["prob_malignant"], str(r["processed_at"])) for r in rows(output)}
    assert len(before) == 6

    args = [
        "reprocess",
        str(image_folder),
        "-o",
        str(output),
        "--model",
        tiny_model_imagenet,
        "--device",
        "cpu",
    ]
    narrowed = runner.invoke(app, [*args, "--prefix", "latest"])
    assert narrowed.exit_code == 0, narrowed.output
    new_rows = [r for r in rows(output) if r["model"] == tiny_model_imagenet]
    assert sorted(Path(r["image_uri"]).name for r in new_rows) == ["d.tif", "e.jpeg", "f.bmp"]
    assert all(r["image_uri"].startswith(f"file://{image_folder}/sub/") for r in new_rows)

    full = runner.invoke(app, args)  # resumes: only the three images outside sub/ are left
    assert full.exit_code == 0, full.output
    everything = rows(output)
    assert len([r for r in everything if r["model"] == tiny_model_imagenet]) == 6
    assert {
        (r["image_uri"], r["prob_malignant"], str(r["processed_at"]))
        for r in everything
        if r["model"] == tiny_model
    } == before
    runs = [run for run in recent_runs(limit=5) if run.flow == "reprocess"]
    assert [(run.state, run.images) for run in runs[:2]] == [("Completed", 3), ("Completed", 3)]


def test_reprocess_requires_a_model_and_an_existing_prefix(image_folder: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["reprocess", str(image_folder), "-o", str(tmp_path / "o")]).exit_code == 2
    result = runner.invoke(
        app, ["reprocess", str(image_folder), "-o", str(tmp_path / "o"), "--model", "m", "--prefix", "nope"]
    )
    assert result.exit_code == 2 and "nope" in result.output
    escape = [
        "reprocess",
        str(image_folder / "sub"),
        "-o",
        str(tmp_path / "o"),
        "--model",
        "m",
        "--prefix",
        "../..",
    ]
    result = runner.invoke(app, escape)
    assert result.exit_code == 2 and "inside SOURCE" in " ".join(result.output.split()), result.output


def test_reprocess_prefix_may_be_a_full_path_inside_source(image_folder: Path, tmp_path: Path) -> None:
    """`--prefix /archive/2023` for SOURCE /archive: the part below SOURCE (was '/archive/archive/2023')."""
    from flows.reprocess import within

    sub = image_folder / "sub"
    sub.mkdir(exist_ok=True)
    assert within(str(image_folder), str(sub)) == within(str(image_folder), "sub") == str(sub)
    assert within(str(image_folder), str(image_folder) + "/") == str(image_folder)
    assert within("s3://scans/in", "s3://scans/in/2023/") == "s3://scans/in/2023"
    assert within(image_folder.as_uri(), str(sub)) == within(str(image_folder), sub.as_uri()) == str(sub)
    for outside in (str(tmp_path), "s3://scans/incoming/2023", "/in/2023"):
        source = "s3://scans/in" if outside.startswith("s3") else str(image_folder)
        result = runner.invoke(
            app, ["reprocess", source, "-o", str(tmp_path / "o"), "--model", "m", "--prefix", outside]
        )
        text = " ".join(result.output.split())
        assert result.exit_code == 2 and f"--prefix {outside!r} is not inside SOURCE" in text, text


def test_history_lists_runs_with_their_image_counts(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    summary = classify(str(image_folder), str(tmp_path / "preds"), model=tiny_model, device="cpu")
    latest = recent_runs(limit=1)[0]
    assert (latest.flow, latest.state, latest.images, latest.errors) == ("classify", "Completed", 6, 0)
    assert latest.run_id == summary["run_id"] and latest.seconds is not None and latest.seconds > 0
    assert latest.model == tiny_model
    result = runner.invoke(app, ["history", "--limit", "3"])
    assert result.exit_code == 0 and "classify" in result.output and "Completed" in result.output
    assert summary["run_id"] in result.output  # to find the run's rows: WHERE run_id = '...'

    # evaluate --data classifies through the classify flow: that run is told apart from nightly ones
    labeled = tmp_path / "labeled"
    shutil.copytree(image_folder, labeled / "Normal")
    shutil.copytree(image_folder, labeled / "Malignant")
    from flows.evaluate import evaluate

    evaluate(output=str(tmp_path / "report"), data=str(labeled), model=tiny_model, device="cpu")
    runs = recent_runs(limit=3)
    assert [run.flow for run in runs] == ["classify (in evaluate)", "evaluate", "classify"], runs
    assert runs[0].model == runs[1].model == tiny_model
    labels = tmp_path / "labels.csv"
    names = sorted(p.name for p in image_folder.iterdir() if p.is_file() and not p.name.startswith("."))
    labels.write_text("image_uri,label\n" + "".join(f"{image_folder / name},Normal\n" for name in names))
    evaluate(output=str(tmp_path / "scored"), predictions=str(tmp_path / "preds"), labels=str(labels))
    assert recent_runs(limit=1)[0].model is None, "scores rows already written: no model of its own"


def test_a_dry_run_of_the_flow_writes_nothing_and_history_tells_it_apart(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """A deployment's run started with dry_run=True (the UI's form) counts and writes nothing."""
    output = tmp_path / "preds"
    plan = classify(str(image_folder), str(output), model=tiny_model, device="cpu", dry_run=True)
    assert (plan["dry_run"], plan["images_found"], plan["images_new"]) == (True, 6, 6)
    assert not output.exists()
    latest = recent_runs(limit=1)[0]
    assert (latest.flow, latest.state, latest.images, latest.run_id) == (
        "classify (dry run)",
        "Completed",
        None,
        plan["run_id"],
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError):
        classify(str(empty), str(output), model=tiny_model, device="cpu", dry_run=True)
    failed = recent_runs(limit=1)[0]
    assert (failed.flow, failed.state) == ("classify (dry run)", "Failed")


def test_history_reads_more_runs_than_one_api_page() -> None:
    """The server returns at most 200 runs per call (a larger limit was a 422 traceback)."""
    from prefect import flow
    from prefect.states import Completed, Running

    from flows.history import PAGE

    @flow(name="history-page")
    def history_page() -> None:
        """Never run: the flow the runs below belong to."""

    with get_client(sync_client=True) as client:
        for _ in range(PAGE + 5):
            run = client.create_flow_run(history_page, state=Running())
            client.set_flow_run_state(run.id, Completed(), force=True)
    runs = recent_runs(limit=PAGE + 5)
    assert [run.flow for run in runs] == ["history-page"] * (PAGE + 5)
    assert len({run.run_id for run in runs}) == PAGE + 5
    assert [run.start for run in runs] == sorted((run.start for run in runs), reverse=True)
    result = runner.invoke(app, ["history", "--limit", str(PAGE + 1)])
    assert result.exit_code == 0 and result.output.count("history-page") == PAGE + 1, result.output[-500:]


def test_history_marks_a_run_left_running_as_crashed() -> None:
    """A run that lost its server stays Running for ever; its operator marks it, once."""
    from prefect import flow
    from prefect.states import Running

    @flow(name="lost-its-server")
    def lost() -> None:
        """Never run: the flow the run below belongs to."""

    with get_client(sync_client=True) as client:
        run_id = str(client.create_flow_run(lost, state=Running()).id)
    marked = runner.invoke(app, ["history", "--mark-crashed", run_id])
    assert marked.exit_code == 0 and f"run {run_id} marked Crashed" in marked.output, marked.output
    assert next(run for run in recent_runs(limit=5) if run.run_id == run_id).state == "Crashed"
    again = runner.invoke(app, ["history", "--mark-crashed", run_id])
    assert again.exit_code == 1 and "is not Running or Pending (it is Crashed)" in " ".join(
        again.output.split()
    )
    refused = runner.invoke(app, ["history", "--mark-crashed", "yesterday"])
    assert refused.exit_code == 2 and "invalid --mark-crashed 'yesterday'" in refused.output


def test_prune_deletes_only_finished_runs_older_than_the_cutoff(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    old = classify(str(image_folder), str(tmp_path / "a"), model=tiny_model, device="cpu")["run_id"]
    time.sleep(1)
    recent = classify(str(image_folder), str(tmp_path / "b"), model=tiny_model, device="cpu")["run_id"]
    with get_client(sync_client=True) as client:  # the server stamps end times itself: cut between the two
        old_end, recent_end = (client.read_flow_run(run).end_time for run in (old, recent))  # type: ignore[arg-type]
    cutoff = old_end + (recent_end - old_end) / 2

    pruned = runner.invoke(app, ["prune", "--older-than", "30d"]).output.strip()
    assert pruned == "deleted 0 flow run(s) older than 30d (30 days)"
    counted = runner.invoke(app, ["prune", "--older-than", "1m", "--dry-run"]).output.strip()
    assert counted.startswith("would delete") and counted.endswith("older than 1m (1 minute)")  # not a month
    assert prune_runs(datetime.now(UTC) - cutoff, dry_run=True) >= 1
    assert prune_runs(datetime.now(UTC) - cutoff) >= 1
    with get_client(sync_client=True) as client:
        left = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[old, recent])))
    assert {str(run.id) for run in left} == {recent}
    for age in ("soon", "1M", "99999999d", "0m"):
        assert runner.invoke(app, ["prune", "--older-than", age]).exit_code == 2, age
    assert "give at least 1m" in runner.invoke(app, ["prune", "--older-than", "0d"]).output


@pytest.mark.slow
def test_history_in_a_new_prefect_home_says_there_are_no_runs_yet(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "history"], env=env, capture_output=True, text=True, timeout=180
    )
    output = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 0 and "no oncoflow runs recorded yet" in output, output
    assert "oncoflow runs (newest first)" not in output  # no empty table


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sighup"])
def test_ctrl_c_in_a_terminal_stops_a_run_on_the_temporary_server_cleanly(
    tmp_path: Path, tiny_model: str, how: str
) -> None:
    """A terminal's Ctrl-C signals the whole process group. Prefect's temporary server (no
    PREFECT_API_URL) runs in a session of its own, so it survives to record the run as Crashed: the
    command exits 130 at once, without a minute of connection tracebacks, and stops the server.
    SIGTERM to the command alone (`kill`, `timeout` in a cron line) ends it the same way, and so does
    SIGHUP (an ssh session closed: to the process group).

    The stop does not wait for the shards in the run's window (up to 4 x --shard-size images): those not
    started are cancelled and the running ones end at their next batch, writing nothing. Here the signal
    comes as the first of 5 shards of 30 lands; before, all four in the window were finished first.

    The first shard holds small images and the others large ones (each takes seconds), so the shard
    running beside the first is mid-way when the signal comes, however loaded the machine is: the shards
    do not finish in lockstep, and a late signal still finds the others running."""
    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    from tests.conftest import make_image

    for number in range(30):
        make_image(tmp_path / "src" / f"i{number:03d}.png", seed=number)
    ramp = np.tile(np.linspace(0, 255, 2000, dtype=np.uint8), (2000, 1))  # about 70 ms to decode
    for number in range(30, 150):
        Image.fromarray(np.roll(ramp, number, axis=1)).save(tmp_path / "src" / f"i{number:03d}.png")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.classify", str(tmp_path / "src"), "-o", str(tmp_path / "dest")]
    command += ["--model", tiny_model, "--shard-size", "30", "--batch-size", "1", "--device", "cpu"]
    run = subprocess.Popen(
        command, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "dest").rglob("*.parquet")) and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[0].decode()[-3000:]
            time.sleep(0.2)
        children = subprocess.run(
            ["pgrep", "-P", str(run.pid)], capture_output=True, text=True
        ).stdout.split()
        if how == "ctrl-c":
            os.killpg(run.pid, signal.SIGINT)  # what the terminal does
        elif how == "sighup":
            os.killpg(run.pid, signal.SIGHUP)
        else:
            run.send_signal(signal.SIGTERM)
        output = run.communicate(timeout=120)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, output[-3000:]
    assert "ConnectError" not in output and "Crash detected" in output
    assert "stopped: the shard files written so far are kept" in output, output[-3000:]
    assert children and not [child for child in children if Path(f"/proc/{child}").exists()]
    written = list((tmp_path / "dest").rglob("*.parquet"))
    assert 1 <= len(written) <= 2, output[-3000:]  # the first shard, and maybe the one beside it
    assert "wrote no rows" in output, output[-3000:]  # a running shard ended at a batch, unwritten
    assert "| INFO    | Task run 'classify-shard-" in output and "- ended by the stop: run " in output
    assert "ShardStopped" not in output, "said as what it is, not as a failed task"
    if how == "sigterm":  # the next run classifies the rest: every image once
        again = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        uris = pq.read_table(tmp_path / "dest", columns=["image_uri"]).column("image_uri").to_pylist()
        assert len(uris) == len(set(uris)) == 150


def test_a_run_under_nohup_survives_the_hangup(tmp_path: Path, tiny_model: str) -> None:
    """`nohup oncoflow classify ...` ignores SIGHUP so that a run outlives its ssh session: oncoflow's
    handler for the hangup must not undo that."""
    from tests.conftest import make_image

    for number in range(40):
        make_image(tmp_path / "src" / f"i{number:03d}.png", seed=number)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "flows.classify", str(tmp_path / "src"), "-o", str(tmp_path / "dest")]
    command += ["--model", tiny_model, "--shard-size", "5", "--batch-size", "1", "--device", "cpu"]
    run = subprocess.Popen(
        command,
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    )
    try:
        deadline = time.monotonic() + 180
        while not list((tmp_path / "dest").rglob("*.parquet")) and time.monotonic() < deadline:
            assert run.poll() is None, run.communicate()[0].decode()[-3000:]
            time.sleep(0.1)
        run.send_signal(signal.SIGHUP)
        output = run.communicate(timeout=300)[0].decode()
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
    assert run.returncode == 0, output[-3000:]
    assert ds.dataset(tmp_path / "dest", format="parquet").count_rows() == 40


def process_alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent that does not reap (PID 1 in a container may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def servers_of(prefect_home: Path) -> list[int]:
    """Live Prefect server processes (any parent) whose PREFECT_HOME is `prefect_home`."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not proc.name.isdigit() or b"server:create_app" not in (proc / "cmdline").read_bytes():
                continue
            environment = (proc / "environ").read_bytes().split(b"\0")
            if f"PREFECT_HOME={prefect_home}".encode() in environment and process_alive(int(proc.name)):
                found.append(int(proc.name))
    return found


@pytest.mark.parametrize("command", ["classify", "history", "demo"])
def test_a_command_killed_with_sigkill_leaves_no_temporary_server(
    tmp_path: Path, tiny_model: str, command: str
) -> None:
    """kill -9 (or the out-of-memory killer) skips Prefect's exit hook that stops its temporary server:
    the server used to live on, one more after each such night. It now stops within seconds, whichever
    command started it: a classify run mid-way, `oncoflow history` (and prune), `make demo`."""
    from tests.conftest import make_image

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    if command == "classify":
        for number in range(60):
            make_image(tmp_path / "src" / f"i{number:03d}.png", size=(600, 600), seed=number)
        argv = ["-m", "flows.classify", str(tmp_path / "src"), "-o", str(tmp_path / "dest")]
        argv += ["--model", tiny_model, "--shard-size", "10", "--batch-size", "1", "--device", "cpu"]
    elif command == "history":
        argv = ["-m", "flows.cli", "history"]
    else:
        argv = ["-m", "flows.demo", "--workdir", str(tmp_path / "demo"), "--images", "8"]
    run = subprocess.Popen(
        [sys.executable, *argv], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    servers: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # classify: a shard written; the others: the server started
            assert run.poll() is None, "the command ended before it could be killed"
            servers = servers_of(tmp_path / "prefect-home")
            if servers and (command != "classify" or list((tmp_path / "dest").rglob("*.parquet"))):
                break
            time.sleep(0.1)
        assert len(servers) == 1, servers
        run.kill()
        run.wait()
        deadline = time.monotonic() + 30
        while process_alive(servers[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not process_alive(servers[0]), "the temporary server outlived the killed command"
    finally:
        with contextlib.suppress(ProcessLookupError):
            run.kill()
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server, signal.SIGKILL)


@pytest.mark.parametrize("weights", ["good", "misfit"])
def test_the_temporary_server_starts_early_and_is_stopped_however_the_run_ends(
    tmp_path: Path, tiny_model: str, weights: str
) -> None:
    """The temporary server is spawned before the model loads (it boots on another core meanwhile) and
    the flow runs on it: one server, named once in the log, stopped at the end, whether the run
    succeeds or fails on a model whose weights do not load."""
    from tests.conftest import make_image

    for number in range(3):
        make_image(tmp_path / "src" / f"i{number}.png", seed=number)
    model = tiny_model
    if weights == "misfit":  # found only as the weights load (a damaged file is refused before the server)
        model = str(tmp_path / "misfit-model")
        shutil.copytree(tiny_model, model)
        config = json.loads((Path(model) / "config.json").read_text())
        (Path(model) / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "classify",
        str(tmp_path / "src"),
        "-o",
        str(tmp_path / "dest"),
    ]
    result = subprocess.run(
        [*command, "--model", model, "--device", "cpu"], env=env, cwd=REPO, capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    if weights == "good":
        assert result.returncode == 0, output[-3000:]
        assert ds.dataset(tmp_path / "dest", format="parquet").count_rows() == 3
    else:
        assert result.returncode == 1 and "error:" in output, output[-3000:]
    assert output.count("Starting temporary server") == 1, output[-3000:]
    assert "Stopping temporary server" in output, output[-3000:]
    assert "View at" not in output, output[-3000:]  # a link to a UI that the server does not serve
    deadline = time.monotonic() + 10
    while servers_of(tmp_path / "prefect-home") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not servers_of(tmp_path / "prefect-home")


def test_an_early_server_that_did_not_start_is_replaced_by_prefects_own(tmp_path: Path) -> None:
    """If the server spawned early exits (its port was taken meanwhile), Prefect starts one itself, as
    before: the command still runs."""
    code = (
        "import subprocess, sys; from flows import server_guard as g; "
        "g._early.update(process=subprocess.Popen([sys.executable, '-c', 'pass']), address='http://127.0.0.1:1'); "
        "g.use_temporary_server(); "
        "from prefect.client.orchestration import get_client; "
        "c = get_client(sync_client=True); print('health', c.api_healthcheck(), c.api_url)"
    )
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "health None http://127.0.0.1:" in result.stdout and ":1/" not in result.stdout, result.stdout


def test_the_temporary_servers_errors_go_to_its_log_in_prefect_home_not_the_terminal(tmp_path: Path) -> None:
    """What the early server prints (errors only: here, a database it cannot reach) is appended to
    PREFECT_HOME/temporary-server.log; the command's terminal gets one warning naming that file (and
    Prefect's own server would take over, as the test above shows)."""
    code = (
        "from flows import server_guard as g; g.start_temporary_server(); "
        "print('exit', g._early['process'].wait(timeout=100)); "
        "g.use_temporary_server()"
    )
    home = tmp_path / "prefect-home"
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgresql+asyncpg://nobody:x@127.0.0.1:1/none",
    }
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, timeout=200
    )
    assert result.returncode == 0 and "exit 3" in result.stdout, result.stdout + result.stderr[-3000:]
    log = (home / "temporary-server.log").read_text()
    assert "Connect call failed" in log and "Application startup failed" in log, log[-2000:]
    assert "Connect call failed" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert f"its errors, if any: {home / 'temporary-server.log'}" in " ".join(result.stderr.split())


@pytest.mark.parametrize("next_command", ["compact", "erase"])
def test_a_compaction_killed_holding_its_lease_is_marked_crashed_by_the_next(
    tmp_path: Path, next_command: str
) -> None:
    """Like classify's output lease: the next compaction (or erase: they share the lease) takes over and
    records the dead run as Crashed instead of leaving it Running in the history for good."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import Running

    from flows.analytics import compact_dataset
    from tests.analytics_data import make_dataset

    dest = tmp_path / "dest"
    make_dataset(dest)
    with get_client(sync_client=True) as client:
        dead = client.create_flow_run(compact_dataset, parameters={"dest": str(dest)}, state=Running())
    code = (
        "import sys, time; from tasks.compact import COMPACTION_LEASE; from tasks.lease import acquire; "
        "from tasks.storage import open_location; "
        "acquire(open_location(sys.argv[1]), COMPACTION_LEASE, sys.argv[2], wait_seconds=0); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(dest), str(dead.id)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()

    if next_command == "compact":
        result = CliRunner().invoke(app, ["compact", str(dest)])
        assert result.exit_code == 0 and "merged 7 files into 3" in result.output, result.output
    else:
        (tmp_path / "list.txt").write_text("file:///scans/site-b/\n")
        result = CliRunner().invoke(app, ["erase", str(dest), "--uris", str(tmp_path / "list.txt"), "--yes"])
        assert result.exit_code == 0 and "erased 40 rows of 40 images" in result.output, result.output
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(dead.id).state
    assert (
        state is not None and state.type == StateType.CRASHED and "compaction lease" in (state.message or "")
    )
