"""The GPU-side preprocessing path (resize/normalize on the model's device), exercised on CPU tensors.

On a CUDA machine the same code runs on the GPU (and JPEGs decode with nvjpeg); here it runs on the CPU,
which checks its batching, error handling and agreement with the exact PIL path.
"""

from __future__ import annotations

import copy
import io
import os
import signal
import threading
import time
from concurrent.futures import BrokenExecutor, Executor, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from tasks import inference
from tasks.images import (
    FRAME_SCAN_LIMIT,
    SPLIT_STEP,
    DecodeSplit,
    DevicePreprocessor,
    ImageError,
    Preprocessor,
    decode_image,
    host_resize_chunk,
    jpeg_frame,
)
from tasks.inference import EngineOptions, classify_files, device_batches, host_workers, resolve_options
from tasks.model import ModelError, load_model, resolve_precision
from tasks.storage import DiscoveredFile, list_images, open_location
from tasks.workers import DecodeWorkers


# Levels of 255: bilinear matches PIL up to rounding; torch's bicubic kernel (a=-0.75) differs from
# PIL's (a=-0.5), which shows on these noise images' sharp edges.
@pytest.mark.parametrize(
    ("resample", "levels"), [(Image.Resampling.BILINEAR, 2), (Image.Resampling.BICUBIC, 16)]
)
def test_device_resize_agrees_with_pil(image_folder: Path, resample: int, levels: int) -> None:
    host = Preprocessor(224, 224, resample, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = DevicePreprocessor(host)
    paths = sorted(
        p
        for p in image_folder.rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".txt"
    )
    images = [decode_image(p.read_bytes()) for p in paths if ".cache" not in p.parts]
    pixels = [np.array(i) for i in images]
    batch, failures, decoders = device.batch(pixels, torch.device("cpu"), torch.float32)
    assert failures == {} and tuple(batch.shape) == (len(images), 3, 224, 224)
    assert decoders == ["pil+device_resize"] * len(images)
    for row, image in zip(batch, images, strict=True):
        difference = np.abs(row.numpy() - host(image)) * 0.5 * 255  # back to 8-bit levels (std 0.5)
        assert difference.max() <= levels + 1e-3 and difference.mean() < 1.0


def test_gpu_decode_mode_gives_the_same_labels(image_folder: Path, tiny_model: str) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location))
    exact = classify_files(files, location.fs, model, EngineOptions(batch_size=4), "r", "s").to_pylist()
    fast = classify_files(
        files, location.fs, model, EngineOptions(batch_size=4, decode="gpu"), "r", "s"
    ).to_pylist()
    assert [r["image_uri"] for r in exact] == [r["image_uri"] for r in fast]
    assert [r["label"] for r in exact] == [r["label"] for r in fast]
    assert (
        max(abs(a["prob_malignant"] - b["prob_malignant"]) for a, b in zip(exact, fast, strict=True)) < 1e-2
    )


def test_unsupported_resample_is_refused() -> None:
    with pytest.raises(ValueError, match="--decode cpu"):
        DevicePreprocessor(Preprocessor(224, 224, Image.Resampling.LANCZOS, 1 / 255, (0,) * 3, (1,) * 3))


def jpeg_bytes(mode: str, size: tuple[int, int] = (70, 46), **save: object) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, "JPEG", **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "save", "components", "for_nvjpeg"),
    [
        ("RGB", {}, 3, True),
        ("L", {}, 1, True),
        ("CMYK", {}, 4, False),
        ("RGB", {"progressive": True}, 3, True),
        ("RGB", {"exif": b"Exif\0\0" + b"\0" * 64}, 3, True),
    ],
)
def test_jpeg_frame_reads_size_and_components_like_pillow(
    mode: str, save: dict, components: int, for_nvjpeg: bool
) -> None:
    frame = jpeg_frame(jpeg_bytes(mode, **save))
    assert frame is not None and frame[:3] == (70, 46, components) and frame.precision == 8
    assert frame.for_nvjpeg is for_nvjpeg


def test_frames_nvjpeg_does_not_take_go_to_the_host_decoder() -> None:
    data = bytearray(jpeg_bytes("RGB"))
    sof = data.index(b"\xff\xc0")
    data[sof + 4] = 12  # a 12-bit frame
    frame = jpeg_frame(bytes(data))
    assert frame is not None and frame.precision == 12 and not frame.for_nvjpeg
    device = DevicePreprocessor(
        Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0,) * 3, (1,) * 3), nvjpeg=True
    )
    with pytest.raises(ImageError):  # decoded (and here refused) on the host, never handed to nvjpeg
        device.encode_or_decode(bytes(data), 10_000)
    padded = b"\xff\xd8" + b"\xff" * (FRAME_SCAN_LIMIT + 10) + bytes(data[sof:])
    assert jpeg_frame(padded) is None, "frame headers beyond the scan limit are left to the host"


@pytest.mark.parametrize(
    "data",
    [
        b"\xff\xd8\xff",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"\xff\xd8" + b"\x00" * 40,
        b"\xff\xd8\xff\xda\x00\x08" + b"\0" * 8,
    ],
)
def test_jpeg_frame_gives_none_for_damaged_headers(data: bytes) -> None:
    assert jpeg_frame(data) is None


def test_nvjpeg_host_side_passes_bytes_and_gives_the_host_categories() -> None:
    device = DevicePreprocessor(
        Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0,) * 3, (1,) * 3), nvjpeg=True
    )
    good = jpeg_bytes("RGB")
    pixels, width, height = device.encode_or_decode(good, 10_000)
    assert pixels.ndim == 1 and pixels.tobytes() == good and (width, height) == (70, 46)
    cmyk_pixels, _, _ = device.encode_or_decode(jpeg_bytes("CMYK"), 10_000)
    assert cmyk_pixels.shape == (46, 70, 3), "CMYK JPEGs are decoded on the host"
    with pytest.raises(ImageError, match="too_large"):
        device.encode_or_decode(good, 1000)
    with pytest.raises(ImageError, match="truncated"):
        device.encode_or_decode(good[:30], 10_000)


def rows_without_time(table: pa.Table) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "processed_at"} for row in table.to_pylist()]


def test_overlapped_feeder_gives_the_same_rows_as_running_in_turn(
    image_folder: Path, tiny_model: str
) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location)) * 3
    tables = [
        classify_files(
            files,
            location.fs,
            model,
            EngineOptions(batch_size=4, decode=decode, overlap=overlap, launch_ahead=ahead),
            "r",
            "s",
        )
        for decode in ("cpu", "gpu")
        for overlap, ahead in ((True, True), (False, False))
    ]
    assert rows_without_time(tables[0]) == rows_without_time(tables[1])
    assert rows_without_time(tables[2]) == rows_without_time(tables[3])
    assert tables[0].num_rows == len(files)


def test_feeder_thread_ends_when_the_consumer_stops_early(image_folder: Path, tiny_model: str) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location)) * 20
    options = resolve_options(EngineOptions(batch_size=2), model)
    batches = device_batches(files, location.fs, model.preprocess, model, options)
    first = next(batches)
    assert len(first.items) == 2
    batches.close()
    assert not [t for t in threading.enumerate() if t.name == "oncoflow-feeder"]


def test_auto_options_follow_the_device(tiny_model: str, tiny_model_imagenet: str) -> None:
    cpu = load_model(tiny_model, device="cpu", precision="fp32")
    on_cpu = resolve_options(EngineOptions(), cpu)
    assert (on_cpu.batch_size, on_cpu.decode) == (32, "cpu")
    on_gpu = resolve_options(EngineOptions(), replace(cpu, device=torch.device("cuda")))
    assert (on_gpu.batch_size, on_gpu.decode) == (256, "gpu")
    chosen = resolve_options(
        EngineOptions(batch_size=64, decode="cpu"), replace(cpu, device=torch.device("cuda"))
    )
    assert (chosen.batch_size, chosen.decode) == (64, "cpu")
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


@pytest.mark.parametrize("launch_ahead", [None, True])
def test_non_finite_scores_fail_with_the_precision_to_use(
    image_folder: Path, tiny_model: str, launch_ahead: bool | None
) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    broken = copy.deepcopy(model.network)
    with torch.no_grad():
        broken.classifier.weight.fill_(float("inf"))
    location = open_location(str(image_folder))
    with pytest.raises(ModelError, match="--precision fp32"):
        classify_files(
            list(list_images(location)),
            location.fs,
            replace(model, network=broken),
            EngineOptions(batch_size=2, launch_ahead=launch_ahead),
            "r",
            "s",
        )


def test_reader_threads_shrink_only_for_local_jpegs_bound_for_nvjpeg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inference, "usable_cores", lambda: 32)
    device = DevicePreprocessor(
        Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0,) * 3, (1,) * 3), nvjpeg=True
    )
    jpegs = [DiscoveredFile(f"file:///data/{n}.jpg", f"/data/{n}.jpg", "1:1", 1) for n in range(10)]
    pngs = [DiscoveredFile(f"file:///data/{n}.png", f"/data/{n}.png", "1:1", 1) for n in range(10)]
    local = LocalFileSystem()
    assert host_workers(jpegs, device, local, exif=False) == 4
    assert host_workers(pngs, device, local, exif=False) == 16, "PNGs are decoded on the host"
    assert host_workers(jpegs, device, local, exif=True) == 16, "EXIF rotation decodes on the host"
    assert host_workers(jpegs, DevicePreprocessor(device.host), local, exif=False) == 16


def noise_jpeg(seed: int, size: tuple[int, int] = (120, 80)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("kind", ["processes", "threads"])
def test_host_share_of_a_split_batch_gives_the_reference_pixels_and_error_categories(kind: str) -> None:
    host = Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    device = DevicePreprocessor(host, nvjpeg=True)
    jpegs = [noise_jpeg(seed) for seed in range(5)]
    broken = jpegs[0][: len(jpegs[0]) // 2]  # header intact, scan cut: only decoding finds out
    png_bytes = _png(9)
    png = np.array(decode_image(png_bytes))
    items = [device.encode_or_decode(data, 10**6)[0] for data in [*jpegs, broken]] + [png]
    assert all(item.ndim == 1 for item in items[:6]), "JPEGs arrive as bytes, as they do for nvjpeg"
    split = DecodeSplit(inference.split_pool(2, kind), share=1.0, workers=2)
    batch, failures, decoders = device.batch(items, torch.device("cpu"), torch.float32, split)
    assert list(failures) == [5] and failures[5].startswith("truncated:")
    assert tuple(batch.shape) == (6, 3, 224, 224)
    for row, data in zip(batch[:5], jpegs, strict=True):
        np.testing.assert_allclose(row.numpy(), host(decode_image(data)), atol=1e-5)  # the reference's
    # The PNG came decoded and was resized on the device: within 2 of 255 levels (std >= 0.2).
    np.testing.assert_allclose(batch[5].numpy(), host(decode_image(png_bytes)), atol=2 / 255 / 0.2 + 1e-5)
    assert (split.on_host, split.on_device) == (6, 0)
    assert decoders == ["pil"] * 5 + ["pil+device_resize"], (
        "host share: PIL's own pixels; the PNG: resized here"
    )


def jpegs_for_a_split(
    count: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[Preprocessor, DevicePreprocessor, list[bytes], list[np.ndarray]]:
    """`count` JPEGs as the reader threads hand them to a split batch, with PIL standing in for nvjpeg."""
    monkeypatch.setattr(DevicePreprocessor, "_decode_jpegs", staticmethod(pil_stand_in_for_nvjpeg))
    host = Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0.5,) * 3, (0.25,) * 3)
    device = DevicePreprocessor(host, nvjpeg=True)
    jpegs = [noise_jpeg(seed) for seed in range(count)]
    return host, device, jpegs, [device.encode_or_decode(data, 10**6)[0] for data in jpegs]


def test_a_host_decode_worker_that_dies_loses_no_image_and_the_pool_is_renewed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A worker process killed mid-run (out of memory, a decoder crash) breaks its pool: the chunk that
    pool refused is decoded by nvjpeg in the same batch, and the next chunk goes to a new pool."""
    host, device, jpegs, items = jpegs_for_a_split(6, monkeypatch)
    pool = inference.split_pool(2, "processes")
    assert isinstance(pool, DecodeWorkers) and os.getpid() not in pool.pids
    os.kill(pool.pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 60
    with pytest.raises(BrokenExecutor):  # calls fail once one reaches the dead worker
        while time.monotonic() < deadline:
            pool.submit(host_resize_chunk, host, items[:1], 10**6).result(timeout=60)
    split = DecodeSplit(
        pool, share=0.5, workers=2, renew=lambda failed: inference.renewed_pool(failed, 2, "processes")
    )
    batch, failures, decoders = device.batch(items, torch.device("cpu"), torch.float32, split)
    assert failures == {} and tuple(batch.shape) == (6, 3, 224, 224)
    # nvjpeg's own half, then the host half's first chunk (refused by the dead pool, so nvjpeg's too),
    # then its second chunk, decoded by the renewed pool.
    assert decoders == ["nvjpeg+device_resize"] * 5 + ["pil"]
    assert split.lost_workers == 1 and (split.on_host, split.on_device) == (1, 5)
    assert split.pool is not pool and inference.split_pool(2, "processes") is split.pool
    for row, data in zip(batch, jpegs, strict=True):
        np.testing.assert_allclose(row.numpy(), host(decode_image(data)), atol=2 / 255 / 0.25 + 1e-5)


def test_workers_that_die_during_a_batch_cost_one_new_pool_and_no_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every chunk of a pool whose workers died fails; the split renews the pool once, not per chunk
    (a second renewal would shut down the healthy pool it just got), and nvjpeg decodes the chunks."""
    host, device, jpegs, items = jpegs_for_a_split(8, monkeypatch)
    pool = inference.split_pool(4, "processes")
    assert isinstance(pool, DecodeWorkers)
    for pid in pool.pids:  # dead before the batch, unnoticed until a call reaches them
        os.kill(pid, signal.SIGKILL)
    renewed: list[object] = []

    def renew(failed: Executor) -> Executor | None:
        renewed.append(failed)
        return inference.renewed_pool(failed, 4, "processes")

    split = DecodeSplit(pool, share=1.0, workers=4, renew=renew)
    batch, failures, decoders = device.batch(items, torch.device("cpu"), torch.float32, split)
    assert failures == {} and tuple(batch.shape) == (8, 3, 224, 224)
    assert decoders == ["nvjpeg+device_resize"] * 8, "the dead pool's chunks went to nvjpeg"
    assert renewed == [pool] and split.lost_workers == 1
    assert split.pool is inference.split_pool(4, "processes") and split.pool is not pool
    assert (split.on_host, split.on_device) == (0, 8)
    # The new pool works: the next batch's host share is decoded by it.
    batch, failures, decoders = device.batch(items, torch.device("cpu"), torch.float32, split)
    assert failures == {} and decoders == ["pil"] * 8
    for row, data in zip(batch, jpegs, strict=True):
        np.testing.assert_allclose(row.numpy(), host(decode_image(data)), atol=1e-5)


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def test_decode_split_moves_its_share_towards_whichever_side_has_time() -> None:
    with ThreadPoolExecutor(1) as pool:
        split = DecodeSplit(pool)
        assert split.share == 0.0 and split.count(256) == 0
        split.host_wait = 0.0  # the host part was done before nvjpeg: give the host more
        split.adjust(readers_behind=False, feeder_ahead=False)
        assert split.share == SPLIT_STEP and split.count(256) == 8
        split.host_wait = 0.01  # the feeder waited for the host while the model waited for the feeder
        split.adjust(readers_behind=False, feeder_ahead=False)
        assert split.share == 0.0
        split.adjust(readers_behind=False, feeder_ahead=True)  # the model is the limit: spare the GPU
        assert split.share == SPLIT_STEP
        split.host_wait = 0.0
        split.adjust(readers_behind=True, feeder_ahead=True)  # the cores cannot even keep up reading
        assert split.share == 0.0
        split.adjust(readers_behind=True, feeder_ahead=False)
        assert split.share == 0.0, "never below 0"
        for _ in range(100):
            split.adjust(readers_behind=False, feeder_ahead=True)
        assert split.share == 1.0 and split.count(256) == 256, "never above 1"
        fixed = DecodeSplit(pool, share=0.25)
        fixed.adjust(readers_behind=True, feeder_ahead=False)
        assert fixed.share == 0.25 and fixed.count(10) == 2
    assert DecodeSplit(None, share=0.5).count(256) == 0, "no threads, no host share"
    with pytest.raises(ValueError, match="between 0 and 1"):
        DecodeSplit(None, share=1.5)


def test_engine_with_the_host_decoding_every_jpeg_matches_the_exact_path(
    image_folder: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The nvjpeg engine path end to end on a CPU: torchvision's nvjpeg is not here, so the split takes
    every JPEG (share 1), which runs everything of that path except the nvjpeg call itself."""
    monkeypatch.setattr(inference, "nvjpeg_available", lambda device: True)
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    files = list(list_images(location)) * 3
    exact = classify_files(files, location.fs, model, EngineOptions(batch_size=4), "r", "s")
    split = classify_files(
        files,
        location.fs,
        model,
        EngineOptions(batch_size=4, decode="gpu", host_decode_share=1.0),
        "r",
        "s",
    )
    assert [r["image_uri"] for r in exact.to_pylist()] == [r["image_uri"] for r in split.to_pylist()]
    assert split.column("label").to_pylist() == exact.column("label").to_pylist()
    jpeg_rows = [
        (a["prob_malignant"], b["prob_malignant"])
        for a, b in zip(exact.to_pylist(), split.to_pylist(), strict=True)
        if a["image_uri"].endswith((".jpg", ".jpeg"))
    ]
    assert len(jpeg_rows) == 6 and max(abs(a - b) for a, b in jpeg_rows) < 1e-5
    assert inference.split_images["host"] >= 6, "the JPEGs were decoded by the split's host threads"


def pil_stand_in_for_nvjpeg(
    items: list[np.ndarray],
    indices: list[int],
    device: torch.device,
    failures: dict[int, str],
    decoders: dict[int, str],
) -> dict[int, torch.Tensor]:
    """What nvjpeg returns (uint8 (3, h, w) tensors, unresized), made with PIL: torchvision's nvjpeg cannot
    run on this machine, and these tests are about how a batch is split and put back together."""
    decoded = {}
    for i in indices:
        try:
            decoded[i] = torch.from_numpy(np.array(decode_image(items[i].tobytes()))).permute(2, 0, 1)
            decoders[i] = "nvjpeg+device_resize"
        except ImageError as exc:
            failures[i] = str(exc)
    return decoded


def test_a_batch_split_between_host_and_device_keeps_item_order_and_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(DevicePreprocessor, "_decode_jpegs", staticmethod(pil_stand_in_for_nvjpeg))
    host = Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    device = DevicePreprocessor(host, nvjpeg=True)
    jpegs = [noise_jpeg(seed, (120 + seed, 80)) for seed in range(8)]
    jpegs[2] = jpegs[2][: len(jpegs[2]) // 2]  # goes to the device side, fails there
    jpegs[7] = jpegs[7][: len(jpegs[7]) // 2]  # goes to the host side (the tail), fails there
    items = [device.encode_or_decode(data, 10**6)[0] for data in jpegs]
    with ThreadPoolExecutor(2) as pool:
        split = DecodeSplit(pool, share=0.5)
        batch, failures, decoders = device.batch(items, torch.device("cpu"), torch.float32, split)
    assert sorted(failures) == [2, 7] and all(f.startswith("truncated:") for f in failures.values())
    assert (split.on_host, split.on_device) == (4, 4)
    assert decoders == ["nvjpeg+device_resize"] * 3 + ["pil"] * 3
    good = [0, 1, 3, 4, 5, 6]
    assert tuple(batch.shape) == (6, 3, 224, 224)
    for row, index in zip(batch, good, strict=True):
        reference = host(decode_image(jpegs[index]))
        exact = index >= 4  # the host half: PIL's own resize; the device half within 2 levels
        np.testing.assert_allclose(row.numpy(), reference, atol=1e-5 if exact else 2 / 255 / 0.2 + 1e-5)


def test_the_decoder_column_says_how_each_row_was_made(
    image_folder: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(image_folder))
    (image_folder / "broken.jpg").write_bytes(noise_jpeg(1)[:300])
    files = list(list_images(location))

    def decoders(**options: object) -> dict[str, str | None]:
        table = classify_files(files, location.fs, model, EngineOptions(batch_size=4, **options), "r", "s")  # type: ignore[arg-type]
        return {row["image_uri"].rsplit("/", 1)[1]: row["decoder"] for row in table.to_pylist()}

    exact = decoders()
    assert exact.pop("broken.jpg") is None, "error rows have no decoder"
    assert set(exact.values()) == {"pil"}
    on_device = decoders(decode="gpu")
    assert on_device.pop("broken.jpg") is None and set(on_device.values()) == {"pil+device_resize"}
    monkeypatch.setattr(inference, "nvjpeg_available", lambda device: True)
    monkeypatch.setattr(DevicePreprocessor, "_decode_jpegs", staticmethod(pil_stand_in_for_nvjpeg))
    split = decoders(decode="gpu", host_decode_share=0.5, host_decode_workers=1)
    assert split.pop("broken.jpg") is None
    assert {split[name] for name in ("b.PNG", "c.png", "d.tif", "f.bmp")} == {"pil+device_resize"}
    assert {split["a.jpg"], split["e.jpeg"]} <= {"pil", "nvjpeg+device_resize"}


def test_the_adaptive_split_runs_both_sides_and_keeps_the_exact_labels(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The feeder's signals drive the share between batches; whichever way it moves on this machine,
    every row is there, in order, with the exact path's labels."""
    folder = tmp_path / "jpegs"
    folder.mkdir()
    for n in range(48):
        (folder / f"{n:03d}.jpg").write_bytes(noise_jpeg(n))
    monkeypatch.setattr(inference, "nvjpeg_available", lambda device: True)
    monkeypatch.setattr(DevicePreprocessor, "_decode_jpegs", staticmethod(pil_stand_in_for_nvjpeg))
    monkeypatch.setitem(inference.learned_split_share, "cpu", 0.5)  # this shard starts where the last ended
    inference.split_images.clear()
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(folder))
    files = list(list_images(location))
    exact = classify_files(files, location.fs, model, EngineOptions(batch_size=4), "r", "s")
    options = EngineOptions(batch_size=4, decode="gpu", host_decode_share=None, host_decode_workers=1)
    split = classify_files(files, location.fs, model, options, "r", "s")
    assert split.column("image_uri").to_pylist() == exact.column("image_uri").to_pylist()
    assert split.column("label").to_pylist() == exact.column("label").to_pylist()
    assert inference.split_images["host"] > 0 and inference.split_images["nvjpeg"] > 0
    assert inference.split_images.total() == 48
    assert 0.0 <= inference.learned_split_share["cpu"] <= 1.0


def test_a_batch_whose_host_share_all_fails_becomes_error_rows_not_a_failed_shard(
    tmp_path: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = Preprocessor(224, 224, Image.Resampling.BILINEAR, 1 / 255, (0,) * 3, (1,) * 3)
    broken = noise_jpeg(3)[:400]  # the frame header reads fine; the scan is cut
    device = DevicePreprocessor(host, nvjpeg=True)
    with ThreadPoolExecutor(1) as pool:
        batch, failures, decoders = device.batch(
            [device.encode_or_decode(broken, 10**6)[0]],
            torch.device("cpu"),
            torch.float32,
            DecodeSplit(pool, 1.0),
        )
    assert tuple(batch.shape) == (0, 3, 224, 224) and list(failures) == [0] and decoders == []

    folder = tmp_path / "scans"
    folder.mkdir()
    for n in range(4):
        (folder / f"{n}.jpg").write_bytes(noise_jpeg(n))
    (folder / "9.jpg").write_bytes(broken)  # alone in the last batch of 4
    monkeypatch.setattr(inference, "nvjpeg_available", lambda device: True)
    model = load_model(tiny_model, device="cpu", precision="fp32")
    location = open_location(str(folder))
    options = EngineOptions(batch_size=4, decode="gpu", host_decode_share=1.0)
    rows = classify_files(list(list_images(location)), location.fs, model, options, "r", "s").to_pylist()
    assert [row["status"] for row in rows] == ["ok"] * 4 + ["error"]
    last = rows[-1]
    assert last["error"].startswith("truncated:")
    assert (last["image_width"], last["image_height"], last["decoder"], last["label"]) == (None,) * 4


class StrictNvjpeg:
    """torchvision.io's decode_jpeg as nvjpeg behaves (PIL does the decoding, since torchvision's nvjpeg
    cannot run here): a list in, a list of uint8 (3, h, w) tensors out; a RuntimeError for the whole
    list when any image in it is rejected; the images it rejects named in `rejects`."""

    class ImageReadMode:
        RGB = "RGB"

    def __init__(self, rejects: set[bytes]) -> None:
        self.rejects, self.calls = rejects, []

    def decode_jpeg(self, data: torch.Tensor | list[torch.Tensor], mode: str, device: object) -> object:
        batch = data if isinstance(data, list) else [data]
        self.calls.append(len(batch))
        if any(item.numpy().tobytes() in self.rejects for item in batch):
            raise RuntimeError("nvjpegDecodeBatched failed")
        pixels = [np.array(decode_image(item.numpy().tobytes())) for item in batch]
        images = [torch.from_numpy(p).permute(2, 0, 1) for p in pixels]
        return images if isinstance(data, list) else images[0]


def test_a_batch_nvjpeg_rejects_is_retried_per_image_then_on_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One file nvjpeg rejects costs one batch call, one call per image and one host decode for that
    file; a file nobody can decode is an error for that file only; the others keep nvjpeg's pixels."""
    import sys
    import types

    good = [noise_jpeg(seed, (64 + seed, 48)) for seed in range(3)]
    odd = noise_jpeg(7, (50, 40))  # nvjpeg rejects it, PIL decodes it
    broken = noise_jpeg(8, (50, 40))[:200]  # nobody decodes it
    nvjpeg = StrictNvjpeg({odd, broken})
    fake = types.ModuleType("torchvision.io")
    fake.decode_jpeg, fake.ImageReadMode = nvjpeg.decode_jpeg, nvjpeg.ImageReadMode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)
    host = Preprocessor(32, 32, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = DevicePreprocessor(host, nvjpeg=True)
    items = [np.frombuffer(data, np.uint8) for data in [good[0], odd, good[1], broken, good[2]]]
    failures: dict[int, str] = {}
    decoders: dict[int, str] = {}
    decoded = device._decode_jpegs(items, [0, 1, 2, 3, 4], torch.device("cpu"), failures, decoders)
    assert nvjpeg.calls == [5, 1, 1, 1, 1, 1], "one batch call, then one call per image"
    assert sorted(decoded) == [0, 1, 2, 4] and list(failures) == [3]
    assert failures[3].startswith("truncated:"), failures[3]
    assert decoders == {
        0: "nvjpeg+device_resize",
        1: "pil+device_resize",
        2: "nvjpeg+device_resize",
        4: "nvjpeg+device_resize",
    }
    for index, data in [(0, good[0]), (1, odd), (4, good[2])]:
        assert torch.equal(decoded[index], torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1))
    # A batch nvjpeg takes whole is one call, every image nvjpeg's.
    nvjpeg.calls.clear()
    decoders.clear()
    decoded = device._decode_jpegs(items, [0, 2, 4], torch.device("cpu"), {}, decoders)
    assert (
        nvjpeg.calls == [3]
        and sorted(decoded) == [0, 2, 4]
        and set(decoders.values()) == {"nvjpeg+device_resize"}
    )


def test_by_default_nvjpeg_decodes_every_jpeg(
    image_folder: Path, tiny_model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No host/nvjpeg split unless asked for: every host share measured slower on the H100."""
    monkeypatch.setattr(inference, "nvjpeg_available", lambda device: True)
    model = load_model(tiny_model, device="cpu", precision="fp32")
    options = resolve_options(EngineOptions(decode="gpu"), model)
    preprocess = inference.choose_preprocessor(model, options.decode)
    assert isinstance(preprocess, DevicePreprocessor) and preprocess.nvjpeg
    location = open_location(str(image_folder))
    files = list(list_images(location))
    assert inference.decode_split(files, location.fs, preprocess, model, options) is None
    adaptive = replace(options, host_decode_share=None, host_decode_workers=1)
    split = inference.decode_split(files, location.fs, preprocess, model, adaptive)
    assert split is not None and split.adaptive


def test_nvjpeg_runs_on_its_own_stream_and_its_outputs_are_guarded_on_the_callers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stream handling of a GPU decode, with torch.cuda's stream calls recorded (no GPU here): nvjpeg
    runs on one decode stream per device, reused; the caller's stream waits for it; every image handed
    back is marked as used by the caller's stream (so the allocator cannot hand its memory to the next
    decode while a resize still reads it); a rejected batch synchronizes the device before retrying."""
    import sys
    import types
    from contextlib import contextmanager

    from tasks import images

    log: list[tuple[str, ...]] = []

    class Stream:
        def __init__(self, name: str) -> None:
            self.name = name

        def synchronize(self) -> None:
            log.append(("synchronize", self.name))

        def wait_stream(self, other: Stream) -> None:
            log.append(("wait", self.name, other.name))

    current = [Stream("caller")]
    created: list[Stream] = []

    def new_stream(device: object) -> Stream:
        created.append(Stream(f"decode{len(created)}"))
        return created[-1]

    @contextmanager
    def use(stream: Stream):  # type: ignore[no-untyped-def]
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    class Cuda:
        type = "cuda"

        def __str__(self) -> str:
            return "cuda:0"

    monkeypatch.setattr(torch.cuda, "Stream", new_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", use)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("device synchronize",)))
    monkeypatch.setattr(
        torch.Tensor, "record_stream", lambda self, stream: log.append(("record", stream.name))
    )
    monkeypatch.setattr(images, "_decode_streams", {})
    good = [noise_jpeg(seed, (40 + seed, 30)) for seed in range(3)]
    broken = noise_jpeg(9, (50, 40))[:200]
    nvjpeg = StrictNvjpeg({broken})
    fake = types.ModuleType("torchvision.io")

    def decode_jpeg(data: object, mode: str, device: object) -> object:
        log.append(("decode on", current[-1].name))
        return nvjpeg.decode_jpeg(data, mode, device)  # type: ignore[arg-type]

    fake.decode_jpeg, fake.ImageReadMode = decode_jpeg, nvjpeg.ImageReadMode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)
    host = Preprocessor(32, 32, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = DevicePreprocessor(host, nvjpeg=True)
    items = [np.frombuffer(data, np.uint8) for data in good]
    decoded = device._decode_jpegs(items, [0, 1, 2], Cuda(), {}, {})
    assert sorted(decoded) == [0, 1, 2]
    assert log == [
        ("synchronize", "decode0"),
        ("decode on", "decode0"),
        ("wait", "caller", "decode0"),
        *[("record", "caller")] * 3,
    ]
    log.clear()
    failures: dict[int, str] = {}
    items.append(np.frombuffer(broken, np.uint8))
    decoded = DevicePreprocessor(host, nvjpeg=True)._decode_jpegs(items, [0, 1, 2, 3], Cuda(), failures, {})
    assert len(created) == 1, "one decode stream per device, whichever preprocessor asks"
    assert sorted(decoded) == [0, 1, 2] and list(failures) == [3]
    assert log[:3] == [("synchronize", "decode0"), ("decode on", "decode0"), ("device synchronize",)]
    assert log.count(("decode on", "decode0")) == 5 and log.count(("device synchronize",)) == 2
    assert log[-4:] == [("wait", "caller", "decode0"), *[("record", "caller")] * 3]


def test_jpeg_bytes_reach_nvjpeg_without_a_copy_in_the_feeder(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader threads hand JPEG bytes over in writable buffers, and the feeder passes those very
    buffers to nvjpeg (copying 256 files per batch there cost it 4-27 ms a batch)."""
    import sys
    import types

    host = Preprocessor(32, 32, Image.Resampling.BILINEAR, 1 / 255, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    device = DevicePreprocessor(host, nvjpeg=True)
    jpegs = [noise_jpeg(seed, (40, 30)) for seed in range(3)]
    items = [device.encode_or_decode(data, 1 << 20)[0] for data in jpegs]
    assert all(
        item.ndim == 1 and item.flags.writeable and item.tobytes() == data
        for item, data in zip(items, jpegs, strict=True)
    )
    seen: list[int] = []
    nvjpeg = StrictNvjpeg(set())

    def decode_jpeg(data: list[torch.Tensor], mode: str, device: object) -> object:
        seen.extend(tensor.data_ptr() for tensor in data)
        return nvjpeg.decode_jpeg(data, mode, device)

    fake = types.ModuleType("torchvision.io")
    fake.decode_jpeg, fake.ImageReadMode = decode_jpeg, nvjpeg.ImageReadMode  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchvision", types.ModuleType("torchvision"))
    monkeypatch.setitem(sys.modules, "torchvision.io", fake)
    decoded = device._decode_jpegs(items, [0, 1, 2], torch.device("cpu"), {}, {})
    assert sorted(decoded) == [0, 1, 2]
    assert seen == [item.ctypes.data for item in items]
