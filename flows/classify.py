"""The classify flow: discover new images → cut shards → classify each shard → one Parquet file per shard.

Incremental: images already in the output for this model revision and fingerprint are skipped, so the
nightly run only classifies what is new or changed. Run it with `oncoflow classify` or
`python -m flows.classify`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from flows.credentials import storage_options
from flows.guards import exclusive_output, gpu_slot
from flows.logs import send_logs_to_prefect
from flows.params import ClassifyParams, flow_params
from flows.runners import SHARDS_IN_FLIGHT, local_task_runner, shard_slots, shards_run_here
from tasks.defaults import DEFAULT_MAX_PIXELS, cuda_graphs_from_env, host_decode_share_from_env, plural
from tasks.dicom import NON_IMAGE_ERROR
from tasks.inference import (
    EngineOptions,
    classify_files,
    progress_listeners,
    resolve_options,
    stopping_runs,
)
from tasks.lease import LEASE_FOLDER, Lease, LeaseLost
from tasks.model import LoadedModel, ModelError, inspect_model, load_model
from tasks.model_files import DEFAULT_MODEL
from tasks.redaction import redact
from tasks.sink import (
    Selection,
    earlier_thresholds,
    known_uris,
    model_slug,
    read_index,
    rows_with_other_exif,
    select_files,
    shard_id,
    shard_path,
    top_level_entries,
    write_shard,
)
from tasks.storage import (
    IMAGE_EXTENSIONS,
    DiscoveredFile,
    check_output,
    check_source,
    describe_skipped,
    existing_part,
    is_transient,
    list_images,
    open_location,
)

send_logs_to_prefect()  # warnings (a lease wait, a skipped file) reach the run logs in the UI

# A shard is one Prefect task and one Parquet file. On a GPU a 1000-image shard lasts well under a
# second, and the per-task overhead (task run states, pipeline fill and drain, one file write) showed:
# the H100 benchmark ran 1,610 img/s steady with 1000-image shards and 2,220 with 4000 (bench/README.md).
CPU_SHARD_SIZE, GPU_SHARD_SIZE = 1000, 4000
PLAN_EXAMPLES = 5  # image URIs a dry run names, of those it would classify


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage and network hiccups; never bad models, bad arguments, full disks or bugs."""
    error = state.data if isinstance(state.data, BaseException) else None
    return error is not None and is_transient(error)


class TooManyErrors(Exception):
    """The run finished and wrote every row, but more files failed than --max-error-rate allows."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class ShardManifest:
    """What a shard task returns: where its rows went and how many of each kind (never the rows)."""

    shard: str
    path: str
    rows: int
    ok: int
    malignant: int
    errors: dict[str, int] = field(default_factory=dict)
    unrecorded: dict[str, int] = field(default_factory=dict)  # files without a row, by reason (Prepared)
    non_images: int = 0  # error rows of DICOM objects that hold no image (tasks.dicom.NON_IMAGE_ERROR)


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_transient, cache_policy=NONE)
def discover_new_images(params: ClassifyParams, revision: str) -> tuple[int, Selection]:
    """List the source and drop what the output already holds for this revision: (files found, the files
    to classify with how many of them are retried error rows and changed images)."""
    options = storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    skipped: Counter[str] = Counter()
    source = open_location(params.source, options)
    destination = open_location(params.output, options)
    index = read_index(destination, revision)
    partitions, others = top_level_entries(destination)
    if others and not partitions:  # another folder given by mistake? (notes beside a dataset are fine)
        get_run_logger().warning(
            "%s holds %d files or folders and no oncoflow dataset yet (no model_slug=… folder); the rows "
            "go in beside them. Check --output if you meant a new or a dataset folder (the folder of "
            "another SOURCE given by mistake?)",
            redact(params.output),
            others,
        )
    listed = list(list_images(source, skipped, known_uris(index)))  # files with rows: not opened again
    report_skipped(params.source, len(listed), skipped)
    earlier = earlier_thresholds(index, params.threshold)
    if earlier:
        # Thresholds as written (repr): an operating point is one image's exact prob_malignant, and a
        # rounded-up hint would leave that image out of the query.
        decided = ", ".join(f"{rows} at {float(threshold)!r}" for threshold, rows in sorted(earlier.items()))
        get_run_logger().warning(
            "%s already holds rows of this model revision decided at another threshold (%s); --threshold "
            "%r applies to new and changed images only. To re-decide the others, query "
            "`prob_malignant >= %r` (docs/analytics.md) or classify into a new --output",
            redact(params.output),
            decided,
            float(params.threshold),
            float(params.threshold),
        )
    if other := rows_with_other_exif(index, params.exif_orientation):
        get_run_logger().warning(
            "%s already holds %d rows of this model revision classified %s --exif-orientation; it applies "
            "to new and changed images only (the decoder column says which rows were rotated). To "
            "classify every image %s it, classify into a new --output",
            redact(params.output),
            other,
            "without" if params.exif_orientation else "with",
            "with" if params.exif_orientation else "without",
        )
    selection = select_files(listed, index, params.retry_errors)
    if params.retry_errors:
        get_run_logger().info(
            "--retry-errors %s: %d image(s) whose newest row is such an error %s classified again",
            ",".join(params.retry_errors),
            selection.retried,
            "would be" if params.dry_run else "are",
        )
    return len(listed), selection


@task(
    retries=2,
    retry_delay_seconds=[5, 30],
    retry_condition_fn=retry_transient,
    cache_policy=NONE,
    task_run_name="classify-shard-{number}",
)
def classify_shard(
    number: int,
    files: list[DiscoveredFile],
    params: ClassifyParams,
    run_id: str,
    day: datetime,
    host_decode_share: float | None = 0.0,
    cuda_graphs: bool = False,
    revision: str | None = None,
) -> ShardManifest:
    """Classify one shard and write its rows as one Parquet file, atomically.

    `revision` is the model revision the run started with (its lease and its index are that revision's):
    a process that holds it keeps classifying with it, whatever is saved over the model's folder
    meanwhile; one that must load the model (a Dask or Ray worker) and finds other weights fails the
    shard before it writes, instead of adding rows of another revision under this run's lease.

    `host_decode_share` is ONCOFLOW_HOST_DECODE_SHARE as the flow process read it (workers on a
    cluster may not have that environment); 0 (nvjpeg decodes every JPEG) like the engine's default.
    `cuda_graphs` is ONCOFLOW_CUDA_GRAPHS, read the same way."""
    model = load_classifier(params, expect_revision=revision)
    if revision is not None and model.revision != revision:
        raise ModelError(
            f"model {params.model!r} changed during the run (revision {revision} when it started, "
            f"{model.revision} where this shard runs): the shards written before keep the first "
            "revision's rows. Replace a model between runs, giving each version a folder of its own, "
            "and run the command again to classify with the new weights"
        )
    shard = shard_id(files, model.revision)
    options = EngineOptions(
        batch_size=params.batch_size,
        threshold=params.threshold,
        max_pixels=params.max_pixels,
        decode=params.decode,
        exif_orientation=params.exif_orientation,
        host_decode_share=host_decode_share,
        compile=params.compile,
        cuda_graphs=cuda_graphs,
    )
    storage = storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    unrecorded: Counter[str] = Counter()
    source = open_location(params.source, storage)
    table = classify_files(files, source.fs, model, options, run_id, shard, unrecorded)
    path = ""  # a shard of archived or vanished files only writes no file
    if table.num_rows:
        path = write_shard(
            open_location(params.output, storage),
            shard_path(model_slug(params.model, model.revision), day, shard),
            table,
        )
    statuses = table.column("status").to_pylist()
    messages = table.column("error").to_pylist()
    errors = Counter(e.split(":", 1)[0] for e in messages if e)
    return ShardManifest(
        shard=shard,
        path=path,
        rows=table.num_rows,
        ok=statuses.count("ok"),
        malignant=table.column("label_id").to_pylist().count(model.positive_id),
        errors=dict(errors),
        unrecorded=dict(unrecorded),
        non_images=messages.count(NON_IMAGE_ERROR),
    )


def report_skipped(source: str, images: int, skipped: Counter[str]) -> None:
    """Files SOURCE holds that are not listed as images (by extension, or for a name without one its
    content): a warning when nothing else was found (slides saved as .svs: a run of 0 images said
    nothing about them), one info line otherwise (sidecar .xml or .txt files are common)."""
    if not skipped:
        return
    kinds = describe_skipped(skipped)
    if images:
        get_run_logger().info("skipped %d file(s) that are not images (%s)", skipped.total(), kinds)
        return
    get_run_logger().warning(
        "%s holds no images, only %d other file(s) (%s); oncoflow lists %s (any letter case), and DICOM "
        "images named otherwise (no extension, .IMA, .dc3: by their DICM marker). Convert other formats "
        "to one of these",
        redact(source),
        skipped.total(),
        kinds,
        ", ".join(sorted(IMAGE_EXTENSIONS)),
    )


def check_storage(params: ClassifyParams) -> None:
    """Missing buckets, denied access and wrong endpoints fail here, before the model loads."""
    options = storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    check_source(open_location(params.source, options))
    check_output(open_location(params.output, options), write=not params.dry_run)


def load_classifier(params: ClassifyParams, expect_revision: str | None = None) -> LoadedModel:
    return load_model(params.model, params.revision, params.device, params.precision, expect_revision)


def start_loading_model(params: ClassifyParams) -> None:
    """Load the model in the background while Prefect starts its temporary server (seconds each).

    The flow's own load_classifier then finds it in the per-process cache. A model that fails to load
    is not cached, so the flow loads it again and reports the error itself.
    """

    def load() -> None:
        with contextlib.suppress(Exception):
            load_classifier(params)

    threading.Thread(target=load, name="oncoflow-preload", daemon=True).start()


def cut_shards(files: list[DiscoveredFile], size: int) -> list[list[DiscoveredFile]]:
    """Consecutive runs of `size` files, in discovery order (deterministic)."""
    return [files[start : start + size] for start in range(0, len(files), size)]


def run_shards(
    shards: list[list[DiscoveredFile]],
    params: ClassifyParams,
    run_id: str,
    slots: int = SHARDS_IN_FLIGHT,
    lease: Lease | None = None,
    day: datetime | None = None,
    revision: str | None = None,
) -> list[ShardManifest]:
    """Submit shards with a bounded window (2 per slot), so pending work never grows with the archive.

    If a shard fails, the shards already submitted are waited for before the error propagates: the
    caller releases the output lease on the way out, and no write may land after that (exactly once).
    A lease lost meanwhile (object stores: renewals failed) stops the submitting at the next shard.

    Stopped (Ctrl-C, SIGTERM: a BaseException that is no Exception here), the run does not finish the
    shards in its window: those not started are cancelled, and those running in this process end at
    their next batch without writing (`stopping_runs`). So a stop takes about one batch, not up to four
    shards; the next run classifies what was left. Shards on Dask or Ray workers finish (they cannot
    see this process's flag).
    """
    day = day or datetime.now(UTC)  # the `date` partition: the day the run started (its caller's)
    share, graphs = host_decode_share_from_env(), cuda_graphs_from_env()
    manifests: list[ShardManifest] = []
    pending: deque[PrefectFuture[ShardManifest]] = deque()
    try:
        for number, files in enumerate(shards):
            if lease is not None and lease.lost:
                raise LeaseLost(lease.lost)
            pending.append(classify_shard.submit(number, files, params, run_id, day, share, graphs, revision))
            if len(pending) >= slots * 2:
                manifests.append(oldest_result(pending))
        while pending:
            manifests.append(oldest_result(pending))
    except BaseException as stop:  # Ctrl-C, SIGTERM (Prefect's TerminationSignal), SystemExit, ...
        if isinstance(stop, Exception):  # a shard failed: the others finish and keep their rows
            raise
        stopping_runs.add(run_id)
        for future in pending:
            queued = thread_future(future)
            if queued is not None:
                queued.cancel()  # only a shard not started yet (in the thread pool's queue)
        raise
    finally:
        for future in pending:
            queued = thread_future(future)
            if queued is None or not queued.cancelled():
                future.wait()
        stopping_runs.discard(run_id)
    return manifests


def oldest_result(pending: deque[PrefectFuture[ShardManifest]]) -> ShardManifest:
    """The oldest shard's manifest, then it leaves `pending`: a stop that comes while waiting for it
    finds it still there, to be stopped and waited for before the lease is released."""
    manifest = pending[0].result()
    pending.popleft()
    return manifest


def thread_future(future: PrefectFuture[Any]) -> concurrent.futures.Future[Any] | None:
    """The thread pool's own future behind a shard submitted to the local runner (None elsewhere)."""
    wrapped = getattr(future, "wrapped_future", None)
    return wrapped if isinstance(wrapped, concurrent.futures.Future) else None


def summarize(
    found: int, new: int, manifests: list[ShardManifest], seconds: float, waited: float = 0.0
) -> dict[str, Any]:
    """The run's counts; images_per_second leaves out `waited` (seconds spent waiting for the lease)."""
    classified = sum(m.rows for m in manifests)
    ok = sum(m.ok for m in manifests)
    malignant = sum(m.malignant for m in manifests)
    errors: Counter[str] = Counter()
    for manifest in manifests:
        errors.update(manifest.errors)
    return {
        "images_found": found,
        "images_new": new,
        "images_classified": classified,
        "images_archived": sum(m.unrecorded.get("archived", 0) for m in manifests),
        "images_vanished": sum(m.unrecorded.get("vanished", 0) for m in manifests),
        "ok": ok,
        "errors": sum(errors.values()),
        "errors_by_category": dict(sorted(errors.items())),
        "dicom_without_images": sum(m.non_images for m in manifests),  # part of errors: not_an_image
        "error_share": round(sum(errors.values()) / classified, 4) if classified else 0.0,
        "malignant": malignant,
        "malignant_share": round(malignant / ok, 4) if ok else None,  # n/a: no row was ok
        "images_per_second": round(classified / (seconds - waited), 2)
        if seconds > waited and classified
        else 0.0,
        "seconds": round(seconds, 2),
        "lease_wait_seconds": round(waited, 2),
        "output_files": [m.path for m in manifests if m.path],
    }


def publish_summary(summary: dict[str, Any], params: ClassifyParams, model: str) -> None:
    """A table artifact in the Prefect UI (research use only, not a diagnosis)."""
    rows = [
        {"metric": key, "value": "n/a" if value is None else str(value)}
        for key, value in summary.items()
        if key not in {"output_files", "errors_by_category"}
    ]
    rows += [{"metric": f"errors: {k}", "value": str(v)} for k, v in summary["errors_by_category"].items()]
    rows += [
        {"metric": "output_files_written", "value": str(len(summary["output_files"]))},
        {"metric": "model", "value": model},
        {"metric": "output", "value": redact(params.output)},
    ]
    create_table_artifact(
        rows,
        key="classify-summary",
        description="oncoflow classify run. Research use only, not a diagnosis: see the model card's error rates.",
    )


@flow(
    name="classify",
    task_runner=local_task_runner(),
    log_prints=True,
)
def classify(
    source: str,
    output: str,
    model: str = DEFAULT_MODEL,
    revision: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto",
    batch_size: int | None = None,
    threshold: float = 0.5,
    shard_size: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    decode: Literal["auto", "cpu", "gpu"] = "auto",
    s3_endpoint_url: str | None = None,
    aws_credentials_block: str | None = None,
    max_error_rate: float | None = None,
    exif_orientation: bool = False,
    compile: bool = False,
    retry_errors: list[str] | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Classify every new or changed image under SOURCE into the Parquet dataset at OUTPUT."""
    return classify_images(flow_params(ClassifyParams, **locals()))


def classify_images(params: ClassifyParams) -> dict[str, Any]:
    """The body of the classify and reprocess flows: lease → discover → shards → summary."""
    # `day` names the `date` partition: the day the run started, even if a lease wait runs past midnight
    started, day = time.perf_counter(), datetime.now(UTC)
    check_storage(params)
    run_id = str(flow_run.get_id() or uuid.uuid4())
    if params.dry_run:
        return plan_run(params, run_id, started, day)
    # Before the lease, so a model that cannot load leaves OUTPUT untouched. With the local runner the
    # shards reuse this very load; on a cluster only the workers build the network (the flow process
    # may have no GPU), and the flow just checks the files and learns the revision.
    if shards_run_here():
        loaded = load_classifier(params)
        revision, device_type = loaded.revision, loaded.device.type
        engine = resolve_options(EngineOptions(batch_size=params.batch_size, decode=params.decode), loaded)
        placement = f"{loaded.precision}, {loaded.device}, batch {engine.batch_size}, {engine.decode} decode"
        placement += ", compiled" if params.compile else ""
    else:
        revision, device_type = inspect_model(params.model, params.revision).revision, "workers"
        placement = f"{params.precision} precision, {params.device} device, on the runner's workers"
        if not os.path.isdir(os.path.expanduser(params.model)):  # a hub id: the workers fetch this commit
            params = params.model_copy(update={"revision": revision})
    # The lease makes overlapping runs take turns: listing happens only once it is held (exactly once).
    asked = time.perf_counter()
    with exclusive_output(params, run_id, revision) as lease:
        waited = time.perf_counter() - asked
        found, selection = discover_new_images(params, revision)
        new_files = selection.files
        for listener in progress_listeners:
            listener("total", len(new_files))
        with gpu_slot(device_type):
            shard_size = params.shard_size or (GPU_SHARD_SIZE if device_type == "cuda" else CPU_SHARD_SIZE)
            shards = cut_shards(new_files, shard_size)
            manifests = run_shards(shards, params, run_id, shard_slots(), lease, day, revision)
    summary = summarize(found, len(new_files), manifests, time.perf_counter() - started, waited)
    # Both part of images_new: error rows classified again (--retry-errors); classified, modified since.
    summary.update(images_retried=selection.retried, images_changed=selection.changed)
    summary.update(run_id=run_id, model=params.model, model_revision=revision)
    publish_summary(summary, params, f"{params.model} @ {revision} ({placement})")
    print(
        f"classified {summary['images_classified']} of {found} images ({plural(summary['errors'], 'error')}, "
        f"{summary['malignant']} Malignant) at {summary['images_per_second']} img/s"
    )
    if summary["images_archived"]:
        get_run_logger().warning(
            "%d new images are in an archive storage class (S3 Glacier Flexible Retrieval or Deep Archive, "
            "or an Intelligent-Tiering archive tier) and were not read: they have no row yet. Restore them "
            "(`aws s3api restore-object`, or move them to a readable class) and a later run classifies them",
            summary["images_archived"],
        )
    if summary["images_vanished"]:
        get_run_logger().warning(
            "%d images were moved or deleted between listing and reading: they have no row; any that are "
            "back (moved back, restored) are classified by the next run",
            summary["images_vanished"],
        )
    check_error_rate(summary, params.max_error_rate)
    return summary


def plan_run(params: ClassifyParams, run_id: str, started: float, day: datetime) -> dict[str, Any]:
    """--dry-run: what a run would classify now, from SOURCE's listing and OUTPUT's index. The model's
    configuration is read and its revision resolved (a hub model's weights are not downloaded), but no
    weights are loaded, no lease is taken and nothing is written; a run going on meanwhile may classify
    some of these. Archived S3 objects count as new: the run itself finds them unreadable."""
    revision = inspect_model(params.model, params.revision, weights=False).revision
    found, selection = discover_new_images(params, revision)
    new = len(selection.files)
    blocked = blocking_files(params.output, model_slug(params.model, revision), day)
    if blocked:
        get_run_logger().warning(
            "a run would fail: %s %s a file where the output needs a folder; move it away",
            ", ".join(blocked),
            "is" if len(blocked) == 1 else "are",
        )
    summary: dict[str, Any] = {
        "dry_run": True,
        "output": redact(params.output),
        "output_exists": output_exists(params),
        "images_found": found,
        "images_new": new,
        "images_changed": selection.changed,
        "images_retried": selection.retried,
        "images_unchanged": found - new,
        "examples": [redact(file.uri) for file in selection.files[:PLAN_EXAMPLES]],
        "blocked": blocked,
        "seconds": round(time.perf_counter() - started, 2),
        "run_id": run_id,
        "model": params.model,
        "model_revision": revision,
    }
    rows = [{"metric": key, "value": str(value)} for key, value in summary.items() if key != "examples"]
    rows += [{"metric": "example", "value": uri} for uri in summary["examples"]]
    create_table_artifact(
        rows,
        key="classify-dry-run",
        description="oncoflow dry run: what a classify run would do; nothing was classified or written.",
    )
    retried = f", {selection.retried} error rows retried" if params.retry_errors else ""
    print(
        f"dry run: {new} of {found} images would be classified ({selection.changed} of them modified since "
        f"classified{retried}); nothing was classified or written"
    )
    return summary


def output_exists(params: ClassifyParams) -> bool | None:
    """Whether OUTPUT exists already (a local folder; on S3, a prefix holding objects); None when that
    cannot be told. A dry run says when it does not: a mistyped DEST would start a second dataset."""
    try:
        destination = open_location(
            params.output, storage_options(params.aws_credentials_block, params.s3_endpoint_url)
        )
        return bool(destination.fs.exists(destination.path))
    except OSError:
        return None


def blocking_files(output: str, slug: str, day: datetime) -> list[str]:
    """The files of a local OUTPUT that stand where a run must make or use a folder (on the way to its
    lease folder or to today's partition of this model revision): a dry run, which writes nothing,
    names them instead of the run failing on them later."""
    location = open_location(output)
    if not location.is_local:
        return []
    wanted = (location.join(LEASE_FOLDER), location.join(os.path.dirname(shard_path(slug, day, "plan"))))
    return sorted({path for path in map(existing_part, wanted) if not os.path.isdir(path)})


def check_error_rate(summary: dict[str, Any], max_error_rate: float | None) -> None:
    """Fail a finished run whose share of error rows exceeds the limit (its rows are already written)."""
    # On the counts, not the rounded error_share: 1 error in 20,002 images is over --max-error-rate 0.
    # DICOM objects that hold no image (reports, presentation states) are neither failures nor images.
    others = summary.get("dicom_without_images", 0)
    classified, failed = summary["images_classified"] - others, summary["errors"] - others
    if max_error_rate is not None and classified and failed / classified > max_error_rate:
        not_counted = f", not counting {others} DICOM objects without images" if others else ""
        raise TooManyErrors(
            f"{failed} of {classified} images failed ({failed / classified:.1%}{not_counted}), more than "
            f"--max-error-rate {max_error_rate:g} allows; "
            f"by category: {summary['errors_by_category']}. Every row was written; see the `error` column",
            summary,
        )


if __name__ == "__main__":
    from flows.cli import classify_command_app
    from flows.quick_exit import run_command

    run_command(classify_command_app)
