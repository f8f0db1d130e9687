"""Decode image bytes and preprocess them exactly as the model's own image processor would.

The reference is the seed card's snippet: `Image.open(f).convert("RGB")`, then the model's
`AutoImageProcessor` (resize to `size` with `resample`, rescale by `rescale_factor`, normalize with
`image_mean`/`image_std`). `Preprocessor` reads those values from the model's preprocessor_config.json;
nothing is hard-coded. Configurations outside that simple form (crops, shortest-edge resizes, padding)
are handed to the transformers processor itself, slower but exact.

Decoding follows the reference wherever the reference gives an answer (alpha dropped, first frame of a
multi-page file, EXIF orientation not applied unless asked for) and departs from it only where the
reference would feed the model garbage: 16-bit and float images are scaled to 8 bits by their value
range instead of being clipped at 255, and DICOM files are windowed as a viewer would show them.
Anything that cannot become an image raises ImageError with one of ERROR_CATEGORIES.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, Executor, Future
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, TiffImagePlugin, UnidentifiedImageError

from tasks.defaults import DEFAULT_MAX_PIXELS

logger = logging.getLogger(__name__)


DICOM_EXTENSIONS = (".dcm", ".dicom")
# File signatures of the formats Pillow decodes here: a file starting with one of them is an image
# that went wrong (truncated), not a file that never was one (not_an_image).
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*", b"BM")
HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# The only formats Pillow may open, whatever a file is named: the listed extensions (JPEG opens a phone's
# multi-picture JPEG). Not "any format Pillow knows": an EPS file named .png would run Ghostscript on
# untrusted content, and ICO, PPM, TGA, JPEG 2000, ... are no scanner's output.
PILLOW_FORMATS = ("JPEG", "PNG", "GIF", "TIFF", "BMP", "WEBP")


class ImageError(Exception):
    """A file that cannot become model input; `category` goes into the output row's `error` column."""

    def __init__(self, category: str, message: str) -> None:
        super().__init__(f"{category}: {message}")
        self.category = category


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, *, name: str = "", exif_orientation: bool = False
) -> Image.Image:
    """Decode bytes into an RGB PIL image, or raise ImageError with a category.

    `name` (the file name) only marks `.dcm`/`.dicom` files as DICOM; DICOM files with the standard
    preamble are recognised by content. The pixel limit is checked from the header, before any pixel
    is allocated.
    """
    if not data:
        raise ImageError("empty", "the file has zero bytes")
    with warnings.catch_warnings():
        # Pillow and pydicom warn per file (corrupt EXIF, odd tags): one error row says enough, and a
        # DICOM warning may quote an element's value.
        warnings.simplefilter("ignore")
        named_dicom = os.path.splitext(name)[1].lower() in DICOM_EXTENSIONS
        # A `.dcm` name on a JPEG/PNG/... (an export renamed) is decoded as the image it is.
        if data[128:132] == b"DICM" or (
            named_dicom and not data.startswith(SIGNATURES) and not is_webp(data)
        ):
            from tasks.dicom import decode_dicom

            return decode_dicom(data, max_pixels)
        return _decode_with_pillow(data, max_pixels, exif_orientation)


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _decode_with_pillow(data: bytes, max_pixels: int, exif_orientation: bool) -> Image.Image:
    # Pillow refuses images beyond 2x its own limit in Image.open; a user who raised --max-pixels
    # above that asked for them, and our own header check below still applies.
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels
    webp = is_webp(data)
    # A file cut short within its signature (`FF D8`: a JPEG's first two bytes) starts like one too.
    cut = len(data) < max(map(len, SIGNATURES)) and any(sign.startswith(data) for sign in SIGNATURES)
    damaged = "truncated" if data.startswith(SIGNATURES) or webp or cut else "not_an_image"
    try:
        image: Image.Image = Image.open(io.BytesIO(data), formats=PILLOW_FORMATS)
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError("too_large", pixel_limit_message(f"{width}x{height}", max_pixels))
        image.load()
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        return to_rgb(image)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", bomb_message(exc, max_pixels)) from exc
    except UnidentifiedImageError as exc:
        if unknown := unsupported_tiff_compression(data):
            raise ImageError("unsupported", unknown) from exc
        message = "the header is damaged or the file ends early" if damaged == "truncated" else ""
        raise ImageError(
            damaged, message or "not a recognised image format (JPEG, PNG, GIF, TIFF, BMP, WebP or DICOM)"
        ) from exc
    except MemoryError as exc:
        raise ImageError("too_large", "not enough memory to decode it; lower --max-pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as exc:
        message = str(exc) or type(exc).__name__
        damaged_data = any(
            sign in message
            for sign in ("runcated", "decoder object", "broken data stream", "broken PNG file")
        )
        # PNG and WebP have no variants Pillow lacks: a stream their decoders cannot parse (a PNG row
        # filter that does not exist, a WebP frame that does not decode) is damaged data, not a format
        # to convert. Found by flipping bytes in valid files (tests/test_bad_input.py).
        damaged_data |= (data.startswith(b"\x89PNG") and "unrecognized data stream" in message) or (
            webp and "failed to read next frame" in message
        )
        if "decoder object" in message:  # libwebp's words for data it cannot start decoding
            message = f"the image data is damaged or ends early ({message})"
        raise ImageError(
            "truncated" if isinstance(exc, EOFError) or damaged_data else "unsupported", message
        ) from exc


# TIFF compressions Pillow cannot decode that medical and slide-scanner exports use (TIFF tag 259).
TIFF_COMPRESSION_NAMES = {
    33003: "JPEG 2000 (Aperio YCbCr)",
    33004: "JPEG 2000 (Aperio)",
    33005: "JPEG 2000 (Aperio RGB)",
    34712: "JPEG 2000",
    34713: "Nikon NEF",
    34892: "lossy JPEG (DNG)",
    50000: "Zstandard",
    50001: "WebP",
}


def unsupported_tiff_compression(data: bytes) -> str | None:
    """The `unsupported` message for a TIFF whose first image uses a compression Pillow lacks; else None."""
    if not data.startswith((b"II*\x00", b"MM\x00*")):
        return None
    try:
        directory = TiffImagePlugin.ImageFileDirectory_v2(data[:8])
        stream = io.BytesIO(data)
        stream.seek(directory.next)
        directory.load(stream)
        compression = int(directory.get(259, 1))
    except Exception:  # noqa: BLE001 - a damaged directory: the caller says truncated
        return None
    if compression in TiffImagePlugin.COMPRESSION_INFO:
        return None
    name = TIFF_COMPRESSION_NAMES.get(compression, "unknown")
    return (
        f"TIFF compression {compression} ({name}) cannot be decoded here; convert the file to an "
        "uncompressed, LZW or JPEG TIFF, or to PNG"
    )


def pixel_limit_message(size: str, max_pixels: int) -> str:
    return (
        f"{size} pixels exceeds the limit of {max_pixels} (--max-pixels; to classify it, raise the limit "
        "and run once with --retry-errors too_large)"
    )


def bomb_message(error: Exception, max_pixels: int) -> str:
    """Pillow's decompression-bomb refusal in terms of --max-pixels (Pillow names its own limit)."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    return pixel_limit_message(found.group(1) if found else "the image's", max_pixels)


def oversized(head: bytes, max_pixels: int) -> str | None:
    """The too_large message if the image header at the start of a file already exceeds max_pixels.

    Used on the first bytes of large files, so that a decompression bomb padded to hundreds of MB is
    refused without being read whole. None when the header is fine or not readable from `head` alone
    (DICOM, a TIFF whose directory sits at the end): the whole file is then read and decoded as usual.
    """
    if max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(head), formats=PILLOW_FORMATS) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        return f"too_large: {bomb_message(exc, max_pixels)}"
    except Exception:  # noqa: BLE001 - any other header problem is for the full decode to categorise
        return None
    if width * height > max_pixels:
        return f"too_large: {pixel_limit_message(f'{width}x{height}', max_pixels)}"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as the reference's `.convert("RGB")`, except high-bit-depth images, scaled by value range."""
    if image.mode in HIGH_DEPTH_MODES:
        return Image.fromarray(scale_to_8bit(np.asarray(image)), "L").convert("RGB")
    return image.convert("RGB")


# High-bit-depth images are mapped to 8 bits a block of rows at a time, so that their float temporaries
# take a few MB whatever the image's size: converting a whole 16-bit mammogram at once held ~15 bytes
# per pixel (Pillow) and ~36 (DICOM) in float copies, in every decoding thread (bench/decode_memory.py).
BLOCK_PIXELS = 1 << 20


def row_blocks(values: np.ndarray) -> Iterator[slice]:
    """Slices of whole rows of `values`, about BLOCK_PIXELS pixels each."""
    per_row = max(1, int(np.prod(values.shape[1:])))
    step = max(1, BLOCK_PIXELS // per_row)
    for start in range(0, values.shape[0], step):
        yield slice(start, start + step)


def finite_float32(values: np.ndarray) -> np.ndarray:
    return np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def scale_to_8bit(
    values: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """Map the array's own [min, max] linearly onto [0, 255] (a constant image becomes black).

    `transform`, applied to each block of rows first, maps stored values to the values to scale (DICOM's
    lookup tables), so that the whole transformed image never exists at once."""

    def cleaned(rows: slice) -> np.ndarray:
        block = values[rows]
        return finite_float32(transform(block) if transform is not None else block)

    grey = np.zeros(values.shape, np.uint8)
    if values.size == 0:
        return grey
    low, high = np.inf, -np.inf
    for rows in row_blocks(values):
        block = cleaned(rows)
        low, high = min(low, float(block.min())), max(high, float(block.max()))
    if high <= low:
        return grey
    scale = np.float32(255.0 / (high - low))
    for rows in row_blocks(values):
        block = cleaned(rows)
        block -= np.float32(low)
        block *= scale
        grey[rows] = np.round(block, out=block)
    return grey


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

    def resize(self, image: Image.Image) -> Image.Image:
        """The resize step alone (the reference's PIL resize; a no-op at the target size)."""
        if self.do_resize and image.size != (self.width, self.height):
            image = image.resize((self.width, self.height), resample=self.resample)
        return image

    def __call__(self, image: Image.Image) -> np.ndarray:
        """An RGB image → float32 array (3, height, width), ready for the model."""
        return self.normalize(np.asarray(self.resize(image)))

    def normalize(self, resized: np.ndarray) -> np.ndarray:
        """Resized RGB pixels (height, width, 3) → float32 array (3, height, width), ready for the model."""
        pixels: np.ndarray = np.asarray(resized, dtype=np.float32)
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


TORCH_MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}
JPEG_MAGIC = b"\xff\xd8\xff"
RESIZE_CHUNK_PIXELS = 64 * 1024 * 1024  # source pixels resized at once on the device (~768 MB as float)
PIN_LIMIT_BYTES = 32 << 20  # host pixels copied to a GPU through pinned memory at most this much at once
# How an ok row's pixels were made (the `decoder` column): PIL decode + PIL resize (the reference's pixels),
# PIL decode + resize on the model's device, nvjpeg decode on the GPU + resize there.
DECODERS = ("pil", "pil+device_resize", "nvjpeg+device_resize")
PIL, PIL_DEVICE_RESIZE, NVJPEG_DEVICE_RESIZE = DECODERS


MAX_POOL_RENEWALS = 3  # per engine run: a pool whose workers keep dying is given up, not restarted forever
SPLIT_STEP = 1 / 32  # share of a batch's JPEGs moved between host and nvjpeg after each batch
SPLIT_SLACK_SECONDS = 0.0005  # waits shorter than this count as no wait,
SPLIT_SLACK_SHARE = 0.05  # and so do waits under 5% of the batch's preparation time


# One chunk of a batch's host share: its indices, the future of its decoding (None: refused), the pool.
HostChunk = tuple[list[int], "Future[list[Decoded | str]] | None", "Executor | None"]


class DecodeSplit:
    """How many of a batch's JPEGs spare CPU cores decode (PIL decode + resize, exactly the reference's
    pixels) while nvjpeg decodes the rest on the GPU.

    Built on the premise that nvjpeg and the model share the GPU's time, so each JPEG the idle cores
    decode gives GPU time back to the model. Measured on the H100 with the host share in threads
    (bench/README.md) every host share was slower than none: the PIL threads took the GIL from the
    feeder and from the model thread's kernel launches (`model_forward` went from 2.1 s to 8.7 s with a
    quarter of the JPEGs on the host). The host share now runs in worker processes by default
    (tasks.inference.split_pool), which share no GIL with the engine; unmeasured on a GPU so far, so the
    engine's default stays share 0 (no split), and this is for `ONCOFLOW_HOST_DECODE_SHARE=auto` or a
    number. With `share=None` the share adapts after every batch, starting where the previous shard on
    this device left it: up by SPLIT_STEP while the host workers finish their part before nvjpeg
    finishes its own, or while the feeder is ahead of the model anyway (the model is the limit, so GPU
    time is what to save); down when the host part held the feeder back while the model waited, or when
    the reader threads fell behind (the cores are busy).
    A fixed `share` (0: nvjpeg decodes every JPEG; 1: the host decodes them all) is for benchmarks/tests.

    Each batch's host share goes to the pool in `workers` chunks (one task per worker, not per image, so
    a process pool moves a few large messages per batch). A worker process that dies (killed for memory,
    or a decoder crash) loses no image: the chunks of its pool go to nvjpeg in the same batch (and, for
    files nvjpeg rejects, to PIL in this process, as `--decode cpu` decodes every file), and `renew`
    (given the broken pool) supplies a new pool for the next batches (or None: it could not), at most
    MAX_POOL_RENEWALS times; without `renew`, or after that, the split stops.
    """

    def __init__(
        self,
        pool: Executor | None,
        share: float | None = None,
        start: float = 0.0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        workers: int = 1,
        renew: Callable[[Executor], Executor | None] | None = None,
    ) -> None:
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"host decode share must be between 0 and 1, got {share}")
        self.adaptive = share is None
        self.share = min(1.0, max(0.0, start)) if share is None else share
        self.max_pixels = max_pixels
        self.pool = pool  # shared by the engines running at once in this process (tasks.inference)
        self.workers = max(1, workers)
        self.renew = renew
        self.host_wait = 0.0  # seconds the last batch waited for its host part after nvjpeg was done
        self.on_host = self.on_device = 0  # JPEGs decoded so far by each side
        self.lost_workers = 0  # pools that broke during this run (each handed its chunks to nvjpeg)

    def count(self, jpegs: int) -> int:
        """How many of `jpegs` JPEGs in this batch the host decodes."""
        return 0 if self.pool is None else min(jpegs, round(self.share * jpegs))

    def submit(
        self, preprocessor: Preprocessor, items: list[np.ndarray], indices: list[int]
    ) -> list[HostChunk]:
        """Start decoding `indices` on the host, in up to `workers` chunks; a chunk the pool refused
        (it broke) comes back without a future and goes to nvjpeg."""
        size = max(1, -(-len(indices) // self.workers))
        submitted: list[HostChunk] = []
        for start in range(0, len(indices), size):
            chunk, pool, future = indices[start : start + size], self.pool, None
            if pool is not None:
                try:
                    future = pool.submit(
                        host_resize_chunk, preprocessor, [items[i] for i in chunk], self.max_pixels
                    )
                except (BrokenExecutor, RuntimeError):  # broken, or shut down at interpreter exit
                    self._broken(pool)
            submitted.append((chunk, future, pool))
        return submitted

    def collect(
        self, submitted: list[HostChunk], failures: dict[int, str], decoders: dict[int, str]
    ) -> tuple[dict[int, np.ndarray], list[int]]:
        """Wait for the host part: ({index: uint8 pixels at the model's size}, [indices nvjpeg must
        decode instead, because their worker died]); error texts go into `failures`."""
        clock = time.perf_counter()
        pixels: dict[int, np.ndarray] = {}
        lost: list[int] = []
        for chunk, future, pool in submitted:
            try:
                results = future.result() if future is not None else None
            except BrokenExecutor:
                self._broken(pool)
                results = None
            except Exception as exc:  # the worker could not run the call (a bug, not an image)
                logger.warning("host decode of %d images failed, nvjpeg decodes them: %s", len(chunk), exc)
                results = None
            if results is None:
                lost.extend(chunk)
                continue
            for i, result in zip(chunk, results, strict=True):
                if isinstance(result, str):
                    failures[i] = result
                else:
                    pixels[i] = result[0]
                    decoders[i] = PIL
        self.host_wait = time.perf_counter() - clock
        self.on_host -= len(lost)
        self.on_device += len(lost)
        return pixels, lost

    def _broken(self, pool: Executor | None) -> None:
        """`pool` lost a worker: if it is still this split's pool, take a new one (at most
        MAX_POOL_RENEWALS times per run; then the split stops and nvjpeg decodes everything)."""
        if pool is None or pool is not self.pool:
            return  # already replaced (all chunks of a broken pool fail; one renewal is enough)
        self.lost_workers += 1
        if self.renew is None or self.lost_workers > MAX_POOL_RENEWALS:
            logger.warning(
                "host decode workers keep failing (%d pools lost): nvjpeg decodes every JPEG",
                self.lost_workers,
            )
            self.pool = None
        else:
            logger.warning("a host decode worker process ended abruptly; starting new ones")
            self.pool = self.renew(pool)  # None when no new workers can start: nvjpeg decodes all

    def adjust(self, readers_behind: bool, feeder_ahead: bool, slack: float = SPLIT_SLACK_SECONDS) -> None:
        """Move the share after a batch (adaptive mode only); host waits up to `slack` seconds are none."""
        if not self.adaptive:
            return
        host_held_back = self.host_wait > slack and not feeder_ahead
        step = -SPLIT_STEP if readers_behind or host_held_back else SPLIT_STEP
        self.share = min(1.0, max(0.0, self.share + step))


# One image decoded on the host: uint8 RGB pixels (H, W, 3) at the model's size, the source's width, height.
Decoded = tuple[np.ndarray, int, int]


def host_resize_chunk(
    preprocessor: Preprocessor,
    items: list[np.ndarray],
    max_pixels: int,
    names: list[str] | None = None,
    exif_orientation: bool = False,
) -> list[Decoded | str]:
    """Host decoding of one chunk of files (bytes as uint8 arrays): PIL decode + PIL resize, the
    reference's pixels, or the error text of the image's row. `names` (file names) mark DICOM files by
    extension and name the file in messages, as in decode_image.

    Used for a DecodeSplit's share of a batch's JPEGs and, beside a GPU, for `--decode cpu`
    (tasks.inference). Module-level and free of torch, so a worker process (tasks.workers) runs it
    after importing only this module."""
    out: list[Decoded | str] = []
    for n, data in enumerate(items):
        try:
            image = decode_image(
                data.tobytes(), max_pixels, name=names[n] if names else "", exif_orientation=exif_orientation
            )
            out.append((np.asarray(preprocessor.resize(image)), image.width, image.height))
        except Exception as exc:
            out.append(decode_error(exc))
    return out


def decode_error(exc: Exception) -> str:
    """The `error` text of an image whose decoding raised `exc`: ImageError's own category, anything else
    (a decoder bug on one hostile file, which must not fail its batch) as `unsupported`."""
    if isinstance(exc, ImageError):
        return str(exc)
    return f"unsupported: {type(exc).__name__}: {exc}"


class DevicePreprocessor:
    """Resize and normalize on the model's device, in batches; optionally decode JPEGs there too (nvjpeg).

    Host workers then only decode (or, for JPEGs with `nvjpeg`, only read the header), which is what
    lets one GPU be fed faster than the CPU cores could resize. Resizing uses torch's antialiased
    bilinear/bicubic, rounded to 8 bits like PIL, so it agrees closely but not bit-exactly with the
    reference (bilinear: within 2 of 255 levels; bicubic: torch's kernel a=-0.75 differs from PIL's a=-0.5,
    up to ~16 levels on sharp edges). bench/throughput.py reports the agreement; `--decode cpu` stays exact.
    """

    def __init__(self, preprocessor: Preprocessor, nvjpeg: bool = False) -> None:
        if preprocessor.resample not in TORCH_MODES:
            raise ValueError(f"resample={preprocessor.resample} has no device equivalent; use --decode cpu")
        self.host = preprocessor
        self.nvjpeg = nvjpeg
        self._constants: dict[str, tuple[Any, Any]] = {}

    def encode_or_decode(
        self, data: bytes, max_pixels: int, *, name: str = "", exif_orientation: bool = False
    ) -> tuple[np.ndarray, int, int]:
        """Host side: raw JPEG bytes (header checked) for nvjpeg, else decoded uint8 RGB pixels (H, W, 3).

        The JPEG bytes come back in a writable buffer, copied here in a reader thread, so that the feeder
        thread (the GPU engine's bottleneck) hands them to nvjpeg without copying 256 files per batch.
        (Reading local files straight into a bytearray instead measured slower: bench/README.md.)"""
        if self.nvjpeg and data[:3] == JPEG_MAGIC and not exif_orientation:
            frame = jpeg_frame(data)
            if frame is not None:
                if frame.width * frame.height > max_pixels:
                    raise ImageError(
                        "too_large", pixel_limit_message(f"{frame.width}x{frame.height}", max_pixels)
                    )
                if frame.for_nvjpeg:
                    return np.frombuffer(bytearray(data), np.uint8), frame.width, frame.height
            # No readable frame header, or a frame nvjpeg does not take: the exact host path decodes it
            # (or gives the file its error category).
        image = decode_image(data, max_pixels, name=name, exif_orientation=exif_orientation)
        return np.array(image), image.width, image.height

    def batch(
        self, items: list[np.ndarray], device: Any, dtype: Any, split: DecodeSplit | None = None
    ) -> tuple[Any, dict[int, str], list[str]]:
        """The items that decoded as one device tensor (n_ok, 3, H, W) in item order, {item index: error}
        for those that did not, and for each of the n_ok which DECODERS entry produced its pixels.

        Items are JPEG bytes (1-D, for nvjpeg) or decoded uint8 pixels (H, W, 3). With a `split`, its
        share of the JPEGs is decoded and resized by its host threads while nvjpeg decodes the rest and
        the device resizes those.
        """
        import torch

        failures: dict[int, str] = {}
        decoders: dict[int, str] = {}
        encoded = [i for i, item in enumerate(items) if item.ndim == 1]
        on_host: list[HostChunk] = []
        if split is not None and split.pool is not None and encoded:
            keep = len(encoded) - split.count(len(encoded))
            on_host = split.submit(self.host, items, encoded[keep:])
            split.on_host, split.on_device = split.on_host + len(encoded) - keep, split.on_device + keep
            encoded = encoded[:keep]
        decoded = self._decode_jpegs(items, encoded, device, failures, decoders) if encoded else {}
        pixels = {i: item for i, item in enumerate(items) if item.ndim == 3}
        decoders.update(dict.fromkeys(pixels, PIL_DEVICE_RESIZE))
        decoded.update(self._upload(pixels, device))
        # Every image that may still arrive gets a slot; nvjpeg's are resized while the host works.
        slots = sorted([*decoded, *(i for chunk, _, _ in on_host for i in chunk)])
        out = torch.empty(len(slots), 3, self.host.height, self.host.width, device=device)
        position = {i: n for n, i in enumerate(slots)}
        self._resize_into(out, position, decoded, device)
        if split is not None:
            host, lost = split.collect(on_host, failures, decoders)
            arrived = self._upload(host, device)
            if lost:  # their worker process died: nvjpeg decodes them after all
                arrived.update(self._decode_jpegs(items, lost, device, failures, decoders))
            self._resize_into(out, position, arrived, device)
            if any(i in failures for i in slots):  # drop the slots of host decodes that failed
                slots = [i for i in slots if i not in failures]
                out = out[torch.tensor([position[i] for i in slots], dtype=torch.long, device=device)]
        if self.host.do_rescale:
            out = out * self.host.rescale_factor
        if self.host.do_normalize:
            mean, std = self._normalization(device)
            out = (out - mean) / std
        return out.to(dtype), failures, [decoders[i] for i in slots]

    @staticmethod
    def _upload(pixels: dict[int, np.ndarray], device: Any) -> dict[int, Any]:
        """Host pixels (H, W, 3) onto the device as (3, H, W) views: one copy per run of same-sized
        images (at most RESIZE_CHUNK_PIXELS pixels each, so large scans are not stacked all at once).
        On a GPU runs up to PIN_LIMIT_BYTES go through pinned memory (asynchronous); larger ones are
        copied from pageable memory, so big scans never grow the never-released pinned-memory cache."""
        import torch

        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, item in pixels.items():
            by_shape.setdefault(item.shape, []).append(i)
        uploaded: dict[int, Any] = {}
        for shape, indices in by_shape.items():
            step = max(1, RESIZE_CHUNK_PIXELS // max(1, shape[0] * shape[1]))
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                stacked = torch.from_numpy(np.stack([pixels[i] for i in chunk]))
                pin = on_cuda(device) and stacked.nbytes <= PIN_LIMIT_BYTES
                if pin:
                    stacked = stacked.pin_memory()
                on_device = stacked.to(device, non_blocking=pin).permute(0, 3, 1, 2)
                uploaded.update(zip(chunk, on_device, strict=True))
        return uploaded

    def _resize_into(self, out: Any, position: dict[int, int], decoded: dict[int, Any], device: Any) -> None:
        """Resize decoded images (3, h, w) to the model's size into their rows of `out`."""
        import torch
        import torch.nn.functional as functional

        # Same-sized images are resized together (one kernel per chunk instead of one per image), in
        # chunks of at most RESIZE_CHUNK_PIXELS source pixels so a batch of large scans stays bounded.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in sorted(decoded):
            groups.setdefault(tuple(decoded[i].shape), []).append(i)
        for shape, indices in groups.items():
            step = max(1, RESIZE_CHUNK_PIXELS // max(1, shape[1] * shape[2]))
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                pixels = torch.stack([decoded[i] for i in chunk]).float()
                if self.host.do_resize and tuple(pixels.shape[-2:]) != (self.host.height, self.host.width):
                    pixels = functional.interpolate(
                        pixels,
                        size=(self.host.height, self.host.width),
                        mode=TORCH_MODES[Image.Resampling(self.host.resample)],
                        antialias=True,
                        align_corners=False,
                    )
                    pixels = pixels.round_().clamp_(0, 255)
                rows = [position[i] for i in chunk]
                if rows[-1] - rows[0] == len(rows) - 1:  # contiguous: a plain slice, no index upload
                    out[rows[0] : rows[-1] + 1] = pixels
                else:
                    out[torch.tensor(rows, device=device)] = pixels

    def _normalization(self, device: Any) -> tuple[Any, Any]:
        """mean and std as (1, 3, 1, 1) tensors on `device`, uploaded once (an upload is a host sync)."""
        import torch

        key = str(device)
        if key not in self._constants:
            self._constants[key] = (
                torch.tensor(self.host.mean, device=device).view(1, 3, 1, 1),
                torch.tensor(self.host.std, device=device).view(1, 3, 1, 1),
            )
        return self._constants[key]

    def _decode_jpegs(
        self,
        items: list[np.ndarray],
        indices: list[int],
        device: Any,
        failures: dict[int, str],
        decoders: dict[int, str],
    ) -> dict[int, Any]:
        """nvjpeg in one batched call; if it rejects the batch, nvjpeg per image, and only the files it
        still rejects are decoded on the host (exact fallback), so one bad file costs one host decode."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        tensors = [
            torch.from_numpy(items[i] if items[i].flags.writeable else items[i].copy()) for i in indices
        ]
        with self._on_decode_stream(device) as decoded:
            try:
                images = decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
                decoders.update(dict.fromkeys(indices, NVJPEG_DEVICE_RESIZE))
                decoded.update(zip(indices, images, strict=True))
                return decoded
            except RuntimeError:
                if on_cuda(device):
                    # A batch that failed part-way may leave nvjpeg writing to outputs torchvision
                    # already freed: let it finish before the retries allocate from the same memory.
                    torch.cuda.synchronize(device)
            for i, tensor in zip(indices, tensors, strict=True):
                try:
                    decoded[i] = decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device)
                    decoders[i] = NVJPEG_DEVICE_RESIZE
                    continue
                except RuntimeError:
                    if on_cuda(device):
                        torch.cuda.synchronize(device)  # as above, for this one image's output
                try:
                    image = decode_image(items[i].tobytes())
                    decoded[i] = torch.from_numpy(np.asarray(image).copy()).to(device).permute(2, 0, 1)
                    decoders[i] = PIL_DEVICE_RESIZE
                except Exception as exc:
                    failures[i] = decode_error(exc)
        return decoded

    @contextmanager
    def _on_decode_stream(self, device: Any) -> Iterator[dict[int, Any]]:
        """Run the block on this device's nvjpeg stream; the images it puts in the yielded dict are
        then ready for, and guarded on, the caller's stream.

        nvjpeg allocates its outputs on the current stream but writes them from its internal stream,
        waiting for nothing queued on ours. Had it allocated on the feeder's stream, memory that the
        stream's still-running resize kernels had freed could be handed to nvjpeg and overwritten (why the
        feeder used to wait for every batch's kernels before the next decode). The decode stream's pool
        only ever holds decoded images, each marked as used by the caller's stream (`record_stream`), so
        the allocator hands it out again only after the resize that read it ran: the feeder can decode
        batch k+1 while batch k is resized and batch k-1 runs in the model.
        """
        import torch

        decoded: dict[int, Any] = {}
        if not on_cuda(device):
            yield decoded
            return
        caller = torch.cuda.current_stream(device)
        with _decode_streams_lock:
            if str(device) not in _decode_streams:
                _decode_streams[str(device)] = torch.cuda.Stream(device)
            decode_stream = _decode_streams[str(device)]
        with torch.cuda.stream(decode_stream):
            decode_stream.synchronize()  # idle but for waits: cheap, and safe should that change
            yield decoded
        caller.wait_stream(decode_stream)
        for image in decoded.values():
            image.record_stream(caller)


def on_cuda(device: Any) -> bool:
    """Whether `device` (a torch.device, or its name) is the CUDA device type."""
    return getattr(device, "type", str(device)) == "cuda"


# One nvjpeg stream per device for the whole process (see DevicePreprocessor._on_decode_stream), so
# the memory its pool caches is reused by every shard instead of one pool per shard.
_decode_streams: dict[str, Any] = {}
_decode_streams_lock = threading.Lock()

SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame (not DHT, JPG, DAC)
STANDALONE_MARKERS = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: no length field


class JpegFrame(NamedTuple):
    width: int
    height: int
    components: int
    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, 0xC3 lossless, 0xC9.. arithmetic, ...
    precision: int  # bits per sample

    @property
    def for_nvjpeg(self) -> bool:
        """8-bit Huffman-coded grey or colour frames: what nvjpeg decodes. Anything else (12-bit,
        lossless, arithmetic, CMYK) goes to the host decoder, so one such file cannot make nvjpeg
        reject a whole batch."""
        return self.marker in (0xC0, 0xC1, 0xC2) and self.precision == 8 and self.components in (1, 3)


FRAME_SCAN_LIMIT = 1 << 20  # a frame header further in than this (huge APPn blocks) is left to the host


def jpeg_frame(data: bytes) -> JpegFrame | None:
    """The start-of-frame header of a JPEG, or None if there is none within FRAME_SCAN_LIMIT bytes before
    the scan (damaged, DNL-sized). Reads only the marker segments: a few microseconds, where Pillow's full
    header parse costs ~40 µs of Python per file, which capped nvjpeg feeding at a few thousand files/s."""
    position, end = 2, min(len(data), FRAME_SCAN_LIMIT)
    while position + 4 <= end:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in STANDALONE_MARKERS:
            position += 2
            continue
        length = (data[position + 2] << 8) | data[position + 3]
        if marker in SOF_MARKERS:
            if length < 8 or position + 10 > end:
                return None
            height = (data[position + 5] << 8) | data[position + 6]
            width = (data[position + 7] << 8) | data[position + 8]
            frame = JpegFrame(width, height, data[position + 9], marker, data[position + 4])
            return frame if width and height else None
        if marker == 0xDA or length < 2:  # start of scan before any frame, or a broken length
            return None
        position += 2 + length
    return None


def nvjpeg_available(device: Any) -> bool:
    """True when torchvision can decode JPEGs on this (CUDA) device."""
    if not on_cuda(device):
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True
