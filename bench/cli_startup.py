"""Start-up of the real command, as a user sees it: `oncoflow classify` launched in a new process, until
its flow begins and its first shard is written, and the whole of a small nightly run.

    python bench/cli_startup.py [--model-size base|tiny] [--runs 3] [--json FILE]

bench/throughput.py measures start-up inside one Python process (call → work known), which leaves out
the interpreter, the imports (torch, transformers, Prefect: seconds on a small CPU) and the temporary
Prefect server's own boot. Here each run is `python -m flows.cli classify SRC -o OUT --model M --device
cpu` (with --api-url, against a running server instead of the temporary one), timed from launch by
the lines it prints: `--help` alone; the first run in a brand-new
PREFECT_HOME (database set-up), then warm runs, each finding one new image (a quiet night). Marks:
`server` = "Starting temporary server" logged, `flow` = "Beginning flow run" (the server answers and the
flow started), `shard` = the first shard finished (the model ran), `exit` = the process ended.
PYTHONDONTWRITEBYTECODE is dropped for the runs, as on a user's machine (.pyc files are written once).
One JSON line per run; bench/README.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MARKS = {
    "server": "Starting temporary server",
    "flow": "Beginning flow run",
    "shard": "Task run 'classify-shard-",
}


def timed_command(argv: list[str], env: dict[str, str], timeout: float = 600) -> dict[str, float]:
    """Run `python argv...` and return seconds from launch to each mark's first line and to the exit."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, float] = {}
    lines: list[str] = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line)
        for name, text in MARKS.items():
            if name not in seen and text in line:
                seen[name] = round(time.monotonic() - started, 2)
    process.wait(timeout=timeout)
    seen["exit"] = round(time.monotonic() - started, 2)
    if process.returncode != 0:
        raise RuntimeError(f"{argv} exited {process.returncode}:\n{''.join(lines)[-3000:]}")
    return seen


def make_image(path: Path, seed: int) -> None:
    """A 700×460 JPEG of noise (the corpus's size; the content does not matter here)."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, size=(460, 700, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-size", choices=["base", "tiny"], default="base")
    parser.add_argument("--runs", type=int, default=3, help="warm runs after the first")
    parser.add_argument("--json", type=Path, help="append one JSON line per run to this file")
    parser.add_argument("--api-url", help="a running Prefect server's API (default: the temporary server)")
    args = parser.parse_args()

    from bench.throughput import machine, make_model

    work = Path(tempfile.mkdtemp(prefix="oncoflow-startup-"))
    try:
        model = make_model(work / "model", args.model_size)
        for number in range(4):
            make_image(work / "src" / f"start{number}.jpg", seed=number)
        env = {
            **os.environ,
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_HOME": str(work / "prefect-home"),
            "HF_HUB_OFFLINE": "1",
        }
        env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        for name in ("PYTHONDONTWRITEBYTECODE", "PREFECT_API_URL"):
            env.pop(name, None)
        if args.api_url:
            env["PREFECT_API_URL"] = args.api_url
        common = {
            "machine": machine(),
            "date": datetime.now(UTC).date().isoformat(),
            "model": args.model_size,
        }
        common["prefect"] = "persistent server" if args.api_url else "temporary server"
        records = [{"run": "--help", **timed_command(["-m", "flows.cli", "--help"], env)}]
        classify = ["-m", "flows.cli", "classify", str(work / "src"), "-o", str(work / "out")]
        classify += ["--model", model, "--device", "cpu"]
        for run in range(args.runs + 1):
            if run:
                make_image(work / "src" / f"night{run}.jpg", seed=100 + run)
            name = "first (new PREFECT_HOME)" if run == 0 else f"warm {run} (1 new image)"
            records.append({"run": name, **timed_command(classify, env)})
        for record in records:
            line = json.dumps({**common, **record})
            print(line, flush=True)
            if args.json:
                with args.json.open("a") as handle:
                    handle.write(line + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"python {platform.python_version()}", file=sys.stderr)


if __name__ == "__main__":
    main()
