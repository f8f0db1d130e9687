"""The throughput benchmark runs end to end (on a tiny model; speeds are recorded in bench/, never asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cpu_compiler_missing

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def run_bench(tmp_path: Path, script: str, *arguments: str, timeout: int) -> dict:
    """Run bench/`script` with `arguments` and `--json FILE`; it must succeed; its JSON record (the last
    line of a JSON-lines file, or the whole file when it is one indented object)."""
    results = tmp_path / f"{Path(script).stem}.json"
    command = [sys.executable, str(BENCH.parent / script), *arguments, "--json", str(results)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    text = results.read_text().strip()
    return json.loads(text if text.startswith("{\n") else text.splitlines()[-1])


@pytest.mark.slow
def test_throughput_bench_runs_on_a_tiny_model(tmp_path: Path, prefect_server: str) -> None:
    results = tmp_path / "results.jsonl"
    command = [
        sys.executable,
        str(BENCH),
        "--images",
        "6",
        "--model-size",
        "tiny",
        "--quick",
        "--cpu-decode-images",
        "4",
        "--json",
        str(results),
    ]
    compiles = not cpu_compiler_missing()
    command += [] if compiles else ["--no-compile"]
    env = {**os.environ, "PREFECT_API_URL": prefect_server}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| engine_fp32_img_s |" in done.stdout
    record = json.loads(results.read_text().splitlines()[-1])
    assert record["images"] == 6 and record["discovery_files"] == 200
    assert record["engine_fp32_vs_snippet_reference"]["label_agreement"] == 1.0
    assert record["engine_fp32_vs_snippet_reference"]["max_prob_diff"] < 1e-3
    # --cpu-decode-images 4: the host-decoding engine runs take the first 4 of the 6 images, and the
    # device path (all 6) is still compared with the fp32 run on those 4.
    assert record["engine_bf16_vs_fp32"]["compared"] == 4
    device_path = next(v for k, v in record.items() if k.endswith("_decode_gpu_vs_fp32"))
    assert device_path["label_agreement"] == 1.0 and device_path["compared"] == 4
    if compiles:  # --compile, where this machine has a C++ compiler for it
        compiled = next(v for k, v in record.items() if k.endswith("_compiled_vs_fp32"))
        assert compiled["compared"] == 4 and compiled["label_agreement"] == 1.0
        built = next(v for k, v in record.items() if k.endswith("_compiled_stage_seconds"))
        assert built["forward_built"] is True and built["forward_failed"] is None  # compiled, not eager
        assert next(v for k, v in record.items() if k.endswith("_compiled_compile_seconds")) > 0
    assert record["discovery_new"] == 100  # half of the 200 listed files are in the history
    stages = record["engine_fp32_stage_seconds"]
    assert (
        stages["model_forward"] > 0 and "model_waits_for_batches" in stages and "feeder_device_prep" in stages
    )
    assert stages["rows"] == {"status": {"ok": 4}, "decoder": {"pil": 4}}  # every row ok, and how decoded
    assert record["flow_rows"]["status"] == {"ok": 6}
    assert not [key for key in record if key.endswith("_error")]
    for key in [
        "seed_snippet_img_s",
        "pipeline_fp32_img_s",
        "model_only_fp32_img_s",
        "engine_fp32_img_s",
        "flow_img_s",
        *([f"model_only_{record['flow_precision']}_compiled_img_s"] if compiles else []),
    ]:
        assert record[key] > 0, key


@pytest.mark.slow
def test_split_emulation_bench_runs(tmp_path: Path) -> None:
    arguments = ["--images", "48", "--unique-images", "8", "--batch-size", "8", "--shares", "0", "1"]
    record = run_bench(tmp_path, "split_emulated.py", *arguments, timeout=120)
    assert record["fixed_0.0"]["host_decoded"] == 0  # nvjpeg (emulated) took every JPEG
    assert record["fixed_1.0"]["host_decoded"] == 48  # the split's PIL threads took every JPEG
    assert 0 <= record["adaptive"]["host_decoded"] <= 48
    assert record["adaptive"]["img_s"] > 0 and record["emulated_device_img_s"] > 0


def test_nvjpeg_probe_runs(tmp_path: Path) -> None:
    """bench/gpu.sh's probe of odd and damaged JPEGs; on a CPU both sides decode with PIL and agree."""
    record = run_bench(tmp_path, "nvjpeg_probe.py", "--device", "cpu", timeout=240)
    assert record["status_disagreements"] == []
    files = record["files"]
    assert (
        files["truncated-half.jpg"]["cpu"]["error"] == "truncated"
        and files["cmyk.jpg"]["gpu"]["status"] == "ok"
    )


def test_analytics_read_bench_runs(tmp_path: Path) -> None:
    """bench/analytics_read.py on a few tiny files: both readers agree (the bench asserts it), requests counted."""
    arguments = [
        "--files",
        "3",
        "--rows-per-file",
        "10",
        "--s3-files",
        "2",
        "--s3-duckdb-bridge",
        "--repeats",
        "1",
    ]
    record = run_bench(tmp_path, "analytics_read.py", *arguments, timeout=300)
    assert record["local rows"] == 30 and record["s3 files"] == 2
    requests = int(record["s3 oncoflow connect: requests (per file)"].split()[0])
    assert 0 < requests <= 16


def test_erase_bench_runs(tmp_path: Path) -> None:
    """bench/erase.py on a small dataset: the plan and the erase agree on what goes."""
    record = run_bench(tmp_path, "erase.py", "--rows", "4000", "--files", "2", timeout=300)
    assert record["plan_rows_erased"] == record["apply_rows_erased"] == 4, record
    assert record["apply_files_rewritten"] == 2 and record["apply_seconds"] >= 0, record


def test_decode_memory_bench_runs(tmp_path: Path) -> None:
    """bench/decode_memory.py on small images: a traced peak and a time for every kind of image."""
    run_bench(tmp_path, "decode_memory.py", "--width", "96", "--height", "64", timeout=300)
    records = [json.loads(line) for line in (tmp_path / "decode_memory.json").read_text().splitlines()]
    assert [record["case"] for record in records][:2] == ["png-16bit", "tiff-16bit"] and len(records) == 7
    assert all(record["traced_bytes"] > 0 and record["seconds"] > 0 for record in records), records


@pytest.mark.slow
def test_gpu_overlap_probe_runs(tmp_path: Path) -> None:
    """bench/gpu_overlap.py's CPU mode: every stage alone and in pairs gives a rate."""
    arguments = ["--device", "cpu", "--batch", "4", "--seconds", "0.2"]
    record = run_bench(tmp_path, "gpu_overlap.py", *arguments, timeout=300)
    for stage in ("forward", "decode", "prep", "resize"):
        assert record[f"{stage}_alone_img_s"] > 0, stage
    assert set(record["forward+decode_img_s"]) == {"forward", "decode"}
    assert record["forward+prep_overlap"] > 0
    assert record["forward_launch_ms_while_a_thread_decodes"] > 0 and record["forward_host_syncs"] == 0


def test_nvjpeg_priority_probe_says_what_it_needs() -> None:
    """bench/nvjpeg_priority.py (the next GPU step of issue 6) loads, and without a GPU says why it stops."""
    script = BENCH.parent / "nvjpeg_priority.py"
    helped = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and "CUDA stream" in " ".join(helped.stdout.split()), helped.stderr[-3000:]
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None:
        done = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        )
        assert done.returncode == 1 and "needs a CUDA GPU" in done.stderr


@pytest.mark.skipif(cpu_compiler_missing(), reason="torch.compile needs a C++ compiler (g++)")
def test_compile_ab_bench_runs_on_a_tiny_model(tmp_path: Path) -> None:
    """bench/compile_ab.py: eager and --compile forwards interleaved, both rates and the compile time."""
    arguments = ["--model-size", "tiny", "--precision", "fp32", "--rounds", "2"]
    record = run_bench(tmp_path, "compile_ab.py", *arguments, timeout=240)
    assert record["eager_img_s"] > 0 and record["compiled_img_s"] > 0
    assert record["compile_and_first_batch_seconds"] > 0 and record["batch_size"] == 32


def test_draft_decode_bench_runs_on_a_tiny_model(tmp_path: Path) -> None:
    """bench/draft_decode.py: both decoders' rates, the pixel difference and the labels it changes."""
    record = run_bench(tmp_path, "draft_decode.py", "--images", "6", "--model-size", "tiny", timeout=240)
    assert record["sizes_of_the_first_image"] == {"file": [700, 460], "draft": [350, 230]}
    assert record["draft_decode_resize_img_s_one_core"] > 0 and 0 <= record["label_agreement"] <= 1


def test_decide_names_the_default_each_gpu_figure_earns(tmp_path: Path) -> None:
    """bench/decide.py (run by gpu.sh): faster beyond the spread and agreeing wins; slower, disagreeing,
    fallen back to eager or missing does not."""
    results = {
        "engine_fp16_decode_gpu_img_s": 4000.0,
        "engine_fp16_decode_gpu_adaptive_split_img_s": 6000.0,
        "engine_fp16_decode_gpu_adaptive_split_vs_fp32": {"label_agreement": 0.9975},
        "engine_fp16_decode_gpu_cuda_graphs_img_s": 7000.0,
        "engine_fp16_decode_gpu_cuda_graphs_vs_fp32": {"label_agreement": 0.99},
        "engine_fp16_decode_gpu_compiled_img_s": 9000.0,
        "engine_fp16_decode_gpu_compiled_stage_seconds": {"forward_built": False},
        "flow_steady_img_s": 3500.0,
        "flow_steady_img_s_one_in_flight": 3600.0,
    }
    path = tmp_path / "results-gpu.jsonl"
    path.write_text("{}\n" + json.dumps(results) + "\n")
    done = subprocess.run(
        [sys.executable, str(BENCH.parent / "decide.py"), str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split(":")[0].removeprefix("- "): line for line in done.stdout.splitlines()[1:]}
    assert (
        "WINS: ONCOFLOW_HOST_DECODE_SHARE defaults to auto"
        in lines[next(k for k in lines if "engine" in k and "host share" in k)]
    )
    assert "not measured (flow_steady_img_s_adaptive_split missing)" in done.stdout
    assert "1.03x" in done.stdout and "labels 99.00%" in done.stdout and "fell back to eager" in done.stdout
    assert done.stdout.count("WINS") == 1


@pytest.mark.slow
def test_cli_startup_bench_runs(tmp_path: Path) -> None:
    """bench/cli_startup.py on a tiny model: the real command's marks, in order, for a first run."""
    run_bench(tmp_path, "cli_startup.py", "--model-size", "tiny", "--runs", "0", timeout=600)
    records = [json.loads(line) for line in (tmp_path / "cli_startup.json").read_text().splitlines()]
    assert [record["run"] for record in records] == ["--help", "first (new PREFECT_HOME)"]
    first = records[1]
    assert 0 < first["server"] <= first["flow"] <= first["shard"] <= first["exit"], first
