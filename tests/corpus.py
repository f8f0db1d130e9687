"""Builders for odd, broken and hostile files: the corpus of the bad-input tests (issue 7)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_NAME = "SENTINEL^PATIENT"  # must never appear in rows or logs
PATIENT_ID = "SENTINEL-ID-4711"


def random_rgb(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims a huge RGB image (a decompression bomb's first step)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 1000))
        + png_chunk(b"IEND", b"")
    )


def tiff_with_unknown_compression(code: int = 50_000) -> bytes:
    """A well-formed TIFF whose compression tag names a codec Pillow cannot decode (34712: JPEG 2000)."""
    data = encode(random_rgb((16, 8), 3), "TIFF")
    entry = b"\x03\x01\x03\x00\x01\x00\x00\x00\x01\x00"  # tag 259 (Compression), SHORT, 1 value: none
    at = data.index(entry)
    return data[: at + 8] + struct.pack("<H", code) + data[at + 10 :]


def exif_rotated_jpeg(size: tuple[int, int] = (64, 32), orientation: int = 6) -> bytes:
    """A JPEG whose EXIF tag says "rotate 90° clockwise to display" (orientation 6)."""
    image = random_rgb(size, 11)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def multipage_tiff() -> bytes:
    """Two pages of different sizes; the first page is the one classified."""
    first, second = random_rgb((40, 30), 21), random_rgb((90, 20), 22)
    return encode(first, "TIFF", save_all=True, append_images=[second])


def animated_gif() -> bytes:
    frames = [random_rgb((32, 32), 30 + n).convert("P") for n in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def sixteen_bit_png(low: int = 1000, high: int = 4000) -> tuple[bytes, np.ndarray]:
    """A 16-bit grayscale PNG with values in [low, high] (a 12-bit scan, say), and its pixels."""
    pixels = np.linspace(low, high, 48 * 64).reshape(48, 64).astype(np.uint16)
    return encode(Image.fromarray(pixels), "PNG"), pixels


def make_dicom(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    window: tuple[float, float] | None = None,
    rescale: tuple[float, float] | None = None,
    bits_stored: int = 16,
) -> bytes:
    """An uncompressed little-endian DICOM file (with preamble) holding 16-bit frames and a patient."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.preamble = b"\0" * 128
    dataset.SOPClassUID = meta.MediaStorageSOPClassUID
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientName = PATIENT_NAME
    dataset.PatientID = PATIENT_ID
    dataset.PatientBirthDate = "19700101"
    dataset.Modality = "OT"
    frames = pixels if pixels.ndim == 3 else pixels[np.newaxis]
    if len(frames) > 1:
        dataset.NumberOfFrames = len(frames)
    dataset.Rows, dataset.Columns = frames.shape[1:]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = 16
    dataset.BitsStored = bits_stored
    dataset.HighBit = bits_stored - 1
    dataset.PixelRepresentation = 0
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    if rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = rescale
    dataset.PixelData = frames.astype("<u2").tobytes()
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def dicom_ramp() -> np.ndarray:
    """A 12-bit ramp (0..4095) across a 32×64 frame."""
    return np.tile(np.linspace(0, 4095, 64).round().astype(np.uint16), (32, 1))


DICOM_UID_NAME = "1.2.840.113619.2.55.3.604688119.971.1"  # a SOP instance UID as a file name


def dicom_report(data: bytes) -> bytes:
    """The DICOM file `data` relabelled a structured report (an SOP class without images)."""
    import pydicom

    report = pydicom.dcmread(io.BytesIO(data))
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# name → (bytes, expected error category or None for a decodable image)
def bad_files() -> dict[str, tuple[bytes, str | None]]:
    jpeg = encode(random_rgb((64, 48), 1), "JPEG")
    png = encode(random_rgb((64, 48), 2), "PNG")
    dicom = make_dicom(dicom_ramp(), window=(2048, 1024))
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "header-only.png": (png[:40], "truncated"),
        "soi-only.jpg": (jpeg[:2], "truncated"),  # cut within the JPEG signature (FF D8)
        "cut-webp.webp": (encode(random_rgb((64, 48), 3), "WEBP")[:40], "truncated"),
        "truncated.dcm": (dicom[: len(dicom) - 1000], "truncated"),
        "notes.png": (b"meeting notes, not a scan\n" * 20, "not_an_image"),
        "error-page.jpg": (b"<html><body>403 Forbidden</body></html>", "not_an_image"),
        "junk.dcm": (b"\x00\x01 definitely not DICOM " * 10, "not_an_image"),
        "odd-codec.tif": (tiff_with_unknown_compression(), "unsupported"),
        "jpeg2000.tif": (tiff_with_unknown_compression(34712), "unsupported"),
        "broken-stream.png": (png[:60] + bytes(10) + png[70:], "truncated"),
        "bomb.png": (png_bomb(), "too_large"),
        "fine.jpg": (jpeg, None),
        "fine.dcm": (dicom, None),
    }


def write_files(root: Path, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
