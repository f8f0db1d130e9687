"""The GPU-side preprocessing path (resize/normalize on the model's device), exercised on CPU tensors.

On a CUDA machine the same code runs on the GPU (and JPEGs decode with nvjpeg); here it runs on the CPU,
which checks its batching, error handling and agreement with the exact PIL path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.images import DevicePreprocessor, Preprocessor, decode_image
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import list_images, open_location


# Levels of 255: bilinear matches PIL up to rounding; torch's bicubic kernel (a=-0.75) differs from
# PIL's (a=-0.5), which shows on these noise images' sharp edges.
@pytest.mark.parametrize(
    ("resample", "levels"), [(Image.Resampling.BILINEAR, 2), (Image.Resampling.BICUBIC, 16)]
)
def test_device_resize_agrees_with_pil(image_folder: Path, resample: int, levels: int) -> None:
    host = Preprocessor(224, 224, resample, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = DevicePreprocessor(host)
    paths = sorted(
        p
        for p in image_folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt"
    )
    images = [decode_image(p.read_bytes()) for p in paths if ".cache" not in p.parts]
    batch, failures = device.batch([np.array(i) for i in images], torch.device("cpu"), torch.float32)
    assert failures == {} and tuple(batch.shape) == (len(images), 3, 224, 224)
    for row, image in zip(batch, images, strict=True):
        difference = np.abs(row.numpy() - host(image)) * 0.5 * 255  # back to 8-bit levels (std 0.5)
        assert difference.max() <= levels + 1e-3 and difference.mean() < 1.0


def test_gpu_decode_mode_gives_the_same_labels(image_folder: Path, tiny_model: str) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location))
    exact = classify_files(files, location.fs, model, EngineOptions(batch_size=4), "r", "s").to_pylist()
    fast = classify_files(
        files, location.fs, model, EngineOptions(batch_size=4, decode="gpu"), "r", "s"
    ).to_pylist()
    assert [r["image_uri"] for r in exact] == [r["image_uri"] for r in fast]
    assert [r["label"] for r in exact] == [r["label"] for r in fast]
    assert (
        max(abs(a["prob_malignant"] - b["prob_malignant"]) for a, b in zip(exact, fast, strict=True)) < 1e-2
    )


def test_unsupported_resample_is_refused() -> None:
    with pytest.raises(ValueError, match="--decode cpu"):
        DevicePreprocessor(Preprocessor(224, 224, Image.Resampling.LANCZOS, 1 / 255, (0,) * 3, (1,) * 3))
