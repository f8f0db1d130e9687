"""Does nvjpeg keep its speed beside the forward pass when it runs on a high-priority CUDA stream?

    python bench/nvjpeg_priority.py --json OUT.json      # CUDA only, about a minute on an H100

bench/gpu_overlap.py measured on the H100 that torchvision's batched nvjpeg decode falls from 12,007
img/s alone to 4,412 beside the fp16 forward pass, and the engine runs at that rate. torchvision runs
nvjpeg on an internal stream of normal priority that the caller cannot choose. This calls libnvjpeg's
batched decoder directly (ctypes; the hardware backend where the GPU has JPEG engines, else the
default one) on a stream of our choosing, and measures, like gpu_overlap.py, alone and beside the
forward: on a normal-priority stream (the API's own effect) and on the highest-priority stream (the
priority's effect). It also checks that its pixels equal torchvision's for one batch. If the
high-priority decode keeps most of its speed beside the forward, the engine can approach the forward's
~9,000 img/s by decoding this way (the next step of issue 6); if not, it will not. It also reports
whether launching the forward waits for the GPU (gpu_overlap.forward_launch): the engine's model
thread spent ~34 ms per batch launching on the H100. And whether the host's GIL is the cause instead:
torchvision's decode beside the forward replayed as a CUDA graph (the model thread then holds the GIL
for microseconds a batch), and beside the eager forward with a 0.5 ms GIL switch interval.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import glob
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.gpu_overlap import (  # noqa: E402
    Bench,
    add_graphed_forward,
    alone_and_beside_forward,
    forward_launch,
    measure,
    set_up,
    torchvision_decoder,
)

MAX_COMPONENT = 4
BACKEND_DEFAULT, BACKEND_HARDWARE = 0, 3
OUTPUT_RGB = 3  # planar RGB: one plane per channel, as torchvision returns (3, H, W)
STATUS_ARCH_MISMATCH = 7


class NvjpegImage(ctypes.Structure):
    _fields_ = [
        ("channel", ctypes.c_void_p * MAX_COMPONENT),
        ("pitch", ctypes.c_size_t * MAX_COMPONENT),
    ]


def find_libnvjpeg() -> ctypes.CDLL:
    """The libnvjpeg this process already loaded (torchvision's), else one from the CUDA wheels or the
    system; a clear error when there is none."""
    candidates: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            candidates += sorted({line.split()[-1] for line in maps if "libnvjpeg" in line})
    except OSError:
        pass
    for base in sys.path:
        for pattern in (
            "nvidia/*/lib/libnvjpeg.so*",
            "nvidia/nvjpeg/lib/libnvjpeg.so*",
            "torchvision.libs/libnvjpeg*.so*",
        ):
            candidates += sorted(glob.glob(os.path.join(base, pattern)))
    if found := ctypes.util.find_library("nvjpeg"):
        candidates.append(found)
    errors = []
    for candidate in dict.fromkeys(candidates):
        try:
            return ctypes.CDLL(candidate)
        except OSError as exc:
            errors.append(f"{candidate}: {exc}")
    raise SystemExit(
        "libnvjpeg not found (looked in this process's loaded libraries, the nvidia/* and torchvision.libs "
        f"folders on sys.path and the system library path){': ' + '; '.join(errors) if errors else ''}. "
        "Run it where torchvision with CUDA, or the nvidia-nvjpeg wheel, is installed."
    )


class BatchedDecoder:
    """libnvjpeg's batched decode (nvjpegDecodeBatched) of a fixed batch size into planar RGB tensors,
    on the CUDA stream passed to decode()."""

    def __init__(self, lib: ctypes.CDLL, batch_size: int) -> None:
        self.lib, self.batch_size = lib, batch_size
        self.handle, self.state = ctypes.c_void_p(), ctypes.c_void_p()
        self.backend = "hardware"
        status = lib.nvjpegCreateEx(BACKEND_HARDWARE, None, None, 0, ctypes.byref(self.handle))
        if status == STATUS_ARCH_MISMATCH:  # no JPEG engines on this GPU
            self.backend = "default"
            status = lib.nvjpegCreateEx(BACKEND_DEFAULT, None, None, 0, ctypes.byref(self.handle))
        self.check(status, "nvjpegCreateEx")
        self.check(lib.nvjpegJpegStateCreate(self.handle, ctypes.byref(self.state)), "nvjpegJpegStateCreate")
        self.check(
            lib.nvjpegDecodeBatchedInitialize(self.handle, self.state, batch_size, 1, OUTPUT_RGB),
            "nvjpegDecodeBatchedInitialize",
        )

    @staticmethod
    def check(status: int, call: str) -> None:
        if status != 0:
            raise RuntimeError(f"{call} failed with nvjpegStatus_t {status}")

    def size(self, data: bytes) -> tuple[int, int]:
        components, subsampling = ctypes.c_int(), ctypes.c_int()
        widths, heights = (ctypes.c_int * MAX_COMPONENT)(), (ctypes.c_int * MAX_COMPONENT)()
        self.check(
            self.lib.nvjpegGetImageInfo(
                self.handle,
                data,
                ctypes.c_size_t(len(data)),
                ctypes.byref(components),
                ctypes.byref(subsampling),
                widths,
                heights,
            ),
            "nvjpegGetImageInfo",
        )
        return heights[0], widths[0]

    def prepare(self, batch: list[bytes], device: torch.device) -> Batch:
        """Output tensors and the call's arguments for one batch, made once: per call they would cost
        ~4 ms of GIL-holding Python per 256 images, and skew the rate measured beside the forward."""
        if len(batch) != self.batch_size:
            raise ValueError(
                f"this decoder was initialized for batches of {self.batch_size}, got {len(batch)}"
            )
        images = (NvjpegImage * len(batch))()
        outputs = []
        for i, data in enumerate(batch):
            height, width = self.size(data)
            output = torch.empty(3, height, width, dtype=torch.uint8, device=device)
            for c in range(3):
                images[i].channel[c] = output.data_ptr() + c * height * width
                images[i].pitch[c] = width
            outputs.append(output)
        pointers = (ctypes.c_char_p * len(batch))(*batch)
        lengths = (ctypes.c_size_t * len(batch))(*(len(data) for data in batch))
        return Batch(batch, outputs, images, pointers, lengths)

    def decode(self, batch: Batch, stream: Any) -> list[torch.Tensor]:
        """Decode into the batch's (3, H, W) uint8 tensors, on `stream`.

        The hardware backend does not wait for work already queued on the stream it is given (reported
        against nvjpeg by torchcodec), so the stream is waited for on the host first: nothing may still
        be reading last call's outputs. (For the same reason the priority can only speed up nvjpeg's
        kernel steps, colour conversion and the like, not the JPEG engines themselves.) Before this
        decoder goes into the engine it also needs nvjpegDecodeBatchedSupported per file, routing the
        others to torchvision or PIL as now."""
        stream.synchronize()
        self.check(
            self.lib.nvjpegDecodeBatched(
                self.handle,
                self.state,
                batch.pointers,
                batch.lengths,
                batch.images,
                ctypes.c_void_p(stream.cuda_stream),
            ),
            "nvjpegDecodeBatched",
        )
        return batch.outputs


@dataclass
class Batch:
    """One batch's JPEG bytes (kept alive: `pointers` points into them) and its prepared call."""

    data: list[bytes]
    outputs: list[torch.Tensor]
    images: Any
    pointers: Any
    lengths: Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each measurement runs")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/nvjpeg_priority.py needs a CUDA GPU (it measures nvjpeg on one)")
    bench: Bench = set_up("cuda", args.batch)  # runs torchvision's nvjpeg once, which loads libnvjpeg
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "batch": args.batch}

    def save() -> None:  # after every part: a later part that fails or is cut off keeps the earlier ones
        if args.json:
            args.json.write_text(json.dumps(results) + "\n")

    results.update(forward_launch(bench))
    print({key: value for key, value in results.items() if key.startswith("forward_")}, flush=True)
    alone_and_beside_forward(bench, "decode", args.seconds, results)  # torchvision, for reference
    save()
    gil_or_gpu(bench, args.seconds, results)
    save()
    try:
        direct_decoder(bench, args, results)
    except Exception as exc:  # noqa: BLE001 - written without a GPU: its failure is a result too
        results["direct_decoder_error"] = f"{type(exc).__name__}: {exc}"[:500]
        print("FAILED the direct decoder:", results["direct_decoder_error"], flush=True)
    print(json.dumps(results, indent=1))
    save()


def gil_or_gpu(bench: Bench, seconds: float, results: dict[str, Any]) -> None:
    """torchvision's decode beside the forward replayed as a CUDA graph (the model thread then holds the
    GIL for microseconds a batch), and beside the eager forward with a 0.5 ms GIL switch interval
    instead of 5 ms (a thread waiting for the GIL gets it sooner). A forward that cannot be captured
    loses only its own figure."""
    try:
        add_graphed_forward(bench)
        alone_and_beside_forward(bench, "decode", seconds, results, forward="forward_graphed")
    except Exception as exc:  # noqa: BLE001 - recorded, the rest still runs
        results["forward_graphed_error"] = f"{type(exc).__name__}: {exc}"[:500]
        print("FAILED forward_graphed:", results["forward_graphed_error"], flush=True)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        counts = measure(bench, ("forward", "decode"), seconds)
    finally:
        sys.setswitchinterval(interval)
    results["forward+decode_switch_interval_0.5ms_img_s"] = counts
    print("decode beside the forward, switch interval 0.5 ms", counts, flush=True)


def direct_decoder(bench: Bench, args: argparse.Namespace, results: dict[str, Any]) -> None:
    """libnvjpeg's batched decoder called directly, on a normal- and on a high-priority stream: its
    pixels against torchvision's, and each rate alone and beside the forward."""
    decoder = BatchedDecoder(find_libnvjpeg(), args.batch)
    batches = [
        decoder.prepare(bench.raw[i : i + args.batch], bench.device)
        for i in range(0, len(bench.raw), args.batch)
    ]
    high = torch.cuda.Stream(bench.device, priority=-100)  # torch maps it to its highest priority
    normal = torch.cuda.Stream(bench.device)
    results["backend"] = decoder.backend
    results["stream_priorities"] = {"high": high.priority, "normal": normal.priority}
    # Same pixels as torchvision (both are nvjpeg): the largest difference over one batch.
    decode_jpeg, rgb = torchvision_decoder()
    reference = decode_jpeg(bench.encoded[0], mode=rgb, device=bench.device)
    ours = decoder.decode(batches[0], normal)
    normal.synchronize()
    results["max_abs_diff_vs_torchvision"] = max(
        int((a.int() - b.int()).abs().max()) for a, b in zip(ours, reference, strict=True)
    )
    print("backend", decoder.backend, "max abs diff vs torchvision", results["max_abs_diff_vs_torchvision"])

    def direct(n: int) -> None:
        stream = torch.cuda.current_stream(bench.device)
        decoder.decode(batches[n % len(batches)], stream)
        stream.synchronize()

    for name, stream in (("normal", normal), ("high", high)):
        stage = f"direct_{name}_priority"
        bench.stages[stage] = direct
        alone_and_beside_forward(bench, stage, args.seconds, results, streams={stage: stream})


if __name__ == "__main__":
    main()
