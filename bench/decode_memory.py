"""Peak memory of decoding one high-bit-depth image (16-bit PNG and TIFF, 32-bit float TIFF, 16-bit DICOM
with a VOI window, without one, with a rescale, MONOCHROME1), as bytes per pixel above the file's bytes.

    python bench/decode_memory.py [--width 3328 --height 4096] [--json FILE]   # a mammogram's size

The figure is tracemalloc's peak: numpy arrays and Python bytes (pydicom's pixel data, the conversions
to 8 bits), the same on any machine. Pillow's own image buffers are not traced: the decoded image (2
bytes per pixel for 16-bit, 4 for float) and its 8-bit grey and RGB copies (4) come on top. Each
decoding thread of a run can hold this much at once. One JSON line per case; bench/README.md keeps the
table. (The resident-memory peak was tried and dropped: freed memory the allocator keeps from building
the case hides the decode's own peak.)
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.images import decode_image  # noqa: E402
from tests.corpus import make_dicom  # noqa: E402


def cases(width: int, height: int) -> dict[str, tuple[bytes, str]]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(height, width), dtype=np.uint16)  # a 12-bit detector

    def encoded(image: Image.Image, fmt: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt)
        return buffer.getvalue()

    return {
        "png-16bit": (encoded(Image.fromarray(pixels), "PNG"), "scan.png"),
        "tiff-16bit": (encoded(Image.fromarray(pixels), "TIFF"), "scan.tif"),
        "tiff-float32": (encoded(Image.fromarray(pixels.astype(np.float32)), "TIFF"), "scan.tif"),
        "dicom-window": (make_dicom(pixels, window=(2048, 1024)), "scan.dcm"),
        "dicom-range": (make_dicom(pixels), "scan.dcm"),
        "dicom-rescale-window": (make_dicom(pixels, window=(0, 2000), rescale=(1.0, -1024.0)), "scan.dcm"),
        "dicom-monochrome1": (make_dicom(pixels, photometric="MONOCHROME1"), "scan.dcm"),
    }


def measure(case: str, width: int, height: int) -> dict[str, float]:
    """The traced peak and the seconds of one decode."""
    data, name = cases(width, height)[case]
    decode_image(cases(64, 64)[case][0], name=name)  # warm on a small one: imports, codecs
    started = time.perf_counter()
    decode_image(data, name=name)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    image = decode_image(data, name=name)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del image
    return {
        "traced_bytes": traced,
        "traced_mb": round(traced / 2**20, 1),
        "traced_bytes_per_pixel": round(traced / (width * height), 2),
        "seconds": round(seconds, 6),  # a small image decodes in well under a millisecond
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=3328)
    parser.add_argument("--height", type=int, default=4096)
    parser.add_argument("--json", type=Path, help="also append the JSON lines to this file")
    args = parser.parse_args()
    for case in cases(8, 8):
        line = {"case": case, "size": f"{args.width}x{args.height}", **measure(case, args.width, args.height)}
        line |= {"machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(line), flush=True)
        if args.json:
            with args.json.open("a") as results:
                results.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
