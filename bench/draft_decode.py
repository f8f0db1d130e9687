"""JPEG draft decoding (PIL's DCT-domain downscale) for the host share: speed and agreement.

    PYTHONPATH=. .venv/bin/python bench/draft_decode.py [--images 200] [--json OUT]

The issue's anchor (16 cores): PIL decode + resize to 224 gives 2,351 img/s, in draft mode 3,839. Draft
mode decodes a 700x460 JPEG at half size (350x230) straight from the DCT coefficients, then resizes that
to 224x224, so its pixels differ from the reference's (full decode, then resize). This measures, on one
core, both rates, the pixel difference, and what it does to a ViT-Base's (random weights, fp32)
probabilities and labels: a fast path must keep labels on >= 99.5% of images to be used at all.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.throughput import emit, machine, make_corpus, make_model  # noqa: E402
from tasks.model import load_model  # noqa: E402

SIZE = (224, 224)


def full(data: bytes) -> np.ndarray:
    """The reference: full decode, then PIL's bilinear resize."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))


def draft(data: bytes) -> np.ndarray:
    """Draft mode: the largest DCT downscale that keeps both sides >= 224, then the same resize."""
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", SIZE)
    return np.asarray(image.convert("RGB").resize(SIZE, Image.Resampling.BILINEAR))


def drafted_size(data: bytes) -> list[int]:
    image = Image.open(io.BytesIO(data))
    image.draft("RGB", SIZE)
    return list(image.size)


def rate(decode: Callable[[bytes], np.ndarray], raw: list[bytes]) -> float:
    started = time.perf_counter()
    for data in raw:
        decode(data)
    return round(len(raw) / (time.perf_counter() - started), 1)


def probabilities(model_dir: str, pixels: np.ndarray, batch: int = 25) -> np.ndarray:
    """prob of class 1 with ViT's default normalization (mean = std = 0.5), fp32."""
    model = load_model(model_dir, device="cpu", precision="fp32")
    inputs = (
        torch.from_numpy((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()
    )
    with torch.inference_mode():
        out = [
            torch.softmax(model.network(pixel_values=inputs[i : i + batch]).logits, -1)[:, 1]
            for i in range(0, len(inputs), batch)
        ]
    return torch.cat(out).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--model-size", choices=["base", "tiny"], default="base")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="oncoflow-draft-"))
    raw = [path.read_bytes() for path in make_corpus(work / "corpus", args.images, unique=args.images)]
    rates = {"full": [rate(full, raw)], "draft": [rate(draft, raw)]}
    rates["full"].append(rate(full, raw))
    rates["draft"].append(rate(draft, raw))
    reference = np.stack([full(data) for data in raw])
    drafted = np.stack([draft(data) for data in raw])
    model_dir = make_model(work / "model", args.model_size)
    a, b = probabilities(model_dir, reference), probabilities(model_dir, drafted)
    difference = np.abs(reference.astype(int) - drafted.astype(int))
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "images": len(raw),
        "sizes_of_the_first_image": {
            "file": list(Image.open(io.BytesIO(raw[0])).size),
            "draft": drafted_size(raw[0]),
        },
        "full_decode_resize_img_s_one_core": max(rates["full"]),
        "draft_decode_resize_img_s_one_core": max(rates["draft"]),
        "pixel_diff_max": int(difference.max()),
        "pixel_diff_mean": round(float(difference.mean()), 3),
        "model": f"ViT-{args.model_size} random weights, fp32",
        "label_agreement": round(float(np.mean((a >= 0.5) == (b >= 0.5))), 4),
        "max_prob_diff": round(float(np.abs(a - b).max()), 5),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
