"""Figures behind docs/scaling.md: classify img/s on this machine (tiny and ViT-Base-sized random
models, engine only, no Prefect) and bytes per output row from a real 1,000-row shard file.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python bench/sizing.py --images 1000 --base-images 48
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from PIL import Image

from flows.demo import build_tiny_model
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.sink import write_shard
from tasks.storage import list_images, open_location


def make_images(folder: str, count: int, size: tuple[int, int] = (700, 460)) -> None:
    """JPEG q90 at docs/design.md's anchor size (700×460), noise so they do not compress to nothing."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    for n in range(count):
        sub = os.path.join(folder, f"site-{n % 4}")
        os.makedirs(sub, exist_ok=True)
        pixels = np.roll(base, n * 7, axis=1)
        Image.fromarray(pixels).save(os.path.join(sub, f"scan_{n:06d}.jpg"), quality=90)


def build_base_model(folder: str) -> str:
    """ViT-Base/16 shape (hidden 768, 12 layers, 85.8M parameters), random weights."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        num_labels=2, id2label={0: "Normal", 1: "Malignant"}, label2id={"Normal": 0, "Malignant": 1}
    )
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    ViTImageProcessor().save_pretrained(folder)
    return folder


def measure(model_dir: str, source: str, limit: int, batch_size: int) -> tuple[float, object]:
    files = list(list_images(open_location(source)))[:limit]
    model = load_model(model_dir, device="cpu", precision="fp32")
    options = EngineOptions(batch_size=batch_size)
    classify_files(files[:batch_size], open_location(source).fs, model, options, "warmup", "warmup")
    started = time.perf_counter()
    table = classify_files(files, open_location(source).fs, model, options, "run", "bench")
    return len(files) / (time.perf_counter() - started), table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--base-images", type=int, default=48)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="oncoflow-sizing-")
    source = os.path.join(work, "scans")
    make_images(source, args.images)
    tiny = build_tiny_model(os.path.join(work, "tiny"))
    rate, table = measure(tiny, source, args.images, 32)
    path = write_shard(open_location(os.path.join(work, "out")), "part-bench.parquet", table)
    size = os.path.getsize(path)
    print(f"tiny ViT (hidden 32, 2 layers), fp32 CPU, {args.images} images 700x460: {rate:.1f} img/s")
    print(f"output: {table.num_rows} rows, {size} bytes, {size / table.num_rows:.1f} bytes/row (zstd)")
    if args.base_images:
        base = build_base_model(os.path.join(work, "base"))
        rate, _ = measure(base, source, args.base_images, 16)
        print(f"ViT-Base/16-sized random model, fp32 CPU, {args.base_images} images: {rate:.2f} img/s")
    print(f"cores: {os.cpu_count()}, torch threads: {__import__('torch').get_num_threads()}")


if __name__ == "__main__":
    main()
