"""`--compile`: the model through torch.compile (inductor, with this machine's C++ compiler) gives the
rows the uncompiled model gives, pads a shard's short last batch, and never costs a run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from flows.demo import build_tiny_model
from tasks.inference import EngineOptions, classify_files
from tasks.model import compiled_forward, load_model
from tasks.storage import list_images, open_location
from tests.conftest import cpu_compiler_missing, make_image

NO_COMPILER = {"cpp.cxx": ("/nonexistent/bin/c++",), "fx_graph_cache": False}


needs_compiler = pytest.mark.skipif(cpu_compiler_missing(), reason="torch.compile needs a C++ compiler (g++)")


def rows_by_name(folder: Path, model_dir: str, **options: object) -> dict[str, dict]:
    location = open_location(str(folder))
    files = list(list_images(location))
    model = load_model(model_dir, device="cpu", precision="fp32")
    engine = EngineOptions(batch_size=4, **options)  # type: ignore[arg-type]
    table = classify_files(files, location.fs, model, engine, "run", "shard")
    return {row["image_uri"].rsplit("/", 1)[-1]: row for row in table.to_pylist()}


@pytest.fixture
def eleven_images(tmp_path: Path) -> Path:
    """Ten images and a corrupt one: batches of 4, 4 and a short last batch of 3 (padded when compiled)."""
    root = tmp_path / "scans"
    for n in range(10):
        make_image(root / f"{n:02d}.jpg", (40 + 7 * n, 60), "RGB", n)
    (root / "10.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


@needs_compiler
def test_the_compiled_model_gives_the_rows_of_the_uncompiled_one(
    eleven_images: Path, tiny_model: str
) -> None:
    plain = rows_by_name(eleven_images, tiny_model)
    compiled = rows_by_name(eleven_images, tiny_model, compile=True)

    forward = compiled_forward(load_model(tiny_model, device="cpu", precision="fp32"), 4)
    assert forward.ready and forward.failed is None, "the rows came from inductor's kernels"
    assert plain.keys() == compiled.keys() and len(compiled) == 11
    assert compiled["10.jpg"]["status"] == "error" and compiled["10.jpg"]["error"].startswith("not_an_image")
    for name, row in plain.items():
        assert compiled[name]["label"] == row["label"], name
        if row["status"] == "ok":
            assert compiled[name]["prob_malignant"] == pytest.approx(row["prob_malignant"], abs=1e-5), name


def test_a_compile_that_fails_runs_the_model_uncompiled(
    eleven_images: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A machine whose C++ compiler is gone: one warning, and every row as the uncompiled model gives it."""
    # Kernels no earlier compile built (another input size), and an empty on-disk cache: inductor must
    # call the compiler.
    model_dir = build_tiny_model(str(tmp_path / "model"), seed=5, image_size=48)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    plain = rows_by_name(eleven_images, model_dir)
    with torch._inductor.config.patch(NO_COMPILER), caplog.at_level(logging.WARNING, "tasks.model"):
        compiled = rows_by_name(eleven_images, model_dir, compile=True)

    forward = compiled_forward(load_model(model_dir, device="cpu", precision="fp32"), 4)
    assert forward.failed is not None and not forward.ready
    assert [r.message for r in caplog.records].count(
        f"--compile failed, the model runs uncompiled ({forward.failed})"
    ) == 1
    assert compiled == {
        name: {**row, "processed_at": compiled[name]["processed_at"]} for name, row in plain.items()
    }


def classify_on_cpu(folder: Path, output: Path, model: str, *options: str) -> list[str]:
    return ["classify", str(folder), "-o", str(output), "--model", model, "--device", "cpu", *options]


def test_compile_without_a_compiler_fails_before_any_work(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    output = tmp_path / "preds"
    with torch._inductor.config.patch(NO_COMPILER):
        result = CliRunner().invoke(app, [*classify_on_cpu(image_folder, output, tiny_model), "--compile"])
    assert result.exit_code == 2, result.output
    assert "--compile on a CPU needs a C++ compiler" in " ".join(result.output.split())
    assert not output.exists()


@needs_compiler
def test_classify_compile_through_the_cli_writes_the_rows_of_a_plain_run(
    image_folder: Path, tmp_path: Path, tiny_model: str
) -> None:
    import pyarrow.dataset as ds

    def probabilities(output: Path, *options: str) -> dict[str, float]:
        arguments = classify_on_cpu(image_folder, output, tiny_model, "--precision", "fp32", *options)
        result = CliRunner().invoke(app, arguments)
        assert result.exit_code == 0, result.output
        table = ds.dataset(str(output), format="parquet", partitioning="hive").to_table()
        assert set(table.column("status").to_pylist()) == {"ok"}
        return dict(
            zip(
                table.column("image_uri").to_pylist(), table.column("prob_malignant").to_pylist(), strict=True
            )
        )

    plain = probabilities(tmp_path / "plain")
    compiled = probabilities(tmp_path / "compiled", "--compile", "--batch-size", "4")
    assert len(compiled) == 6 and compiled.keys() == plain.keys()
    assert all(compiled[uri] == pytest.approx(p, abs=1e-5) for uri, p in plain.items())


def test_cuda_graphs_are_ignored_on_a_cpu(eleven_images: Path, tiny_model: str) -> None:
    plain = rows_by_name(eleven_images, tiny_model)
    graphs = rows_by_name(eleven_images, tiny_model, cuda_graphs=True)
    assert {n: r["prob_malignant"] for n, r in graphs.items()} == {
        n: r["prob_malignant"] for n, r in plain.items()
    }


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_give_the_rows_of_the_eager_forward_from_two_threads(
    eleven_images: Path, tiny_model: str
) -> None:
    """Replays share one captured graph: two shards classifying at once (as two in flight do) each get
    their own images' rows, equal to the eager forward's."""
    from concurrent.futures import ThreadPoolExecutor

    from tasks.model import fixed_batch_forward

    def rows(**options: object) -> dict[str, dict]:
        location = open_location(str(eleven_images))
        files = list(list_images(location))
        model = load_model(tiny_model, device="cuda", precision="fp32")
        engine = EngineOptions(batch_size=4, **options)  # type: ignore[arg-type]
        table = classify_files(files, location.fs, model, engine, "run", "shard")
        return {row["image_uri"]: row for row in table.to_pylist()}

    plain = rows()
    with ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(lambda _: rows(cuda_graphs=True), range(2)))
    forward = fixed_batch_forward(load_model(tiny_model, device="cuda", precision="fp32"), "cuda_graphs", 4)
    assert forward.ready and forward.failed is None
    for graphed in runs:
        assert graphed.keys() == plain.keys()
        for uri, row in plain.items():
            assert graphed[uri]["status"] == row["status"] and graphed[uri]["label"] == row["label"]
            if row["status"] == "ok":
                assert graphed[uri]["prob_malignant"] == pytest.approx(row["prob_malignant"], abs=1e-5)
