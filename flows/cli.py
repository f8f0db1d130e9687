"""The `oncoflow` command line: thin wrappers that validate arguments, then run the flows.

Research use only: oncoflow's labels are model outputs, not diagnoses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import sys
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.default_styles import DEFAULT_STYLES
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from rich.theme import Theme

from flows.params import (
    ClassifyParams,
    DatasetParams,
    EraseParams,
    EvaluateParams,
    RunnerParams,
    TrainParams,
    check_endpoint_environment,
    describe_validation_error,
    location_argument,
    require_apart,
    require_folder,
)
from flows.quick_exit import run_command
from flows.server_guard import (
    is_temporary_server,
    start_temporary_server,
    use_temporary_server,
)
from tasks.defaults import DEFAULT_MAX_PIXELS, TARGET_ROWS, plural
from tasks.model_files import DEFAULT_BASE_MODEL, DEFAULT_MODEL, ModelError, check_model_name
from tasks.redaction import install_log_redaction, redact

app = typer.Typer(
    help="Batch classification of medical images (Normal / Malignant) with a ViT, as Prefect flows. "
    "For research, not diagnosis.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)


def print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("oncoflow")
        except PackageNotFoundError:  # run from a checkout that was never installed
            installed = "not installed (run from a source checkout)"
        print(f"oncoflow {installed}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option("--version", is_eager=True, callback=print_version, help="Print the version and exit."),
    ] = False,
) -> None:
    """oncoflow: classify medical images in bulk. Research use only, not a diagnosis."""
    install_log_redaction()  # from the first log line on: storage libraries log signed URLs and keys


def expected_errors() -> tuple[type[BaseException], ...]:
    """The errors whose messages say what to do, shown as one `error:` line without a traceback. OSError
    covers storage failures (full disk, lost output location). Imported when a command runs: --help and
    argument errors need no storage libraries."""
    from tasks.lease import LeaseBusy, LeaseLost

    return (ModelError, OSError, ValueError, LeaseBusy, LeaseLost)


TOO_MANY_ERRORS_EXIT = 3  # the run completed and wrote its rows, but --max-error-rate was exceeded
ERRNO_PREFIX = re.compile(r"^\[Errno \d+\] ")  # of str(OSError): its message says what the number means


def fail(message: str, code: int = 1) -> None:
    message = ERRNO_PREFIX.sub("", message, count=1)
    console.print(f"[bold red]error:[/] {escape(redact(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def validated(factory: Callable[..., Any], names: dict[str, str] | None = None, **values: Any) -> Any:
    """Build a parameter object, turning validation problems into one clear message and exit code 2.
    `names`: how this command spells a field whose spelling differs from the others' (serve's --source)."""
    try:
        return factory(**values)
    except ValidationError as exc:
        fail(describe_validation_error(exc, names=names), code=2)


@contextmanager
def progress_bar() -> Iterator[None]:
    """A progress bar on a terminal; nothing when output is redirected (logs stay clean)."""
    if not sys.stderr.isatty():
        yield
        return
    live = log_console()
    # Prefect's console has a theme of its own, without rich's progress styles: lend them for the bar.
    bar_styles = {k: v for k, v in DEFAULT_STYLES.items() if k.startswith(("bar.", "progress."))}
    live.push_theme(Theme(bar_styles, inherit=False))  # on top of its own: only the styles it lacks
    try:
        with Progress(
            TextColumn("classifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=live
        ) as progress:
            from tasks.inference import progress_listeners

            bar = progress.add_task("classify", total=None)

            def listen(event: str, count: int) -> None:
                if event == "total":
                    progress.update(bar, total=count)
                else:
                    progress.advance(bar, count)

            progress_listeners.append(listen)
            try:
                yield
            finally:
                progress_listeners.remove(listen)
    finally:
        live.pop_theme()


def log_console() -> Console:
    """The rich Console Prefect's log handler prints to the terminal with, else the CLI's own.

    The progress bar draws on this one: a console knows to print a line above its own live display, not
    above another's (two consoles put Prefect's records at the end of the bar's line:
    `classifying ━━ 0/?  22:07:13.882 | INFO ...`)."""
    for handler in logging.getLogger().handlers:
        own = getattr(handler, "console", None)
        if isinstance(own, Console) and own.is_terminal:
            return own
    return console


def print_plan(summary: dict[str, Any]) -> None:
    table = Table(title="oncoflow dry run: nothing was classified or written")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, meaning in (
        ("images_found", ""),
        ("images_new", " (would be classified)"),
        ("images_changed", " (of those: modified since classified)"),
        ("images_retried", " (of those: error rows again)"),
        ("images_unchanged", " (classified already)"),
        ("model_revision", ""),
    ):
        table.add_row(key + meaning, str(summary.get(key)))
    out = Console()
    out.print(table)
    for uri in summary["examples"]:
        out.print(f"  would classify {escape(uri)}", highlight=False, soft_wrap=True)
    if summary["images_new"] > len(summary["examples"]):
        out.print(f"  ... and {summary['images_new'] - len(summary['examples'])} more", highlight=False)
    if summary.get("output_exists") is False:
        out.print(
            f"  {escape(summary['output'])} does not exist yet: a run would start a new dataset there "
            "(check the path if you meant an existing one)",
            highlight=False,
            soft_wrap=True,
        )
    for path in summary.get("blocked", []):  # the run's log warns about each too
        out.print(
            f"  blocked by {escape(path)}: a file where the output needs a folder",
            highlight=False,
            soft_wrap=True,
        )


def print_summary(summary: dict[str, Any], output: str | None = None) -> None:
    """The run's summary table; `output`: where its rows went (DEST as given, credentials redacted)."""
    if summary.get("dry_run"):
        print_plan(summary)
        return
    table = Table(title="oncoflow run summary (research use only, not a diagnosis)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in (
        "images_found",
        "images_new",
        "images_classified",
        "ok",
        "errors",
        "malignant",
        "malignant_share",
        "images_per_second",
        "seconds",
    ):
        value = summary.get(key)
        table.add_row(key, "n/a" if value is None else str(value))
    if summary.get("images_changed"):
        table.add_row("images_changed (classified before, modified since)", str(summary["images_changed"]))
    if summary.get("images_retried"):
        table.add_row("images_retried (error rows classified again)", str(summary["images_retried"]))
    if summary.get("lease_wait_seconds"):
        table.add_row("lease_wait_seconds", str(summary["lease_wait_seconds"]))
    if summary.get("images_archived"):
        table.add_row("images_archived (not read; restore them)", str(summary["images_archived"]))
    if summary.get("images_vanished"):
        table.add_row("images_vanished (moved or deleted during the run)", str(summary["images_vanished"]))
    for category, count in summary.get("errors_by_category", {}).items():
        table.add_row(f"errors: {category}", str(count))
    if summary.get("dicom_without_images"):  # reports, presentation states: not counted as failures
        table.add_row("  of which DICOM without images", str(summary["dicom_without_images"]))
    table.add_row("output_files", str(len(summary.get("output_files", []))))
    table.add_row("model_revision", str(summary.get("model_revision")))
    table.add_row("run_id", str(summary.get("run_id")))
    out = Console()
    out.print(table)
    if output is not None:  # a line of its own: a table cell would cut a long path short
        out.print(f"output: {escape(redact(output))}", highlight=False, soft_wrap=True)


Source = Annotated[
    str,
    typer.Argument(metavar="SOURCE", help="Folder, file:// URI or s3://bucket/prefix holding the images."),
]
Output = Annotated[
    str,
    typer.Option(
        "--output", "-o", help="Output dataset: a folder or s3:// prefix (Hive-partitioned Parquet)."
    ),
]
ModelOption = Annotated[
    str, typer.Option(help="Hugging Face Hub id, or a local folder saved with save_pretrained (safetensors).")
]
RevisionOption = Annotated[
    str | None, typer.Option(help="Hub branch, tag or commit to pin (hub models only). Default: main.")
]
DeviceOption = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]
PrecisionOption = Annotated[
    str,
    typer.Option(
        help="auto (fp16 on GPU; bf16 on CPUs with AVX512-BF16/AMX, else fp32), fp32 (exact reference parity), bf16 or fp16 (GPU only)."
    ),
]
BatchOption = Annotated[
    int | None, typer.Option(help="Images per forward pass. Default: 256 on a GPU, 32 on a CPU.")
]
ThresholdOption = Annotated[
    float,
    typer.Option(help="Decision threshold on prob_malignant: label is Malignant iff prob >= threshold."),
]
ShardOption = Annotated[
    int | None,
    typer.Option(help="Images per task and per output Parquet file. Default: 4000 on a GPU, else 1000."),
]
MaxPixelsOption = Annotated[
    int, typer.Option(help="Images with more pixels become `too_large` error rows (decompression bombs).")
]
RunnerOption = Annotated[
    str, typer.Option(help="Where shards run: local (threads here), dask or ray (see docs/scaling.md).")
]
DaskAddressOption = Annotated[
    str | None,
    typer.Option(help="Dask scheduler (tcp://HOST:8786); without it --runner dask starts a LocalCluster."),
]
DaskWorkersOption = Annotated[
    int | None,
    typer.Option(
        help="Worker processes of the LocalCluster that --runner dask starts without address \\[default: 1]."
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster address (ray://HOST:10001); needs pip install 'oncoflow\\[ray]'."),
]
DecodeOption = Annotated[
    str,
    typer.Option(
        help="auto (default): gpu when the model runs on a GPU and its processor resizes bilinearly, else "
        "cpu. cpu: decode, resize and normalize with PIL (exact parity with the reference snippet). "
        "gpu: resize/normalize batched on the model's device and decode JPEGs with nvjpeg when torchvision "
        "is installed (faster on GPUs; agreement in bench/README.md)."
    ),
]
S3EndpointOption = Annotated[
    str | None,
    typer.Option(
        help="S3-compatible endpoint (MinIO, SeaweedFS, Ceph), e.g. http://minio:9000. "
        "Default: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS."
    ),
]
AwsBlockOption = Annotated[
    str | None,
    typer.Option(
        help="Name of a prefect-aws AwsCredentials block to read S3 credentials from. "
        "Default: the standard AWS chain (environment, profile, instance role)."
    ),
]
MaxErrorRateOption = Annotated[
    float | None,
    typer.Option(
        help="Exit with code 3 (after writing every row) when the share of error rows exceeds this."
    ),
]
RetryErrorsOption = Annotated[
    str | None,
    typer.Option(
        metavar="CATEGORIES",
        help="Classify again the images whose newest row for this model is an error of these categories "
        "(comma-separated, or all), e.g. unsupported after installing a decoder, read_failed after "
        "access was granted. Error rows are final otherwise. Each retry adds a row; `latest` shows the newest.",
    ),
]
ExifOption = Annotated[
    bool, typer.Option(help="Rotate images per their EXIF orientation tag (the reference snippet does not).")
]
DryRunOption = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Only count what the run would classify (new, changed, retried images) and name a few: lists "
        "SOURCE and reads OUTPUT's index; loads no model weights, writes nothing.",
    ),
]
CompileOption = Annotated[
    bool,
    typer.Option(
        help="Run the model through torch.compile: batches run faster after a one-time compile per process "
        "(5-25 s on a CPU, cached on disk). Needs a C++ compiler on a CPU, Triton on a GPU. For large runs."
    ),
]


def classify_command(
    source: Source,
    output: Output,
    model: ModelOption = DEFAULT_MODEL,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchOption = None,
    threshold: ThresholdOption = 0.5,
    shard_size: ShardOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    runner: RunnerOption = "local",
    dask_address: DaskAddressOption = None,
    dask_workers: DaskWorkersOption = None,
    ray_address: RayAddressOption = None,
    decode: DecodeOption = "auto",
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
    max_error_rate: MaxErrorRateOption = None,
    exif_orientation: ExifOption = False,
    compile: CompileOption = False,
    retry_errors: RetryErrorsOption = None,
    dry_run: DryRunOption = False,
) -> None:
    """Classify new or changed images under SOURCE; append one Parquet row per image to OUTPUT."""
    params = validated(
        ClassifyParams, **{k: v for k, v in locals().items() if k not in RunnerParams.model_fields}
    )
    placement = validated(
        RunnerParams,
        runner=runner,
        dask_address=dask_address,
        dask_workers=dask_workers,
        ray_address=ray_address,
    )
    prepare_local_run(params, placement)
    from flows.classify import classify

    run_and_report(classify, placement, **params.model_dump())


def prepare_local_run(params: ClassifyParams, placement: RunnerParams) -> None:
    """Check --model (exit 2 before any work); with the local runner this process runs the model: check
    --device, --precision and --compile against this machine too, and start loading the model while
    Prefect starts (its temporary server is spawned first, to boot meanwhile; a dry run loads no model
    and writes nothing). On a cluster the workers check and load it (this machine may have no GPU)."""
    local = placement.runner == "local"
    check_model_arguments(params.model)
    # Spawned before torch and the storage libraries are imported (~1.3 s here), so that the server's
    # boot, the critical path of a run on it, begins sooner; a check below that fails stops it on the way out.
    start_temporary_server()
    if local:
        check_model_arguments(params.model, params.device, params.precision, params.compile, folder=False)
    if not params.dry_run:  # a dry run needs read access only
        check_writable(params.output)
    if local and not params.dry_run:
        from flows.classify import start_loading_model

        start_loading_model(params)


def check_writable(folder: str, option: str = "--output") -> None:
    """Exit 2 before any work when a local output folder can neither be created nor written (its parent
    is a file, a read-only or virtual filesystem, no permission); object stores are checked by the run."""
    if "://" in folder:
        return
    from tasks.storage import probe_local_folder

    try:
        probe_local_folder(folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        fail(
            f"invalid {option}: cannot create or write the folder {folder!r} ({reason}); choose a folder "
            "this account can create and write",
            code=2,
        )


def missing_folder(location: str) -> bool:
    """A local path or file:// URI that is not an existing folder (object stores are checked later)."""
    try:
        require_folder(location, "")
    except ValueError:
        return True
    return False


def check_model_arguments(
    model: str,
    device: str | None = None,
    precision: str | None = None,
    compile: bool = False,
    option: str = "--model",
    folder: bool = True,
) -> None:
    """Exit 2 before any work when the model arguments cannot work: a --model path that is no folder
    (or a folder without safetensors weights; not checked again with `folder=False`), and, given the
    device the model runs on in this process, --device, --precision and --compile on this machine
    (these import torch)."""
    if folder:
        try:
            check_model_name(model, classifier=option == "--model")
        except ModelError as exc:
            fail(f"invalid {option}: {exc}", code=2)
    if device is None:
        return
    from tasks.model import check_compile, resolve_device, resolve_precision

    try:
        torch_device = resolve_device(device)  # type: ignore[arg-type]
        if precision is not None:
            resolve_precision(precision, torch_device)  # type: ignore[arg-type]
        if compile:
            check_compile(torch_device)
    except ModelError as exc:
        fail(str(exc), code=2)


STOPPED_SHARD = "exception ShardStopped: "  # tasks.inference.ShardStopped, as the task's final state says it


def safe_message(record: logging.LogRecord) -> str:
    """The record's text; "" for one whose arguments do not fit its format (the handler reports those,
    as it always did: a filter that raised would fail the code that logged)."""
    try:
        return record.getMessage()
    except (TypeError, ValueError):
        return ""


class OneLineExpectedErrors(logging.Filter):
    """On the terminal, Prefect's report of a failed run keeps one line when the error is one this CLI
    explains itself (its `error:` line follows): the first record of it without its traceback; the
    task's and the flow's later records repeating the same error ("Finished in state Failed(...)")
    are dropped, and so is Prefect's "EventsWorker - Still processing items: 1 items remaining..."
    while it sends the failed run's last events at exit (it means nothing to do). A shard that a stop
    (Ctrl-C, SIGTERM) ended before it wrote is not an error: its record becomes an INFO line saying so.
    The run's logs in the Prefect API, written by another handler before this one, keep every record and
    the whole traceback."""

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected
        self.seen: set[str] = set()  # the texts of expected errors already shown

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and STOPPED_SHARD in (message := safe_message(record)):
            said = message.split(STOPPED_SHARD, 1)[1].split("')", 1)[0]
            record.msg, record.args, record.exc_info, record.exc_text = (
                f"ended by the stop: {said}",
                (),
                None,
                None,
            )
            record.levelno, record.levelname = logging.INFO, "INFO"
            return True
        if record.exc_info and isinstance(record.exc_info[1], self.expected):
            text = str(record.exc_info[1])
            record.exc_info = record.exc_text = None
            if text in self.seen:
                return False
            if text:
                self.seen.add(text)
            return True
        message = safe_message(record) if self.seen else ""
        if self.seen and message.startswith("Still processing items"):
            return False
        return not any(text in message for text in self.seen)


def quiet_expected_tracebacks(expected: tuple[type[BaseException], ...]) -> None:
    """Install OneLineExpectedErrors on the terminal handlers (Prefect puts its console handler on the
    root logger; run loggers reach it by propagation, after their own API handler), once."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, OneLineExpectedErrors) for f in handler.filters
        ):
            handler.addFilter(OneLineExpectedErrors(expected))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
STOPPED = (
    "stopped: the shard files written so far are kept; run the same command again and it classifies "
    "only the images that have no row yet"
)


@contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout` in a cron line, a service manager stopping) and SIGHUP (the terminal
    or ssh session closed) end a run as Ctrl-C does: the run is marked Crashed, the command exits 130
    and the temporary server is stopped. Prefect's own handler marks the run Crashed, then signals the
    process again with the handler it found: without this one, the default, which ends the process at
    once (exit 143 or 129), leaving the run Running in the history and the temporary server to stop
    itself. Not in a thread other than the main one, where signals cannot be handled."""

    def interrupt(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt

    try:  # a signal ignored stays ignored: `nohup oncoflow ...` must survive the logout it was run for
        previous = {
            number: signal.signal(number, interrupt)
            for number in STOP_SIGNALS
            if signal.getsignal(number) is not signal.SIG_IGN
        }
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


RUN_FIX = "or unset PREFECT_API_URL to run on a temporary server of this command's own"
RERUN_FIX = (  # the server went away during a run: each Parquet file lands whole or not at all
    "then run the command again: the rows written are kept, and their images are not classified twice"
)


def prepare_prefect_api() -> None:
    """Before a command's flow starts. With PREFECT_API_URL set (the environment or the Prefect profile),
    a server that does not answer fails now, naming the URL and the fix, not as a traceback from
    Prefect's engine after the model has loaded; only a connection failure counts (a server that
    answers is Prefect's to judge). Without it, the flow runs on the command's temporary server
    (flows/server_guard.py: spawned early, waited for here)."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        use_temporary_server()
        return
    from prefect.client.orchestration import get_client

    with prefect_api(fix=RUN_FIX), get_client(sync_client=True) as client:
        error = client.api_healthcheck()
        if isinstance(error, httpx.TransportError):
            raise error


def run_and_report(flow: Any, placement: RunnerParams, **parameters: Any) -> None:
    """Run a classify-style flow on the chosen runner with a progress bar; print its summary; exit codes."""
    import httpx

    from flows.classify import TooManyErrors
    from flows.runners import api_for_local_workers, with_runner

    quiet_expected_tracebacks((*expected_errors(), TooManyErrors, httpx.TransportError))
    dry = bool(parameters.get("dry_run"))
    if dry:  # one listing task: no cluster to start for it
        placement = RunnerParams()  # type: ignore[call-arg]
    prepare_prefect_api()
    try:
        with (
            contextlib.nullcontext() if dry else progress_bar(),
            sigterm_as_ctrl_c(),
            api_for_local_workers(placement),
            prefect_api(fix=RERUN_FIX, mid_run=True),
        ):
            summary = with_runner(flow, placement)(**parameters)
    except TooManyErrors as exc:
        print_summary(exc.summary, parameters.get("output"))
        fail(str(exc), code=TOO_MANY_ERRORS_EXIT)
    except expected_errors() as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):  # the terminal may be gone (a hangup)
            console.print("stopped" if dry else STOPPED, highlight=False, soft_wrap=True)
        raise
    print_summary(summary, parameters.get("output"))


app.command("classify")(classify_command)

classify_command_app = typer.Typer(add_completion=False)
classify_command_app.command()(classify_command)


Dest = Annotated[
    str,
    typer.Argument(
        metavar="DEST",
        help="The dataset `oncoflow classify --output` wrote: a folder, file:// URI or s3://bucket/prefix.",
    ),
]


@app.command("compact")
def compact_command(
    dest: Dest,
    target_rows: Annotated[
        int, typer.Option(help="Rows per merged file (4,000,000 ≈ 80-120 MB; see docs/analytics.md).")
    ] = TARGET_ROWS,
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
) -> None:
    """Merge each partition's small Parquet files into larger ones; no row is lost or doubled."""
    params = validated(DatasetParams, **locals())
    start_temporary_server()
    from flows.analytics import compact_dataset

    prepare_prefect_api()
    quiet_expected_tracebacks(expected_errors())
    try:
        with sigterm_as_ctrl_c():
            report = compact_dataset(**params.model_dump())
    except expected_errors() as exc:
        fail(str(exc))
    line = (
        f"merged {report['files_merged']} files into {report['files_written']} "
        f"({plural(report['rows_merged'], 'row')}, {plural(report['partitions'], 'partition')})"
        if report["files_merged"]
        else f"nothing to merge: {report['partitions']} partition(s), none with files to merge"
        if report["partitions"]
        else "nothing to merge: the dataset holds no rows yet"
    )
    if report["leftovers_deleted"]:
        line += f"; {report['leftovers_deleted']} inputs of an interrupted compaction deleted"
    if report["temporaries_deleted"]:
        line += f"; {report['temporaries_deleted']} stale temporary files deleted"
    Console().print(line, soft_wrap=True)


@app.command("erase")
def erase_command(
    dest: Dest,
    uris: Annotated[
        str | None,
        typer.Option(
            "--uris",
            metavar="FILE",
            help="A local text file naming the images whose rows to erase, one per line: an image URI "
            "(s3://…, file://…) or a local path, or a folder or key prefix ending in / (every image "
            "under it); # comments. A CSV with an image_uri column (a filtered `latest` export) works too.",
        ),
    ] = None,
    missing_from: Annotated[
        str | None,
        typer.Option(
            "--missing-from",
            metavar="SOURCE",
            help="Instead of --uris: erase the rows of images under SOURCE (as classify was given it) "
            "that SOURCE no longer holds (deleted under a retention policy).",
        ),
    ] = None,
    yes: Annotated[
        bool, typer.Option("--yes", help="Erase. Without it, only count and name what would be erased.")
    ] = False,
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
) -> None:
    """Erase every row of some images (consent withdrawn, deleted at the source): README, "Erasing the rows"."""
    params = validated(
        EraseParams,
        dest=dest,
        uris=uris,
        missing_from=missing_from,
        apply=yes,
        s3_endpoint_url=s3_endpoint_url,
        aws_credentials_block=aws_credentials_block,
    )
    start_temporary_server()
    from flows.analytics import erase_rows
    from tasks.erase import EraseReport, describe

    prepare_prefect_api()
    quiet_expected_tracebacks(expected_errors())
    try:
        with sigterm_as_ctrl_c():
            report = EraseReport(**erase_rows(**params.model_dump()))
    except expected_errors() as exc:
        fail(str(exc))
    out = Console(highlight=False, soft_wrap=True, markup=False)  # file names may hold [brackets]
    out.print(describe(report))
    if report.images_listed:
        out.print(f"({params.missing_from} lists {plural(report.images_listed, 'image')}: their rows stay)")
    if report.images_still_there:
        out.print(
            f"{plural(report.images_still_there, 'image')} under {params.missing_from} that its listing does "
            "not name still exist (in a hidden folder, or reached through a link): their rows stay"
        )
    for example in report.examples:
        out.print(f"  {example}")
    if report.entries_unmatched:
        shown = ", ".join(report.entries_unmatched[:5])
        more = len(report.entries_unmatched) - 5
        out.print(
            f"{len(report.entries_unmatched)} of the {report.entries} entries of {params.uris} match no row "
            "(erased before? a typo, or another spelling of the path than image_uri's? a folder or key "
            f"prefix ends in /): {shown}" + (f" and {more} more" if more > 0 else "")
        )
    if report.images_under_empty_folders:
        out.print(
            f"{plural(report.images_under_empty_folders, 'image')} under {params.missing_from} that its "
            "listing does not name lie under an empty folder (an unmounted share?): their rows stay; if "
            "they are really gone, remove the empty folders (find SOURCE -type d -empty -delete) and run "
            "again, or name them with --uris"
        )
    if report.leftovers_deleted:
        out.print(
            f"{plural(report.leftovers_deleted, 'file')} an interrupted erase or compaction left deleted"
        )
    if not report.applied:
        if report.rows_erased or report.leftover_rows:
            out.print("nothing was erased: run again with --yes to erase these rows")
        return
    if report.rows_erased:
        out.print(
            "the images themselves are untouched: one still under a SOURCE is classified again by its next "
            "run, and a classify run in progress may still write a row of one: run erase again after it. "
            "Prefect's run logs and artifacts and the files exported before (latest, report, evaluate) "
            "may still name them (docs/analytics.md)"
        )


def read_dataset(
    action: Callable[[str, str, dict[str, Any]], Any],
    dest: str,
    output: str,
    extensions: tuple[str, ...],
    s3_endpoint_url: str | None,
    aws_credentials_block: str | None,
) -> Any:
    """Validate DEST, --output (one of `extensions`) and the S3 options (exit 2), then run
    action(dest, output, storage options); errors while reading exit 1."""
    import duckdb

    from flows.credentials import storage_options

    params = validated(
        DatasetParams, dest=dest, s3_endpoint_url=s3_endpoint_url, aws_credentials_block=aws_credentials_block
    )
    try:
        output = location_argument(output)  # a local file or an s3:// key
        if output.startswith("s3://") and not params.s3_endpoint_url:
            check_endpoint_environment()
    except ValueError as exc:
        fail(f"invalid --output: {exc}", code=2)
    if not output.lower().endswith(extensions):
        fail(f"--output {output!r} must end in {' or '.join(extensions)}", code=2)
    if "://" not in output and os.path.isdir(os.path.expanduser(output)):
        fail(
            f"--output {output!r} is an existing folder; give a file name (it is created or replaced)", code=2
        )
    try:
        # a file written into DEST would join the dataset
        require_apart(dest, "DEST", output, "--output", "file")
    except ValueError as exc:
        fail(str(exc), code=2)
    check_writable(
        os.path.dirname(os.path.abspath(os.path.expanduser(output))) if "://" not in output else output
    )
    storage = storage_options(params.aws_credentials_block, params.s3_endpoint_url)
    errors: tuple[type[BaseException], ...] = (*expected_errors(), duckdb.Error)
    try:
        return action(params.dest, output, storage)
    except errors as exc:
        if (
            isinstance(exc, duckdb.Error) and "parquet" in str(exc).lower()
        ):  # a damaged file: which, and the fix
            from tasks.sink import find_unreadable_file
            from tasks.storage import open_location

            damaged = find_unreadable_file(open_location(params.dest, storage))
            fail(str(damaged or exc))
        fail(str(exc))


@app.command("latest")
def latest_command(
    dest: Dest,
    output: Annotated[str, typer.Option("--output", "-o", help="File to write: .parquet or .csv.")],
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
) -> None:
    """Export one row per image, of its current content: the row of the newest model revision (by first
    appearance in DEST) that classified that content (docs/analytics.md)."""
    from tasks.analytics import export_latest

    rows = read_dataset(
        export_latest, dest, output, (".parquet", ".csv"), s3_endpoint_url, aws_credentials_block
    )
    Console().print(f"wrote {rows} rows (one per image) to {output}", soft_wrap=True)


@app.command("report")
def report_command(
    dest: Dest,
    output: Annotated[str, typer.Option("--output", "-o", help="File to write: .html or .png.")],
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
) -> None:
    """Plot volumes per day, Malignant share, confidence and errors. Research use only, not a diagnosis."""
    from tasks.dataset_report import write_report

    data = read_dataset(write_report, dest, output, (".html", ".png"), s3_endpoint_url, aws_credentials_block)
    totals = data.totals
    Console().print(
        f"wrote {output}: {totals['images (latest row each)']} images, "
        f"{totals['error rows (latest row each)']} error rows ({totals['error share']})",
        highlight=False,
        soft_wrap=True,
    )


def print_metrics(metrics: dict[str, Any], written: str) -> None:
    """The seed card's table, the confusion counts and the operating point, on stdout."""
    # matplotlib, scikit-learn: only once there is a report
    from tasks.report import SEED_ROWS, interval_text, metric_text, threshold_text

    table = Table(title="oncoflow evaluation (research use only, not a diagnosis)")
    table.add_column("Metric")
    table.add_column("Value", justify="right")
    counts = metrics["counts"]
    share = metrics.get("malignant_share")  # precision, accuracy and F1 hold at this share only
    table.add_row(
        "images: Normal / Malignant",
        f"{counts['Normal']} / {counts['Malignant']}"
        + (f" ({share:.2%} Malignant)" if share is not None else ""),
    )
    for name, key in SEED_ROWS:
        # "n/a (no Malignant images)" where undefined; the 95% interval of the two rates
        table.add_row(name, metric_text(metrics, key) + interval_text(metrics, key))
    table.add_row(
        "TP / FN / FP / TN", f"{metrics['tp']} / {metrics['fn']} / {metrics['fp']} / {metrics['tn']}"
    )
    table.add_row("ROC AUC", metric_text(metrics, "roc_auc"))
    point = metrics.get("operating_point")
    if point:
        table.add_row(
            f"threshold for sensitivity >= {point['target_sensitivity']}",
            f"{point['threshold']!r} (specificity {metric_text(point, 'specificity')}, "
            f"precision {metric_text(point, 'precision')})",
        )
    images = metrics["images"]
    # Rows add up: evaluated + labelled error rows + predictions without label = prediction rows.
    table.add_row("not evaluated: labelled, but an error row", str(images["labelled_error_rows"]))
    table.add_row("not evaluated: predictions without label", str(images["predictions_without_label"]))
    table.add_row("not evaluated: labels without prediction", str(images["labels_without_prediction"]))
    Console().print(table)
    out = Console(highlight=False, soft_wrap=True)
    threshold = threshold_text(metrics)
    out.print(threshold[0].upper() + threshold[1:])
    out.print(f"report: {written}")


def evaluate_command(
    output: Annotated[
        str, typer.Option("--output", "-o", help="Report folder: metrics.json, report.md, plots.")
    ],
    predictions: Annotated[
        str | None, typer.Option(help="A classify output dataset (DEST) to evaluate; needs --labels.")
    ] = None,
    labels: Annotated[
        str | None, typer.Option(help="csv or parquet with image_uri,label (Normal/Malignant or 0/1).")
    ] = None,
    model_revision: Annotated[
        str | None, typer.Option(help="Which model revision (or model_slug) of DEST, when it holds several.")
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(help="A folder with Normal/ and Malignant/ sub-folders: classify, then evaluate."),
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchOption = None,
    target_sensitivity: Annotated[
        float | None, typer.Option(help="Also report the highest threshold whose sensitivity is >= this.")
    ] = None,
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
    compile: CompileOption = False,
) -> None:
    """Compare predictions with true labels: the seed card's metrics, plots and an operating point."""
    params = validated(EvaluateParams, **{k: v for k, v in locals().items()})
    from tasks.report import check_not_among_images

    try:
        check_not_among_images(params.output)
    except ValueError as exc:
        fail(str(exc), code=2)
    if params.data is not None:  # classified here first: the classify checks, before any work
        check_model_arguments(params.model, params.device, params.precision, params.compile)
        check_writable(params.output)
        from tasks.labels import LabelError, labeled_folder

        try:  # Normal/ and Malignant/ sub-folders with images: a listing, before Prefect starts
            if not labeled_folder(params.data):
                fail(f"--data {params.data!r} holds no images under Normal/ and Malignant/", code=2)
        except (LabelError, OSError) as exc:
            fail(str(exc), code=2)
        check_report_of_local_model(params)
    else:
        check_writable(params.output)
    if params.labels:  # its content is an argument too: a bad labels file fails before any work
        from tasks.labels import LabelError, read_labels_file

        try:
            read_labels_file(params.labels)
        except (LabelError, OSError) as exc:  # OSError: unreadable (permissions), a folder, ...
            fail(str(exc), code=2)
    if params.predictions and not params.aws_credentials_block:
        check_revision_choice(
            params.predictions, params.model_revision, params.s3_endpoint_url, params.output
        )
    start_temporary_server()
    from flows.evaluate import evaluate

    quiet_expected_tracebacks(expected_errors())
    prepare_prefect_api()
    try:
        with sigterm_as_ctrl_c():
            metrics = evaluate(**params.model_dump())
    except expected_errors() as exc:
        fail(str(exc))
    print_metrics(metrics, f"{params.output}/report.md")


def check_report_of_local_model(params: EvaluateParams) -> None:
    """Exit 2 before Prefect starts when REPORT holds the report of another model revision or setting and
    --model is a local folder (its revision is a hash of its files, computed here only when REPORT holds
    a report); a hub model's revision is known once fetched: the flow checks it then, before classifying."""
    directory = check_model_name(params.model)
    if directory is None or not os.path.exists(os.path.join(params.output, "metrics.json")):
        return
    from flows.evaluate import predictions_folder
    from tasks.model_files import weights_revision
    from tasks.report import check_report_folder

    destination = os.path.join(os.path.abspath(params.output), predictions_folder(params))
    try:
        check_report_folder(params.output, [weights_revision(directory)], destination)
    except ValueError as exc:
        fail(str(exc), code=2)


def check_revision_choice(
    predictions: str, model_revision: str | None, s3_endpoint_url: str | None, report: str
) -> None:
    """Exit 2 before Prefect starts when --predictions holds several model revisions and no
    --model-revision chooses one, or none that it names, or when REPORT holds the report of another
    revision or DEST (tasks.report.check_report_folder; the flow checks again before writing). A dataset
    that cannot be read here is left for the flow to report."""
    from flows.credentials import storage_options
    from tasks.metrics import EvaluationError
    from tasks.metrics import check_revision_choice as check

    try:
        chosen = check(predictions, model_revision, storage_options(None, s3_endpoint_url))
    except EvaluationError as exc:
        fail(str(exc), code=2)
    except Exception:  # unreachable storage, a damaged file: the flow's own checks name those
        return
    if chosen is not None:
        from tasks.report import check_report_folder

        try:
            check_report_folder(report, [chosen], predictions)
        except ValueError as exc:
            fail(str(exc), code=2)


def train_command(
    data: Annotated[str, typer.Option(help="Folder with Normal/ and Malignant/ sub-folders of images.")],
    output: Annotated[str, typer.Option("--output", "-o", help="New folder for the trained model.")],
    base_model: Annotated[str, typer.Option(help="Hub id or local folder of the ViT to start from.")] = (
        DEFAULT_BASE_MODEL
    ),
    epochs: Annotated[int, typer.Option(help="Passes over the training images.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per optimizer step.")] = 16,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (constant).")] = 5e-5,
    val_split: Annotated[
        float, typer.Option(help="Share of each class held out to pick the best epoch.")
    ] = 0.15,
    seed: Annotated[int, typer.Option(help="Fixes the split, initialization, shuffling and crops.")] = 42,
    device: DeviceOption = "auto",
    workers: Annotated[int, typer.Option(help="DataLoader processes decoding images (0: in-process).")] = 0,
) -> None:
    """Fine-tune a ViT on labelled images with the seed card's recipe; `classify --model OUTPUT` uses it."""
    params = validated(TrainParams, **{k: v for k, v in locals().items()})
    check_model_arguments(params.base_model, params.device, option="--base-model")
    check_writable(params.output)
    from tasks.labels import LabelError, labeled_folder
    from tasks.training import split

    try:  # the classes and enough images for --val-split: listing only, before Prefect starts
        split(labeled_folder(params.data), params.val_split, params.seed)
    except (LabelError, ValueError, OSError) as exc:  # TrainingError is a ValueError
        fail(str(exc), code=2)
    start_temporary_server()
    from flows.train import train

    quiet_expected_tracebacks(expected_errors())
    prepare_prefect_api()
    try:
        with sigterm_as_ctrl_c():
            summary = train(**params.model_dump())
    except expected_errors() as exc:
        fail(str(exc))
    validation = summary["validation"]
    Console().print(
        f"model saved to {summary['output']} (best epoch {summary['best_epoch']}): validation accuracy "
        f"{100 * validation['accuracy']:.2f}%, recall {100 * validation['recall']:.2f}%, specificity "
        f"{100 * validation['specificity']:.2f}% — see {summary['output']}/README.md. Research use only.",
        highlight=False,
        soft_wrap=True,
    )


app.command("evaluate")(evaluate_command)
app.command("train")(train_command)

evaluate_command_app = typer.Typer(add_completion=False)
evaluate_command_app.command()(evaluate_command)
train_command_app = typer.Typer(add_completion=False)
train_command_app.command()(train_command)


PrefixOption = Annotated[
    str, typer.Option(help="Only this sub-folder of SOURCE (relative path, e.g. 2023/ward-4). Default: all.")
]


@app.command("reprocess")
def reprocess_command(
    source: Source,
    output: Output,
    model: Annotated[str, typer.Option(help="The new model: Hub id or local save_pretrained folder.")],
    prefix: PrefixOption = "",
    revision: RevisionOption = None,
    device: DeviceOption = "auto",
    precision: PrecisionOption = "auto",
    batch_size: BatchOption = None,
    threshold: ThresholdOption = 0.5,
    shard_size: ShardOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    decode: DecodeOption = "auto",
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
    max_error_rate: MaxErrorRateOption = None,
    exif_orientation: ExifOption = False,
    compile: CompileOption = False,
    retry_errors: RetryErrorsOption = None,
    dry_run: DryRunOption = False,
    runner: RunnerOption = "local",
    dask_address: DaskAddressOption = None,
    dask_workers: DaskWorkersOption = None,
    ray_address: RayAddressOption = None,
) -> None:
    """Classify every image under SOURCE with MODEL; other models' rows stay; re-run to resume."""
    from flows.reprocess import reprocess, within

    values = {k: v for k, v in locals().items() if k not in {"prefix", "reprocess", "within"}}
    flow_values = {k: v for k, v in values.items() if k not in RunnerParams.model_fields}
    try:
        narrowed = within(source, prefix)
    except ValueError as exc:
        fail(str(exc), code=2)
    if narrowed != source and missing_folder(narrowed) and not missing_folder(source):
        fail(
            f"invalid --prefix {prefix!r}: SOURCE has no such sub-folder ({narrowed!r}); give a sub-folder "
            "of SOURCE, relative to it (e.g. 2023/ward-4) or as a full path inside it",
            code=2,
        )
    placement = validated(RunnerParams, **{k: v for k, v in values.items() if k in RunnerParams.model_fields})
    params = validated(ClassifyParams, **{**flow_values, "source": narrowed})
    prepare_local_run(params, placement)
    run_and_report(
        reprocess, placement, **{**flow_values, "retry_errors": params.retry_errors}, prefix=prefix
    )


@contextmanager
def prefect_api(
    fix: str = "or unset PREFECT_API_URL to read this machine's own run history",
    mid_run: bool = False,
) -> Iterator[None]:
    """Calls to the Prefect API: an unreachable server is an error that names the URL and the fix.

    `mid_run`: the server went away while a flow ran. Prefect's background services would then spend
    minutes retrying, one event at a time, deliveries to a server that is gone before the process may
    exit; the command ends at once instead (exit 1), after the message. Every Parquet file of the run is
    whole already (each lands in one rename) and the lease is released in the flow's own `finally`."""
    import httpx
    from prefect.settings import PREFECT_API_URL

    try:
        yield
    except httpx.TransportError as exc:
        url = PREFECT_API_URL.value()
        if not url or is_temporary_server(url):
            url = "the temporary server"
        message = f"cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc}); start it "
        if not mid_run:
            fail(f"{message}(`prefect server start`), {fix}")
        try:
            fail(f"{message}again, {fix}; the run stays 'Running' in its history")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)


@app.command("history")
def history_command(
    limit: Annotated[int, typer.Option(min=1, help="How many runs to show, newest first.")] = 20,
    mark_crashed: Annotated[
        str | None,
        typer.Option(
            metavar="RUN_ID",
            help="Mark this run Crashed: one still Running although its process is gone (it lost its Prefect "
            "server, or its machine died). Its rows stay; run it again to classify the rest.",
        ),
    ] = None,
) -> None:
    """Recent runs from the Prefect backend: flow, state, start, duration, images, errors, model, and the run
    id (the `run_id` column of the rows it wrote; `prefect flow-run inspect ID` shows the rest)."""
    from flows.history import recent_runs

    if mark_crashed is not None:
        mark_run_crashed(mark_crashed)
        return

    table = Table(title="oncoflow runs (newest first)")
    for column in ("flow", "run", "state", "start (UTC)", "duration", "images", "errors", "model", "run id"):
        table.add_column(column, justify="right" if column in {"duration", "images", "errors"} else "left")
    start_temporary_server()
    use_temporary_server()
    with prefect_api():
        runs = recent_runs(limit)
    for run in runs:
        table.add_row(
            run.flow,
            run.name,
            run.state,
            f"{run.start:%Y-%m-%d %H:%M:%S}" if run.start else "-",
            f"{run.seconds:.1f} s" if run.seconds is not None else "-",
            "-" if run.images is None else str(run.images),
            "-" if run.errors is None else str(run.errors),
            escape(str(run.model)) if run.model else "-",
            run.run_id,
        )
    if not runs:
        console.print(
            "no oncoflow runs recorded yet in this Prefect backend (PREFECT_API_URL, or PREFECT_HOME's "
            "database when the temporary server is used); each classify, reprocess or evaluate run adds one"
        )
        return
    Console(width=200).print(table)


def mark_run_crashed(run_id: str) -> None:
    """Only for a run whose process is gone: a live run would set its own final state over it."""
    from flows.history import mark_crashed
    from tasks.lease import is_flow_run_id

    if not is_flow_run_id(run_id):
        fail(
            f"invalid --mark-crashed {run_id!r}: give a run id as `oncoflow history` lists it (a UUID)",
            code=2,
        )
    start_temporary_server()
    use_temporary_server()
    with prefect_api():
        changed, state = mark_crashed(
            run_id, "marked Crashed with `oncoflow history --mark-crashed`: its process was gone"
        )
    if not changed:
        where = f"it is {state}" if state else "this Prefect backend has no such run"
        fail(f"run {run_id} is not Running or Pending ({where}): nothing changed")
    console.print(f"run {run_id} marked Crashed; its rows stay, and the next run classifies what it left")


@app.command("prune")
def prune_command(
    older_than: Annotated[
        str, typer.Option(help="Age of the runs to delete: 30d (days), 12h (hours) or 90m (minutes).")
    ] = "30d",
    dry_run: Annotated[bool, typer.Option(help="Only count what would be deleted.")] = False,
) -> None:
    """Delete finished flow runs (with task runs, states, artifacts) that ended longer ago than --older-than."""
    from flows.history import describe_age, parse_age, prune_runs

    try:
        age = parse_age(older_than)
    except ValueError as exc:
        fail(str(exc), code=2)
    start_temporary_server()
    use_temporary_server()
    with prefect_api():
        count = prune_runs(age, dry_run=dry_run)
    console.print(
        f"{'would delete' if dry_run else 'deleted'} {count} flow run(s) older than {older_than} "
        f"({describe_age(age)})"
    )


@app.command("serve")
def serve_command(
    source: Annotated[str, typer.Option(help="What classify-nightly classifies (folder or s3:// prefix).")],
    output: Output,
    model: ModelOption = DEFAULT_MODEL,
    cron: Annotated[str, typer.Option(help="When classify-nightly runs (cron syntax).")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="IANA time zone of --cron, e.g. Europe/Berlin.")] = "UTC",
    device: DeviceOption = "auto",
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many runs at once.")] = None,
    precision: PrecisionOption = "auto",
    batch_size: BatchOption = None,
    threshold: ThresholdOption = 0.5,
    shard_size: ShardOption = None,
    max_pixels: MaxPixelsOption = DEFAULT_MAX_PIXELS,
    decode: DecodeOption = "auto",
    s3_endpoint_url: S3EndpointOption = None,
    aws_credentials_block: AwsBlockOption = None,
    max_error_rate: MaxErrorRateOption = None,
    exif_orientation: ExifOption = False,
    compile: CompileOption = False,
) -> None:
    """Serve classify-nightly, reprocess-archive and evaluate from this machine until interrupted (Ctrl-C).

    The classify options given here become the parameters of classify-nightly and reprocess-archive
    (the storage options evaluate's too), as `oncoflow classify` takes them."""
    from zoneinfo import available_timezones

    from prefect.settings import PREFECT_API_URL

    if timezone not in available_timezones():
        fail(f"invalid --timezone: {timezone!r} is not an IANA time zone (e.g. UTC, Europe/Berlin)", code=2)
    try:
        from prefect.client.schemas.schedules import CronSchedule

        CronSchedule(cron=cron, timezone=timezone)
    except (ValueError, ValidationError):
        fail(
            f"invalid --cron {cron!r}: give five fields in range (minute 0-59, hour 0-23, day of month "
            "1-31, month 1-12, day of week 0-6), e.g. '0 2 * * *' for 02:00 every day",
            code=2,
        )
    options = {k: v for k, v in locals().items() if k in ClassifyParams.model_fields}
    params = validated(ClassifyParams, names={"source": "--source"}, **options)
    # The runs execute in this process: a model folder, a hub model out of reach, or --device,
    # --precision or --compile that cannot work here would otherwise fail only at 02:00.
    check_model_arguments(params.model, params.device, params.precision, params.compile)
    check_hub_model(params.model)
    check_writable(params.output)
    if not PREFECT_API_URL.value():  # the environment, or the active Prefect profile; after the arguments,
        fail(  # which would be refused only once a server is running
            "serve needs a running Prefect server: start one with `prefect server start`, then "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api",
            code=2,
        )
    from flows.serve import build_deployments, serve_deployments

    with prefect_api("and run serve again once it answers (it takes a few seconds to start)"):
        check_served_storage(params)
        chosen = params.model_dump(exclude_defaults=True, exclude={"source", "output", "model", "device"})
        serve_deployments(
            build_deployments(params.source, params.output, model, cron, timezone, device, chosen),
            limit=limit,
        )


def check_served_storage(params: ClassifyParams) -> None:
    """An S3 source or output that cannot be reached now (a missing bucket, a wrong endpoint, denied
    access: the checks a run makes first) is a warning: serving anyway, the nightly run would fail on
    it unless it is fixed by then (a bucket created, a network that comes up)."""
    if not any(
        "://" in location and not location.startswith("file:") for location in (params.source, params.output)
    ):
        return
    from flows.classify import check_storage

    try:
        check_storage(params)
    except (OSError, ValueError) as exc:
        console.print(
            f"[yellow]warning:[/] {escape(redact(str(exc)).rstrip('.'))}. Serving anyway: the runs check it "
            "again when they start, and fail if it is still so",
            highlight=False,
            soft_wrap=True,
        )


def check_hub_model(model: str) -> None:
    """A hub id: fetch its configuration now (the network, or the local Hugging Face cache with
    HF_HUB_OFFLINE=1). One the hub says it has not (a wrong id or revision, a gated model without
    access) exits 2; one out of reach (no network yet at boot, a hub outage) is a warning, as the runs
    fetch it when they start."""
    if os.path.isdir(os.path.expanduser(model)):
        return
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from tasks.model import inspect_model

    try:
        inspect_model(model, weights=False)
    except ModelError as exc:
        if isinstance(exc.__cause__, RepositoryNotFoundError | RevisionNotFoundError):
            fail(f"invalid --model: {exc}", code=2)
        console.print(
            f"[yellow]warning:[/] {escape(redact(str(exc).rstrip('.')))}. Serving anyway: each run fetches the model "
            "when it starts, and fails if it is still out of reach then",
            highlight=False,
            soft_wrap=True,
        )


def run() -> None:
    """The `oncoflow` console script: the CLI, ending as soon as its work is done (flows/quick_exit.py)."""
    run_command(app)


if __name__ == "__main__":
    run()
