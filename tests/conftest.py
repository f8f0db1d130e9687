"""Shared fixtures: an offline, isolated environment, one Prefect test server, tiny ViTs and images."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect or huggingface_hub: offline, and nothing written to the user's home.
_home = tempfile.mkdtemp(prefix="oncoflow-tests-")
os.environ["PREFECT_HOME"] = os.path.join(_home, "prefect")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = os.path.join(_home, "hf")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("PREFECT_API_URL", None)

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from flows.demo import build_tiny_model  # noqa: E402
from tests.s3_fixtures import s3, s3_server  # noqa: E402, F401  (the S3 server fixtures)


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """One real Prefect API (temporary server on SQLite) for the whole session; yields its URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(PREFECT_API_URL.value())


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ViT (random weights, Normal/Malignant) with ViT's default processor (mean/std 0.5)."""
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny-vit")), seed=1)


@pytest.fixture(scope="session")
def tiny_model_imagenet(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A second tiny ViT whose processor differs: 64×64 input, ImageNet mean/std, bicubic resampling."""
    from transformers import ViTImageProcessor

    folder = build_tiny_model(str(tmp_path_factory.mktemp("tiny-vit-imagenet")), seed=2, image_size=64)
    ViTImageProcessor(
        size={"height": 64, "width": 64},
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        resample=Image.Resampling.BICUBIC,
    ).save_pretrained(folder)
    return folder


def make_image(path: Path, size: tuple[int, int] = (64, 48), mode: str = "RGB", seed: int = 0) -> Path:
    """A random image of the given PIL mode, saved in the format its extension names."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(0, 256, size=(height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six images of assorted sizes, modes and formats, in nested folders, plus files to be skipped."""
    root = tmp_path / "scans"
    make_image(root / "a.jpg", (64, 48), "RGB", 1)
    make_image(root / "b.PNG", (30, 90), "L", 2)
    make_image(root / "c.png", (224, 224), "RGBA", 3)
    make_image(root / "sub" / "d.tif", (300, 120), "RGB", 4)
    make_image(root / "sub" / "deeper" / "e.jpeg", (17, 23), "RGB", 5)
    make_image(root / "sub" / "f.bmp", (50, 50), "P", 6)
    (root / "notes.txt").write_text("not an image")
    make_image(root / ".hidden.jpg", seed=7)
    make_image(root / ".cache" / "g.jpg", seed=8)
    return root


def cpu_compiler_missing() -> bool:
    """No C++ compiler for torch.compile on the CPU here: the --compile tests cannot compile."""
    import torch

    from tasks.model import ModelError, check_compile

    try:
        check_compile(torch.device("cpu"))
    except ModelError:
        return True
    return False
