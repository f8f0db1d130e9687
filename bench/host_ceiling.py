"""Host-side ceiling of `--decode gpu`: how many files/s the engine's CPU side can hand to nvjpeg.

    PYTHONPATH=. .venv/bin/python bench/host_ceiling.py --images 10000 --unique-images 500

On a GPU machine the engine's device side (nvjpeg decode + resize: 9,374 img/s on an H100; the fp16
forward: 9,350 img/s) must be fed by the host side: listing, reading each file, checking its JPEG
header, batching, building rows. This measures that host side alone, on any machine, by replacing the
two device stages with no-ops: `DevicePreprocessor.batch` returns a ready tensor and the network
returns zeros. Everything else is the real engine (`classify_files`, threads, feeder, RowBuilder).
It reports the reader stream alone (`prepared_stream`) and the whole engine, with the default
number of reader threads and with 16 (the old default), so a change to the host side shows here
before a GPU is at hand; then the host share of a DecodeSplit at its largest (PIL decode + resize of
every JPEG in one worker per core, processes and threads, real batch code, no forward), per core; then
the exact path (`--decode cpu`, no forward) with PIL in worker processes and in the reader threads.
These are not GPU throughputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from throughput import machine, make_corpus, make_model, publish  # noqa: E402

import tasks.images as images  # noqa: E402
import tasks.inference as inference  # noqa: E402
from tasks.inference import EngineOptions, classify_files, prepared_stream  # noqa: E402
from tasks.model import load_model  # noqa: E402
from tasks.storage import list_images, open_location  # noqa: E402


class NoOpNetwork(torch.nn.Module):
    """Stands in for the forward pass: zeros logits, no compute."""

    def forward(self, pixel_values: torch.Tensor) -> Any:
        return type("Output", (), {"logits": torch.zeros(pixel_values.shape[0], 2)})()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--unique-images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--split-images", type=int, default=2000, help="files for the host-decode run")
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oncoflow-host-"))
    make_corpus(work / "corpus", args.images, unique=args.unique_images)
    model = load_model(make_model(work / "model", "tiny"), device="cpu", precision="fp32")
    model = replace(model, network=NoOpNetwork())
    ready = torch.zeros(args.batch_size, 3, 224, 224)

    def no_device_work(
        self: Any, items: list[Any], device: Any, dtype: Any, split: Any = None
    ) -> tuple[torch.Tensor, dict[int, str], list[str]]:
        return ready[: len(items)], {}, [images.NVJPEG_DEVICE_RESIZE] * len(items)

    real_batch = images.DevicePreprocessor.batch
    images.DevicePreprocessor.batch = no_device_work  # type: ignore[method-assign]
    location = open_location(str(work / "corpus"))
    files = list(list_images(location))
    preprocess = images.DevicePreprocessor(model.preprocess, nvjpeg=True)  # type: ignore[arg-type]
    # classify_files asks for nvjpeg only on CUDA; here it takes the nvjpeg host path on the CPU too.
    inference.nvjpeg_available = lambda device: True  # type: ignore[assignment]

    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "images": len(files)}
    for workers in (None, 16):
        label = "default_workers" if workers is None else f"{workers}_workers"
        # No host share of decoding: this measures handing bytes to nvjpeg, not decoding them.
        options = EngineOptions(
            batch_size=args.batch_size, decode="gpu", decode_workers=workers, host_decode_share=0.0
        )
        started = time.perf_counter()
        count = sum(1 for _ in prepared_stream(files, location.fs, preprocess, options))
        results[f"reader_stream_{label}_files_s"] = round(count / (time.perf_counter() - started))
        started = time.perf_counter()
        table = classify_files(files, location.fs, model, options, "bench", "bench")
        results[f"engine_{label}_files_s"] = round(table.num_rows / (time.perf_counter() - started))

    # The host share of a DecodeSplit at its largest: every JPEG decoded and resized by PIL in the split's
    # workers (one per core), the real batch code around it, still no forward pass. Per core, this is
    # what each spare core of a GPU machine can take off nvjpeg: in worker processes (the default) and
    # in threads of this process (what the H100 runs measured).
    images.DevicePreprocessor.batch = real_batch  # type: ignore[method-assign]
    cores = os.cpu_count() or 1
    subset = files[: args.split_images]
    for pool in ("processes", "threads"):
        options = EngineOptions(
            batch_size=args.batch_size,
            decode="gpu",
            host_decode_share=1.0,
            host_decode_workers=cores,
            host_decode_pool=pool,  # type: ignore[arg-type]
        )
        classify_files(subset[: args.batch_size], location.fs, model, options, "warm-up", "bench")
        started = time.perf_counter()
        table = classify_files(subset, location.fs, model, options, "bench", "bench")
        rate = table.num_rows / (time.perf_counter() - started)
        suffix = "" if pool == "threads" else "_processes"  # threads keep the keys of earlier runs
        results[f"split_host_decode_{cores}_{pool}_files_s"] = round(rate)
        results[f"split_host_decode_per_core_files_s{suffix}"] = round(rate / cores)
    # The exact path (`--decode cpu`: PIL decode + resize + normalize), no forward pass: in the reader
    # threads, and with PIL's part in worker processes (the default beside a GPU).
    for in_processes in (True, False):
        options = EngineOptions(
            batch_size=args.batch_size, decode="cpu", decode_cpu_in_processes=in_processes
        )
        classify_files(subset[: args.batch_size], location.fs, model, options, "warm-up", "bench")
        started = time.perf_counter()
        table = classify_files(subset, location.fs, model, options, "bench", "bench")
        rate = table.num_rows / (time.perf_counter() - started)
        results[f"exact_decode_{'processes' if in_processes else 'threads'}_files_s"] = round(rate)
    publish(results, args.json)


if __name__ == "__main__":
    main()
