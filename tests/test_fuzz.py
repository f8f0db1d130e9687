"""Property-based: random and mutated bytes under image names never crash the engine, never lose a file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.defaults import ERROR_CATEGORIES
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import list_images, open_location
from tests import corpus

SEEDS = {
    "jpg": corpus.encode(corpus.random_rgb((24, 16), 1), "JPEG"),
    "png": corpus.encode(corpus.random_rgb((24, 16), 2), "PNG"),
    "gif": corpus.animated_gif(),
    "tif": corpus.multipage_tiff(),
    "webp": corpus.encode(corpus.random_rgb((24, 16), 3), "WEBP"),
    "dcm": corpus.make_dicom(corpus.dicom_ramp()[:8, :16], window=(2048, 1024)),
}


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, bytes]:
    """A valid file of some format with bytes flipped, cut or spliced in; or plain random bytes."""
    extension = draw(st.sampled_from(sorted(SEEDS)))
    data = bytearray(SEEDS[extension])
    kind = draw(st.sampled_from(["flip", "cut", "splice", "random"]))
    if kind == "random":
        return extension, draw(st.binary(max_size=300))
    if kind == "cut":
        return extension, bytes(data[: draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return extension, bytes(data)


@pytest.fixture(scope="module")
def model(tiny_model: str):  # type: ignore[no-untyped-def]
    return load_model(tiny_model, device="cpu", precision="fp32")


@settings(max_examples=60, deadline=None)
@given(files=st.lists(mutated(), min_size=1, max_size=6))
def test_every_file_becomes_one_row_with_a_known_outcome(model, files: list[tuple[str, bytes]]) -> None:  # type: ignore[no-untyped-def]
    with tempfile.TemporaryDirectory() as folder:
        for number, (extension, data) in enumerate(files):
            Path(folder, f"f{number:02d}.{extension}").write_bytes(data)
        location = open_location(folder)
        listed = list(list_images(location))
        # A low pixel limit: a mutated header may claim any size, and the test must stay small.
        options = EngineOptions(batch_size=4, decode_workers=2, max_pixels=1_000_000)
        rows = classify_files(listed, location.fs, model, options, "fuzz", "fuzz").to_pylist()

    assert [r["image_uri"] for r in rows] == [f.uri for f in listed] and len(rows) == len(files)
    for row in rows:
        if row["status"] == "ok":
            assert row["error"] is None and 0.0 <= row["prob_malignant"] <= 1.0
        else:
            assert row["status"] == "error" and row["label"] is None
            assert row["error"].split(": ", 1)[0] in ERROR_CATEGORIES, row["error"]
