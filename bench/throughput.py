"""Throughput benchmark: oncoflow end to end against the usual ways of running the seed model.

    python bench/throughput.py --images 64 --device cpu            # ViT-Base/16, random weights
    python bench/throughput.py --images 2000 --device cuda --batch-size 256
    python bench/throughput.py --images 8 --model-size tiny --quick  # what the test suite runs

One run generates the corpus (700×460 JPEG, quality 90, ~100 KB, like docs/design.md's anchors) and a
full-size ViT-Base/16 with random weights (same compute as the real model), then reports img/s for the
seed card's snippet loop, the transformers pipeline, model-only forward at each precision, and
oncoflow end to end (the engine alone, and the Prefect flow), with ratios, peak RSS, agreement of
every fast path with the fp32 reference, start-up time and discovery time. Results print as a
Markdown table and, with --json, are appended to a JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tasks.inference import (  # noqa: E402
    EngineOptions,
    classify_files,
    learned_split_share,
    progress_listeners,
    split_images,
    stage_times,
)
from tasks.model import (  # noqa: E402
    DTYPES,
    clear_model_cache,
    compiled_forward,
    fixed_batch_forward,
    load_model,
    resolve_precision,
)
from tasks.storage import list_images, open_location  # noqa: E402

LABELS = {0: "Normal", 1: "Malignant"}
last_stage_times: dict[str, Any] = {}  # seconds per engine stage in the last bench_engine run, and
# with nvjpeg how the decoding was split between the host and the GPU


def _make_jpeg(job: tuple[int, str, tuple[int, int]]) -> None:
    n, path, (width, height) = job
    rng = np.random.default_rng(n)
    coarse = rng.integers(0, 256, size=(height // 20 + 1, width // 20 + 1, 3), dtype=np.uint8)
    base = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(base, np.int16) + rng.integers(-25, 26, size=(height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_corpus(
    folder: Path, count: int, size: tuple[int, int] = (700, 460), unique: int | None = None
) -> list[Path]:
    """Smooth noisy colour images saved as JPEG q90 (~100–150 KB at 700×460, like the anchors' corpus).

    With `unique` < count, only that many are encoded (in parallel) and the rest are hard links to them:
    the same decode work per file, a fraction of the set-up time for GPU-sized corpora.
    """
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(count, unique or count)
    paths = [folder / f"img_{n:06d}.jpg" for n in range(count)]
    jobs = [(n, str(paths[n]), size) for n in range(distinct)]
    if distinct > 64:
        from multiprocessing import get_context

        with get_context("spawn").Pool(os.cpu_count()) as pool:
            pool.map(_make_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _make_jpeg(job)
    for n in range(distinct, count):
        os.link(paths[n % distinct], paths[n])
    return paths


def make_model(folder: Path, size: str) -> str:
    """ViT-Base/16 (85.8M parameters, the seed's architecture) or a tiny ViT, random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    shape: dict[str, Any] = (
        {}
        if size == "base"
        else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    )
    config = ViTConfig(**shape, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})  # type: ignore[call-arg]
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder)
    return str(folder)


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def bench_snippet(model_dir: str, paths: list[Path], device: str) -> tuple[float, dict[str, float]]:
    """The seed card's usage snippet, one image at a time, fp32."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = AutoModelForImageClassification.from_pretrained(model_dir).to(device).eval()
    probabilities = {}

    def loop() -> None:
        for path in paths:
            inputs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt").to(device)
            with torch.no_grad():
                probs = torch.softmax(model(**inputs).logits, dim=-1)[0]
            probabilities["file://" + str(path)] = float(probs[1])

    _, seconds = timed(loop)
    return rate(len(paths), seconds), probabilities


def bench_pipeline(model_dir: str, paths: list[Path], device: str, precision: str, batch_size: int) -> float:
    from transformers import pipeline

    classifier = pipeline(
        "image-classification", model=model_dir, device=device, dtype=DTYPES[precision], batch_size=batch_size
    )
    _, seconds = timed(lambda: classifier([str(p) for p in paths]))
    return rate(len(paths), seconds)


def bench_model_only(
    model_dir: str, device: str, precision: str, batch_size: int, batches: int, compiled: bool = False
) -> float:
    """Forward passes on ready tensors: the ceiling for everything else. "tf32" = fp32 weights with
    TF32 matrix products allowed, switched off again afterwards. `compiled`: through the engine's
    --compile forward (tasks.model.CompiledForward); the compile itself is timed apart, in
    last_stage_times["compile_seconds"]."""
    tf32 = precision == "tf32"
    model = load_model(model_dir, device=device, precision="fp32" if tf32 else precision)  # type: ignore[arg-type]
    torch.backends.cuda.matmul.allow_tf32 = tf32  # PyTorch's default is False (cuDNN's is already True)
    inputs = torch.randn(batch_size, 3, 224, 224, device=model.device, dtype=model.dtype)
    forward = compiled_forward(model, batch_size) if compiled else None

    def run(batch: torch.Tensor) -> torch.Tensor:
        return forward(batch) if forward is not None else model.network(pixel_values=batch).logits

    with torch.inference_mode():
        started = time.perf_counter()
        run(inputs[: min(4, batch_size)])  # warm-up (compiled: the compile, at the full batch shape)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        if forward is not None:
            last_stage_times["compile_seconds"] = round(time.perf_counter() - started, 1)
            if forward.failed:
                raise RuntimeError(f"torch.compile failed: {forward.failed}")
        started = time.perf_counter()
        for _ in range(batches):
            run(inputs).float().cpu()
        seconds = time.perf_counter() - started
    return rate(batch_size * batches, seconds)


def bench_engine(
    model_dir: str,
    folder: Path,
    device: str,
    precision: str,
    batch_size: int,
    decode: str = "cpu",
    overlap: bool = True,
    host_decode_share: float | None = 0.0,
    host_decode_pool: str = "processes",
    compiled: bool = False,
    cuda_graphs: bool = False,
    limit: int | None = None,
) -> tuple[float, dict[str, float], dict[str, str]]:
    """oncoflow's engine (read → decode → batched forward → rows), without Prefect; `compiled`: with
    --compile (its warm-up batch compiles, or finds the model_only section's compile); `limit`: only the
    first files of the folder (same URIs, so agreement still compares them with the other runs)."""
    model = load_model(model_dir, device=device, precision=precision)  # type: ignore[arg-type]
    location = open_location(str(folder))
    files = list(list_images(location))[:limit]
    options = EngineOptions(
        batch_size=batch_size,
        decode=decode,  # type: ignore[arg-type]
        overlap=overlap,
        host_decode_share=host_decode_share,
        host_decode_pool=host_decode_pool,  # type: ignore[arg-type]
        compile=compiled,
        cuda_graphs=cuda_graphs,
    )
    classify_files(files[: min(len(files), batch_size)], location.fs, model, options, "warm-up", "bench")
    stage_times.take()
    split_images.clear()
    learned_split_share.clear()  # every adaptive run starts from share 0, whatever ran before it
    table, seconds = timed(lambda: classify_files(files, location.fs, model, options, "bench", "bench"))
    last_stage_times.update(stage_times.take())
    if split_images:
        last_stage_times["jpegs_decoded_by"] = dict(split_images)
        last_stage_times["split_share_at_end"] = learned_split_share.get(str(model.device))
    # Which decoder made the pixels, and how many rows are ok: a "decode gpu" run that quietly fell back
    # to the host, or error rows counted as images, must show in the results.
    last_stage_times["rows"] = row_counts(table)
    if compiled or (cuda_graphs and model.device.type == "cuda"):  # built, or fell back to eager (why)
        forward = fixed_batch_forward(
            model, "compile" if compiled else "cuda_graphs", options.batch_size or 32
        )
        last_stage_times["forward_built"] = forward.ready
        last_stage_times["forward_failed"] = forward.failed
    uris = table.column("image_uri").to_pylist()
    probs = dict(zip(uris, table.column("prob_malignant").to_pylist(), strict=True))
    labels = dict(zip(uris, table.column("label").to_pylist(), strict=True))
    return rate(len(files), seconds), probs, labels


def row_counts(table: Any) -> dict[str, dict[str, int]]:
    """Rows per status and per decoder (None for error rows) of an engine or flow output."""
    return {
        column: dict(Counter(str(value) for value in table.column(column).to_pylist()))
        for column in ("status", "decoder")
    }


def bench_device_preprocess(model_dir: str, paths: list[Path], device: str, batch_size: int) -> float:
    """`--decode gpu`'s device side alone (nvjpeg where available + batched resize/normalize) on bytes
    already in memory: the ceiling that decoding on the device puts on the engine."""
    from tasks.images import DevicePreprocessor, nvjpeg_available

    model = load_model(model_dir, device=device, precision="bf16")  # type: ignore[arg-type]
    preprocess = DevicePreprocessor(model.preprocess, nvjpeg=nvjpeg_available(model.device))  # type: ignore[arg-type]
    items = [preprocess.encode_or_decode(path.read_bytes(), 1 << 30)[0] for path in paths]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    preprocess.batch(batches[0], model.device, model.dtype)  # warm-up (nvjpeg handles, kernels)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        preprocess.batch(batch, model.device, model.dtype)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return rate(len(items), time.perf_counter() - started)


def bench_nvjpeg_alone(paths: list[Path], device: str, batch_size: int) -> float:
    """torchvision's batched nvjpeg decode alone (bytes in memory, no resize): on A100/H100-class GPUs
    baseline JPEGs go to the hardware JPEG decoder, not the SMs the model runs on."""
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8) for path in paths]
    batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    decode_jpeg(batches[0], mode=ImageReadMode.RGB, device=device)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    for batch in batches:
        decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
    torch.cuda.synchronize()
    return rate(len(encoded), time.perf_counter() - started)


def bench_flow(
    model_dir: str,
    folder: Path,
    device: str,
    precision: str,
    batch_size: int,
    decode: str = "cpu",
    shard_size: int = 1000,
    host_decode_share: str | None = None,
    shards_in_flight: int | None = None,
) -> dict[str, Any]:
    """The Prefect classify flow end to end (discovery, shards, Parquet); `host_decode_share`: the
    flow's ONCOFLOW_HOST_DECODE_SHARE for this run (None: as the environment has it);
    `shards_in_flight`: threads of the local task runner (None: the flow's own, SHARDS_IN_FLIGHT).

    start-up = from the call until the work is known (model loaded from disk, Prefect's temporary server
    up unless PREFECT_API_URL is set, source listed, index read), as the CLI runs it; steady img/s = images after the first batch / time after the first batch.
    """
    from flows.classify import classify, start_loading_model
    from flows.params import ClassifyParams

    marks: dict[str, float] = {}
    first_batch_images: list[int] = []

    def listen(event: str, count: int) -> None:
        if event == "total":
            marks.setdefault("work_known", time.perf_counter())
        elif not first_batch_images:
            first_batch_images.append(count)
            marks["first_batch_done"] = time.perf_counter()

    progress_listeners.append(listen)
    output = Path(tempfile.mkdtemp(prefix="oncoflow-bench-out-"))
    parameters = ClassifyParams.model_validate(
        dict(
            source=str(folder),
            output=str(output),
            model=model_dir,
            device=device,
            precision=precision,
            batch_size=batch_size,
            decode=decode,
            shard_size=shard_size,
        )
    )
    clear_model_cache()
    stage_times.take()
    saved = os.environ.get("ONCOFLOW_HOST_DECODE_SHARE")
    if host_decode_share is not None:
        os.environ["ONCOFLOW_HOST_DECODE_SHARE"] = host_decode_share
    started = time.perf_counter()
    try:
        start_loading_model(parameters)  # as the CLI does: the model loads while Prefect starts
        flow = classify
        if shards_in_flight is not None:
            from prefect.task_runners import ThreadPoolTaskRunner

            flow = classify.with_options(task_runner=ThreadPoolTaskRunner(max_workers=shards_in_flight))
        summary = flow(**parameters.model_dump())
    finally:
        progress_listeners.remove(listen)
        if saved is None:
            os.environ.pop("ONCOFLOW_HOST_DECODE_SHARE", None)
        else:
            os.environ["ONCOFLOW_HOST_DECODE_SHARE"] = saved
    finished = time.perf_counter()
    images = summary["images_classified"]
    steady = (
        rate(images - first_batch_images[0], finished - marks["first_batch_done"])
        if first_batch_images
        else 0.0
    )
    import pyarrow.dataset as ds

    rows = ds.dataset(str(output), format="parquet", partitioning="hive").to_table(
        columns=["status", "decoder"]
    )
    return {
        "flow_rows": row_counts(rows),
        "flow_img_s": rate(images, finished - started),
        "flow_steady_img_s": steady,
        "startup_to_work_known_s": round(marks.get("work_known", finished) - started, 2),
        "flow_stage_seconds": stage_times.take(),
    }


def agreement(reference: dict[str, float], fast: dict[str, float], threshold: float = 0.5) -> dict[str, Any]:
    """Labels and probabilities of `fast` against `reference`, over distinct images: the corpus repeats
    its unique images as hard links, which must not count again (one file per inode)."""
    common = distinct_images(sorted(set(reference) & set(fast)))
    if not common:
        return {"compared": 0}
    ref = np.array([reference[k] for k in common])
    got = np.array([fast[k] for k in common])
    return {
        "label_agreement": round(float(np.mean((ref >= threshold) == (got >= threshold))), 4),
        "max_prob_diff": round(float(np.max(np.abs(ref - got))), 5),
        "compared": len(common),
    }


def distinct_images(uris: list[str]) -> list[str]:
    """One `file://` URI per file content (inode); URIs that are not local files are kept as they are."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for uri in uris:
        try:
            st = os.stat(uri.removeprefix("file://")) if uri.startswith("file://") else None
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) in seen:
            continue
        if st is not None:
            seen.add((st.st_dev, st.st_ino))
        kept.append(uri)
    return kept


def bench_rss(model_dir: str, folder: Path, count: int, batch_size: int) -> float:
    """Peak RSS (MB, VmHWM: ru_maxrss survives exec) of a fresh process running the engine over `count`
    images (corpus files reused)."""
    code = f"""
import os, resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import list_images, open_location
loc = open_location({str(folder)!r})
files = list(list_images(loc))
files = (files * ({count} // len(files) + 1))[:{count}]
model = load_model({model_dir!r}, device="cpu", precision="fp32")
classify_files(files, loc.fs, model, EngineOptions(batch_size={batch_size}), "rss", "rss")
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(int(done.stdout.split()[-1]) / 1024, 1)


def bench_discovery(workdir: Path, files: int, history_rows: int) -> dict[str, float]:
    """List `files` local files and diff them against a `history_rows`-row output dataset."""
    import pyarrow as pa

    from tasks.sink import SCHEMA, read_index, select_new, write_shard

    source = workdir / "discovery-src"
    for n in range(files):
        folder = source / f"d{n // 1000:04d}"
        if n % 1000 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{n:07d}.jpg").touch()
    destination = open_location(str(workdir / "discovery-dst"))
    listed = list(list_images(open_location(str(source))))
    per_file = 100_000
    for start in range(0, history_rows, per_file):
        rows = min(per_file, history_rows - start)
        uris = [
            listed[(start + i) % len(listed)].uri if i % 2 else f"file:///old/{start + i}.jpg"
            for i in range(rows)
        ]
        fingerprints = [
            listed[(start + i) % len(listed)].fingerprint if i % 2 else "0:0" for i in range(rows)
        ]
        columns = {name: pa.nulls(rows, SCHEMA.field(name).type) for name in SCHEMA.names}
        columns.update(
            image_uri=pa.array(uris),
            fingerprint=pa.array(fingerprints),
            model_revision=pa.array(["rev"] * rows),
        )
        write_shard(
            destination,
            f"model_slug=m-rev/date=2026-01-01/part-{start}.parquet",
            pa.table(columns, schema=SCHEMA),
        )

    def discover() -> int:
        found = list(list_images(open_location(str(source))))
        return len(select_new(found, read_index(destination, "rev")))

    new, seconds = timed(discover)
    return {
        "discovery_files": files,
        "history_rows": history_rows,
        "discovery_s": round(seconds, 2),
        "discovery_new": new,
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} cores {cpu}; {gpu}"


class Sections:
    """Runs the benchmark's sections in turn: each is timed and printed as it ends, a failing one is
    recorded (with its error) instead of losing the rest, and the results so far are rewritten to
    `partial` after every section, so a run cut short still leaves its figures."""

    def __init__(self, results: dict[str, Any], partial: Path | None) -> None:
        self.results, self.partial, self.started = results, partial, time.perf_counter()
        self.failed: list[str] = []  # sections that raised: the run exits non-zero, after the rest ran

    def run(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            value = function(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a benchmark section's failure is a result too
            self.results[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            self.results[f"{name}_traceback"] = traceback.format_exc()[-4000:]
            self.failed.append(name)
            print(f"FAILED {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()
            value = None
        spent = time.perf_counter() - began
        print(f"[{time.perf_counter() - self.started:7.1f}s] {name}: {spent:.1f}s", flush=True)
        if self.partial is not None:
            self.partial.write_text(json.dumps(self.results, indent=1))
        return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--images", type=int, default=64, help="corpus size for the engine, flow and pipeline"
    )
    parser.add_argument(
        "--unique-images", type=int, default=None, help="encode only this many; the rest are hard links"
    )
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model-size", choices=["base", "tiny"], default="base")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    parser.add_argument("--snippet-images", type=int, default=16, help="the seed loop is slow: a subset")
    parser.add_argument("--pipeline-images", type=int, default=None, help="default: all --images")
    parser.add_argument(
        "--cpu-decode-images",
        type=int,
        default=None,
        help="engine runs that decode on the host (--decode cpu) take only the first N images (on a GPU "
        "they run at the host decoders' ~1,000 img/s); default: all --images",
    )
    parser.add_argument(
        "--rss-images",
        type=int,
        nargs=2,
        default=[1000, 20000],
        metavar=("SMALL", "LARGE"),
        help="0 0 skips the memory runs",
    )
    parser.add_argument("--discovery-files", type=int, default=100_000, help="0 skips discovery")
    parser.add_argument("--history-rows", type=int, default=1_000_000)
    parser.add_argument("--flow-shard-sizes", type=int, nargs="*", default=[1000], help="none skips the flow")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure --compile (model-only and engine; compiling costs 5-25 s on a CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for the test suite")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()
    if args.quick:
        args.rss_images, args.discovery_files, args.history_rows = [8, 16], 200, 1000
    batch = args.batch_size or (256 if args.device == "cuda" else 32)
    precisions = ["fp32", "bf16"] + (["fp16"] if args.device == "cuda" else [])

    work = Path(tempfile.mkdtemp(prefix="oncoflow-bench-"))
    corpus = work / "corpus"
    results: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "machine": machine(),
        "software": f"torch {torch.__version__}, python {platform.python_version()}",
        "device": args.device,
        "model": f"ViT-{args.model_size} random weights",
        "images": args.images,
        "batch_size": batch,
    }
    sections = Sections(results, Path(args.json + ".partial") if args.json else None)
    paths = make_corpus(corpus, args.images, unique=args.unique_images)  # nothing runs without it
    model_dir = make_model(work / "model", args.model_size)
    results["corpus_kb_per_image"] = round(sum(p.stat().st_size for p in paths) / len(paths) / 1024, 1)

    snippet = sections.run(
        "snippet", lambda: bench_snippet(model_dir, paths[: args.snippet_images], args.device)
    )
    snippet_rate, reference = snippet if snippet else (0.0, {})
    results["seed_snippet_img_s"] = snippet_rate
    for precision in precisions:
        pipeline_paths = paths[: args.pipeline_images or len(paths)]
        results[f"pipeline_{precision}_img_s"] = sections.run(
            f"pipeline_{precision}", bench_pipeline, model_dir, pipeline_paths, args.device, precision, 64
        )
    for precision in precisions + (["tf32"] if args.device == "cuda" else []):
        batches = 3 if args.device == "cpu" else 20
        results[f"model_only_{precision}_img_s"] = sections.run(
            f"model_only_{precision}", bench_model_only, model_dir, args.device, precision, batch, batches
        )
    torch.backends.cuda.matmul.allow_tf32 = False

    fp32_probs: dict[str, float] = {}

    def engine(precision: str, decode: str = "cpu", **variant: Any) -> None:
        """bench_engine with `variant` (its keyword arguments after `decode`), recorded under a key
        that names what differs from the defaults."""
        nonlocal fp32_probs
        limit = args.cpu_decode_images if decode == "cpu" else None
        speed, probs, _ = bench_engine(
            model_dir, corpus, args.device, precision, batch, decode, limit=limit, **variant
        )
        share, compiled = variant.get("host_decode_share", 0.0), variant.get("compiled", False)
        key = (
            f"engine_{precision}"
            + ("_decode_gpu" if decode == "gpu" else "")
            + ("" if share == 0 else "_adaptive_split" if share is None else f"_host_share_{share}")
            + ("_threads" if variant.get("host_decode_pool") == "threads" else "")
            + ("" if variant.get("overlap", True) else "_serial")
            + ("_compiled" if compiled else "")
            + ("_cuda_graphs" if variant.get("cuda_graphs") else "")
        )
        results[f"{key}_img_s"] = speed
        results[f"{key}_stage_seconds"] = dict(last_stage_times)
        last_stage_times.clear()
        ceiling = results.get(f"model_only_{precision}{'_compiled' if compiled else ''}_img_s")
        if ceiling:
            results[f"{key}_vs_model_only"] = round(speed / ceiling, 3)
        if precision == "fp32" and decode == "cpu" and not compiled:
            fp32_probs = probs
            results["engine_fp32_vs_snippet_reference"] = agreement(reference, probs)
        elif fp32_probs:
            results[f"{key}_vs_fp32"] = agreement(fp32_probs, probs)

    for precision in precisions:
        sections.run(f"engine_{precision}", engine, precision)
    if args.device == "cuda":
        # --decode cpu beside a GPU decodes in worker processes (since the eighth session); the reader
        # threads doing it themselves, as in runs A and B, for comparison.
        sections.run("engine_fp16_threads", engine, "fp16", "cpu", host_decode_pool="threads")
    default_precision = resolve_precision("auto", torch.device(args.device))
    if args.device == "cuda" or args.quick:  # on a CPU the device path only proves it runs
        results["device_preprocess_img_s"] = sections.run(
            "device_preprocess",
            lambda: bench_device_preprocess(model_dir, paths[: 8 * batch], args.device, batch),
        )
        if args.device == "cuda":
            results["nvjpeg_decode_only_img_s"] = sections.run(
                "nvjpeg_decode_only", bench_nvjpeg_alone, paths[: 8 * batch], args.device, batch
            )
        for precision in dict.fromkeys([default_precision, "fp16" if args.device == "cuda" else "fp32"]):
            sections.run(f"engine_{precision}_decode_gpu", engine, precision, "gpu")
        sections.run("engine_decode_gpu_serial", lambda: engine(default_precision, "gpu", overlap=False))
        # The host/nvjpeg split (off by default: nvjpeg decodes every JPEG) adapting per batch, its host
        # share in worker processes (the default pool since the eighth session).
        sections.run(
            "engine_decode_gpu_adaptive_split",
            lambda: engine(default_precision, "gpu", host_decode_share=None),
        )
        if args.device == "cuda":  # fixed shares map the curve the adaptive share should find the top of
            for share in (0.25, 0.5):
                sections.run(
                    f"engine_host_share_{share}", engine, default_precision, "gpu", host_decode_share=share
                )
            # The pool runs A and B measured (threads, under the engine's GIL), for comparison.
            sections.run(
                "engine_host_share_0.25_threads",
                engine,
                default_precision,
                "gpu",
                host_decode_share=0.25,
                host_decode_pool="threads",
            )
    flow_decode = "gpu" if args.device == "cuda" else "cpu"
    for shard_size in args.flow_shard_sizes:
        flow = sections.run(
            f"flow_shard_{shard_size}",
            bench_flow,
            *(model_dir, corpus, args.device, default_precision, batch, flow_decode, shard_size),
        )
        suffix = "" if shard_size == args.flow_shard_sizes[0] else f"_shard_{shard_size}"
        results.update({f"{key}{suffix}": value for key, value in (flow or {}).items()})
    if args.device == "cuda" and args.flow_shard_sizes:
        # The flow with the adaptive split (its host share in worker processes), for when the engine
        # sections above show the split paying off: the default would then change.
        shard_size = args.flow_shard_sizes[0]
        flow = sections.run(
            f"flow_shard_{shard_size}_adaptive_split",
            bench_flow,
            *(model_dir, corpus, args.device, default_precision, batch, flow_decode, shard_size, "auto"),
        )
        results.update({f"{key}_adaptive_split": value for key, value in (flow or {}).items()})
        # One shard at a time: do two engines sharing the GPU (the flow's default) cost the gap between
        # the engine and the flow? (Run B: engine 4,191 img/s, flow steady 3,485.)
        flow = sections.run(
            f"flow_shard_{shard_size}_one_in_flight",
            bench_flow,
            *(model_dir, corpus, args.device, default_precision, batch, flow_decode, shard_size, None, 1),
        )
        results.update({f"{key}_one_in_flight": value for key, value in (flow or {}).items()})
    if args.device == "cuda":
        # The forward replayed as a CUDA graph (no compile: captured in a second): does the feeder get
        # the GIL it needs when the model thread makes one call per batch? Agreement as for every path.
        sections.run(
            f"engine_{default_precision}_decode_gpu_cuda_graphs",
            engine,
            default_precision,
            "gpu",
            cuda_graphs=True,
        )
    if args.compile:
        # --compile: the forward through torch.compile (inductor), model-only then the engine, at the
        # default precision and decode; the engine's agreement with fp32 is checked like every fast path.
        # Last, so that a compile cut short by gpu.sh's time limit costs no other section.
        key = f"model_only_{default_precision}_compiled"
        results[f"{key}_img_s"] = sections.run(
            key,
            bench_model_only,
            model_dir,
            args.device,
            default_precision,
            batch,
            20 if args.device == "cuda" else 3,
            True,
        )
        results[f"{key}_compile_seconds"] = last_stage_times.pop("compile_seconds", None)
        sections.run(
            f"engine_{default_precision}_compiled", engine, default_precision, flow_decode, compiled=True
        )
    results["flow_precision"], results["flow_decode"] = default_precision, flow_decode
    if snippet_rate and results.get("engine_fp32_img_s"):
        results["engine_fp32_vs_seed_snippet"] = round(results["engine_fp32_img_s"] / snippet_rate, 2)

    small, large = args.rss_images
    if small and large:
        tiny = make_model(work / "tiny", "tiny")
        results[f"peak_rss_mb_{small}_images_tiny"] = sections.run(
            "rss_small", lambda: bench_rss(tiny, corpus, small, 32)
        )
        results[f"peak_rss_mb_{large}_images_tiny"] = sections.run(
            "rss_large", lambda: bench_rss(tiny, corpus, large, 32)
        )
    results["peak_rss_mb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    if args.discovery_files:
        results.update(
            sections.run("discovery", lambda: bench_discovery(work, args.discovery_files, args.history_rows))
            or {}
        )

    publish(results, args.json)
    if sections.failed:
        print(f"FAILED sections: {', '.join(sections.failed)}", flush=True)
        sys.exit(1)


def emit(result: dict[str, Any], json_lines: Path | None) -> None:
    """Print a small benchmark's result as one JSON line; append it to `json_lines` if given."""
    print(json.dumps(result))
    if json_lines:
        with json_lines.open("a") as handle:
            handle.write(json.dumps(result) + "\n")


def publish(results: dict[str, Any], json_lines: str | None) -> None:
    """Print the results as a Markdown table; append them as one JSON line to `json_lines` if given."""
    print("| metric | value |\n|---|---|")
    for key, value in results.items():
        print(f"| {key} | {value} |")
    if json_lines:
        with open(json_lines, "a") as handle:
            handle.write(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
