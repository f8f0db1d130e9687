"""Does the adaptive host/nvjpeg split find the best share? The real engine against an emulated GPU.

    PYTHONPATH=. .venv/bin/python bench/split_emulated.py --images 3000

A GPU machine answers this directly (bench/gpu.sh runs fixed shares beside the adaptive one); this
answers it on any machine, for the controller alone. Everything is the real engine (readers, feeder,
DecodeSplit and its PIL workers, threads or processes, launch-ahead, rows) except the two GPU stages, which become timed
jobs on one emulated device shared by processor sharing, as two CUDA streams share one GPU's SMs:
nvjpeg decode + resize takes 1/R seconds per image and the forward pass 1/R, and while both run each
gets half the device. R is set from this machine's own host share: R = ratio × H, where H is the rate
of the split's PIL threads alone and the default ratio 4.7 is the H100's (9,350 img/s forward,
9,374 nvjpeg + resize, against ~2,000 img/s from 10 spare cores). The best fixed share then sits
inside (0, 1), and the table shows how close the adaptive share gets to it. Not GPU throughputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from throughput import machine, make_corpus, make_model, publish  # noqa: E402

import tasks.images as images  # noqa: E402
import tasks.inference as inference  # noqa: E402
from tasks.inference import EngineOptions, classify_files  # noqa: E402
from tasks.model import load_model  # noqa: E402
from tasks.storage import list_images, open_location  # noqa: E402


class SharedDevice:
    """One device that runs timed jobs by processor sharing: with n jobs in flight each advances at 1/n."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._remaining: dict[object, float] = {}  # job → seconds of full-device work left
        self._since = time.perf_counter()

    def run(self, seconds: float) -> None:
        """Block for one job of `seconds` of full-device work, sharing the device with the others."""
        job = object()
        with self._changed:
            self._advance()
            self._remaining[job] = seconds
            while job in self._remaining:
                self._changed.wait(min(self._remaining.values()) * len(self._remaining))
                self._advance()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self._remaining:
            share = (now - self._since) / len(self._remaining)
            for job in list(self._remaining):
                self._remaining[job] -= share
                if self._remaining[job] <= 1e-6:
                    del self._remaining[job]
                    self._changed.notify_all()
        self._since = now


class EmulatedNetwork(torch.nn.Module):
    """The forward pass as a job on the shared device: zero logits after n/rate seconds of device time.

    Before the job, `launch_ops` tiny torch operations stand for the kernel launches of a real forward
    on a GPU (~240 for ViT-Base): each releases the GIL and takes it back, as a CUDA launch from Python
    does, so the time the model thread spends launching shows what other threads holding the GIL cost."""

    def __init__(self, device: SharedDevice, rate: float, launch_ops: int = 0) -> None:
        super().__init__()
        self.device, self.rate, self.launch_ops = device, rate, launch_ops
        self._scalar = torch.zeros(1)

    def forward(self, pixel_values: torch.Tensor) -> Any:
        for _ in range(self.launch_ops):
            self._scalar.add_(1.0)
        if self.rate:
            self.device.run(pixel_values.shape[0] / self.rate)
        return type("Output", (), {"logits": torch.zeros(pixel_values.shape[0], 2)})()


def emulate_nvjpeg(device: SharedDevice, rate: list[float], pixels: int) -> Any:
    """DevicePreprocessor._decode_jpegs as a job on the shared device, giving images already resized."""
    resized = torch.zeros(3, pixels, pixels, dtype=torch.uint8)

    def decode(
        items: list[np.ndarray], indices: list[int], _device: Any, failures: dict, decoders: dict
    ) -> dict[int, Any]:
        if rate[0]:
            device.run(len(indices) / rate[0])
        decoders.update(dict.fromkeys(indices, images.NVJPEG_DEVICE_RESIZE))
        return dict.fromkeys(indices, resized)

    return staticmethod(decode)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--unique-images", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--host-threads", type=int, default=2, help="split workers (the spare cores)")
    parser.add_argument(
        "--pools",
        nargs="+",
        choices=inference.SPLIT_POOLS,
        default=list(inference.SPLIT_POOLS),
        help="where the split's host share runs (EngineOptions.host_decode_pool); each is measured",
    )
    parser.add_argument(
        "--launch-ops",
        type=int,
        default=0,
        help="tiny torch ops per emulated forward, standing for its kernel launches (240: ViT-Base)",
    )
    parser.add_argument("--ratio", type=float, default=4.7, help="emulated device rate / host share rate")
    parser.add_argument("--shares", type=float, nargs="*", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument(
        "--pixels",
        type=int,
        default=32,
        help="model input side: small, so the device-side tensor work this "
        "machine's CPU does in place of the GPU (normalizing, stacking) stays negligible",
    )
    parser.add_argument(
        "--engines",
        type=int,
        default=1,
        help="engines at once on the device, like the flow's shards in flight",
    )
    parser.add_argument("--json", help="append the results as one JSON line to this file")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="oncoflow-split-"))
    make_corpus(work / "corpus", args.images, unique=args.unique_images)
    device = SharedDevice()
    rate = [0.0]  # images/s of the emulated device; 0 while calibrating (no device time)
    network = EmulatedNetwork(device, 0.0, args.launch_ops)
    model_dir = Path(make_model(work / "model", "tiny"))
    config = json.loads((model_dir / "preprocessor_config.json").read_text())
    config["size"] = {"height": args.pixels, "width": args.pixels}
    (model_dir / "preprocessor_config.json").write_text(json.dumps(config))
    model = replace(load_model(str(model_dir), device="cpu", precision="fp32"), network=network)
    images.DevicePreprocessor._decode_jpegs = emulate_nvjpeg(device, rate, args.pixels)  # type: ignore[method-assign]
    inference.nvjpeg_available = lambda device: True  # type: ignore[assignment]
    location = open_location(str(work / "corpus"))
    files = list(list_images(location))

    def run(share: float | None, pool: str, fresh: bool = True) -> dict[str, Any]:
        if fresh:
            inference.learned_split_share.clear()  # an adaptive run starts from share 0
        inference.split_images.clear()
        options = EngineOptions(
            batch_size=args.batch_size,
            decode="gpu",
            host_decode_share=share,
            host_decode_workers=args.host_threads,
            host_decode_pool=pool,  # type: ignore[arg-type]
            launch_ahead=True,  # as on a GPU
        )
        inference.stage_times.take()
        parts = [files[n :: args.engines] for n in range(args.engines)]
        rows = [0] * args.engines

        def engine(n: int) -> None:
            rows[n] = classify_files(parts[n], location.fs, model, options, "bench", f"shard{n}").num_rows

        started = time.perf_counter()
        threads = [threading.Thread(target=engine, args=(n,)) for n in range(args.engines)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        seconds = time.perf_counter() - started
        return {
            "img_s": round(sum(rows) / seconds),
            "host_decoded": inference.split_images["host"],
            "share_at_end": round(inference.learned_split_share.get("cpu", share or 0.0), 3),
            "stage_seconds": inference.stage_times.take(),
        }

    # H: the split's workers decoding everything, no device time (the better of two: the first warms
    # up). The emulated device's rate comes from the first pool's H, so every pool meets the same device.
    hosts = {pool: max(run(1.0, pool)["img_s"] for _ in range(2)) for pool in args.pools}
    host = hosts[args.pools[0]]
    rate[0] = network.rate = args.ratio * host
    results: dict[str, Any] = {
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d"),
        "images": len(files),
        "host_threads": args.host_threads,
        "launch_ops": args.launch_ops,
        "engines": args.engines,
        "host_share_alone_img_s": host,
        "host_share_alone_img_s_by_pool": hosts,
        "emulated_device_img_s": round(rate[0]),
        # Processor sharing, host share s: T = min(H / s, R / (2 - s)); best where the two meet.
        "best_possible": {
            "share": round(2 * host / (rate[0] + host), 3),
            "img_s": round((rate[0] + host) / 2),
        },
    }
    for pool in args.pools:
        # The first pool keeps the keys earlier runs recorded (threads were the only pool then).
        prefix = "" if pool == "threads" else f"{pool}_"
        for share in args.shares:
            results[f"{prefix}fixed_{share}"] = run(share, pool)
        results[f"{prefix}adaptive"] = run(None, pool)
        # The flow's later shards start from the share the previous one ended with.
        results[f"{prefix}adaptive_from_learned_share"] = run(None, pool, fresh=False)
    publish(results, args.json)


if __name__ == "__main__":
    main()
