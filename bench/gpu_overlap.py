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
them in series and no host-side pipelining can beat the sum.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.throughput import make_corpus, make_model  # noqa: E402
from tasks.images import DevicePreprocessor  # noqa: E402
from tasks.model import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each measurement runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cpu only checks that the script runs")
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    from contextlib import nullcontext

    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:  # a CPU machine without torchvision: PIL stands in, to check the script runs
        from PIL import Image

        from tasks.images import decode_image

        class ImageReadMode:  # type: ignore[no-redef]
            RGB = Image.Resampling.NEAREST

        def decode_jpeg(data: list[Any], mode: Any, device: Any) -> list[Any]:  # type: ignore[misc]
            pixels = [np.asarray(decode_image(item.numpy().tobytes())) for item in data]
            return [torch.from_numpy(p.copy()).permute(2, 0, 1) for p in pixels]

    batch_size = args.batch
    cuda = args.device == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.current_stream(device).synchronize()

    work = Path(tempfile.mkdtemp(prefix="oncoflow-overlap-"))
    paths = make_corpus(work / "corpus", 8 * batch_size, unique=8 * batch_size)
    model = load_model(
        make_model(work / "model", "base" if cuda else "tiny"),
        device=args.device,
        precision="fp16" if cuda else "fp32",
    )
    device = model.device
    preprocess = DevicePreprocessor(model.preprocess, nvjpeg=cuda)  # type: ignore[arg-type]
    items = [preprocess.encode_or_decode(path.read_bytes(), 1 << 30)[0] for path in paths]
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    raw = [np.frombuffer(path.read_bytes(), np.uint8) for path in paths]
    encoded = [
        [torch.from_numpy(item.copy()) for item in raw[i : i + batch_size]]
        for i in range(0, len(raw), batch_size)
    ]
    size = model.preprocess.height, model.preprocess.width  # type: ignore[union-attr]
    inputs = torch.randn(batch_size, 3, *size, device=device, dtype=model.dtype)

    def forward(n: int) -> None:
        with torch.inference_mode():
            model.network(pixel_values=inputs).logits.float().cpu()

    def decode(n: int) -> None:
        decode_jpeg(encoded[n % len(encoded)], mode=ImageReadMode.RGB, device=device)
        sync()

    def prep(n: int) -> None:
        preprocess.batch(batches[n % len(batches)], device, model.dtype)
        sync()

    stages: dict[str, Callable[[int], None]] = {"forward": forward, "decode": decode, "prep": prep}
    for stage in stages.values():  # warm-up
        stage(0)
    sync()

    def loop(stage: Callable[[int], None], until: float, counts: dict[str, float], name: str) -> None:
        with torch.cuda.stream(torch.cuda.Stream(device)) if cuda else nullcontext():
            done, started = 0, time.perf_counter()
            while time.perf_counter() < until:
                stage(done)
                done += 1
            counts[name] = round(done * batch_size / (time.perf_counter() - started), 1)

    def run(*names: str) -> dict[str, float]:
        counts: dict[str, float] = {}
        until = time.perf_counter() + args.seconds
        threads = [threading.Thread(target=loop, args=(stages[n], until, counts, n)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return counts

    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "batch": batch_size,
    }
    for name in stages:
        results[f"{name}_alone_img_s"] = run(name)[name]
        print(name, "alone", results[f"{name}_alone_img_s"], flush=True)
    for pair in (("forward", "decode"), ("forward", "prep")):
        counts = run(*pair)
        results[f"{pair[0]}+{pair[1]}_img_s"] = counts
        # 1.0: the two overlap fully; 0.5: they run in series (each gets half its alone rate)
        results[f"{pair[0]}+{pair[1]}_overlap"] = round(
            sum(counts[n] / results[f"{n}_alone_img_s"] for n in pair) / 2, 3
        )
        print(pair, counts, results[f"{pair[0]}+{pair[1]}_overlap"], flush=True)

    def python_loop(seconds: float) -> float:
        count, until = 0, time.perf_counter() + seconds
        while time.perf_counter() < until:
            count += 1
        return count / seconds

    results["python_loop_alone_per_s"] = round(python_loop(1.0))
    stop = threading.Event()

    def decoding() -> None:
        n = 0
        while not stop.is_set():
            decode(n)
            n += 1

    thread = threading.Thread(target=decoding)
    thread.start()
    time.sleep(0.2)
    results["python_loop_during_decode_per_s"] = round(python_loop(1.0))
    stop.set()
    thread.join()
    # resize + normalize alone: one batch decoded once, then the device side of a batch of pixels
    decoded = decode_jpeg(encoded[0], mode=ImageReadMode.RGB, device=device)
    out = torch.empty(batch_size, 3, *size, device=device)
    position = {i: i for i in range(batch_size)}
    sync()
    started, rounds = time.perf_counter(), 10
    for _ in range(rounds):
        preprocess._resize_into(out, position, dict(enumerate(decoded)), device)
    sync()
    results["resize_alone_img_s"] = round(rounds * batch_size / (time.perf_counter() - started), 1)
    results["numpy"] = np.__version__
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
