"""tasks.workers: the worker processes that take host decoding (a split batch's host share, and the
exact `--decode cpu` path beside a GPU) off the engine's GIL."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import BrokenExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tasks import inference, workers
from tasks.images import Preprocessor, decode_image, host_resize_chunk
from tasks.inference import EngineOptions, classify_files
from tasks.model import load_model
from tasks.storage import DiscoveredFile, list_images, open_location
from tasks.workers import DecodeWorkers, decode_reply, encode_call, receive, send, worker_process
from tests.corpus import (
    animated_gif,
    bad_files,
    exif_rotated_jpeg,
    multipage_tiff,
    sixteen_bit_png,
    write_files,
)

HOST = Preprocessor(64, 48, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))


def jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (90, 130, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def as_item(data: bytes) -> np.ndarray:
    return np.frombuffer(bytearray(data), np.uint8)  # how the reader threads hand JPEG bytes over


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def test_workers_give_pils_pixels_and_error_texts_from_lean_processes() -> None:
    pool = DecodeWorkers(2)
    try:
        data = [jpeg(seed) for seed in range(3)]
        items = [as_item(d) for d in [*data, data[0][:200], b"not an image at all"]]
        results = pool.submit(host_resize_chunk, HOST, items, 10**6).result(timeout=60)
        for got, source in zip(results[:3], data, strict=True):
            assert isinstance(got, tuple)
            pixels, width, height = got
            assert pixels.shape == (64, 48, 3) and (width, height) == (130, 90), "the source's own size"
            assert np.array_equal(pixels, np.asarray(HOST.resize(decode_image(source))))  # PIL's own pixels
        assert isinstance(results[3], str) and results[3].startswith("truncated:")
        assert isinstance(results[4], str) and results[4].startswith("not_an_image:")
        assert pool.submit(host_resize_chunk, HOST, [], 10**6).result(timeout=60) == []
        too_small = pool.submit(host_resize_chunk, HOST, items[:1], 100).result(timeout=60)
        assert isinstance(too_small[0], str) and too_small[0].startswith("too_large:")
        assert os.getpid() not in pool.pids
        # A worker holds numpy and Pillow, not the engine's torch or Prefect (those alone are 300+ MB).
        assert all(resident_mb(pid) < 120 for pid in pool.pids)
        with pytest.raises(TypeError, match="host_resize_chunk"):
            pool.submit(os.getpid)
        # Arguments the protocol cannot carry fail their own call; the workers go on.
        odd = Preprocessor(64, 48, 2, 1 / 255, (np.float32(0.5),) * 3, (0.5,) * 3)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="JSON serializable"):
            pool.submit(host_resize_chunk, odd, items[:1], 10**6).result(timeout=60)
        assert isinstance(pool.submit(host_resize_chunk, HOST, items[:1], 10**6).result(timeout=60)[0], tuple)
    finally:
        pool.shutdown()
    assert all(process.poll() is not None for process in pool._processes), "shutdown ends the workers"
    with pytest.raises(RuntimeError, match="after shutdown"):
        pool.submit(host_resize_chunk, HOST, [], 10**6)


def test_a_worker_killed_breaks_the_pool_like_a_process_pool() -> None:
    pool = DecodeWorkers(2)
    items = [as_item(jpeg(1))]
    try:
        pool.submit(host_resize_chunk, HOST, items, 10**6).result(timeout=60)
        os.kill(pool.pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 60
        with pytest.raises(BrokenExecutor, match="ended abruptly"):
            while time.monotonic() < deadline:  # calls fail once one reaches the dead worker
                pool.submit(host_resize_chunk, HOST, items, 10**6).result(timeout=60)
        with pytest.raises(BrokenExecutor):
            pool.submit(host_resize_chunk, HOST, items, 10**6)
    finally:
        pool.shutdown()
    assert all(process.poll() is not None for process in pool._processes), "the survivor was stopped too"


def test_a_malformed_call_fails_alone_and_the_worker_goes_on() -> None:
    worker = worker_process()
    assert worker.stdin is not None and worker.stdout is not None
    try:
        send(worker.stdin, b"{not json", b"")
        header, body = receive(worker.stdout), receive(worker.stdout)
        assert header is not None and body is not None
        with pytest.raises(RuntimeError, match="decode worker failed: JSONDecodeError"):
            decode_reply(header, body)
        item = as_item(jpeg(2))
        send(worker.stdin, *encode_call({"preprocessor": HOST, "items": [item], "max_pixels": 10**6}))
        header, body = receive(worker.stdout), receive(worker.stdout)
        assert header is not None and body is not None
        ((pixels, width, height),) = decode_reply(header, body)
        assert np.array_equal(pixels, host_resize_chunk(HOST, [item], 10**6)[0][0])
        assert (width, height) == (130, 90)
    finally:
        worker.stdin.close()
        assert worker.wait(timeout=30) == 0, "a worker ends when its input does"


def test_workers_import_this_package_whatever_the_working_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine started in a folder that has its own `tasks` package still gets working workers."""
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('the wrong tasks package')\n")
    monkeypatch.chdir(tmp_path)
    pool = DecodeWorkers(1)
    try:
        ((pixels, _, _),) = pool.submit(host_resize_chunk, HOST, [as_item(jpeg(3))], 10**6).result(timeout=60)
        assert isinstance(pixels, np.ndarray) and pixels.shape == (64, 48, 3)
    finally:
        pool.shutdown()


def rows_without_time(table: object) -> list[dict[str, object]]:
    return [{k: v for k, v in row.items() if k != "processed_at"} for row in table.to_pylist()]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("exif", "chunk_bytes"), [(False, None), (True, None), (False, 1)])
def test_exact_path_decoded_in_workers_gives_the_very_same_rows(
    image_folder: Path, tiny_model: str, exif: bool, chunk_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--decode cpu` beside a GPU decodes in worker processes: every row, error texts and
    probabilities included, equals the one the reader threads make (here forced on, on the CPU).
    chunk_bytes=1: each file of a run goes to the workers in a call of its own."""
    monkeypatch.setattr(inference, "_split_pools", {})  # this test's own workers
    if chunk_bytes is not None:
        monkeypatch.setattr(inference, "EXACT_CHUNK_BYTES", chunk_bytes)
    write_files(image_folder / "bad", {name: data for name, (data, _) in bad_files().items()})
    write_files(image_folder / "more", {"rotated.jpg": exif_rotated_jpeg(), "multi.tif": multipage_tiff()})
    write_files(image_folder / "more", {"deep.png": sixteen_bit_png()[0], "moving.gif": animated_gif()})
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location))
    options = EngineOptions(batch_size=4, decode="cpu", exif_orientation=exif)
    threads = classify_files(files, location.fs, model, options, "r", "s")
    in_workers = replace(options, decode_cpu_in_processes=True)

    def not_in_this_process(*args: object) -> None:
        raise AssertionError("a file was decoded in the engine's process")

    monkeypatch.setattr(inference, "decode_prepared", not_in_this_process)
    processes = classify_files(files, location.fs, model, in_workers, "r", "s")
    assert rows_without_time(processes) == rows_without_time(threads)
    assert len(files) == 25 and threads.column("status").to_pylist().count("error") == 13


def counted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files decoded in the engine's own process from now on (inference.decode_prepared calls)."""
    calls: list[str] = []
    original = inference.decode_prepared

    def counting(file: DiscoveredFile, *args: Any) -> Any:
        calls.append(file.path)
        return original(file, *args)

    monkeypatch.setattr(inference, "decode_prepared", counting)
    return calls


def engine_runs(image_folder: Path, tiny_model: str) -> tuple[Callable[[bool], list[dict[str, object]]], int]:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location)) * 4
    options = EngineOptions(batch_size=4, decode="cpu", decode_workers=2)

    def run(in_processes: bool) -> list[dict[str, object]]:
        chosen = replace(options, decode_cpu_in_processes=in_processes)
        return rows_without_time(classify_files(files, location.fs, model, chosen, "r", "s"))

    return run, len(files)


def test_exact_path_workers_that_die_change_no_row(
    image_folder: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers killed before the run: the calls that find them dead are decoded in the reader threads
    (one run of files each, two threads), a new pool takes the rest; the rows are the same."""
    monkeypatch.setattr(inference, "_split_pools", {})
    run, images = engine_runs(image_folder, tiny_model)
    threads = run(False)
    pool = inference.split_pool(2, "processes")
    assert isinstance(pool, DecodeWorkers)
    for pid in pool.pids:
        os.kill(pid, signal.SIGKILL)
    in_threads = counted(monkeypatch)
    assert run(True) == threads
    assert 1 <= len(in_threads) <= 6 < images, "only the calls that met the dead pool"
    assert inference.split_pool(2, "processes") is not pool, "the broken pool was replaced"


def test_exact_path_gives_up_workers_that_keep_dying_or_cannot_start(
    image_folder: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, images = engine_runs(image_folder, tiny_model)
    threads = run(False)
    # Workers that exit at once: every call fails; after MAX_POOL_RENEWALS new pools, threads only.
    monkeypatch.setattr(inference, "_split_pools", {})
    started: list[int] = []

    def short_lived() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-c", "pass"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        started.append(process.pid)
        return process

    monkeypatch.setattr(workers, "worker_process", short_lived)
    in_threads = counted(monkeypatch)
    assert run(True) == threads
    assert len(in_threads) == images, "every file ended up decoded in a reader thread"
    assert len(started) == 2 * (1 + inference.MAX_POOL_RENEWALS), "two workers a pool, then no more"
    assert inference._split_pools == {}, "the last broken pool was retired, not left for the next shard"
    # Workers that cannot start at all (out of processes): threads from the start, same rows.
    monkeypatch.setattr(inference, "_split_pools", {})

    def refused() -> subprocess.Popen[bytes]:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(workers, "worker_process", refused)
    in_threads.clear()
    assert run(True) == threads and len(in_threads) == images
