"""Decode image bytes and preprocess them exactly as the model's own image processor would.

The reference is the seed card's snippet: `Image.open(f).convert("RGB")`, then the model's
`AutoImageProcessor` (resize to `size` with `resample`, rescale by `rescale_factor`, normalize with
`image_mean`/`image_std`). `Preprocessor` reads those values from the model's preprocessor_config.json;
nothing is hard-coded. Configurations outside that simple form (crops, shortest-edge resizes, padding)
are handed to the transformers processor itself, slower but exact.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageError(Exception):
    """A file that cannot become model input; `category` goes into the output row's `error` column."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(f"{category}: {message}")
        self.category = category


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode bytes into an RGB PIL image, or raise ImageError with a category.

    The pixel limit is checked from the header, before any pixel is allocated.
    """
    if not data:
        raise ImageError("empty", "the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageError("too_large", f"{width}x{height} pixels exceeds the limit of {max_pixels}")
            image.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        category = "truncated" if "truncated" in message or isinstance(exc, EOFError) else "unsupported"
        raise ImageError(category, message) from exc
    return image.convert("RGB")


@dataclass(frozen=True)
class Preprocessor:
    """Resize → rescale → normalize, with the values from a preprocessor_config.json."""

    height: int
    width: int
    resample: int
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessor | None:
        """Build from a processor config, or None when it needs steps this fast path does not do."""
        size = config.get("size", {"height": 224, "width": 224})
        if isinstance(size, int):
            size = {"height": size, "width": size}
        if set(size) != {"height", "width"}:
            return None
        if config.get("do_center_crop") or config.get("do_pad") or config.get("crop_pct"):
            return None
        mean = config.get("image_mean", [0.0, 0.0, 0.0])
        std = config.get("image_std", [1.0, 1.0, 1.0])
        if isinstance(mean, int | float):
            mean = [mean] * 3
        if isinstance(std, int | float):
            std = [std] * 3
        return cls(
            height=int(size["height"]),
            width=int(size["width"]),
            resample=int(config.get("resample", Image.Resampling.BILINEAR)),
            rescale_factor=float(config.get("rescale_factor", 1 / 255)),
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            do_resize=bool(config.get("do_resize", True)),
            do_rescale=bool(config.get("do_rescale", True)),
            do_normalize=bool(config.get("do_normalize", True)),
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image → float32 array (3, height, width), ready for the model."""
        if self.do_resize and image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        pixels: np.ndarray = np.asarray(image, dtype=np.float32)
        if self.do_rescale:
            pixels = pixels * np.float32(self.rescale_factor)
        if self.do_normalize:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class ProcessorFallback:
    """Preprocess with the transformers image processor itself, for configs the fast path does not cover."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoImageProcessor

        self.processor = AutoImageProcessor.from_pretrained(model_dir)

    def __call__(self, image: Image.Image) -> np.ndarray:
        batch = self.processor(images=image, return_tensors="np")
        return np.asarray(batch["pixel_values"][0], dtype=np.float32)


def make_preprocessor(config: dict[str, Any], model_dir: str) -> Preprocessor | ProcessorFallback:
    """The fastest exact preprocessing for a model's processor config."""
    return Preprocessor.from_config(config) or ProcessorFallback(model_dir)
