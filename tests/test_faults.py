"""Faults: flaky storage is retried per file, a full disk or a lost output fails the run cleanly, a re-run
after the fix completes exactly once, and --max-error-rate fails a finished run."""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from fsspec.implementations.local import LocalFileSystem
from typer.testing import CliRunner

from flows.classify import TooManyErrors, classify
from flows.cli import TOO_MANY_ERRORS_EXIT, app
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import RETRY_ATTEMPTS, list_images, open_location
from tests import corpus


class FlakyFileSystem(LocalFileSystem):
    """The real local filesystem, except that opening chosen files fails a set number of times.

    Disks and object stores cannot be made to fail on cue in a test; this injects the fault at the
    fsspec boundary, where a real backend's error would surface.
    """

    cachable = False

    def __init__(self, failures: dict[str, tuple[int, Exception]]) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: Counter[str] = Counter()

    def _open(self, path, mode="rb", **kwargs):  # type: ignore[no-untyped-def]
        self.attempts[path] += 1
        times, error = self.failures.get(path, (0, None))
        if error is not None and self.attempts[path] <= times:
            raise error
        return super()._open(path, mode, **kwargs)


def scans(folder: Path, count: int) -> Path:
    corpus.write_files(
        folder, {f"scan{n}.png": corpus.encode(corpus.random_rgb((24, 24), n), "PNG") for n in range(count)}
    )
    return folder


def read_rows(output: Path) -> list[dict]:
    return ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()


def leftovers(output: Path) -> list[Path]:
    return [p for p in output.rglob("*") if p.is_file() and p.name.startswith(".")]


def test_storage_errors_are_retried_per_file_and_the_shard_is_kept(tmp_path: Path, tiny_model: str) -> None:
    folder = scans(tmp_path / "scans", 5)
    files = list(list_images(open_location(str(folder))))
    hiccup, dead, denied = files[1].path, files[2].path, files[3].path
    fs = FlakyFileSystem(
        {
            hiccup: (1, OSError(errno.EIO, "Input/output error")),
            dead: (99, OSError(errno.EIO, "Input/output error")),
            denied: (99, PermissionError(errno.EACCES, "Permission denied")),
        }
    )
    model = load_model(tiny_model, device="cpu", precision="fp32")
    rows = classify_files(files, fs, model, EngineOptions(batch_size=2), "r", "s").to_pylist()

    assert [r["status"] for r in rows] == ["ok", "ok", "error", "error", "ok"]
    assert fs.attempts[hiccup] == 2, "a transient error is retried"
    assert fs.attempts[dead] == RETRY_ATTEMPTS, "retried, then the file becomes an error row"
    assert fs.attempts[denied] == 1, "a permission problem is not transient"
    assert rows[2]["error"].startswith("read_failed: OSError")
    assert rows[3]["error"].startswith("read_failed: PermissionError")
    assert rows[3]["error"].endswith("once it is readable, `touch` it and the next run classifies it")


def test_a_lasting_outage_fails_the_shard_instead_of_writing_final_error_rows(
    tmp_path: Path, tiny_model: str
) -> None:
    """Error rows are final; a connection that stays down must fail the shard (Prefect retries it)."""
    files = list(list_images(open_location(str(scans(tmp_path / "scans", 2)))))
    fs = FlakyFileSystem({files[0].path: (99, ConnectionError("connection reset by peer"))})
    model = load_model(tiny_model, device="cpu", precision="fp32")
    with pytest.raises(ConnectionError):
        classify_files(files, fs, model, EngineOptions(batch_size=2), "r", "s")
    assert fs.attempts[files[0].path] == RETRY_ATTEMPTS


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs, so that 'disk full' is the kernel's ENOSPC (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()}); needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_full_disk_fails_cleanly_and_a_rerun_completes_once(
    tmp_path: Path, small_disk: Path, tiny_model: str
) -> None:
    folder = scans(tmp_path / "scans", 6)
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 60 * 1024)  # leaves less room than one shard file needs
    output = small_disk / "preds"
    result = CliRunner().invoke(
        app,
        [
            "classify",
            str(folder),
            "-o",
            str(output),
            "--model",
            tiny_model,
            "--device",
            "cpu",
            "--shard-size",
            "2",
        ],
    )
    assert result.exit_code == 1, result.output
    text = " ".join(result.output.split())
    assert "output device is full" in text and str(output) in text and "run again" in text
    assert not leftovers(output)
    kept = len(read_rows(output)) if list(output.rglob("*.parquet")) else 0  # whole shards written before

    filler.unlink()  # the fix
    summary = classify(str(folder), str(output), model=tiny_model, device="cpu", shard_size=2)
    assert summary["images_classified"] == 6 - kept
    rows = read_rows(output)
    assert len(rows) == 6 and len({r["image_uri"] for r in rows}) == 6
    assert not leftovers(output)


@pytest.mark.slow
def test_lost_output_location_fails_cleanly_and_a_rerun_completes_once(
    tmp_path: Path, tiny_model: str
) -> None:
    folder = scans(tmp_path / "scans", 3)
    blocker = tmp_path / "mnt"
    blocker.write_text("an unmounted share leaves a file where the folder was")
    output = blocker / "preds"
    with pytest.raises(OSError) as raised:
        classify(str(folder), str(output), model=tiny_model, device="cpu")
    message = str(raised.value)
    assert f"({blocker}); a file stands where a folder of the output must be" in message, message
    assert list(tmp_path.rglob("*.parquet")) == []

    blocker.unlink()
    blocker.mkdir()
    assert classify(str(folder), str(output), model=tiny_model, device="cpu")["images_classified"] == 3
    assert classify(str(folder), str(output), model=tiny_model, device="cpu")["images_classified"] == 0
    assert len(read_rows(output)) == 3 and not leftovers(output)


def mixed_folder(folder: Path) -> Path:
    scans(folder, 2)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not a scan")
    return folder


@pytest.mark.slow
def test_max_error_rate_fails_after_writing_every_row(tmp_path: Path, tiny_model: str) -> None:
    folder = mixed_folder(tmp_path / "scans")
    with pytest.raises(TooManyErrors) as raised:
        classify(str(folder), str(tmp_path / "a"), model=tiny_model, device="cpu", max_error_rate=0.25)
    assert "2 of 4 images failed" in str(raised.value) and "--max-error-rate 0.25" in str(raised.value)
    assert raised.value.summary["errors_by_category"] == {"empty": 1, "not_an_image": 1}
    assert len(read_rows(tmp_path / "a")) == 4, "every row is written before the run fails"

    summary = classify(str(folder), str(tmp_path / "b"), model=tiny_model, device="cpu", max_error_rate=0.5)
    assert summary["error_share"] == 0.5 and summary["errors"] == 2

    result = CliRunner().invoke(
        app,
        ["classify", str(folder), "-o", str(tmp_path / "c"), "--model", tiny_model, "--device", "cpu"]
        + ["--max-error-rate", "0.1"],
    )
    assert result.exit_code == TOO_MANY_ERRORS_EXIT
    assert "--max-error-rate" in result.output and "errors: empty" in result.output


def test_dicom_objects_without_images_keep_their_row_but_are_no_failed_images(
    tmp_path: Path, tiny_model: str
) -> None:
    """A PACS export mixes structured reports in with the images, named .dcm like them: each gets its
    not_an_image row (so it is not read again each night), and --max-error-rate leaves them out."""
    import pydicom

    from tests import corpus

    folder = scans(tmp_path / "scans", 2)
    report = pydicom.dcmread(io.BytesIO(corpus.dicom_report(corpus.make_dicom(corpus.dicom_ramp()))))
    for keyword in ("PixelData", "Rows", "Columns"):  # a real structured report holds text, not pixels
        delattr(report, keyword)
    report.save_as(folder / "sr.dcm", enforce_file_format=True)
    (folder / "broken.jpg").write_bytes(b"")
    run = ["classify", str(folder), "-o", str(tmp_path / "out"), "--model", tiny_model, "--device", "cpu"]

    result = CliRunner().invoke(app, [*run, "--max-error-rate", "0.34"])
    assert result.exit_code == 0, result.output  # 1 of 3 images failed; 2 of 4 rows are errors
    assert re.search(r"of which DICOM without images +│ +1 │", result.output), result.output
    rows = {Path(r["image_uri"]).name: r["error"] for r in read_rows(tmp_path / "out")}
    assert rows["sr.dcm"] == "not_an_image: a DICOM object without pixel data (a report or similar)"

    (folder / "broken2.jpg").write_bytes(b"")
    run[3] = str(tmp_path / "out2")
    failed = CliRunner().invoke(app, [*run, "--max-error-rate", "0.34"])
    text = " ".join(failed.output.split())
    assert failed.exit_code == TOO_MANY_ERRORS_EXIT, text
    assert "2 of 4 images failed (50.0%, not counting 1 DICOM objects without images)" in text, text


def test_max_error_rate_compares_the_counts_not_the_rounded_share() -> None:
    """error_share is rounded to 4 places for reading: 1 error in 20,002 images shows as 0.0 but is
    over --max-error-rate 0; 29 in 100 is exactly 0.29, not over it."""
    from flows.classify import check_error_rate

    def summary(errors: int, classified: int) -> dict:
        share = round(errors / classified, 4) if classified else 0.0
        return {
            "errors": errors,
            "images_classified": classified,
            "error_share": share,
            "errors_by_category": {},
        }

    with pytest.raises(TooManyErrors):
        check_error_rate(summary(1, 20_002), 0.0)
    with pytest.raises(TooManyErrors):
        check_error_rate(summary(50_040, 1_000_000), 0.05)
    check_error_rate(summary(29, 100), 0.29)
    check_error_rate(summary(0, 0), 0.0)


def test_bad_max_error_rate_is_rejected_before_any_work(tmp_path: Path, image_folder: Path) -> None:
    output = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["classify", str(image_folder), "-o", str(output), "--max-error-rate", "1.5"]
    )
    assert result.exit_code == 2 and "--max-error-rate" in result.output
    with pytest.raises(ValueError, match="invalid parameter max_error_rate"):
        classify(str(image_folder), str(output), model="unused/model", max_error_rate=-0.1)
    assert not output.exists()


@pytest.mark.slow
def test_a_failed_shard_keeps_the_lease_until_the_shards_in_flight_have_written(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lease is released only after every submitted shard is done: a run waiting for it must not
    list the output while shards of the failed run still write (they would be classified twice)."""
    import flows.classify
    from tests.test_exactly_once import lease_held

    folder = scans(tmp_path / "scans", 6)
    output = tmp_path / "preds"
    failed = threading.Event()
    lease_while_writing: list[bool] = []
    real = flows.classify.classify_files

    def classify_files_with_a_full_disk(files, fs, model, options, run_id, shard, unrecorded):  # type: ignore[no-untyped-def]
        if any(f.path.endswith("scan0.png") for f in files):
            failed.set()
            raise OSError(errno.ENOSPC, "No space left on device")
        failed.wait(timeout=30)
        time.sleep(1.5)  # the flow has long seen the failure by now
        lease_while_writing.append(lease_held(output))
        return real(files, fs, model, options, run_id, shard, unrecorded)

    monkeypatch.setattr(flows.classify, "classify_files", classify_files_with_a_full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        classify(str(folder), str(output), model=tiny_model, device="cpu", shard_size=2)
    assert lease_while_writing == [True, True]
    assert not lease_held(output)
    assert len(read_rows(output)) == 4  # the other two shards were written, under the lease


def test_a_lost_lease_stops_the_run_before_the_next_shard(tmp_path: Path, tiny_model: str) -> None:
    from flows.classify import run_shards
    from flows.params import ClassifyParams
    from tasks.lease import LeaseLost, acquire

    folder = scans(tmp_path / "scans", 2)
    files = list(list_images(open_location(str(folder))))
    params = ClassifyParams(
        source=str(folder), output=str(tmp_path / "preds"), model=tiny_model, device="cpu"
    )
    with acquire(open_location(str(tmp_path / "preds")), "m", "run-a", wait_seconds=0) as lease:
        lease.lost = "lease could not be renewed (connection refused); another run may take it over"
        with pytest.raises(LeaseLost, match="could not be renewed"):
            run_shards([files[:1], files[1:]], params, "run-a", lease=lease)
    assert not list((tmp_path / "preds").rglob("*.parquet"))


def test_shards_go_to_the_date_partition_of_the_day_the_run_started(tmp_path: Path, tiny_model: str) -> None:
    """A run that waits for the lease past midnight still writes under the day it started on."""
    from datetime import UTC, datetime

    from prefect import flow

    from flows.classify import run_shards
    from flows.params import ClassifyParams

    folder = scans(tmp_path / "scans", 2)
    files = list(list_images(open_location(str(folder))))
    params = ClassifyParams(
        source=str(folder), output=str(tmp_path / "preds"), model=tiny_model, device="cpu"
    )
    started = datetime(2026, 11, 27, 23, 59, 30, tzinfo=UTC)

    @flow
    def shards_after_midnight() -> None:
        run_shards([files[:1], files[1:]], params, "run-a", day=started)

    shards_after_midnight()
    assert {path.parent.name for path in (tmp_path / "preds").rglob("*.parquet")} == {"date=2026-11-27"}


def test_a_model_folder_saved_again_during_a_run_does_not_change_the_runs_rows(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New weights copied over the folder mid-run: the run's lease and index are its first revision's,
    and so are all its rows (it keeps the weights it loaded). A worker that must load the model itself
    and finds other weights fails the shard before it writes."""
    import shutil

    import flows.classify
    from flows.demo import build_tiny_model
    from flows.params import ClassifyParams
    from tasks.model import ModelError, clear_model_cache, load_model

    folder, output, model = scans(tmp_path / "scans", 6), tmp_path / "preds", tmp_path / "model"
    shutil.copytree(tiny_model, model)
    replacement = build_tiny_model(str(tmp_path / "replacement"), seed=5)
    started = load_model(str(model), device="cpu").revision
    swapped = threading.Lock()
    real = flows.classify.classify_files

    def classify_files_then_save_the_model_again(*args):  # type: ignore[no-untyped-def]
        rows = real(*args)
        if swapped.acquire(blocking=False):
            for name in ("model.safetensors", "config.json"):
                shutil.copy(Path(replacement) / name, model / name)
        return rows

    monkeypatch.setattr(flows.classify, "classify_files", classify_files_then_save_the_model_again)
    summary = classify(str(folder), str(output), model=str(model), device="cpu", shard_size=2)
    written = read_rows(output)
    assert summary["model_revision"] == started and summary["images_classified"] == 6
    assert len(written) == 6 and {row["model_revision"] for row in written} == {started}

    monkeypatch.setattr(flows.classify, "classify_files", real)
    params = ClassifyParams(
        source=str(folder), output=str(tmp_path / "other"), model=str(model), device="cpu"
    )
    files = list(list_images(open_location(str(folder))))
    clear_model_cache()  # as on a worker, which has not loaded the run's weights: they are gone
    with pytest.raises(ModelError, match="changed during the run"):
        flows.classify.classify_shard.fn(0, files[:2], params, "run", datetime.now(UTC), revision=started)
    assert not (tmp_path / "other").exists()


STOP_WHILE_WAITING = """
import signal, sys, threading, time
from pathlib import Path
from prefect import flow
import flows.classify
from flows.params import ClassifyParams
from tasks.storage import list_images, open_location

folder, output, model = sys.argv[1:4]
files = list(list_images(open_location(folder)))
params = ClassifyParams(source=folder, output=output, model=model, device="cpu", batch_size=1)
main, fired = threading.get_ident(), threading.Event()
real = flows.classify.classify_files


def waiting_for_a_shard() -> bool:
    frame = sys._current_frames().get(main)
    while frame is not None and frame.f_code.co_name != "oldest_result":
        frame = frame.f_back
    return frame is not None


def stopped_while_the_flow_waits(*args):
    if not fired.is_set():
        fired.set()
        deadline = time.monotonic() + 30
        while not waiting_for_a_shard() and time.monotonic() < deadline:
            time.sleep(0.01)
        signal.pthread_kill(main, signal.SIGINT)  # Ctrl-C while the flow waits for this shard's result
        time.sleep(1)  # however loaded the machine, the stop is under way before the first batch
    return real(*args)


flows.classify.classify_files = stopped_while_the_flow_waits


@flow
def one_shard() -> None:
    flows.classify.run_shards([files], params, "run-stopped", slots=1)


try:
    one_shard()
except KeyboardInterrupt:
    print("stopped")
time.sleep(3)  # a shard left running would write its file by now
print(len(list(Path(output).rglob("*.parquet"))), "files")
"""


def test_a_stop_while_waiting_for_a_shard_ends_it_unwritten_before_returning(
    tmp_path: Path, tiny_model: str, prefect_server: str
) -> None:
    """Ctrl-C lands while the flow waits for a shard's result: that shard must still be stopped and
    waited for (it was taken off the window before its result came: it ran on and wrote after the
    lease was released). In a process of its own: a signal to a test runner's worker is not a user's."""
    folder, output = scans(tmp_path / "scans", 30), tmp_path / "preds"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", STOP_WHILE_WAITING, str(folder), str(output), tiny_model],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root), "PREFECT_API_URL": prefect_server},
    )
    assert done.stdout.split()[-3:] == ["stopped", "0", "files"], done.stdout[-2000:] + done.stderr[-3000:]


SAVE_OVER_A_LOADED_MODEL = """
import sys
from pathlib import Path
import torch
from tasks.model import load_model
model = load_model(sys.argv[1], device="cpu", precision="fp32")
with open(Path(sys.argv[1]) / "model.safetensors", "wb") as handle:  # `cp new.safetensors ...` truncates it
    handle.write(b"new weights, being copied")
size = model.processor_config["size"]["height"]
with torch.inference_mode():
    print(model.network(pixel_values=torch.zeros(1, 3, size, size)).logits.shape[-1])
"""


def test_weights_copied_over_a_loaded_model_do_not_crash_the_process(tmp_path: Path, tiny_model: str) -> None:
    """safetensors maps the weights file, and an fp32 model on the CPU kept those pages: a copy over the
    file during a run ended the process with SIGBUS (exit 135) at the next batch."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", SAVE_OVER_A_LOADED_MODEL, str(model)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0 and done.stdout.strip() == "2", (done.returncode, done.stderr[-2000:])
