"""How `--decode gpu` (nvjpeg on CUDA) treats odd and damaged JPEGs, against the exact CPU path.

    PYTHONPATH=. python bench/nvjpeg_probe.py --device cuda --json $OUT/nvjpeg-probe.json

The CPU tests stand in for nvjpeg with PIL, so what the hardware decoder does with a truncated or
corrupt file (an error, or a half-grey image with an `ok` row?) is only seen on a GPU. Each probe file
is classified twice with a tiny ViT on the same device, `--decode gpu` and `--decode cpu`; the table
shows status, error category, decoder and the probability difference per file. On a machine without
CUDA the gpu side runs the same DevicePreprocessor without nvjpeg, which only proves the script runs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.throughput import make_model  # noqa: E402
from tasks.inference import EngineOptions, classify_files  # noqa: E402
from tasks.model import load_model  # noqa: E402
from tasks.storage import list_images, open_location  # noqa: E402


def jpeg(image: Image.Image, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def probe_files() -> dict[str, bytes]:
    """Valid variants nvjpeg may or may not take, and damaged files that must not become `ok` rows."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (460, 700, 3), dtype=np.uint8)).filter(
        ImageFilter.GaussianBlur(2)
    )
    plain = jpeg(rgb, quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6
    middle = bytearray(plain)
    middle[len(plain) // 2 : len(plain) // 2 + 400] = bytes(400)  # scan data zeroed in the middle
    return {
        "plain-420.jpg": plain,
        "subsampling-444.jpg": jpeg(rgb, quality=90, subsampling=0),
        "progressive.jpg": jpeg(rgb, quality=90, progressive=True),
        "grayscale.jpg": jpeg(rgb.convert("L"), quality=90),
        "cmyk.jpg": jpeg(rgb.convert("CMYK"), quality=90),
        "exif-rotated.jpg": jpeg(rgb, quality=90, exif=exif.tobytes()),
        "one-pixel.jpg": jpeg(Image.new("RGB", (1, 1), "red")),
        "restart-markers.jpg": jpeg(rgb, quality=90, restart_marker_blocks=4),
        "truncated-half.jpg": plain[: len(plain) // 2],
        "truncated-header.jpg": plain[:200],
        "corrupt-middle.jpg": bytes(middle),
        "no-eoi.jpg": plain[:-2],
    }


def classify(folder: Path, model_dir: str, device: str, decode: str) -> dict[str, dict[str, Any]]:
    model = load_model(model_dir, device=device, precision="fp32")  # type: ignore[arg-type]
    location = open_location(str(folder))
    files = list(list_images(location))
    table = classify_files(
        files, location.fs, model, EngineOptions(batch_size=8, decode=decode), "probe", "p"
    )  # type: ignore[arg-type]
    return {
        row["image_uri"].rsplit("/", 1)[-1]: {
            "status": row["status"],
            "error": (row["error"] or "").split(":", 1)[0] or None,
            "decoder": row["decoder"],
            "prob": row["prob_malignant"],
        }
        for row in table.to_pylist()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncoflow-nvjpeg-probe-"))
    folder = work / "probe"
    folder.mkdir()
    for name, data in probe_files().items():
        (folder / name).write_bytes(data)
    model_dir = make_model(work / "tiny", "tiny")
    gpu, cpu = (classify(folder, model_dir, args.device, decode) for decode in ("gpu", "cpu"))
    results: dict[str, Any] = {"device": args.device, "files": {}}
    print("| file | decode gpu: status / error / decoder | decode cpu: status / error | prob diff |")
    print("|---|---|---|---|")
    for name in sorted(cpu):
        g, c = gpu[name], cpu[name]
        diff = abs(g["prob"] - c["prob"]) if g["prob"] is not None and c["prob"] is not None else None
        results["files"][name] = {"gpu": g, "cpu": c, "prob_diff": diff}
        print(
            f"| {name} | {g['status']} / {g['error']} / {g['decoder']} | {c['status']} / {c['error']} | "
            f"{'' if diff is None else f'{diff:.4f}'} |"
        )
    results["status_disagreements"] = [n for n in cpu if gpu[n]["status"] != cpu[n]["status"]]
    print("status disagreements (gpu vs cpu):", results["status_disagreements"] or "none")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
