"""Where the GPU engine's time goes: do nvjpeg decoding and the device resize overlap with the forward?

    python bench/gpu_overlap.py --json OUT.json      # CUDA only, about a minute on an H100

The engine (bench/throughput.py) ran ~4,200-4,400 img/s on the H100 with nvjpeg decoding every JPEG,
against 11,600 img/s for nvjpeg alone and 8,600-9,200 for the fp16 forward alone: close to the two in
series. This measures, on one GPU, each stage alone for a few seconds and then two at once in two
threads on their own CUDA streams (as the engine's feeder and model threads run them):
- forward: ViT-Base/16 fp16, batch 256, results read back each batch (as the engine does);
- decode: torchvision's batched nvjpeg decode of 256 JPEGs (700x460, q90), no resize;
- prep: the engine's whole device side of a batch (DevicePreprocessor.batch: nvjpeg + resize +
  normalize), its kernels waited for per batch.
It also counts a pure-Python loop alone and while a decode thread runs (does the decode call hold the
GIL?). If "forward with decode" + "decode with forward" add up to about one stage alone, the GPU runs
them in series and no host-side pipelining can beat the sum. bench/nvjpeg_priority.py builds on this.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.throughput import make_corpus, make_model  # noqa: E402
from tasks.images import DevicePreprocessor  # noqa: E402
from tasks.model import LoadedModel, load_model  # noqa: E402

Stage = Callable[[int], None]  # runs batch number n of a stage, waiting for its GPU work


def torchvision_decoder() -> tuple[Any, Any]:
    """torchvision's (decode_jpeg, ImageReadMode); on a CPU machine without torchvision, a PIL stand-in
    so that the scripts can be checked there."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg, ImageReadMode.RGB
    except ImportError:
        from tasks.images import decode_image

        def pil_decode(data: list[Any], mode: Any, device: Any) -> list[Any]:
            pixels = [np.asarray(decode_image(item.numpy().tobytes())) for item in data]
            return [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]

        return pil_decode, None


@dataclass
class Bench:
    """A corpus of 8 batches of 700x460 JPEGs, a ViT-Base/16 (tiny on CPU) and the stages to time."""

    device: torch.device
    batch_size: int
    model: LoadedModel
    preprocess: DevicePreprocessor
    raw: list[bytes]
    encoded: list[list[torch.Tensor]]
    stages: dict[str, Stage] = field(default_factory=dict)
    inputs: torch.Tensor | None = None  # one batch of model inputs on the device

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()


def set_up(device_name: str, batch_size: int) -> Bench:
    decode_jpeg, rgb = torchvision_decoder()
    cuda = device_name == "cuda"
    work = Path(tempfile.mkdtemp(prefix="oncoflow-overlap-"))
    paths = make_corpus(work / "corpus", 8 * batch_size, unique=8 * batch_size)
    model = load_model(
        make_model(work / "model", "base" if cuda else "tiny"),
        device=device_name,  # type: ignore[arg-type]
        precision="fp16" if cuda else "fp32",
    )
    preprocess = DevicePreprocessor(model.preprocess, nvjpeg=cuda)  # type: ignore[arg-type]
    raw = [path.read_bytes() for path in paths]
    items = [preprocess.encode_or_decode(data, 1 << 30)[0] for data in raw]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in raw]
    encoded = [tensors[i : i + batch_size] for i in range(0, len(tensors), batch_size)]
    bench = Bench(model.device, batch_size, model, preprocess, raw, encoded)
    size = model.preprocess.height, model.preprocess.width  # type: ignore[union-attr]
    inputs = bench.inputs = torch.randn(batch_size, 3, *size, device=bench.device, dtype=model.dtype)

    def forward(n: int) -> None:
        with torch.inference_mode():
            model.network(pixel_values=inputs).logits.float().cpu()

    def decode(n: int) -> None:
        decode_jpeg(encoded[n % len(encoded)], mode=rgb, device=bench.device)
        bench.sync()

    def prep(n: int) -> None:
        preprocess.batch(batches[n % len(batches)], bench.device, model.dtype)
        bench.sync()

    bench.stages.update(forward=forward, decode=decode, prep=prep)
    for stage in bench.stages.values():  # warm-up
        stage(0)
    bench.sync()
    return bench


def measure(
    bench: Bench, names: tuple[str, ...], seconds: float, streams: dict[str, Any] | None = None
) -> dict[str, float]:
    """img/s of each named stage, all running at once in their own threads for `seconds`; each thread on
    a new normal-priority CUDA stream unless `streams` names one for it."""
    counts: dict[str, float] = {}
    until = time.perf_counter() + seconds

    def loop(name: str) -> None:
        stream = (streams or {}).get(name) or (torch.cuda.Stream(bench.device) if bench.cuda else None)
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            done, started = 0, time.perf_counter()
            while time.perf_counter() < until:
                bench.stages[name](done)
                done += 1
            counts[name] = round(done * bench.batch_size / (time.perf_counter() - started), 1)

    threads = [threading.Thread(target=loop, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return counts


def alone_and_beside_forward(
    bench: Bench,
    stage: str,
    seconds: float,
    results: dict[str, Any],
    streams: dict[str, Any] | None = None,
    forward: str = "forward",
) -> None:
    """`stage` alone, then beside the forward pass (the stage named `forward`); records both rates and
    the overlap figure (1.0: the two overlap fully; 0.5: they run in series, each at half its rate
    alone). A stage measured alone before is not measured again."""
    if f"{forward}_alone_img_s" not in results:
        results[f"{forward}_alone_img_s"] = measure(bench, (forward,), seconds)[forward]
    if f"{stage}_alone_img_s" not in results:
        results[f"{stage}_alone_img_s"] = measure(bench, (stage,), seconds, streams)[stage]
    counts = measure(bench, (forward, stage), seconds, streams)
    results[f"{forward}+{stage}_img_s"] = counts
    results[f"{forward}+{stage}_overlap"] = round(
        (
            counts[forward] / results[f"{forward}_alone_img_s"]
            + counts[stage] / results[f"{stage}_alone_img_s"]
        )
        / 2,
        3,
    )
    print(stage, "alone", results[f"{stage}_alone_img_s"], f"beside {forward}", counts, flush=True)


def add_graphed_forward(bench: Bench) -> None:
    """A `forward_graphed` stage: the same forward captured once as a CUDA graph and replayed. A replay
    is one call that holds the GIL for microseconds where the eager forward's ~1,500 operator calls
    hold it for milliseconds: if nvjpeg keeps its speed beside this one and not beside the eager one,
    the GIL (the host) starves it, not the GPU."""
    network, inputs = bench.model.network, bench.inputs
    side = torch.cuda.Stream(bench.device)
    side.wait_stream(torch.cuda.current_stream(bench.device))
    with torch.inference_mode():
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graph asks
                network(pixel_values=inputs)
        torch.cuda.current_stream(bench.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = network(pixel_values=inputs).logits

    def forward_graphed(n: int) -> None:
        graph.replay()
        logits.float().cpu()

    bench.stages["forward_graphed"] = forward_graphed
    forward_graphed(0)
    bench.sync()


@contextmanager
def running(bench: Bench, stage: str) -> Iterator[None]:
    """`stage` in a loop on another thread (its own CUDA stream) for the duration of the block."""
    stop = threading.Event()

    def loop() -> None:
        with torch.cuda.stream(torch.cuda.Stream(bench.device)) if bench.cuda else nullcontext():
            n = 0
            while not stop.is_set():
                bench.stages[stage](n)
                n += 1

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        time.sleep(0.2)  # under way
        yield
    finally:
        stop.set()
        thread.join()


def launch_while(bench: Bench, stage: str, launch: Callable[[], Any], rounds: int = 10) -> float:
    """Median milliseconds `launch()` takes on this thread while another runs `stage` in a loop."""
    times = []
    with running(bench, stage):
        for _ in range(rounds):
            started = time.perf_counter()
            launch()
            times.append((time.perf_counter() - started) * 1000)
            bench.sync()
    return sorted(times)[len(times) // 2]


def forward_launch(bench: Bench) -> dict[str, Any]:
    """Does launching the forward pass wait for the GPU? In the engine on the H100 the model thread spent
    ~34 ms per batch launching (`model_forward`), about a forward's GPU time: a host sync inside the
    model's forward would defeat launch-ahead, and a feeder holding the GIL would slow every launch.
    Times the launch of a forward while another is queued and while a thread decodes, and counts the
    host syncs torch reports for one forward (torch.cuda.set_sync_debug_mode)."""
    import warnings

    network, inputs = bench.model.network, bench.inputs
    with torch.inference_mode():
        network(pixel_values=inputs)
        bench.sync()
        network(pixel_values=inputs)  # queued: the GPU is busy with it while the next is launched
        started = time.perf_counter()
        network(pixel_values=inputs)
        launch_ms = (time.perf_counter() - started) * 1000
        bench.sync()
        started = time.perf_counter()
        network(pixel_values=inputs)
        bench.sync()
        gpu_ms = (time.perf_counter() - started) * 1000
        # The same launch while a thread decodes (as the feeder does in the engine): the GIL's share
        launch_beside_decode_ms = launch_while(bench, "decode", lambda: network(pixel_values=inputs))
        caught: list[Any] = []
        if bench.cuda:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    network(pixel_values=inputs)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            bench.sync()
    return {
        "forward_launch_ms_while_gpu_busy": round(launch_ms, 2),
        "forward_launch_and_run_ms": round(gpu_ms, 2),
        "forward_launch_ms_while_a_thread_decodes": round(launch_beside_decode_ms, 2),
        "forward_host_syncs": len(caught),
        "forward_host_sync_first": str(caught[0].message)[:300] if caught else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each measurement runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu only checks that the script runs")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    bench = set_up(args.device, args.batch)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if bench.cuda else "cpu",
        "batch": args.batch,
    }
    for stage in ("decode", "prep"):
        alone_and_beside_forward(bench, stage, args.seconds, results)
    results.update(forward_launch(bench))

    def python_loop(seconds: float) -> float:
        count, until = 0, time.perf_counter() + seconds
        while time.perf_counter() < until:
            count += 1
        return count / seconds

    results["python_loop_alone_per_s"] = round(python_loop(1.0))
    with running(bench, "decode"):
        results["python_loop_during_decode_per_s"] = round(python_loop(1.0))
    # resize + normalize alone: one batch decoded once, then the device side of a batch of pixels
    decode_jpeg, rgb = torchvision_decoder()
    decoded = decode_jpeg(bench.encoded[0], mode=rgb, device=bench.device)
    size = bench.preprocess.host.height, bench.preprocess.host.width
    out = torch.empty(args.batch, 3, *size, device=bench.device)
    position = {i: i for i in range(args.batch)}
    bench.sync()
    started, rounds = time.perf_counter(), 10
    for _ in range(rounds):
        bench.preprocess._resize_into(out, position, dict(enumerate(decoded)), bench.device)
    bench.sync()
    results["resize_alone_img_s"] = round(rounds * args.batch / (time.perf_counter() - started), 1)
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
