"""`make demo`: an offline train → evaluate → classify loop on synthetic images and a tiny local model.

The demo model is NOT a medical model: it is a tiny ViT built here and trained on synthetic blobs, and
it knows nothing about pathology. It exists so the whole pipeline runs without network. For real use, pass
`--model Shivamnegi92/cancer-classification-vit` (or a local copy of it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image

from flows.quick_exit import run_command
from tasks.model_files import POSITIVE_LABEL, share_model_files

CLASSES = ("Normal", POSITIVE_LABEL)


def write_sample_images(
    folder: str, count: int, seed: int = 0, size: tuple[int, int] = (320, 240)
) -> list[str]:
    """Synthetic "scans": Normal = smooth pink tissue-like noise, Malignant = the same with dark dense blobs.

    The classes are visibly different so a model trained on them (issue: train) learns an obvious signal.
    Files go to folder/<class>/<class>_<n>.<ext>, with a mix of JPEG and PNG.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    paths = []
    for n in range(count):
        label = CLASSES[n % 2]
        base = np.stack(
            [np.full((height, width), 225), np.full((height, width), 180), np.full((height, width), 200)],
            axis=-1,
        ).astype(np.float32)
        base += rng.normal(0, 12, size=(height, width, 3))
        if label == POSITIVE_LABEL:
            yy, xx = np.mgrid[0:height, 0:width]
            for _ in range(int(rng.integers(4, 9))):
                cy, cx = rng.integers(0, height), rng.integers(0, width)
                radius = rng.integers(min(size) // 10, min(size) // 5)
                blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
                base[blob] = [90, 30, 110] + rng.normal(0, 10, size=(int(blob.sum()), 3))
        pixels = np.clip(base, 0, 255).astype(np.uint8)
        extension = "jpg" if n % 3 else "png"
        path = os.path.join(folder, label, f"{label.lower()}_{n:04d}.{extension}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


def build_tiny_model(folder: str, seed: int = 0, image_size: int = 224) -> str:
    """A tiny ViT (hidden 32, 2 layers) with Normal/Malignant labels and a ViT image processor, saved as
    safetensors with `save_pretrained`. Random weights unless trained afterwards."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(  # type: ignore[call-arg]
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=16,
        num_labels=2,
        id2label=dict(enumerate(CLASSES)),
        label2id={name: i for i, name in enumerate(CLASSES)},
    )
    ViTForImageClassification(config).save_pretrained(folder, safe_serialization=True)
    share_model_files(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


DEMO_IMAGE_SIZE = 64  # the tiny demo ViT sees 64x64 inputs: enough for the blobs, fast on 2 CPU cores
# The tiny model starts from random weights, so it needs a larger step and more epochs than the seed
# recipe's 5e-5 x 5, which fine-tunes a pretrained ViT-Base.
DEMO_EPOCHS = 6
DEMO_LEARNING_RATE = 1e-3


DEMO_BANNER = (
    "> **Demo output.** A tiny ViT trained on synthetic blobs by `make demo`: not a medical model. "
    "Its numbers say nothing about any real model, scanner or patient. Research use only, not a diagnosis.\n\n"
)


def mark_as_demo(markdown: str) -> None:
    """Put DEMO_BANNER at the top of a model card or report the demo wrote, so a copy cannot pass for real."""
    with open(markdown, encoding="utf-8") as handle:
        text = handle.read()
    with open(markdown, "w", encoding="utf-8") as handle:
        handle.write(DEMO_BANNER + text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="demo-output", help="where the demo writes everything")
    parser.add_argument("--images", type=int, default=100, help="how many synthetic training images to make")
    args = parser.parse_args()

    workdir = os.path.abspath(args.workdir)
    from flows.server_guard import start_temporary_server, use_temporary_server

    start_temporary_server()  # boots while the sample images and the model are made (guarded, as the CLI's)
    shutil.rmtree(workdir, ignore_errors=True)
    folders = {
        name: os.path.join(workdir, name)
        for name in ("train", "holdout", "incoming", "base-model", "model", "report", "predictions")
    }
    write_sample_images(folders["train"], args.images, seed=1)
    write_sample_images(folders["holdout"], 40, seed=2)
    write_sample_images(folders["incoming"], 30, seed=3)
    build_tiny_model(folders["base-model"], image_size=DEMO_IMAGE_SIZE)
    print(
        f"made synthetic labelled images ({args.images} to train on, 40 held out) in {workdir}, 30 more "
        "unlabelled ones in incoming/, and an untrained tiny ViT"
    )
    print("NOTE: the demo model is not a medical model; it learns synthetic blobs. Research use only.")

    from flows.classify import classify
    from flows.evaluate import evaluate
    from flows.train import train
    from tasks.report import interpretation, seed_table

    use_temporary_server()  # Ctrl-C or kill -9 of the demo does not leave Prefect's server running
    print("\n1. train (a Prefect flow; the seed recipe with a larger learning rate for a model from scratch)")
    trained = train(
        folders["train"],
        folders["model"],
        base_model=folders["base-model"],
        epochs=DEMO_EPOCHS,
        learning_rate=DEMO_LEARNING_RATE,
        device="cpu",
    )
    mark_as_demo(os.path.join(trained["output"], "README.md"))
    print(f"model card: {trained['output']}/README.md")

    print("\n2. evaluate on the held-out images (classified through the classify flow)")
    metrics = evaluate(folders["report"], data=folders["holdout"], model=folders["model"], device="cpu")
    print(f"\n{seed_table(metrics)}\n\n{interpretation(metrics)}")
    mark_as_demo(os.path.join(folders["report"], "report.md"))
    print(f"report, metrics.json and plots: {folders['report']}")

    print("\n3. classify new images with the trained model, twice (the second run finds nothing new)")
    summary = classify(folders["incoming"], folders["predictions"], model=folders["model"], device="cpu")
    again = classify(folders["incoming"], folders["predictions"], model=folders["model"], device="cpu")
    print(
        f"\nfirst run classified {summary['images_classified']} images ({summary['malignant']} Malignant); "
        f"the second found {again['images_found']} images, all already in the output, and classified "
        f"{again['images_classified']}: runs are incremental, as intended"
    )
    output = folders["predictions"]
    print(f"Parquet dataset: {output}")
    print("Query it with DuckDB:")
    print(
        f'  {sys.executable} -c "import duckdb; duckdb.sql(\\"select label, count(*) n, avg(confidence) conf from '
        f"read_parquet('{output}/model_slug=*/date=*/*.parquet') group by label\\\").show()\""
    )


if __name__ == "__main__":
    run_command(main)
