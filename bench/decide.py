"""Read one bench/gpu.sh result line and say which default each measured alternative earns.

    python3 bench/decide.py $OUT/results-gpu.jsonl        # the last line; gpu.sh runs it at the end
    python3 bench/decide.py $OUT/results-gpu.jsonl.partial  # what a run cut off had measured

Each rule compares an alternative with what is the default now, in the same run, and names the change
it calls for (bench/README.md, "Ready for the next GPU session"). An alternative wins only if it is
faster by more than the run-to-run spread seen on the H100 (5%) and keeps labels on >= 99.5% of images
against the fp32 reference; a figure that is missing (a section that failed or was cut off) says so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SPREAD = 0.05  # run A against run B on the same H100: 4,383 and 4,191 img/s (4.6%)
AGREEMENT = 0.995

# (question, default's key, alternative's key, agreement key of the alternative or None, change if it wins)
RULES = [
    (
        "host share in worker processes (adaptive) vs nvjpeg only, engine",
        "engine_fp16_decode_gpu_img_s",
        "engine_fp16_decode_gpu_adaptive_split_img_s",
        "engine_fp16_decode_gpu_adaptive_split_vs_fp32",
        "ONCOFLOW_HOST_DECODE_SHARE defaults to auto, if the flow agrees (next rule)",
    ),
    (
        "host share in worker processes (adaptive) vs nvjpeg only, flow steady",
        "flow_steady_img_s",
        "flow_steady_img_s_adaptive_split",
        None,
        "ONCOFLOW_HOST_DECODE_SHARE defaults to auto, if the engine agrees (previous rule)",
    ),
    (
        "--decode cpu: PIL in threads vs in worker processes (the default beside a GPU)",
        "engine_fp16_img_s",
        "engine_fp16_threads_img_s",
        None,
        "EngineOptions.decode_cpu_in_processes defaults to threads",
    ),
    (
        "one shard in flight vs two (the default), flow steady",
        "flow_steady_img_s",
        "flow_steady_img_s_one_in_flight",
        None,
        "flows.runners.SHARDS_IN_FLIGHT = 1 on GPUs",
    ),
    (
        "CUDA graphs for the forward vs eager, engine",
        "engine_fp16_decode_gpu_img_s",
        "engine_fp16_decode_gpu_cuda_graphs_img_s",
        "engine_fp16_decode_gpu_cuda_graphs_vs_fp32",
        "EngineOptions.cuda_graphs and ONCOFLOW_CUDA_GRAPHS default to on for GPUs",
    ),
    (
        "--compile vs eager, engine",
        "engine_fp16_decode_gpu_img_s",
        "engine_fp16_decode_gpu_compiled_img_s",
        "engine_fp16_decode_gpu_compiled_vs_fp32",
        "say so in README's --compile row; a GPU default only if the compile time is small",
    ),
]


def decide(results: dict[str, Any]) -> list[str]:
    lines = []
    for question, default_key, alternative_key, agreement_key, change in RULES:
        default, alternative = results.get(default_key), results.get(alternative_key)
        if not default or not alternative:
            missing = [
                key for key, value in ((default_key, default), (alternative_key, alternative)) if not value
            ]
            lines.append(f"- {question}: not measured ({', '.join(missing)} missing)")
            continue
        ratio = alternative / default
        agreement = (results.get(agreement_key) or {}).get("label_agreement") if agreement_key else None
        agrees = agreement is None or agreement >= AGREEMENT
        built = results.get(alternative_key.replace("_img_s", "_stage_seconds"), {}).get(
            "forward_built", True
        )
        verdict = "WINS" if ratio > 1 + SPREAD and agrees and built else "keep the default"
        facts = f"{alternative:,.0f} vs {default:,.0f} img/s ({ratio:.2f}x)"
        if agreement is not None:
            facts += f", labels {agreement:.2%} equal to fp32"
        if not built:
            facts += ", its forward fell back to eager"
        lines.append(f"- {question}: {facts} -> {verdict}" + (f": {change}" if verdict == "WINS" else ""))
    seconds = results.get("model_only_fp16_compiled_compile_seconds")
    if seconds is not None:
        lines.append(f"- --compile took {seconds} s (compile and first batch) on this machine")
    return lines


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results-gpu.jsonl")
    text = path.read_text()
    # A .jsonl file's last line, or a whole results-gpu.jsonl.partial (one indented JSON object)
    results = json.loads(text) if path.suffix == ".partial" else json.loads(text.splitlines()[-1])
    print(f"decisions from {path} ({results.get('machine')}, {results.get('date')}):")
    print("\n".join(decide(results)))


if __name__ == "__main__":
    main()
