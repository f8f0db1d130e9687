"""Decode DICOM files into the 8-bit RGB images the model expects, as a viewer would display them.

First frame only; modality LUT (rescale slope/intercept), then the VOI window (the first
WindowCenter/WindowWidth, or the VOI LUT sequence), else the frame's own value range; MONOCHROME1 is
inverted so that bright always means dense; grey is replicated to RGB. PALETTE COLOR frames go through
their colour lookup tables.

Privacy: nothing read from the header goes into a message. DICOM headers carry patient names, ids and
dates; every error text here is written by us, so no identifier can reach a row or a log.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from tasks.images import ImageError, pixel_limit_message, row_blocks, scale_to_8bit

DICOM_EXTRA = "`pip install 'oncoflow[dicom]'`"

# pydicom logs an ERROR per undecodable file, naming no file: the file's error row says it, with its name.
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

# The error of a DICOM object that holds no image (a structured report, a presentation state, a key
# object selection: PACS exports mix them in with the images). Its row is kept (so the file is not read
# again each night) but it is no failed image: `--max-error-rate` leaves it out (flows/classify.py).
NON_IMAGE_OBJECT = "a DICOM object without pixel data (a report or similar)"
NON_IMAGE_ERROR = f"not_an_image: {NON_IMAGE_OBJECT}"


def decode_dicom(data: bytes, max_pixels: int) -> Image.Image:
    """DICOM bytes → RGB PIL image, or ImageError with a category."""
    import pydicom
    from pydicom.pixels import pixel_array

    preamble = data[128:132] == b"DICM"
    try:
        dataset = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # a damaged header can fail in many ways; none may quote a value
        raise ImageError(
            "truncated" if preamble else "not_an_image",
            f"the DICOM header cannot be read ({type(exc).__name__})",
        ) from exc
    if "PixelData" not in dataset:
        if not preamble:
            raise ImageError("not_an_image", "neither a DICOM image nor a recognised image format")
        if _is_image_object(dataset):
            raise ImageError("truncated", "the DICOM image ends before its pixel data")
        raise ImageError("not_an_image", NON_IMAGE_OBJECT)
    try:
        rows, columns = int(dataset.Rows), int(dataset.Columns)
    except Exception as exc:
        raise ImageError("unsupported", "DICOM pixel data without valid Rows/Columns") from exc
    if rows * columns > max_pixels:
        raise ImageError("too_large", pixel_limit_message(f"{columns}x{rows}", max_pixels))
    if rows <= 0 or columns <= 0 or not dataset.PixelData:
        raise ImageError("not_an_image", f"a DICOM object with an empty image ({columns}x{rows} pixels)")
    syntax = _transfer_syntax(dataset)
    try:
        frame = pixel_array(dataset, index=0)
    except Exception as exc:
        name = syntax.name if syntax is not None else "unknown"
        if syntax is not None and not syntax.is_compressed:
            if len(dataset.PixelData) < _frame_bytes(dataset):
                raise ImageError("truncated", "the DICOM pixel data ends early") from exc
        elif syntax is not None:
            decoder = _decoder(syntax)
            if decoder is None or not decoder.is_available:
                needs = "; ".join(decoder.missing_dependencies) if decoder is not None else "none known"
                raise ImageError(
                    "unsupported",
                    f"no decoder for DICOM transfer syntax {name} is installed here (options: {needs}); "
                    f"{DICOM_EXTRA} installs them (then classify with --retry-errors unsupported)",
                ) from exc
            installed = ", ".join(sorted(decoder.available_plugins))
            # The installed plugin may lack the variant (Pillow: no 12-bit or lossless JPEG); GDCM
            # decodes every variant of the syntaxes it knows, so with it a failure is damaged data.
            if decoder.missing_dependencies and "gdcm" not in decoder.available_plugins:
                raise ImageError(
                    "unsupported",
                    f"the installed decoder ({installed}) could not decode this DICOM {name} frame "
                    f"({type(exc).__name__}): a variant it lacks, or damaged data; other decoders: "
                    f"{'; '.join(decoder.missing_dependencies)} ({DICOM_EXTRA} installs GDCM, which "
                    "decodes every variant)",
                ) from exc
            raise ImageError(  # every decoder pydicom knows for it is installed, and it failed
                "truncated",
                f"the DICOM pixel data ({name}) is damaged: its decoders ({installed}) failed "
                f"({type(exc).__name__})",
            ) from exc
        raise ImageError(
            "unsupported",
            f"DICOM pixel data cannot be decoded (transfer syntax {name}, {type(exc).__name__})",
        ) from exc
    del dataset.PixelData  # decoded: its bytes (as many as the frame's) are not needed any more
    try:
        return _displayed(frame, dataset)
    except Exception as exc:  # a malformed header value (a window, a slope): its text may be an identifier
        raise ImageError(
            "unsupported", f"DICOM pixel values cannot be displayed ({type(exc).__name__})"
        ) from exc


def _transfer_syntax(dataset: Dataset) -> UID | None:
    """The dataset's transfer syntax; for a file without file meta (no preamble, as some archives
    store them), the one its encoding was read with, set so that pydicom can decode the pixels."""
    meta = getattr(dataset, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None:
        return UID(syntax)
    encoding = getattr(dataset, "original_encoding", None)
    inferred = {
        (True, True): ImplicitVRLittleEndian,
        (False, True): ExplicitVRLittleEndian,
        (False, False): ExplicitVRBigEndian,
    }.get(tuple(encoding) if encoding else None)  # type: ignore[arg-type]
    if inferred is None:
        return None
    if meta is None:
        dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = inferred
    return inferred


def _decoder(syntax: UID) -> Any:
    """pydicom's decoder for `syntax`, or None when pydicom has none at all."""
    from pydicom.pixels import get_decoder

    try:
        return get_decoder(syntax)
    except NotImplementedError:
        return None


def _displayed(frame: np.ndarray, dataset: Dataset) -> Image.Image:
    """A decoded first frame as the RGB image a viewer shows."""
    from pydicom.pixels import apply_color_lut

    if frame.ndim == 3:  # colour (RGB, or YBR already converted to RGB by pydicom)
        return Image.fromarray(_colour_to_8bit(frame), "RGB")
    if getattr(dataset, "PhotometricInterpretation", "") == "PALETTE COLOR":
        colours = apply_color_lut(frame, dataset)  # 8- or 16-bit entries: 16-bit ones keep their top byte
        colours = colours if colours.dtype == np.uint8 else (colours >> 8).astype(np.uint8)
        return Image.fromarray(np.ascontiguousarray(colours), "RGB")
    return Image.fromarray(display_values(frame, dataset), "L").convert("RGB")


def display_values(frame: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Stored values → modality values → 8-bit display grey: VOI window or LUT, else value range;
    MONOCHROME1 inverted. A block of rows at a time (tasks.images.row_blocks): the float64 modality
    and window values of a whole mammogram took ~36 bytes per pixel."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    def modality(block: np.ndarray) -> np.ndarray:
        return apply_modality_lut(block, dataset).astype(np.float64)

    inverted = getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1"
    center, width = (
        _first(getattr(dataset, "WindowCenter", None)),
        _first(getattr(dataset, "WindowWidth", None)),
    )
    if center is not None and width is not None and width > 0:
        function = str(getattr(dataset, "VOILUTFunction", "LINEAR") or "LINEAR").upper()
        grey = np.empty(frame.shape, np.uint8)
        for rows in row_blocks(frame):
            shown = window(modality(frame[rows]), center, width, function)
            grey[rows] = np.round((1.0 - shown if inverted else shown) * 255)
        return grey
    if "VOILUTSequence" in dataset:
        grey = scale_to_8bit(frame, lambda block: apply_voi_lut(modality(block), dataset, prefer_lut=True))
    else:
        grey = scale_to_8bit(frame, modality)
    return np.subtract(255, grey, out=grey) if inverted else grey


def window(values: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """The DICOM VOI window (PS3.3 C.11.2.1.2) mapped onto [0, 1]."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width <= 1:  # LINEAR with width 1 is a threshold at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _is_image_object(dataset: Dataset) -> bool:
    """Whether the SOP class (from the dataset or its file meta) stores images; unknown counts as yes."""
    meta = getattr(dataset, "file_meta", None)
    sop = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    return sop is None or "Rows" in dataset or "Image" in str(getattr(sop, "name", ""))


def _first(value: object) -> float | None:
    """The first of a possibly multi-valued number (several windows may be stored; the first is default)."""
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        return float(value[0]) if len(value) else None  # type: ignore[index, arg-type]
    return float(value)  # type: ignore[arg-type]


def _colour_to_8bit(frame: np.ndarray) -> np.ndarray:
    if frame.dtype == np.uint8:
        return np.ascontiguousarray(frame)
    return scale_to_8bit(frame)


def _frame_bytes(dataset: Dataset) -> int:
    """Bytes one uncompressed frame needs."""
    bits = int(getattr(dataset, "BitsAllocated", 8))
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    return int(dataset.Rows) * int(dataset.Columns) * samples * max(1, bits // 8)
