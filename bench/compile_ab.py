"""Eager against `--compile` forwards, interleaved: one batch each in turn, medians compared.

    PYTHONPATH=. .venv/bin/python bench/compile_ab.py --device cpu --precision bf16 [--json OUT]

bench/throughput.py measures the two in separate sections, a minute apart; on a shared or throttling
machine that spread (±7% on the 2-core build machine) is as large as the gain. Here both run on the
same input, alternately, so a slow minute slows both. Uses the engine's own compiled forward
(tasks.model.CompiledForward) on a ViT-Base/16 with random weights (tiny with --model-size tiny).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.throughput import emit, machine, make_model  # noqa: E402
from tasks.model import compiled_forward, load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 on CPU, 256 on GPU")
    parser.add_argument("--rounds", type=int, default=6, help="batches of each, interleaved")
    parser.add_argument("--model-size", choices=["base", "tiny"], default="base")
    parser.add_argument("--json", type=Path, help="append the result as one JSON line")
    args = parser.parse_args()
    batch = args.batch_size or (256 if args.device == "cuda" else 32)
    model_dir = make_model(Path(tempfile.mkdtemp(prefix="oncoflow-compile-")) / "model", args.model_size)
    model = load_model(model_dir, device=args.device, precision=args.precision)
    size = model.preprocess.height, model.preprocess.width  # type: ignore[union-attr]
    inputs = torch.randn(batch, 3, *size, device=model.device, dtype=model.dtype)
    compiled = compiled_forward(model, batch)

    def timed(forward) -> float:  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            started = time.perf_counter()
            forward(inputs).float().cpu()  # the read-back waits for the GPU
            return time.perf_counter() - started

    def eager(batch_inputs: torch.Tensor) -> torch.Tensor:
        return model.network(pixel_values=batch_inputs).logits

    compile_seconds = timed(compiled)
    if compiled.failed:
        raise SystemExit(f"torch.compile failed: {compiled.failed}")
    timed(eager)  # warm-up
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        times["eager"].append(timed(eager))
        times["compiled"].append(timed(compiled))
    rates = {name: round(batch / statistics.median(seconds), 2) for name, seconds in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "software": f"torch {torch.__version__}",
        "device": args.device,
        "precision": args.precision,
        "model": f"ViT-{args.model_size} random weights",
        "batch_size": batch,
        "rounds": args.rounds,
        "compile_and_first_batch_seconds": round(compile_seconds, 1),
        "eager_img_s": rates["eager"],
        "compiled_img_s": rates["compiled"],
        "compiled_vs_eager": round(rates["compiled"] / rates["eager"], 3),
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
