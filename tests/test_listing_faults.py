"""Listing faults: a broken link, a vanished or unreadable sub-folder leave the rest of the source listed,
with a warning that names what was left out; only an unreadable source folder itself fails the run."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from flows.classify import classify
from tasks.storage import _list_local, list_images, open_location
from tests.conftest import make_image

needs_non_root = pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads folders whatever their permissions"
)


def listed_names(folder: Path) -> list[str]:
    return [os.path.relpath(f.path, folder) for f in list_images(open_location(str(folder)))]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "tasks.storage" and r.levelno == logging.WARNING
    ]


@pytest.fixture
def locked() -> Iterator[list[Path]]:
    """Folders a test makes unreadable, given their permissions back so tmp_path can be removed."""
    folders: list[Path] = []
    yield folders
    for folder in folders:
        folder.chmod(0o755)


def test_a_broken_link_is_left_out_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "scans"
    make_image(folder / "a.jpg", seed=1)
    make_image(folder / "b.png", seed=2)
    (folder / "broken.jpg").symlink_to("/nonexistent/x.jpg")
    (folder / "loop.jpg").symlink_to("loop.jpg")  # stat fails with ELOOP, not FileNotFoundError
    (folder / "gone").symlink_to("/nonexistent/folder")  # not an image name: ignored quietly

    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        assert listed_names(folder) == ["a.jpg", "b.png"]

    warnings = warnings_of(caplog)
    assert len(warnings) == 2, warnings
    for name, warning in zip(["broken.jpg", "loop.jpg"], warnings, strict=True):
        assert str(folder / name) in warning and "broken link: repair or remove it" in warning


def test_a_fifo_or_device_named_like_an_image_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Reading a FIFO would block the run for ever, a device like /dev/zero never ends: not listed."""
    folder = tmp_path / "scans"
    make_image(folder / "a.jpg", seed=1)
    os.mkfifo(folder / "pipe.jpg")
    (folder / "zero.png").symlink_to("/dev/zero")
    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        assert listed_names(folder) == ["a.jpg"]
    warnings = warnings_of(caplog)
    assert any("pipe.jpg" in w and "named pipe (FIFO), not a regular file" in w for w in warnings), warnings
    assert any("zero.png" in w and "character device" in w for w in warnings), warnings


def test_a_sub_folder_deleted_during_listing_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "scans"
    make_image(folder / "sub" / "a.png", seed=1)
    make_image(folder / "z.png", seed=2)
    # list_images sorts, so it reads the whole tree at once; the walk itself is a generator that has
    # queued `sub` when it hands out z.png, which lets the test delete `sub` at exactly that point.
    walk = _list_local(str(folder))
    assert next(walk).path == str(folder / "z.png")
    shutil.rmtree(folder / "sub")

    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        assert list(walk) == []
    [warning] = warnings_of(caplog)
    assert str(folder / "sub") in warning and "deleted while the source was being listed" in warning


@needs_non_root
def test_an_unreadable_sub_folder_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, locked: list[Path]
) -> None:
    folder = tmp_path / "scans"
    make_image(folder / "a.png", seed=1)
    make_image(folder / "private" / "b.png", seed=2)
    locked.append(folder / "private")
    (folder / "private").chmod(0)

    with caplog.at_level(logging.WARNING, logger="tasks.storage"):
        assert listed_names(folder) == ["a.png"]
    [warning] = warnings_of(caplog)
    assert str(folder / "private") in warning and "make it readable" in warning


@needs_non_root
def test_an_unreadable_source_folder_still_fails(tmp_path: Path, locked: list[Path]) -> None:
    folder = tmp_path / "scans"
    make_image(folder / "a.png")
    locked.append(folder)
    folder.chmod(0)
    with pytest.raises(PermissionError):
        listed_names(folder)


def test_classify_succeeds_past_a_broken_link(tmp_path: Path, tiny_model: str) -> None:
    folder = tmp_path / "scans"
    make_image(folder / "a.jpg", seed=1)
    make_image(folder / "sub" / "b.png", seed=2)
    (folder / "broken.jpg").symlink_to("/nonexistent/x.jpg")
    output = tmp_path / "preds"

    summary = classify(str(folder), str(output), model=tiny_model, device="cpu")

    assert summary["images_found"] == 2 and summary["errors"] == 0
    rows = ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()
    assert sorted(r["image_uri"] for r in rows) == [
        "file://" + str(folder / "a.jpg"),
        "file://" + str(folder / "sub" / "b.png"),
    ]
    assert {r["status"] for r in rows} == {"ok"}


def as_an_ordinary_user(command: list[str]) -> list[str] | None:
    """`command` run without the power to read every file: as it is for a non-root user; for root, with
    the capabilities that bypass file permissions dropped (setpriv); None where neither is possible."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        return command
    setpriv = shutil.which("setpriv")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *command] if setpriv else None


def listed_as_an_ordinary_user(folder: Path, locked: list[Path]) -> subprocess.CompletedProcess[str]:
    """list_images(folder) in a process that cannot read the `locked` files (mode 000 meanwhile): its
    stdout is the listed paths relative to `folder`, its stderr the warnings. Skips where impossible."""
    script = (
        "import logging, os, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from tasks.storage import list_images, open_location\n"
        "print([os.path.relpath(f.path, sys.argv[1]) for f in list_images(open_location(sys.argv[1]))])"
    )
    command = as_an_ordinary_user([sys.executable, "-c", script, str(folder)])
    if command is None:
        pytest.skip("running as root without setpriv: every file is readable")
    for path in locked:
        path.chmod(0o000)
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=root, check=True)
    finally:
        for path in locked:
            path.chmod(0o644)


def test_an_unreadable_image_is_left_out_and_listed_once_readable(tmp_path: Path) -> None:
    """An exporter writing with umask 077, a cron job fixing permissions later: the unreadable images
    are left out with one warning (not recorded as final error rows, since chmod keeps the mtime and so
    the fingerprint), and the next listing after the fix has them."""
    folder = tmp_path / "scans"
    make_image(folder / "a.jpg", seed=1)
    for name in ("b.jpg", "c.png"):
        make_image(folder / "late" / name, seed=2)
    locked = [folder / "late" / name for name in ("b.jpg", "c.png")]
    before = listed_as_an_ordinary_user(folder, locked)
    after = listed_as_an_ordinary_user(folder, [])
    assert before.stdout.strip() == "['a.jpg']" and "'late/b.jpg'" in after.stdout
    warning = " ".join(before.stderr.split())
    assert "left 2 unreadable image file(s) out of the listing (Permission denied)" in warning, warning
    assert str(folder / "late" / "b.jpg") in warning and "the next run lists and classifies them" in warning
    assert after.stderr.strip() == ""


def test_a_link_into_a_folder_that_cannot_be_listed_keeps_its_image(tmp_path: Path) -> None:
    """A drop folder that may be entered but not listed (mode 111) and a link to an image in it: the
    walk cannot list the image at its own path, so the link is listed (not left out as a duplicate)."""
    folder = tmp_path / "scans"
    make_image(folder / "drop" / "x.png", seed=1)
    (folder / "x-link.png").symlink_to(folder / "drop" / "x.png")
    (folder / "drop").chmod(0o111)
    try:
        done = listed_as_an_ordinary_user(folder, [])
    finally:
        (folder / "drop").chmod(0o755)
    assert done.stdout.strip() == "['x-link.png']", done.stdout + done.stderr
    assert "left " in done.stderr and "drop" in done.stderr


def test_files_without_an_extension_that_cannot_be_opened_get_one_neutral_warning(tmp_path: Path) -> None:
    """Found by content, a DICOM file named IM000001 must be opened to be known: when it may not be, the
    listing says so once, without promising a README that it will be listed."""
    from tests import corpus

    folder = tmp_path / "cd"
    folder.mkdir()
    (folder / "IM000001").write_bytes(corpus.make_dicom(corpus.dicom_ramp()))
    (folder / "README").write_text("CD export")
    done = listed_as_an_ordinary_user(folder, [folder / "IM000001", folder / "README"])
    warning = " ".join(done.stderr.split())
    assert done.stdout.strip() == "[]"
    assert "could not open 2 file(s) without an image extension to see whether they are DICOM" in warning
    assert "if they are, make them readable" in warning and "next run" not in warning, warning


def test_a_model_this_account_cannot_read_fails_before_any_work(tmp_path: Path) -> None:
    """A model saved by another account with owner-only weights: exit 2 naming the file and the fix,
    before the source is listed or anything is written."""
    from flows.demo import build_tiny_model

    model = Path(build_tiny_model(str(tmp_path / "model"), seed=1))
    weights = model / "model.safetensors"
    make_image(tmp_path / "scans" / "a.jpg", seed=1)
    command = as_an_ordinary_user(
        [sys.executable, "-m", "flows.cli", "classify", str(tmp_path / "scans"), "-o", str(tmp_path / "out")]
        + ["--model", str(model), "--device", "cpu"]
    )
    if command is None:
        pytest.skip("running as root without setpriv: every file is readable")
    if os.geteuid() == 0:
        os.chown(weights, 12345, 12345)  # another account's file, owner-only
    weights.chmod(0o600 if os.geteuid() == 0 else 0o000)
    root = Path(__file__).resolve().parents[1]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=root, env=environment)
    text = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 2, text
    assert "this account cannot read model.safetensors" in text and "chmod a+r" in text, text
    assert not (tmp_path / "out").exists()
