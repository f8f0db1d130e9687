"""Broken and unusual files: every file becomes exactly one row, odd-but-valid images are classified as the
reference would, DICOM is windowed like a viewer, bombs are refused before allocation."""

from __future__ import annotations

import io
import os
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from tasks.defaults import DEFAULT_MAX_PIXELS, ERROR_CATEGORIES
from tasks.dicom import window
from tasks.images import ImageError, decode_image
from tasks.inference import MAX_FILE_BYTES, PROBE_BYTES, PROBE_FROM_BYTES, EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import list_images, open_location
from tests import corpus
from tests.test_parity import reference_predictions


def classify_folder(folder: Path, model_dir: str, **options: object) -> dict[str, dict]:
    """Engine-level run over a folder; rows keyed by file name."""
    location = open_location(str(folder))
    files = list(list_images(location))
    model = load_model(model_dir, device="cpu", precision="fp32")
    table = classify_files(files, location.fs, model, EngineOptions(batch_size=4, **options), "run", "shard")  # type: ignore[arg-type]
    assert table.num_rows == len(files)
    return {row["image_uri"].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


def category(row: dict) -> str | None:
    return row["error"].split(":", 1)[0] if row["error"] else None


@pytest.mark.parametrize("decode", ["cpu", "gpu"])  # "gpu" runs the device path on CPU tensors here
def test_every_bad_file_gets_its_category(tmp_path: Path, tiny_model: str, decode: str) -> None:
    files = corpus.bad_files()
    corpus.write_files(tmp_path / "scans", {name: data for name, (data, _) in files.items()})
    rows = classify_folder(tmp_path / "scans", tiny_model, decode=decode)

    assert sorted(rows) == sorted(files)
    for name, (_, expected) in files.items():
        row = rows[name]
        assert category(row) == expected, (name, row["error"])
        assert row["status"] == ("ok" if expected is None else "error")
        if expected is not None:
            assert expected in ERROR_CATEGORIES and row["label"] is None and row["prob_malignant"] is None
            assert len(row["error"]) > len(expected) + 5, "the message says more than the category"
    assert "100000x100000" in rows["bomb.png"]["error"] or "10000000000" in rows["bomb.png"]["error"]


def test_a_file_gone_during_the_run_gets_no_row_and_is_classified_once_back(
    tmp_path: Path, tiny_model: str
) -> None:
    """Moved away after listing and back later with its mtime (a move back, `cp -p`, rsync -a): a
    `missing` row would be final for that fingerprint, so the file gets no row and the run counts it."""
    from flows.classify import classify

    folder = tmp_path / "scans"
    corpus.write_files(
        folder, {f"{n}.png": corpus.encode(corpus.random_rgb((20, 20), n), "PNG") for n in range(3)}
    )
    location = open_location(str(folder))
    files = list(list_images(location))
    (folder / "1.png").rename(tmp_path / "away.png")  # moved between listing and reading
    model = load_model(tiny_model, device="cpu", precision="fp32")
    unrecorded: Counter[str] = Counter()
    rows = classify_files(files, location.fs, model, EngineOptions(batch_size=2), "r", "s", unrecorded)
    assert [r["image_uri"].rsplit("/", 1)[1] for r in rows.to_pylist()] == ["0.png", "2.png"]
    assert unrecorded == {"vanished": 1}

    def run() -> dict:
        return classify(str(folder), str(tmp_path / "out"), model=tiny_model, device="cpu", shard_size=1)

    assert run()["images_classified"] == 2
    (tmp_path / "away.png").rename(folder / "1.png")  # back, same mtime
    back = run()
    assert back["images_new"] == back["images_classified"] == 1 and back["images_vanished"] == 0


@pytest.mark.parametrize("fmt", ["EPS", "PPM", "ICO", "TGA", "PCX", "SGI"])
def test_formats_no_scanner_writes_are_not_images_whatever_their_name(
    fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow opens dozens of formats; only the listed ones are tried. An EPS file named .png would
    otherwise have Ghostscript render untrusted content (a `gs` on PATH records any call here)."""
    called = tmp_path / "gs-was-run"
    fake = tmp_path / "bin" / "gs"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ntouch {called}\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, fmt)
    with pytest.raises(ImageError) as raised:
        decode_image(buffer.getvalue(), name="scan0001.png")
    assert raised.value.category == "not_an_image" and not called.exists()


def test_bomb_is_refused_from_its_header() -> None:
    with pytest.raises(ImageError) as raised:
        decode_image(corpus.png_bomb(12_000, 10_000), max_pixels=1_000_000)
    assert raised.value.category == "too_large" and "12000x10000 pixels exceeds the limit of 1000000" in str(
        raised.value
    )


def test_messages_name_the_option_and_the_codec() -> None:
    """Pillow's own bomb refusal is put in terms of --max-pixels; an undecodable TIFF names its codec."""
    with pytest.raises(ImageError) as raised:
        decode_image(corpus.png_bomb(), max_pixels=DEFAULT_MAX_PIXELS)
    assert str(raised.value) == (
        f"too_large: 10000000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS} (--max-pixels; to "
        "classify it, raise the limit and run once with --retry-errors too_large)"
    )
    with pytest.raises(ImageError) as raised:
        decode_image(corpus.tiff_with_unknown_compression(34712), max_pixels=DEFAULT_MAX_PIXELS)
    assert raised.value.category == "unsupported" and "TIFF compression 34712 (JPEG 2000)" in str(
        raised.value
    )


def test_max_pixels_is_ours_not_pillows(monkeypatch: pytest.MonkeyPatch) -> None:
    data = corpus.encode(corpus.random_rgb((64, 48), 1), "PNG")  # 3,072 pixels
    with pytest.raises(ImageError, match="too_large"):
        decode_image(data, max_pixels=3_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow alone would refuse it as a bomb
    assert decode_image(data, max_pixels=10_000).size == (64, 48)


def odd_images(root: Path) -> list[str]:
    """Valid images the reference snippet reads with `Image.open(f).convert("RGB")`."""
    base = corpus.random_rgb((64, 48), 5)
    files = {
        "grey.png": corpus.encode(base.convert("L"), "PNG"),
        "rgba.png": corpus.encode(base.convert("RGBA"), "PNG"),
        "la.png": corpus.encode(base.convert("LA"), "PNG"),
        "palette.png": corpus.encode(base.convert("P"), "PNG", transparency=0),
        "bilevel.png": corpus.encode(base.convert("1"), "PNG"),
        "animated.gif": corpus.animated_gif(),
        "cmyk.jpg": corpus.encode(base.convert("CMYK"), "JPEG"),
        "pages.tif": corpus.multipage_tiff(),
        "pixel.png": corpus.encode(corpus.random_rgb((1, 1), 6), "PNG"),
        "wide.png": corpus.encode(corpus.random_rgb((2000, 1), 7), "PNG"),
        "tall.jpg": corpus.encode(corpus.random_rgb((3, 1500), 8), "JPEG"),
        "lossless.webp": corpus.encode(base, "WEBP", lossless=True),
        "lossy.webp": corpus.encode(base.convert("RGBA"), "WEBP"),
        "plain.bmp": corpus.encode(base, "BMP"),
        "rotated.jpg": corpus.exif_rotated_jpeg(),
    }
    corpus.write_files(root, files)
    return sorted(files)


def test_odd_but_valid_images_match_the_reference(tmp_path: Path, tiny_model: str) -> None:
    names = odd_images(tmp_path / "odd")
    rows = classify_folder(tmp_path / "odd", tiny_model)
    expected = reference_predictions(tiny_model, [tmp_path / "odd" / name for name in names])
    for name in names:
        row = rows[name]
        assert row["status"] == "ok", (name, row["error"])
        label, confidence, prob_malignant = expected[row["image_uri"]]
        assert row["label"] == label, name
        assert row["prob_malignant"] == pytest.approx(prob_malignant, abs=1e-3), name
    assert (rows["pages.tif"]["image_width"], rows["pages.tif"]["image_height"]) == (40, 30)  # first page
    assert (rows["rotated.jpg"]["image_width"], rows["rotated.jpg"]["image_height"]) == (64, 32)


def test_exif_orientation_is_applied_only_when_asked(tmp_path: Path) -> None:
    data = corpus.exif_rotated_jpeg((64, 32), orientation=6)
    assert decode_image(data).size == (64, 32)  # the reference's view
    rotated = decode_image(data, exif_orientation=True)
    assert rotated.size == (32, 64)
    upright = np.asarray(decode_image(data).transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    assert np.abs(np.asarray(rotated, dtype=np.int16) - upright).max() == 0


def test_rows_say_when_exif_orientation_was_applied(tmp_path: Path, tiny_model: str) -> None:
    """--exif-orientation changes the pixels: each row's decoder says it was on, so an analyst can
    tell such rows from a plain run's (the flag applies to new and changed images only)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "rotated.jpg").write_bytes(corpus.exif_rotated_jpeg((64, 32), orientation=6))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    plain = classify_folder(folder, tiny_model)
    turned = classify_folder(folder, tiny_model, exif_orientation=True)
    assert plain["rotated.jpg"]["decoder"] == "pil"
    assert turned["rotated.jpg"]["decoder"] == "pil+exif_orientation"
    assert turned["broken.jpg"]["decoder"] is None, "error rows have no pixels, so no decoder"
    assert turned["rotated.jpg"]["prob_malignant"] != plain["rotated.jpg"]["prob_malignant"]


def test_sixteen_bit_images_are_scaled_by_range_not_clipped() -> None:
    data, pixels = corpus.sixteen_bit_png(1000, 4000)
    clipped = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert (clipped == 255).all(), "Pillow's own conversion clips every value above 255"
    decoded = np.asarray(decode_image(data))
    assert decoded.shape == (48, 64, 3) and (decoded[..., 0] == decoded[..., 2]).all()
    expected = np.round((pixels.astype(np.float64) - 1000) * 255 / 3000)
    assert np.abs(decoded[..., 0] - expected).max() <= 1
    assert decoded.min() == 0 and decoded.max() == 255 and len(np.unique(decoded)) > 200
    tiff = corpus.encode(Image.fromarray(pixels), "TIFF")
    assert np.array_equal(np.asarray(decode_image(tiff)), decoded)
    floats = corpus.encode(Image.fromarray(pixels.astype(np.float32) / 4000), "TIFF")
    assert np.abs(np.asarray(decode_image(floats)).astype(int) - decoded).max() <= 1


def display(data: bytes, **kwargs: object) -> np.ndarray:
    image = decode_image(data, **kwargs)  # type: ignore[arg-type]
    pixels = np.asarray(image)
    assert (
        image.mode == "RGB"
        and (pixels[..., 0] == pixels[..., 1]).all()
        and (pixels[..., 1] == pixels[..., 2]).all()
    )
    return pixels[..., 0]


def test_dicom_monochrome2_with_voi_window() -> None:
    ramp = corpus.dicom_ramp()
    shown = display(corpus.make_dicom(ramp, window=(2048, 1024), bits_stored=12))
    row = ramp[0].astype(np.float64)
    expected = np.clip((row - 2047.5) / 1023 + 0.5, 0, 1) * 255
    assert np.abs(shown[0].astype(int) - np.round(expected)).max() <= 1
    assert shown[0, 0] == 0 and shown[0, -1] == 255 and 0 < shown[0, 32] < 255  # clipped outside the window


def test_dicom_monochrome1_is_inverted_and_rescaled() -> None:
    ramp = corpus.dicom_ramp()
    plain = display(corpus.make_dicom(ramp))
    inverted = display(corpus.make_dicom(ramp, photometric="MONOCHROME1"))
    assert plain[0, 0] == 0 and plain[0, -1] == 255  # no window: the frame's own range
    assert np.array_equal(inverted, 255 - plain)
    # Modality LUT first: stored 0..4095 with slope 2, intercept -1024 → window (3072, 2048) on real values.
    rescaled = display(corpus.make_dicom(ramp, window=(3072, 2048), rescale=(2.0, -1024.0)))
    real = ramp[0] * 2.0 - 1024
    assert np.abs(rescaled[0].astype(int) - np.round(window(real, 3072, 2048) * 255)).max() <= 1


def test_dicom_first_frame_only_and_sniffed_by_content(tmp_path: Path, tiny_model: str) -> None:
    ramp = corpus.dicom_ramp()
    frames = np.stack([ramp, ramp[:, ::-1]])
    data = corpus.make_dicom(frames)
    assert np.array_equal(display(data), display(corpus.make_dicom(ramp)))
    corpus.write_files(tmp_path / "d", {"a.dcm": data, "b.DICOM": data, "c.png": data, "d.txt": data})
    rows = classify_folder(tmp_path / "d", tiny_model)
    assert sorted(rows) == ["a.dcm", "b.DICOM", "c.png"]  # discovery is by extension; decoding sniffs DICM
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert (rows["a.dcm"]["image_width"], rows["a.dcm"]["image_height"]) == (64, 32)


def test_dicom_files_without_an_extension_are_found_by_their_marker(tmp_path: Path, tiny_model: str) -> None:
    """A DICOM CD export or PACS dump: IM000001-style names, SOP instance UIDs, Siemens .IMA. Those with
    DICOM's DICM marker and an image SOP class are listed and classified; DICOMDIR (the export's index), a
    structured report beside the images, other files and a named pipe (a read would block) are not."""
    from collections import Counter

    data, uid = corpus.make_dicom(corpus.dicom_ramp()), corpus.DICOM_UID_NAME
    files = {f"DICOM/PA0/ST0/SE0/IM{n:06d}": data for n in range(3)}
    files |= {uid: data, "DICOMDIR": data, "README": b"CD export " * 20, "LOG.42": b"x" * 200}
    files |= {"scan.IMA": data, "DICOM/PA0/ST0/SE1/IM000000": corpus.dicom_report(data)}
    for name, content in files.items():
        (tmp_path / "cd" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cd" / name).write_bytes(content)
    os.mkfifo(tmp_path / "cd" / "PIPE")
    skipped: Counter[str] = Counter()
    listed = [
        file.path.rsplit("/", 1)[-1] for file in list_images(open_location(str(tmp_path / "cd")), skipped)
    ]
    assert listed == [uid, "IM000000", "IM000001", "IM000002", "scan.IMA"]
    # not listed: README, LOG.42 (a number is no extension), PIPE; DICOMDIR and the report apart
    assert skipped == Counter({"no extension": 3, "DICOM without images": 2})
    rows = classify_folder(tmp_path / "cd", tiny_model)
    assert {r["status"] for r in rows.values()} == {"ok"} and len(rows) == 5


def test_files_without_an_extension_that_have_rows_are_not_opened_again(tmp_path: Path) -> None:
    """Each night the listing would open every `IM000001` again to find its DICM marker (an NFS archive
    of a million: three round trips each); a file the output has rows for is taken as the image it was.
    Shown with a file that is no DICOM: listed only because the index knows it."""
    import pyarrow as pa

    from tasks.sink import known_uris

    (tmp_path / "cd").mkdir()
    (tmp_path / "cd" / "IM000001").write_bytes(corpus.make_dicom(corpus.dicom_ramp()))
    (tmp_path / "cd" / "IM000002").write_bytes(b"not DICOM (any more)")
    (tmp_path / "cd" / "README").write_bytes(b"CD export")
    location = open_location(str(tmp_path / "cd"))
    index = pa.table({"image_uri": [f"file://{tmp_path}/cd/IM000002", f"file://{tmp_path}/cd/other"]})
    looked = [file.path.rsplit("/", 1)[-1] for file in list_images(location)]
    knowing = [file.path.rsplit("/", 1)[-1] for file in list_images(location, known=known_uris(index))]
    assert looked == ["IM000001"] and knowing == ["IM000001", "IM000002"]
    assert not known_uris(index.slice(0, 0))(f"file://{tmp_path}/cd/IM000002")


@pytest.mark.parametrize(
    ("sop_class", "kind"),
    [
        ("1.2.840.10008.5.1.4.1.1.7", "image"),  # secondary capture
        ("1.2.840.10008.5.1.4.1.1.481.1", "image"),  # RT Image
        ("1.2.840.10008.5.1.4.1.1.481.10", "no image"),  # RT Physician Intent
        ("1.2.840.10008.5.1.4.1.1.481.2", "no image"),  # RT Dose
        ("1.2.840.10008.5.1.4.1.1.67", "no image"),  # real world value mapping
        ("1.2.840.10008.5.1.4.1.1.104.1", "no image"),  # encapsulated PDF
        ("1.2.840.10008.1.3.10", "no image"),  # a DICOMDIR under another name
    ],
)
def test_dicom_found_by_content_is_listed_only_for_image_sop_classes(
    tmp_path: Path, sop_class: str, kind: str
) -> None:
    import pydicom

    from tasks.storage import dicom_kind

    dataset = pydicom.dcmread(io.BytesIO(corpus.make_dicom(corpus.dicom_ramp())))
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    dataset.save_as(tmp_path / "IM000001", enforce_file_format=True)
    with os.scandir(tmp_path) as entries:
        assert [dicom_kind(entry) for entry in entries] == [kind]


def edited_dicom(data: bytes, **elements: object) -> bytes:
    """A DICOM file from make_dicom with some header elements replaced (name → (VR, value))."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data))
    for keyword, (vr, value) in elements.items():  # type: ignore[misc]
        dataset.add_new(keyword, vr, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_palette_colour_goes_through_its_lookup_tables() -> None:
    ramp = (np.arange(256, dtype=np.uint16)[np.newaxis].repeat(8, axis=0)) % 256
    red = (np.arange(256)[::-1] * 257).astype("<u2").tobytes()  # 16-bit entries: red = 255 - index
    zeros = np.zeros(256, "<u2").tobytes()
    data = edited_dicom(
        corpus.make_dicom(ramp, photometric="PALETTE COLOR", bits_stored=8),
        RedPaletteColorLookupTableDescriptor=("US", [256, 0, 16]),
        GreenPaletteColorLookupTableDescriptor=("US", [256, 0, 16]),
        BluePaletteColorLookupTableDescriptor=("US", [256, 0, 16]),
        RedPaletteColorLookupTableData=("OW", red),
        GreenPaletteColorLookupTableData=("OW", zeros),
        BluePaletteColorLookupTableData=("OW", zeros),
    )
    pixels = np.asarray(decode_image(data))
    assert pixels[0, :, 0].tolist() == list(range(255, -1, -1)) and not pixels[..., 1:].any()


def test_a_malformed_dicom_header_value_is_an_error_row_without_the_value() -> None:
    # Written with VR LO: pydicom would refuse to write a DS that is not a number, as some devices do.
    data = edited_dicom(corpus.make_dicom(corpus.dicom_ramp()), WindowCenter=("LO", "SENTINEL"))
    with pytest.raises(ImageError) as raised:
        decode_image(data)
    assert raised.value.category == "unsupported" and "SENTINEL" not in str(raised.value)


def test_a_dicom_with_an_empty_image_is_not_an_image() -> None:
    """Rows = Columns = 0 and no pixel bytes (some modalities' placeholders): before, a raw TypeError."""
    data = edited_dicom(
        corpus.make_dicom(corpus.dicom_ramp()), Rows=("US", 0), Columns=("US", 0), PixelData=("OW", b"")
    )
    with pytest.raises(ImageError) as raised:
        decode_image(data, name="zero.dcm")
    assert raised.value.category == "not_an_image" and "empty image (0x0 pixels)" in str(raised.value)


def test_an_image_named_dcm_is_decoded_as_the_image_it_is() -> None:
    for fmt in ("PNG", "WEBP", "JPEG"):
        data = corpus.encode(corpus.random_rgb((24, 16), 3), fmt)
        assert decode_image(data, name="export.dcm").size == (24, 16), fmt


def test_a_png_or_webp_with_a_damaged_byte_is_truncated_never_unsupported() -> None:
    """Every byte of small PNG and WebP files flipped in turn: the file decodes, or is `truncated`
    (damaged: copy it again) or `not_an_image` (its signature is gone), never `unsupported` (convert
    it), which sent users to convert files that were only damaged ("broken PNG file", a row filter that
    does not exist, a WebP frame that does not decode)."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    stored = io.BytesIO()
    Image.fromarray(pixels).save(stored, "PNG", compress_level=0)
    files = {
        "png": corpus.encode(Image.fromarray(pixels), "PNG"),
        "png-stored": stored.getvalue(),
        "webp": corpus.encode(Image.fromarray(pixels), "WEBP"),
    }
    found: Counter[str] = Counter()
    for kind, data in files.items():
        for position in range(len(data)):
            for mask in (0x01, 0x10, 0xFF):
                damaged = bytearray(data)
                damaged[position] ^= mask
                try:
                    decode_image(bytes(damaged))
                    found["ok"] += 1
                except ImageError as error:
                    found[error.category] += 1
                    assert error.category in {"truncated", "not_an_image"}, (kind, position, mask, error)
    assert found["truncated"] > 1000


def old_scale_to_8bit(values: np.ndarray) -> np.ndarray:
    """scale_to_8bit as it was before it worked in blocks of rows: the whole image at once."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return np.round((values - low) * np.float32(255.0 / (high - low))).astype(np.uint8)


def dicom_with_voi_lut(pixels: np.ndarray) -> bytes:
    """A DICOM file whose display goes through a VOI LUT sequence (a square-root curve, 16-bit entries)."""
    from pydicom.dataset import Dataset

    table = (np.sqrt(np.arange(4096) / 4095) * 60000).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.add_new("LUTData", "OW", table.tobytes())
    return edited_dicom(corpus.make_dicom(pixels, bits_stored=12), VOILUTSequence=("SQ", [item]))


def test_high_depth_images_map_to_8_bits_block_by_block_with_the_same_result(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The mapping to 8 bits runs a block of rows at a time (bounded float temporaries); every block
    size gives the pixels of the whole-image mapping, for each kind of high-depth image."""
    import tasks.images

    rng = np.random.default_rng(5)
    values = rng.normal(0, 1000, size=(37, 29)).astype(np.float32)
    values[3, 4], values[10, 0], values[36, 28] = np.nan, np.inf, -np.inf
    pixels = rng.integers(0, 4096, size=(37, 29), dtype=np.uint16)
    files = {
        "png-16bit": corpus.encode(Image.fromarray(pixels), "PNG"),
        "tiff-float": corpus.encode(Image.fromarray(values), "TIFF"),
        "dicom-window": corpus.make_dicom(pixels, window=(2048, 1024)),
        "dicom-range": corpus.make_dicom(pixels),
        "dicom-rescale-window-mono1": corpus.make_dicom(
            pixels, photometric="MONOCHROME1", window=(0, 2000), rescale=(1.5, -1024.0)
        ),
        "dicom-range-mono1": corpus.make_dicom(pixels, photometric="MONOCHROME1"),
        "dicom-voi-lut": dicom_with_voi_lut(pixels),
    }
    whole = {name: display(data) for name, data in files.items()}  # each fits in one block
    assert np.array_equal(whole["png-16bit"], old_scale_to_8bit(pixels))
    assert np.array_equal(whole["dicom-range"], old_scale_to_8bit(pixels))
    assert np.array_equal(whole["dicom-range-mono1"], 255 - whole["dicom-range"])
    assert whole["dicom-voi-lut"].min() == 0 and whole["dicom-voi-lut"].max() == 255
    assert whole["dicom-voi-lut"].mean() > whole["dicom-range"].mean() + 20  # the square-root curve
    for block_pixels in (1, 29 * 5, 29 * 36):  # one row, several, all but the last
        monkeypatch.setattr(tasks.images, "BLOCK_PIXELS", block_pixels)
        assert np.array_equal(tasks.images.scale_to_8bit(values), old_scale_to_8bit(values))
        for name, data in files.items():
            assert np.array_equal(display(data), whole[name]), (name, block_pixels)


def test_decoding_a_large_high_depth_image_holds_a_few_bytes_per_pixel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Traced allocations (numpy, Python bytes) while decoding 16-bit images: ~4-5 bytes per pixel, not
    the 15 (PNG) and 36 (DICOM) of whole-image float copies. bench/decode_memory.py has the figures at a
    mammogram's size; blocks are made small here so that a 512x512 image has many."""
    import tracemalloc

    import tasks.images

    monkeypatch.setattr(tasks.images, "BLOCK_PIXELS", 1 << 14)
    pixels = np.random.default_rng(6).integers(0, 4096, size=(512, 512), dtype=np.uint16)
    for name, data in {
        "scan.png": corpus.encode(Image.fromarray(pixels), "PNG"),
        "scan.dcm": corpus.make_dicom(pixels, window=(2048, 1024), rescale=(1.0, -1024.0)),
    }.items():
        decode_image(data, name=name)
        tracemalloc.start()
        try:
            decode_image(data, name=name)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak / pixels.size < 7, (name, peak / pixels.size)


def test_window_functions() -> None:
    values = np.array([0.0, 99.5, 100.0, 200.0])
    assert window(values, 100, 1).tolist() == [0.0, 0.0, 1.0, 1.0]
    assert window(values, 100, 200, "LINEAR_EXACT").tolist() == pytest.approx([0.0, 0.4975, 0.5, 1.0])
    assert window(values, 100, 200, "SIGMOID")[2] == pytest.approx(0.5)


def test_no_patient_identifier_in_rows_or_logs(
    tmp_path: Path, tiny_model: str, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    good = corpus.make_dicom(corpus.dicom_ramp(), window=(2048, 1024))
    corpus.write_files(
        tmp_path / "d",
        {
            "good.dcm": good,
            "cut.dcm": good[:-500],
            "header.dcm": good[:400],
            "odd.dcm": good[:132] + b"\xff" * 300,
        },
    )
    with caplog.at_level("DEBUG"):
        rows = classify_folder(tmp_path / "d", tiny_model)
    assert rows["good.dcm"]["status"] == "ok" and rows["cut.dcm"]["error"].startswith("truncated")
    text = repr(rows) + caplog.text + "".join(capfd.readouterr())
    for secret in (corpus.PATIENT_NAME, "SENTINEL", corpus.PATIENT_ID, "19700101"):
        assert secret not in text


def test_a_giant_file_is_refused_from_its_listed_size_without_reading_it(
    tmp_path: Path, tiny_model: str
) -> None:
    giant = tmp_path / "scans" / "giant.tif"
    giant.parent.mkdir()
    with open(giant, "wb") as handle:  # sparse: takes no disk space, and is never read
        handle.truncate(MAX_FILE_BYTES + 1)
    location = open_location(str(giant.parent))
    model = load_model(tiny_model, device="cpu", precision="fp32")
    rows = classify_files(
        list(list_images(location)), location.fs, model, EngineOptions(), "r", "s"
    ).to_pylist()
    assert [r["status"] for r in rows] == ["error"] and rows[0]["error"].startswith("too_large:")


class CountingFileSystem(LocalFileSystem):
    """The real local filesystem, recording how many bytes each read returned."""

    cachable = False

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, int]] = []

    def cat_file(self, path, start=None, end=None, **kwargs):  # type: ignore[no-untyped-def,override]
        data = super().cat_file(path, start=start, end=end, **kwargs)
        self.reads.append((Path(path).name, len(data)))
        return data


def test_a_padded_decompression_bomb_costs_one_small_read(tmp_path: Path, tiny_model: str) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    header = io.BytesIO()
    Image.new("L", (1, 1)).save(header, "PNG")
    bomb = bytearray(header.getvalue())
    bomb[16:24] = (50_000).to_bytes(4, "big") * 2  # IHDR width and height: 2.5 billion pixels declared
    bomb[29:33] = zlib.crc32(bytes(bomb[12:29])).to_bytes(4, "big")  # a valid chunk checksum
    padded = PROBE_FROM_BYTES + 4096
    for name, data in (("bomb.png", bytes(bomb)), ("big-but-fine.png", header.getvalue())):
        with open(folder / name, "wb") as handle:  # trailing zeros: sparse on disk, ignored by decoders
            handle.write(data)
            handle.truncate(padded)
    fs = CountingFileSystem()
    files = list(list_images(open_location(str(folder))))
    model = load_model(tiny_model, device="cpu", precision="fp32")
    rows = {
        r["image_uri"].rsplit("/", 1)[-1]: r
        for r in classify_files(files, fs, model, EngineOptions(), "r", "s").to_pylist()
    }
    assert rows["bomb.png"]["error"].startswith("too_large:")
    assert rows["big-but-fine.png"]["status"] == "ok"
    assert [n for name, n in fs.reads if name == "bomb.png"] == [PROBE_BYTES], "only the header was read"
    assert [n for name, n in fs.reads if name == "big-but-fine.png"] == [PROBE_BYTES, padded]


def compressed_dicom(syntax: object, stream: bytes) -> bytes:
    """An 8-bit grey 32×64 DICOM whose one frame is `stream`, encapsulated under transfer `syntax`."""
    import pydicom
    from pydicom.encaps import encapsulate

    dataset = pydicom.dcmread(io.BytesIO(corpus.make_dicom(corpus.dicom_ramp())))
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelData = encapsulate([stream])
    dataset["PixelData"].VR = "OB"
    dataset["PixelData"].is_undefined_length = True
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


WITHOUT_DICOM_EXTRA = """
import json, sys
# oncoflow installed without its `dicom` extra: the decoders' packages cannot be imported.
sys.modules.update(gdcm=None, jpeg_ls=None, pylibjpeg=None, openjpeg=None, libjpeg=None, rle=None)
from tasks.images import ImageError, decode_image
for path in sys.argv[1:]:
    try:
        decode_image(open(path, "rb").read())
        print(json.dumps(["ok", ""]))
    except ImageError as error:
        print(json.dumps([error.category, str(error)]))
"""


def test_compressed_dicom_without_its_decoders_is_unsupported_and_names_the_extra(tmp_path: Path) -> None:
    """Installed without the `dicom` extra: a damaged frame that only Pillow could try, or a syntax with
    no decoder at all, is `unsupported`, naming what to install."""
    import json
    import subprocess
    import sys

    from pydicom.uid import JPEGBaseline8Bit, JPEGLSLossless

    grey = Image.fromarray((corpus.dicom_ramp() // 16).astype(np.uint8), "L")
    jpeg = corpus.encode(grey, "JPEG")
    files = {
        "fine.dcm": compressed_dicom(JPEGBaseline8Bit, jpeg),
        "damaged.dcm": compressed_dicom(JPEGBaseline8Bit, jpeg[: len(jpeg) // 2]),
        "jpeg-ls.dcm": compressed_dicom(JPEGLSLossless, b"\xff\xd8 not decodable here \xff\xd9"),
    }
    corpus.write_files(tmp_path, files)
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_DICOM_EXTRA, *(str(tmp_path / name) for name in files)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (fine, _), (damaged, damaged_text), (missing, missing_text) = map(json.loads, done.stdout.splitlines())
    assert fine == "ok"
    # Only Pillow decodes it there: a damaged frame or a variant Pillow lacks (12-bit) look alike.
    assert damaged == "unsupported" and "JPEG Baseline" in damaged_text
    assert "installed decoder (pillow)" in damaged_text and "oncoflow[dicom]" in damaged_text
    assert missing == "unsupported" and "no decoder for DICOM transfer syntax JPEG-LS" in missing_text
    assert "pyjpegls" in missing_text and "oncoflow[dicom]" in missing_text


def gdcm_transcoded(data: bytes, syntax: str, folder: Path) -> bytes:
    """`data` (an uncompressed DICOM file) re-encoded by GDCM into `syntax` (a gdcm.TransferSyntax name):
    pydicom has no encoder for JPEG Lossless, the syntax mammography archives use most."""
    import gdcm

    source, target = folder / "source.dcm", folder / "target.dcm"
    source.write_bytes(data)
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, syntax)))
    change.SetInput(reader.GetImage())
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    return target.read_bytes()


def test_compressed_dicom_decodes_to_the_pixels_of_the_uncompressed_file(tmp_path: Path) -> None:
    """With the `dicom` extra (in the dev install): the lossless syntaxes PACS exports use give exactly
    the pixels of the same image stored uncompressed, and a damaged frame is `truncated`."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit, JPEGLSLossless, RLELossless

    pixels = np.random.default_rng(7).integers(0, 4096, size=(40, 56), dtype=np.uint16)
    plain = corpus.make_dicom(pixels, window=(2048, 1024), bits_stored=12)
    expected = display(plain)
    encoded = {"JPEG Lossless SV1": gdcm_transcoded(plain, "JPEGLosslessProcess14_1", tmp_path)}
    for syntax in (JPEG2000Lossless, JPEGLSLossless, RLELossless):
        dataset = pydicom.dcmread(io.BytesIO(plain))
        dataset.compress(syntax)
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        encoded[syntax.name] = buffer.getvalue()
    for name, data in encoded.items():
        assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID.is_compressed, name
        assert np.array_equal(display(data), expected), name
    grey = Image.fromarray((corpus.dicom_ramp() // 16).astype(np.uint8), "L")
    jpeg = corpus.encode(grey, "JPEG")
    with pytest.raises(ImageError) as damaged:
        decode_image(compressed_dicom(JPEGBaseline8Bit, jpeg[: len(jpeg) // 2]))
    assert damaged.value.category == "truncated" and "is damaged" in str(damaged.value)


def test_dicom_without_file_meta_is_decoded_by_the_encoding_it_was_read_with() -> None:
    """Some archives store bare datasets: no preamble, no file meta, implicit VR little endian."""
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(corpus.make_dicom(corpus.dicom_ramp(), window=(2048, 1024))))
    del dataset.file_meta
    dataset.preamble = None
    buffer = io.BytesIO()
    dataset.save_as(buffer, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = buffer.getvalue()
    assert bare[128:132] != b"DICM"
    expected = display(corpus.make_dicom(corpus.dicom_ramp(), window=(2048, 1024)))
    assert np.array_equal(display(bare, name="scan.dcm"), expected)
