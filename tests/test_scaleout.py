"""Scale-out: the classify flow on a real Dask cluster writes exactly what the local runner writes."""

from __future__ import annotations

import importlib.util
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest
from typer.testing import CliRunner

from flows.cli import app
from flows.params import RunnerParams
from flows.runners import with_runner

ROOT = Path(__file__).resolve().parents[1]
VOLATILE = {"run_id", "processed_at"}  # differ between any two runs, whatever the runner


def rows_and_files(output: Path) -> tuple[list[dict], list[str]]:
    table = ds.dataset(str(output), format="parquet", partitioning="hive").to_table()
    rows = sorted(
        ({k: v for k, v in row.items() if k not in VOLATILE} for row in table.to_pylist()),
        key=lambda row: row["image_uri"],
    )
    return rows, sorted(str(p.relative_to(output)) for p in output.rglob("*.parquet"))


def cached_models() -> int:
    """Runs on each Dask worker: how many models this worker process holds."""
    from tasks import model

    return len(model._cache)


@pytest.mark.slow
def test_dask_cluster_matches_local_runner(image_folder: Path, tmp_path: Path, tiny_model: str) -> None:
    from distributed import Client, LocalCluster

    from flows.classify import classify

    (image_folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (image_folder / "empty.png").write_bytes(b"")
    common = {"model": tiny_model, "device": "cpu", "shard_size": 2, "batch_size": 2}
    local = classify(str(image_folder), str(tmp_path / "local"), **common)

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster, set_as_default=False) as client,
    ):
        on_dask = with_runner(classify, RunnerParams(runner="dask", dask_address=cluster.scheduler_address))
        distributed = on_dask(str(image_folder), str(tmp_path / "dask"), **common)
        again = on_dask(str(image_folder), str(tmp_path / "dask"), **common)
        models_per_worker = client.run(cached_models)

    assert distributed["images_classified"] == local["images_classified"] == 8
    assert distributed["errors_by_category"] == local["errors_by_category"] == {"empty": 1, "not_an_image": 1}
    assert again["images_new"] == 0, "the incremental index works the same on the cluster"
    local_rows, local_files = rows_and_files(tmp_path / "local")
    dask_rows, dask_files = rows_and_files(tmp_path / "dask")
    assert dask_files == local_files and len(dask_files) == 4  # same shards, same deterministic names
    assert dask_rows == local_rows
    # Each worker process loaded the model at most once and kept it, for every shard it ran.
    assert sorted(models_per_worker.values()) in ([1, 1], [0, 1])


@pytest.mark.slow
def test_dask_runner_started_without_address_uses_a_local_cluster(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    """`--runner dask` with no address and no PREFECT_API_URL, as a user runs it: a LocalCluster of two
    worker processes, and ONE temporary Prefect server (started by the CLI and named to the workers),
    which records every shard task the workers ran."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_HOME": str(home),
        "PREFECT_LOGGING_LEVEL": "INFO",
    }
    command = [
        sys.executable,
        "-m",
        "flows.cli",
        "classify",
        str(image_folder),
        "--output",
        str(tmp_path / "out"),
    ]
    command += ["--model", tiny_model, "--device", "cpu", "--runner", "dask", "--dask-workers", "2"]
    done = subprocess.run(
        [*command, "--shard-size", "2"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows, files = rows_and_files(tmp_path / "out")
    assert len(rows) == 6 and len(files) == 3 and all(row["status"] == "ok" for row in rows)
    output = done.stdout + done.stderr
    assert output.count("Starting temporary server") == 1, output[-3000:]
    with sqlite3.connect(home / "prefect.db") as db:
        shards = db.execute("SELECT state_name FROM task_run WHERE name LIKE 'classify-shard-%'").fetchall()
    assert shards == [("COMPLETED",)] * 3 or sorted(shards) == [("Completed",)] * 3, shards


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--runner", "spark"], "--runner"),
        (["--dask-address", "tcp://127.0.0.1:8786"], "--dask-address needs --runner dask"),
        (["--runner", "dask", "--dask-address", "localhost:8786"], "tcp://HOST:8786"),
        (["--ray-address", "ray://127.0.0.1:10001"], "--ray-address needs --runner ray"),
        (["--dask-workers", "7"], "--dask-workers needs --runner dask"),
        (
            ["--runner", "dask", "--dask-address", "tcp://127.0.0.1:8786", "--dask-workers", "2"],
            "drop --dask-workers or --dask-address",
        ),
    ],
)
def test_bad_runner_options_fail_before_any_work(image_folder: Path, tmp_path: Path, args, expected) -> None:
    output = tmp_path / "out"
    result = CliRunner().invoke(app, ["classify", str(image_folder), "--output", str(output), *args])
    assert result.exit_code == 2 and expected in " ".join(result.output.split()), result.output
    assert not output.exists()


@pytest.mark.skipif(bool(importlib.util.find_spec("prefect_ray")), reason="prefect-ray is installed here")
def test_ray_runner_without_the_extra_says_what_to_install(image_folder: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["classify", str(image_folder), "--output", str(tmp_path / "out"), "--runner", "ray"]
    )
    assert result.exit_code == 2 and "pip install 'oncoflow[ray]'" in " ".join(result.output.split())


def test_a_model_folder_saved_again_in_place_is_loaded_again(tmp_path: Path) -> None:
    """A long-lived worker keeps models loaded; new weights in the same folder must not reuse the old."""
    from flows.demo import build_tiny_model
    from tasks.model import load_model

    folder = build_tiny_model(str(tmp_path / "model"), seed=1)
    first = load_model(folder, device="cpu", precision="fp32")
    assert load_model(folder, device="cpu", precision="fp32") is first  # unchanged: the cached one
    build_tiny_model(folder, seed=2)  # retrained and saved over the old files
    second = load_model(folder, device="cpu", precision="fp32")
    assert second is not first and second.revision != first.revision
