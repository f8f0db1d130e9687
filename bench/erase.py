"""What `oncoflow erase` costs on a large dataset: the plan (reads the image_uri column of every file),
erasing one patient's images (rewrites the files that hold them), and peak memory.

python bench/erase.py --rows 4000000 --files 40 [--json bench/results-erase.jsonl]

The dataset is written with the real writer (tasks.sink.write_shard): `--files` shard files over 10 days,
the rows of 1,000 "patients" spread over every file, as nightly runs of a whole hospital would be.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.erase import erase  # noqa: E402
from tasks.erase_list import read_erase_list  # noqa: E402
from tasks.sink import SCHEMA, model_slug, shard_path, write_shard  # noqa: E402
from tasks.storage import open_location  # noqa: E402

PATIENTS = 1000


def make_dataset(dest: str, rows: int, files: int) -> None:
    location = open_location(dest)
    per_file = rows // files
    rng = np.random.default_rng(0)
    for number in range(files):
        start = number * per_file
        ids = np.arange(start, start + per_file)
        prob = rng.uniform(size=per_file)
        when = datetime(2026, 3, 1, 22, tzinfo=UTC) + timedelta(days=number % 10)
        columns = {
            "image_uri": [f"file:///scans/patient-{i % PATIENTS:04d}/{i:010d}.jpg" for i in ids],
            "fingerprint": [f"{100_000 + i % 999}:{1_700_000_000_000_000_000 + i}" for i in ids],
            "label": np.where(prob >= 0.5, "Malignant", "Normal"),
            "label_id": (prob >= 0.5).astype(np.int64),
            "confidence": np.maximum(prob, 1 - prob),
            "prob_malignant": prob,
            "threshold": np.full(per_file, 0.5),
            "model": ["/models/vit"] * per_file,
            "model_revision": ["sha256:00000000000000aa"] * per_file,
            "run_id": [f"run-{number}"] * per_file,
            "processed_at": [when] * per_file,
            "status": ["ok"] * per_file,
            "error": pa.nulls(per_file, pa.string()),
            "shard_id": [f"s{number}"] * per_file,
            "precision": ["fp32"] * per_file,
            "image_width": np.full(per_file, 700),
            "image_height": np.full(per_file, 460),
            "decoder": ["pil"] * per_file,
        }
        table = pa.table({name: pa.array(columns[name], SCHEMA.field(name).type) for name in SCHEMA.names})
        slug = model_slug("/models/vit", "sha256:00000000000000aa")
        write_shard(location, shard_path(slug, when, f"{number:020x}"), table)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--json", type=Path, help="also append the result as a JSON line to this file")
    args = parser.parse_args()
    record: dict[str, object] = {"rows": args.rows, "files": args.files}
    work = tempfile.mkdtemp(prefix="oncoflow-erase-")
    dest = os.path.join(work, "dest")
    started = time.perf_counter()
    make_dataset(dest, args.rows, args.files)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dest) for f in fs)
    record["dataset_mb"] = round(size / 1e6, 1)
    print(
        f"dataset: {args.rows:,} rows, {args.files} files, {size / 1e6:.0f} MB ({time.perf_counter() - started:.0f} s)"
    )
    listed = os.path.join(work, "withdrawn.txt")
    with open(listed, "w") as handle:
        handle.write("file:///scans/patient-0042/\n")
    selection = read_erase_list(listed)
    location = open_location(dest)
    for apply in (False, True):
        started = time.perf_counter()
        report = erase(location, selection, apply=apply)
        seconds = time.perf_counter() - started
        print(
            f"{'erase --yes' if apply else 'plan'}: {report.rows_erased:,} rows of {report.images_erased:,} "
            f"images, {report.files_rewritten} files rewritten, in {seconds:.1f} s "
            f"({args.rows / seconds:,.0f} rows/s scanned)"
        )
        step = "apply" if apply else "plan"
        record |= {f"{step}_seconds": round(seconds, 2), f"{step}_rows_erased": report.rows_erased}
        record[f"{step}_files_rewritten"] = report.files_rewritten
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak:.0f} MB")
    record |= {"peak_rss_mb": round(peak), "machine": platform.machine(), "cpus": os.cpu_count()}
    record["date"] = time.strftime("%Y-%m-%d")
    if args.json:
        with args.json.open("a") as results:
            results.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
