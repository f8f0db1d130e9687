"""Exactly one row per (image, fingerprint, model revision), whatever happens: SIGKILL of a real
`oncoflow classify` process at several points followed by re-runs, and two runs started at once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from flows.classify import classify
from flows.demo import write_sample_images
from flows.history import recent_runs

pytestmark = pytest.mark.slow

VOLATILE = {"run_id", "processed_at", "shard_id"}  # differ between runs by design


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 images large enough (1024×768) that shards take a moment, so kills land mid-run."""
    folder = tmp_path_factory.mktemp("archive")
    write_sample_images(str(folder), 12, seed=3, size=(1024, 768))
    return folder


def start_classify(source: Path, output: Path, model: str, server: str) -> subprocess.Popen[str]:
    # The `oncoflow` console script, run by this interpreter so the code under test is what runs.
    command = [
        sys.executable,
        "-c",
        "from flows.cli import app; app()",
        "classify",
        str(source),
        "-o",
        str(output),
    ]
    return subprocess.Popen(
        [*command, "--model", model, "--device", "cpu", "--shard-size", "2"],
        env={**os.environ, "PREFECT_API_URL": server},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, so SIGKILL takes the whole process tree
    )


def shard_files(output: Path) -> list[Path]:
    """The shard files so far; none while the command's write probe makes and removes the folder."""
    try:
        return list(output.rglob("part-*.parquet"))
    except FileNotFoundError:
        return []


def lease_held(output: Path) -> bool:
    return (
        any(p.stat().st_size > 0 for p in (output / "_leases").glob("*.lease")) if output.exists() else False
    )


def kill_when(process: subprocess.Popen[str], ready, timeout: float = 180) -> None:
    """SIGKILL the process group as soon as `ready()` is true; fail if the process ended first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point:\n{process.stdout.read()}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    assert process.wait(timeout=30) == -signal.SIGKILL


def rows_by_image(output: Path) -> dict[str, dict]:
    rows = ds.dataset(str(output), format="parquet", partitioning="hive").to_table().to_pylist()
    keys = Counter((r["image_uri"], r["fingerprint"], r["model_revision"]) for r in rows)
    assert max(keys.values()) == 1, f"duplicate rows: {[k for k, n in keys.items() if n > 1]}"
    return {r["image_uri"]: {k: v for k, v in r.items() if k not in VOLATILE} for r in rows}


def assert_same_rows(actual: dict[str, dict], expected: dict[str, dict]) -> None:
    assert actual.keys() == expected.keys()
    for uri, row in expected.items():
        for column, value in row.items():
            if isinstance(value, float):
                assert actual[uri][column] == pytest.approx(value, abs=1e-6), (uri, column)
            else:
                assert actual[uri][column] == value, (uri, column)


def test_kill_9_at_several_points_then_rerun_matches_an_uninterrupted_run(
    archive: Path, tmp_path: Path, tiny_model: str, prefect_server: str
) -> None:
    expected = tmp_path / "uninterrupted"
    classify(str(archive), str(expected), model=tiny_model, device="cpu", shard_size=2)

    output = tmp_path / "killed"
    # Kill points: holding the lease before any shard; right after the first shard file; two shards later.
    # Each re-run resumes from what the killed runs left, so later kills land deeper into the work.
    kill_points = [
        lambda: lease_held(output),
        lambda: len(shard_files(output)) >= 1,
        lambda: len(shard_files(output)) >= 3,
    ]
    for ready in kill_points:
        kill_when(start_classify(archive, output, tiny_model, prefect_server), ready)
    final = start_classify(archive, output, tiny_model, prefect_server)
    log, _ = final.communicate(timeout=240)
    assert final.returncode == 0, log

    assert_same_rows(rows_by_image(output), rows_by_image(expected))
    assert len(rows_by_image(output)) == 12
    # Every killed run held the lease, so the run after it marked it Crashed: none stays Running.
    classify_runs = [run for run in recent_runs(limit=20) if run.flow == "classify"]
    assert [run.state for run in classify_runs[:4]] == ["Completed", "Crashed", "Crashed", "Crashed"]


def test_two_runs_started_at_once_write_each_image_once(
    archive: Path, tmp_path: Path, tiny_model: str, prefect_server: str
) -> None:
    output = tmp_path / "overlap"
    runs = [start_classify(archive, output, tiny_model, prefect_server) for _ in range(2)]
    logs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], logs

    rows = rows_by_image(output)
    assert len(rows) == 12 and all(row["status"] == "ok" for row in rows.values())
    # One run classified everything; the other waited for the lease, then found nothing new.
    classified = sorted(int(log.split("images_classified")[1].split()[1]) for log in logs)
    assert classified == [0, 12]


def test_a_run_that_lists_while_another_is_mid_run_adds_no_duplicate(
    archive: Path, tmp_path: Path, tiny_model: str, prefect_server: str
) -> None:
    """The overlap that content-addressed shards alone do not cover: the second run lists a different set
    (a new image sorts first and shifts every shard boundary) while the first still has shards to write."""
    source, output = tmp_path / "incoming", tmp_path / "preds"
    shutil.copytree(archive, source)
    first = start_classify(source, output, tiny_model, prefect_server)
    deadline = time.monotonic() + 180
    while not shard_files(output):
        assert first.poll() is None and time.monotonic() < deadline, "the first run wrote nothing"
        time.sleep(0.005)
    os.killpg(first.pid, signal.SIGSTOP)  # frozen mid-run, still holding the lease
    try:
        write_sample_images(str(source / "0-early"), 1, seed=5, size=(64, 64))
        result: dict = {}
        second = threading.Thread(
            target=lambda: result.update(
                classify(str(source), str(output), model=tiny_model, device="cpu", shard_size=2)
            )
        )
        second.start()
        second.join(timeout=8)  # without the lease the second run would list and write now
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    log, _ = first.communicate(timeout=240)
    second.join(timeout=120)
    assert first.returncode == 0, log

    assert len(rows_by_image(output)) == 13
    assert result["images_classified"] == 1  # it waited for the first run, then found only the new image
