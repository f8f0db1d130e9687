"""The batched engine: read → decode + preprocess in a bounded worker pool → batched forward → rows.

Reading and decoding run in threads (PIL and storage I/O release the GIL) at most a few batches ahead
of the model, so memory stays flat however many files a shard holds, and the model never waits for
the next batch while the pool keeps up. Every file becomes exactly one row: `ok`, or `error` with
`<category>: <message>`.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import BrokenExecutor, CancelledError, Executor, Future, ThreadPoolExecutor
from contextlib import closing, nullcontext
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Literal

import fsspec
import numpy as np
import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from tasks.defaults import DEFAULT_MAX_PIXELS
from tasks.images import (
    MAX_POOL_RENEWALS,
    PIL,
    SPLIT_SLACK_SECONDS,
    SPLIT_SLACK_SHARE,
    Decoded,
    DecodeSplit,
    DevicePreprocessor,
    Preprocessor,
    ProcessorFallback,
    decode_error,
    decode_image,
    host_resize_chunk,
    nvjpeg_available,
    on_cuda,
    oversized,
)
from tasks.model import FixedBatchForward, LoadedModel, ModelError, fixed_batch_forward
from tasks.redaction import install_log_redaction, redact
from tasks.sink import EXIF_SUFFIX, SCHEMA
from tasks.storage import DiscoveredFile, read_bytes, read_file, s3_error_code
from tasks.workers import DecodeWorkers

# Each decode worker holds one whole file in memory: larger files are refused from their listed size,
# before any byte is read (no valid scan within the default pixel limit comes near it).
MAX_FILE_BYTES = 1 << 30
# Files above PROBE_FROM_BYTES have their first PROBE_BYTES header-checked before they are read whole, so
# a decompression bomb padded to hundreds of MB costs one small read, not a worker's memory.
PROBE_FROM_BYTES, PROBE_BYTES = 64 << 20, 1 << 20

# Called as listener("total", n) once the work is known and listener("advance", n) after each batch;
# the CLI's progress bar listens here.
progress_listeners: list[Callable[[str, int], None]] = []

# Runs being stopped (Ctrl-C, SIGTERM): their shards running in this process end at the next batch and
# write nothing (flows.classify.run_shards adds a run here; the next run classifies those images).
stopping_runs: set[str] = set()


class ShardStopped(Exception):
    """The run was stopped while this shard ran: it ended at a batch boundary and wrote no rows."""


logger = logging.getLogger(__name__)

MESSAGE_LIMIT = 500  # characters of an error row's message: enough to act on, never a dump


class StageTimes:
    """Seconds spent in each engine stage, summed over batches and shards. bench/throughput.py reads
    them to say which stage held a run back (a few clock reads per batch: always on)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds: dict[str, float] = {}

    def add(self, stage: str, since: float) -> float:
        """Add the time from `since` to now to `stage`; return now."""
        now = time.perf_counter()
        self.record(stage, now - since)
        return now

    def record(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def take(self) -> dict[str, float]:
        """The totals so far (rounded), and start again from zero."""
        with self._lock:
            totals = {stage: round(seconds, 3) for stage, seconds in self._seconds.items()}
            self._seconds.clear()
        return totals


# feeder_waits_for_files: readers behind; feeder_device_prep: copy / nvjpeg / launching the resize (the
# feeder does not wait for the resize kernels), including feeder_waits_for_host_decode (the host share of
# a DecodeSplit finishing after nvjpeg); feeder_waits_for_model
# and model_waits_for_batches: which side of the hand-over waited; model_forward: launching the forward
# (on a CPU: running it); model_waits_for_results: the GPU finishing it; rows.
stage_times = StageTimes()

# The DecodeSplit share each device ended its last shard with: the next shard starts there; and how many
# JPEGs each side decoded so far in this process (benchmarks read them).
learned_split_share: dict[str, float] = {}
split_images: Counter[str] = Counter()


@dataclass(frozen=True)
class EngineOptions:
    batch_size: int | None = None  # None: 256 on a GPU, 32 on a CPU (larger gains nothing there)
    threshold: float = 0.5  # label is Malignant iff prob_malignant >= threshold; 0.5 is the argmax
    # Reader/decoder threads; None: one per core up to 16, but only 4 when JPEGs go to nvjpeg from local
    # disk (the host then only reads and checks headers, and more threads just contend for the GIL).
    decode_workers: int | None = None
    prefetch_batches: int = 2  # decoded batches allowed to wait for the model
    max_pixels: int = DEFAULT_MAX_PIXELS
    # "cpu": decode, resize and normalize in host workers with PIL (exact reference parity).
    # "gpu": host workers only decode (JPEGs: only read, for nvjpeg when torchvision has it); resize and
    # normalize run batched on the model's device. Faster on GPUs, close but not bit-exact.
    # "auto": "gpu" when the model is on a GPU and its processor resizes bilinearly (the device resize
    # is within 2 of 255 levels of PIL there; bicubic differs more), else "cpu".
    decode: Literal["auto", "cpu", "gpu"] = "auto"
    exif_orientation: bool = False  # rotate per EXIF before preprocessing; the reference snippet does not
    # Build the next batch on the device (copy, or nvjpeg decode + resize) in a feeder thread on its own
    # CUDA stream while the model runs the current one. False runs both in turn (benchmarks compare).
    overlap: bool = True
    # With nvjpeg: the share of JPEGs that spare CPU threads decode instead (exact PIL decode + resize; the
    # GPU then only normalizes them). 0 (default): nvjpeg decodes every JPEG; None: adapt per batch
    # (tasks.images.DecodeSplit); 1: the host decodes them all. On the H100 any host share was slower
    # (two runs, bench/README.md: share 0 4,383 / 4,191 img/s; 0.25 2,322 / 1,513; adaptive 2,169 / 1,650),
    # so it is off by default.
    host_decode_share: float | None = 0.0
    # Launch batch k+1's forward before turning batch k into rows; None: on a GPU only (on a CPU the
    # forward runs at launch, so it would only delay the rows and the progress they report).
    launch_ahead: bool | None = None
    # Workers for that host share; None: the cores left after the reader threads and two more (the
    # feeder and the model's thread); 0 turns the split off.
    host_decode_workers: int | None = None
    # Where they run: "processes" (worker processes sharing no GIL with the feeder and the model thread;
    # see split_pool) or "threads" (what the H100 runs measured, slower than no split).
    host_decode_pool: Literal["processes", "threads"] = "processes"
    # With decode "cpu" (exact): PIL decode + resize in worker processes too (tasks.workers; the reader
    # threads still read and normalize, so the pixels are the same arrays). None: when the model is on
    # a GPU and host_decode_pool is "processes" (on a CPU the forward needs those cores anyway).
    decode_cpu_in_processes: bool | None = None
    # Run the forward through torch.compile (tasks.model.CompiledForward): fused kernels at one static
    # batch shape, compiled once per process (on 2 CPU cores: 23 s the first time, 5 s from inductor's
    # on-disk cache; ViT-Base bf16 then ran 14-19% faster, bench/README.md). Off by default: start-up
    # counts for nightly runs of a few hundred images, and it is unmeasured on a GPU.
    compile: bool = False
    # On a GPU: capture the forward once as a CUDA graph and replay it for every batch
    # (tasks.model.GraphedForward): one call per batch instead of ~1,500 operator launches, each taking
    # the GIL the feeder needs. Same kernels, same outputs. Off by default until measured on a GPU
    # (ONCOFLOW_CUDA_GRAPHS=1 in the flows); ignored on a CPU and with `compile`.
    cuda_graphs: bool = False


@dataclass
class Prepared:
    """One file after reading and preprocessing: pixels, or the reason there are none."""

    file: DiscoveredFile
    pixels: np.ndarray | None = None
    error: str | None = None
    width: int | None = None
    height: int | None = None
    decoder: str | None = None  # one of tasks.images.DECODERS, once the pixels are on the device
    # Why the file gets no row now, a later run reading it again: "archived" (an object store's archive
    # tier: a restore keeps the ETag) or "vanished" (moved or deleted after listing: back with its old
    # mtime, a final `missing` row would keep it unclassified for good).
    unrecorded: str | None = None


def prepare(
    file: DiscoveredFile,
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    max_pixels: int,
    exif_orientation: bool = False,
) -> Prepared:
    """Read, decode and preprocess one file; failures become a Prepared with an error, never raise."""
    read = read_for_decode(file, fs, max_pixels)
    if isinstance(read, Prepared):
        return read
    data, file = read
    return decode_prepared(file, data, preprocess, max_pixels, exif_orientation)


def read_for_decode(
    file: DiscoveredFile, fs: fsspec.AbstractFileSystem, max_pixels: int
) -> tuple[bytes, DiscoveredFile] | Prepared:
    """A file's bytes (and its listing, refreshed by the read), or the Prepared error row it becomes."""
    if file.size > MAX_FILE_BYTES:
        return Prepared(
            file, error=f"too_large: {file.size} bytes; files over {MAX_FILE_BYTES} bytes are not read"
        )
    try:
        if file.size > PROBE_FROM_BYTES and (
            refusal := oversized(read_bytes(fs, file.path, PROBE_BYTES), max_pixels)
        ):
            return Prepared(file, error=refusal[:MESSAGE_LIMIT])
        return read_file(file, fs)
    except FileNotFoundError:  # moved away or deleted during the run: if it comes back, it is new
        return Prepared(file, unrecorded="vanished")
    except ConnectionError:
        raise  # still failing after the storage layer's retries: fail the shard (the task retries it), never a final row
    # Any other storage error (permissions, a local EIO after retries) concerns this file only.
    except Exception as exc:
        if s3_error_code(exc) == "InvalidObjectState":
            # S3 Glacier Flexible Retrieval / Deep Archive, or an Intelligent-Tiering archive tier: a
            # restore makes it readable without changing its ETag, so a row (final for this content)
            # would keep it unclassified for good. No row: every run tries it again until it reads.
            return Prepared(file, unrecorded="archived")
        # An error row is final for this content: say how to have the file classified again (local
        # files unreadable at listing are left out instead; this is one that became so since).
        retry = (
            "; once it is readable, `touch` it and the next run classifies it"
            if file.uri.startswith("file://")
            else ""
        )
        text = f"read_failed: {type(exc).__name__}: {exc}"
        return Prepared(file, error=(redact(text)[: MESSAGE_LIMIT - len(retry)] + retry))


def decode_prepared(
    file: DiscoveredFile, data: bytes, preprocess: Preprocess, max_pixels: int, exif_orientation: bool
) -> Prepared:
    """Decode and preprocess one file's bytes in this thread."""
    try:
        if isinstance(preprocess, DevicePreprocessor):
            pixels, width, height = preprocess.encode_or_decode(
                data, max_pixels, name=file.path, exif_orientation=exif_orientation
            )
            return Prepared(file, pixels, width=width, height=height)
        image = decode_image(data, max_pixels, name=file.path, exif_orientation=exif_orientation)
        return Prepared(file, preprocess(image), width=image.width, height=image.height)
    except Exception as exc:  # ImageError, or a decoder bug on one hostile file: never kill the shard
        return Prepared(file, error=redact(decode_error(exc))[:MESSAGE_LIMIT])


EXACT_CHUNK_BYTES = 64 << 20  # file bytes a reader thread hands a decode worker at once (memory bound)


class ExactDecoders:
    """`--decode cpu` beside a GPU: PIL decode + resize in worker processes (tasks.workers), each reader
    thread sending the files of its run as one call, so the engine's threads keep the GIL for the
    feeder and the model's launches (on the H100, 16 PIL threads slowed those 7×: bench/README.md).
    Normalizing stays in the reader thread, with Preprocessor.normalize, the second half of
    Preprocessor.__call__: the model gets the very arrays the threads would have made.

    If the workers fail (they cannot start, one died, a call failed), the files of that call are
    decoded in the reader thread, as without workers: nothing is lost or changed. A broken pool is
    replaced; after MAX_POOL_RENEWALS failures in one run the workers are given up (and retired, so
    the next shard starts fresh ones) and the threads decode everything."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.failures = 0
        self._lock = threading.Lock()
        self.pool = start_pool(workers)

    def decode(
        self,
        preprocessor: Preprocessor,
        items: list[np.ndarray],
        names: list[str],
        max_pixels: int,
        exif: bool,
    ) -> list[Decoded | str] | None:
        """host_resize_chunk's results, or None when the workers could not run the call."""
        pool = self.pool
        if pool is None:
            return None
        try:
            results: list[Decoded | str] = pool.submit(
                host_resize_chunk, preprocessor, items, max_pixels, names, exif
            ).result()
            if len(results) == len(items):
                return results
            problem, unusable = f"{len(results)} results for {len(items)} files", False
        except Exception as exc:  # a worker died, the pool was retired, or the call itself failed
            problem = f"{type(exc).__name__}: {exc}"
            unusable = isinstance(exc, BrokenExecutor | CancelledError | RuntimeError)
        with self._lock:
            if self.pool is pool:  # the first reader thread to find this pool failing deals with it
                self.failures += 1
                if self.failures > MAX_POOL_RENEWALS:
                    retire_split_pool(pool)
                    self.pool = None
                elif unusable:
                    self.pool = renewed_pool(pool, self.workers)
                logger.warning(
                    "decode workers failed (%s); these files are decoded in threads%s",
                    problem,
                    ", and all the others too" if self.pool is None else "",
                )
        return None

    def prepare_run(
        self,
        files: Sequence[DiscoveredFile],
        fs: fsspec.AbstractFileSystem,
        preprocess: Preprocessor,
        options: EngineOptions,
    ) -> list[Prepared]:
        """prepare() for a run of files, decoded by the workers in calls of at most EXACT_CHUNK_BYTES
        of file bytes (a larger file goes alone)."""
        prepared: list[Prepared | None] = []
        pending: list[tuple[int, DiscoveredFile, bytes]] = []
        pending_bytes = 0

        def flush() -> None:
            items = [np.frombuffer(data, np.uint8) for _, _, data in pending]
            names = [file.path for _, file, _ in pending]
            results = self.decode(preprocess, items, names, options.max_pixels, options.exif_orientation)
            for n, (index, file, data) in enumerate(pending):
                result = results[n] if results is not None else None
                if result is None:
                    prepared[index] = decode_prepared(
                        file, data, preprocess, options.max_pixels, options.exif_orientation
                    )
                elif isinstance(result, str):
                    prepared[index] = Prepared(file, error=redact(result)[:MESSAGE_LIMIT])
                else:
                    pixels, width, height = result
                    try:
                        prepared[index] = Prepared(
                            file, preprocess.normalize(pixels), width=width, height=height
                        )
                    except Exception as exc:  # as decode_prepared would: an error row, not a failed shard
                        prepared[index] = Prepared(file, error=redact(decode_error(exc))[:MESSAGE_LIMIT])
            pending.clear()

        for file in files:
            read = read_for_decode(file, fs, options.max_pixels)
            if isinstance(read, Prepared):
                prepared.append(read)
                continue
            data, listed = read
            if pending and pending_bytes + len(data) > EXACT_CHUNK_BYTES:
                flush()
                pending_bytes = 0
            pending.append((len(prepared), listed, data))
            pending_bytes += len(data)
            prepared.append(None)
        if pending:
            flush()
        done = [item for item in prepared if item is not None]
        assert len(done) == len(prepared), "every file of the run became a Prepared"
        return done


def start_pool(workers: int, kind: str = "processes") -> Executor | None:
    """split_pool, or None (with a warning) when its processes cannot start: decode in threads then."""
    try:
        return split_pool(workers, kind)
    except Exception as exc:  # out of processes, memory or file descriptors
        logger.warning("decode worker processes could not start (%s); decoding without them", exc)
        return None


def renewed_pool(failed: Executor, workers: int, kind: str = "processes") -> Executor | None:
    """The pool to use instead of `failed`: a new one, or the one another engine of this process
    already started in its place (engines that share a pool all see it fail)."""
    retire_split_pool(failed)
    return start_pool(workers, kind)


def host_workers(
    files: Sequence[DiscoveredFile], preprocess: Preprocess, fs: fsspec.AbstractFileSystem, exif: bool
) -> int:
    """Reader threads: one per core up to 16, but 4 when (nearly) all files are local JPEGs bound for
    nvjpeg: the threads then only read and check headers, and more of them only contend for the GIL."""
    cores = usable_cores()
    nvjpeg = isinstance(preprocess, DevicePreprocessor) and preprocess.nvjpeg and not exif
    if nvjpeg and isinstance(fs, LocalFileSystem) and files:
        jpegs = sum(file.path.lower().endswith((".jpg", ".jpeg")) for file in files)
        if jpegs >= 0.9 * len(files):
            return min(4, cores)
    return min(16, cores)


def reader_threads(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    options: EngineOptions,
) -> int:
    """The reader threads a run uses: EngineOptions.decode_workers, or host_workers' choice."""
    return options.decode_workers or host_workers(files, preprocess, fs, options.exif_orientation)


def prepared_stream(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    options: EngineOptions,
    blocked: list[float] | None = None,
    exact: ExactDecoders | None = None,
) -> Iterator[Prepared]:
    """Prepared files in input order, with at most a bounded number in flight.

    Files go to the workers in small runs (up to 16 at a time, fewer when that would leave workers
    idle): one future per file cost more Python time than reading a JPEG for nvjpeg does. Seconds spent
    waiting for runs the workers had not finished yet are added to `blocked[0]` (the DecodeSplit's sign
    that the readers are behind). With `exact`, the exact path's decoding runs in worker processes.
    """
    window = (options.batch_size or CPU_BATCH_SIZE) * (options.prefetch_batches + 1)
    workers = reader_threads(files, fs, preprocess, options)
    run = max(1, min(16, window // (2 * workers)))

    def prepare_run(start: int) -> list[Prepared]:
        if exact is not None and isinstance(preprocess, Preprocessor):
            return exact.prepare_run(files[start : start + run], fs, preprocess, options)
        return [
            prepare(file, fs, preprocess, options.max_pixels, options.exif_orientation)
            for file in files[start : start + run]
        ]

    def take(future: Future[list[Prepared]]) -> list[Prepared]:
        if blocked is None or future.done():
            return future.result()
        clock = time.perf_counter()
        prepared = future.result()
        blocked[0] += time.perf_counter() - clock
        return prepared

    with ThreadPoolExecutor(workers, thread_name_prefix="oncoflow-decode") as pool:
        pending: deque[Future[list[Prepared]]] = deque()
        for start in range(0, len(files), run):
            pending.append(pool.submit(prepare_run, start))
            if len(pending) * run >= window:
                yield from take(pending.popleft())
        while pending:
            yield from take(pending.popleft())


Preprocess = Preprocessor | ProcessorFallback | DevicePreprocessor


GPU_BATCH_SIZE, CPU_BATCH_SIZE = 256, 32


def resolve_options(options: EngineOptions, model: LoadedModel) -> EngineOptions:
    """Fill in the `auto` batch size and decode mode for the device the model is on."""
    cuda = model.device.type == "cuda"
    decode = options.decode
    if decode == "auto":
        host = model.preprocess
        bilinear = isinstance(host, Preprocessor) and host.resample == Image.Resampling.BILINEAR
        decode = "gpu" if cuda and bilinear else "cpu"
    batch_size = options.batch_size or (GPU_BATCH_SIZE if cuda else CPU_BATCH_SIZE)
    return replace(options, decode=decode, batch_size=batch_size)


def choose_preprocessor(model: LoadedModel, decode: str) -> Preprocess:
    """Host PIL preprocessing (exact), or device-side resizing (+ nvjpeg where torchvision provides it)."""
    host = model.preprocess
    if decode == "gpu" and isinstance(host, Preprocessor):
        return DevicePreprocessor(host, nvjpeg=nvjpeg_available(model.device))
    return host


def to_model_input(
    items: list[np.ndarray], preprocess: Preprocess, model: LoadedModel, split: DecodeSplit | None = None
) -> tuple[torch.Tensor, dict[int, str], list[str]]:
    """One batch on the model's device, {index: error} for items that failed there, and the decoder
    of each item that did not (tasks.images.DECODERS)."""
    if isinstance(preprocess, DevicePreprocessor):
        return preprocess.batch(items, model.device, model.dtype, split)
    inputs = torch.from_numpy(np.stack(items))
    if model.device.type == "cuda":
        inputs = inputs.pin_memory()
    return inputs.to(model.device, dtype=model.dtype, non_blocking=True), {}, [PIL] * len(items)


@dataclass
class Launched:
    """A batch whose forward pass was launched: its probabilities arrive in `probabilities` (pinned host
    memory on a GPU) once `done` has fired."""

    batch: DeviceBatch
    probabilities: torch.Tensor
    done: torch.cuda.Event | None = None


@torch.inference_mode()
def launch(model: LoadedModel, batch: DeviceBatch, forward: FixedBatchForward | None = None) -> Launched:
    """Start the forward pass (through `forward`, --compile or CUDA graphs, when given) and the copy of
    its softmax (fp32) to the host, without waiting for them: on a GPU the caller turns the previous
    batch into rows while this one computes."""
    assert batch.inputs is not None
    inputs = batch.inputs
    logits = forward(inputs) if forward is not None else model.network(pixel_values=inputs).logits
    probabilities = torch.softmax(logits.float(), dim=-1)
    if model.device.type != "cuda":
        return Launched(batch, probabilities)
    host = torch.empty(probabilities.shape, dtype=probabilities.dtype, pin_memory=True)
    host.copy_(probabilities, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return Launched(batch, host, done)


def results(model: LoadedModel, launched: Launched) -> np.ndarray:
    """Class probabilities (n, num_labels) as float64, once the launched forward pass has finished."""
    if launched.done is not None:
        launched.done.synchronize()
    probabilities = launched.probabilities.numpy().astype(np.float64)
    if not np.isfinite(probabilities).all():
        fix = (
            "--precision bf16 or fp32" if model.precision == "fp16" else "--precision fp32, or another model"
        )
        raise ModelError(
            f"the model gave non-finite scores in {model.precision} on {model.device} "
            f"(overflow or broken weights); nothing was written for this shard. Rerun with {fix}."
        )
    return probabilities


def decide(probabilities: np.ndarray, positive_id: int, threshold: float) -> np.ndarray:
    """Class ids: the positive class iff its probability >= threshold, else the likeliest other class."""
    others = probabilities.copy()
    others[:, positive_id] = -1.0
    return np.where(probabilities[:, positive_id] >= threshold, positive_id, others.argmax(axis=1))


class RowBuilder:
    """Accumulates a shard's rows column by column."""

    def __init__(
        self, model: LoadedModel, threshold: float, run_id: str, shard: str, exif_orientation: bool = False
    ) -> None:
        self.model, self.threshold, self.run_id, self.shard = model, threshold, run_id, shard
        # --exif-orientation changes the pixels: the decoder column says so (`pil+exif_orientation`).
        self.decoder_suffix = EXIF_SUFFIX if exif_orientation else ""
        self.columns: dict[str, list[object]] = {name: [] for name in SCHEMA.names}
        self.unrecorded: Counter[str] = Counter()

    def add(
        self, item: Prepared, probabilities: np.ndarray | None = None, class_id: int | None = None
    ) -> None:
        """One row: a prediction when probabilities and class_id are given, else an error row; none for
        a file that is unrecorded (counted in `unrecorded`; the next run reads it again)."""
        if item.unrecorded:
            self.unrecorded[item.unrecorded] += 1
            return
        values: dict[str, object] = {
            "image_uri": item.file.uri,
            "fingerprint": item.file.fingerprint,
            "threshold": self.threshold,
            "model": self.model.name,
            "model_revision": self.model.revision,
            "run_id": self.run_id,
            "processed_at": datetime.now(UTC),
            "shard_id": self.shard,
            "precision": self.model.precision,
            "image_width": item.width,
            "image_height": item.height,
            "decoder": item.decoder + self.decoder_suffix if item.decoder else item.decoder,
        }
        if probabilities is not None and class_id is not None:
            values.update(
                label=self.model.id2label[class_id],
                label_id=class_id,
                confidence=float(probabilities[class_id]),
                prob_malignant=float(probabilities[self.model.positive_id]),
                status="ok",
            )
        else:
            values.update(status="error", error=item.error or "unsupported: no pixels and no reason recorded")
        for name, column in self.columns.items():
            column.append(values.get(name))

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=SCHEMA)


@dataclass
class DeviceBatch:
    """One batch: every item in input order, and the decodable ones' pixels on the model's device."""

    items: list[Prepared]
    decodable: list[Prepared]
    inputs: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None  # recorded on the feeder's stream once `inputs` are complete


def assemble(
    items: list[Prepared], preprocess: Preprocess, model: LoadedModel, split: DecodeSplit | None = None
) -> DeviceBatch:
    """Move a batch's pixels onto the device; items that fail there (nvjpeg) become error items."""
    decodable = [item for item in items if item.pixels is not None]
    if not decodable:
        return DeviceBatch(items, [])
    pixels = [item.pixels for item in decodable]
    inputs, failures, decoders = to_model_input(pixels, preprocess, model, split)  # type: ignore[arg-type]
    for index, error in failures.items():
        failed = decodable[index]
        failed.pixels, failed.width, failed.height = None, None, None  # error rows carry no size
        failed.error = redact(error)[:MESSAGE_LIMIT]
    decodable = [item for item in decodable if item.pixels is not None]
    for item, decoder in zip(decodable, decoders, strict=True):
        item.decoder = decoder
    return DeviceBatch(items, decodable, inputs if decodable else None)


def batched(stream: Iterator[Prepared], size: int) -> Generator[list[Prepared], None, None]:
    batch: list[Prepared] = []
    for item in stream:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def decode_split(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    model: LoadedModel,
    options: EngineOptions,
) -> DecodeSplit | None:
    """The host/nvjpeg split for this run, or None when nothing goes to nvjpeg or no core is spare."""
    if (
        not (isinstance(preprocess, DevicePreprocessor) and preprocess.nvjpeg)
        or options.host_decode_share == 0
    ):
        return None
    workers = options.host_decode_workers
    if workers is None:
        readers = reader_threads(files, fs, preprocess, options)
        # Readers of bytes for nvjpeg mostly wait (on disk, or on S3 with 16 of them): count at most 4 cores.
        workers = min(MAX_SPLIT_WORKERS, max(0, usable_cores() - min(readers, 4) - 2))
        if options.host_decode_share is not None:
            workers = max(1, workers)  # a share asked for explicitly gets at least one thread
    if workers <= 0:
        return None
    start = learned_split_share.get(str(model.device), 0.0)
    kind = options.host_decode_pool
    pool = start_pool(workers, kind)
    if pool is None:
        return None
    return DecodeSplit(
        pool,
        options.host_decode_share,
        start=start,
        max_pixels=options.max_pixels,
        workers=workers,
        renew=lambda failed: renewed_pool(failed, workers, kind),
    )


def exact_decoders(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    model: LoadedModel,
    options: EngineOptions,
) -> ExactDecoders | None:
    """Worker processes for the exact path's decoding, one per reader thread; see
    EngineOptions.decode_cpu_in_processes."""
    wanted = options.decode_cpu_in_processes
    if wanted is None:
        wanted = on_cuda(model.device) and options.host_decode_pool == "processes"
    if not wanted or not isinstance(preprocess, Preprocessor):
        return None
    readers = reader_threads(files, fs, preprocess, options)
    return ExactDecoders(min(MAX_SPLIT_WORKERS, readers))


MAX_SPLIT_WORKERS = 16  # each worker may hold one decoded scan: bounded however many cores a node has
SPLIT_POOLS = ("processes", "threads")
_split_pools: dict[tuple[str, int], Executor] = {}
_split_lock = threading.Lock()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's cpuset), not the node's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def retire_split_pool(pool: Executor) -> None:
    """Shut `pool` down and forget it, so the next split_pool call of its kind and size starts anew."""
    with _split_lock:
        for key, cached in list(_split_pools.items()):
            if cached is pool:
                del _split_pools[key]
    atexit.unregister(pool.shutdown)  # registered by split_pool; a retired pool need not wait for exit
    pool.shutdown(wait=False, cancel_futures=True)


def split_pool(workers: int, kind: str = "processes") -> Executor:
    """One pool of host-decode workers per kind and size for the whole process, so the shards that run at
    once (two with the local runner) share the spare cores instead of each claiming them all. A pool
    that failed is retired (retire_split_pool) and the next call starts a new one (renewed_pool).

    "processes" are fresh interpreters (tasks.workers.DecodeWorkers) that share no GIL with the feeder
    and the model thread and import only numpy, Pillow and tasks.images; they start here, while the
    first batch is still being read, and end with this process."""
    if kind not in SPLIT_POOLS:
        raise ValueError(f"host decode pool must be one of {SPLIT_POOLS}, got {kind!r}")
    with _split_lock:
        key = (kind, workers)
        pool = _split_pools.get(key)
        if pool is None:
            if kind == "threads":
                pool = ThreadPoolExecutor(workers, thread_name_prefix="oncoflow-split")
            else:
                pool = DecodeWorkers(workers)
                # At exit, without waiting: a worker ends when its input closes, as this process exits.
                atexit.register(pool.shutdown, wait=False)
            _split_pools[key] = pool
        return pool


def device_batches(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    preprocess: Preprocess,
    model: LoadedModel,
    options: EngineOptions,
) -> Generator[DeviceBatch, None, None]:
    """Batches ready on the model's device, in input order.

    With `options.overlap`, a feeder thread assembles batch k+1 (on a side CUDA stream when the model is
    on a GPU) while the caller runs the model on batch k; at most one assembled batch waits. An error in
    the feeder (a storage outage) is raised here, in the caller's thread. With nvjpeg, a DecodeSplit
    lets spare cores decode part of each batch (see EngineOptions.host_decode_share).
    """
    blocked = [0.0]  # seconds spent waiting for reader threads that were not done yet
    stream = prepared_stream(
        files, fs, preprocess, options, blocked, exact_decoders(files, fs, preprocess, model, options)
    )
    source = batched(stream, options.batch_size or CPU_BATCH_SIZE)
    split = decode_split(files, fs, preprocess, model, options)
    try:
        if options.overlap:
            yield from fed_batches(source, preprocess, model, split, blocked)
        else:
            for items in source:
                yield assemble(items, preprocess, model, split)
                if split is not None:
                    split.adjust(readers_behind=False, feeder_ahead=False)
    finally:
        source.close()
        if split is not None:
            with _split_lock:
                split_images.update(host=split.on_host, nvjpeg=split.on_device)
            if split.adaptive:
                learned_split_share[str(model.device)] = split.share


def fed_batches(
    source: Generator[list[Prepared], None, None],
    preprocess: Preprocess,
    model: LoadedModel,
    split: DecodeSplit | None,
    blocked: list[float],
) -> Iterator[DeviceBatch]:
    """device_batches with the feeder thread (see there)."""
    cuda = model.device.type == "cuda"
    side = torch.cuda.Stream(model.device) if cuda else None
    handoff: queue.Queue[DeviceBatch | BaseException | None] = queue.Queue(maxsize=1)  # None: done
    stop = threading.Event()

    def hand(value: DeviceBatch | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                handoff.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            with torch.cuda.stream(side) if side is not None else nullcontext():
                clock, blocked_before = time.perf_counter(), 0.0
                for number, items in enumerate(source):
                    clock = stage_times.add("feeder_waits_for_files", clock)
                    readers_blocked, blocked_before = blocked[0] - blocked_before, blocked[0]
                    batch = assemble(items, preprocess, model, split)
                    if side is not None and batch.inputs is not None:
                        # The model's stream waits for this event; the feeder goes on to the next batch
                        # without waiting for this one's kernels (nvjpeg's outputs are kept safe from
                        # reuse by the allocator: DevicePreprocessor._on_decode_stream).
                        batch.ready = torch.cuda.Event()
                        batch.ready.record(side)
                    prep = time.perf_counter() - clock
                    clock = stage_times.add("feeder_device_prep", clock)
                    if not hand(batch):
                        return
                    ahead = time.perf_counter() - clock
                    clock = stage_times.add("feeder_waits_for_model", clock)
                    if split is not None:
                        stage_times.record("feeder_waits_for_host_decode", split.host_wait)
                        # Waits count from a share of the batch's own preparation time up (GIL switches
                        # and Python overheads are not signals); a shard's first batch always waits for
                        # the readers to start.
                        slack = max(SPLIT_SLACK_SECONDS, SPLIT_SLACK_SHARE * prep)
                        behind = number > 0 and readers_blocked > slack
                        split.adjust(readers_behind=behind, feeder_ahead=ahead > slack, slack=slack)
            hand(None)
        except BaseException as exc:  # handed to the caller's thread, raised there
            hand(exc)

    feeder = threading.Thread(target=feed, name="oncoflow-feeder", daemon=True)
    feeder.start()
    try:
        while True:
            clock = time.perf_counter()
            batch = handoff.get()
            stage_times.add("model_waits_for_batches", clock)
            if batch is None:
                return
            if isinstance(batch, BaseException):
                raise batch
            if batch.ready is not None and batch.inputs is not None:
                current = torch.cuda.current_stream(model.device)
                current.wait_event(batch.ready)
                batch.inputs.record_stream(current)
            yield batch
    finally:
        stop.set()
        feeder.join()


def classify_files(
    files: Sequence[DiscoveredFile],
    fs: fsspec.AbstractFileSystem,
    model: LoadedModel,
    options: EngineOptions,
    run_id: str,
    shard: str,
    unrecorded: Counter[str] | None = None,
) -> pa.Table:
    """Classify files in batches; one row per file, in input order, but for files that get none this
    run (`Prepared.unrecorded`: archived, vanished), counted by reason into `unrecorded`.

    On a GPU the forward pass of batch k+1 is launched before batch k's results are read back and turned
    into rows, so building rows costs no GPU time. On a CPU the forward runs at launch, so each batch's
    rows follow at once (launching ahead would only delay them and the progress they report).
    """
    install_log_redaction()  # storage libraries log signed URLs at debug level
    options = resolve_options(options, model)
    preprocess = choose_preprocessor(model, options.decode)
    rows = RowBuilder(model, options.threshold, run_id, shard, options.exif_orientation)
    ahead = options.launch_ahead if options.launch_ahead is not None else model.device.type == "cuda"
    cuda = model.device.type == "cuda"
    kind = "compile" if options.compile else "cuda_graphs" if options.cuda_graphs and cuda else None
    forward = fixed_batch_forward(model, kind, options.batch_size or CPU_BATCH_SIZE) if kind else None
    waiting: Launched | DeviceBatch | None = None  # the previous batch, launched or without inputs
    with closing(device_batches(files, fs, preprocess, model, options)) as batches:
        for batch in batches:
            if run_id in stopping_runs:
                raise ShardStopped(f"run {run_id} was stopped: shard {shard} wrote no rows")
            clock = time.perf_counter()
            launched = launch(model, batch, forward) if batch.inputs is not None else batch
            stage_times.add("model_forward", clock)
            if waiting is not None:
                add_rows(rows, model, options.threshold, waiting)
            waiting = launched
            if not ahead:
                add_rows(rows, model, options.threshold, waiting)
                waiting = None
    if waiting is not None:
        add_rows(rows, model, options.threshold, waiting)
    if unrecorded is not None:
        unrecorded.update(rows.unrecorded)
    return rows.table()


def add_rows(rows: RowBuilder, model: LoadedModel, threshold: float, done: Launched | DeviceBatch) -> None:
    """One row per item of a finished batch: its prediction, or its error."""
    predictions: dict[int, tuple[np.ndarray, int]] = {}
    if isinstance(done, Launched):
        clock = time.perf_counter()
        batch, probabilities = done.batch, results(model, done)
        stage_times.add("model_waits_for_results", clock)
        class_ids = decide(probabilities, model.positive_id, threshold)
        for n, item in enumerate(batch.decodable):
            predictions[id(item)] = (probabilities[n], int(class_ids[n]))
    else:
        batch = done
    clock = time.perf_counter()
    for item in batch.items:
        if id(item) in predictions:
            rows.add(item, *predictions[id(item)])
        else:
            rows.add(item)
    for listener in progress_listeners:
        listener("advance", len(batch.items))
    stage_times.add("rows", clock)
