"""A synthetic output dataset with the real writer: two model revisions, three days, folders, errors."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.sink import SCHEMA, model_slug, shard_path, write_shard
from tasks.storage import open_location

FIRST_DAY = datetime(2026, 3, 1, 22, 0, tzinfo=UTC)
OLD, NEW = "sha256:00000000000000aa", "sha256:00000000000000bb"
MODEL = "/models/vit"


def rows(
    images: range,
    revision: str,
    when: datetime,
    seed: int,
    shard: str,
    folder: str = "site-a",
    model: str = MODEL,
) -> pa.Table:
    """One shard's rows; every 10th image is an error row, the rest get seeded probabilities."""
    rng = np.random.default_rng(seed)
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    for n in images:
        prob = float(rng.uniform())
        ok = n % 10 != 9
        malignant = prob >= 0.5
        values = {
            "image_uri": f"file:///scans/{folder}/img_{n:05d}.jpg",
            "fingerprint": f"{1000 + n}:1700000000000000000",
            "label": ("Malignant" if malignant else "Normal") if ok else None,
            "label_id": int(malignant) if ok else None,
            "confidence": (prob if malignant else 1 - prob) if ok else None,
            "prob_malignant": prob if ok else None,
            "threshold": 0.5,
            "model": model,
            "model_revision": revision,
            "run_id": f"run-{revision[-2:]}-{when:%d}",
            "processed_at": when + timedelta(seconds=n),
            "status": "ok" if ok else "error",
            "error": None
            if ok
            else ("truncated: image file is truncated" if n % 20 == 9 else "not_an_image: x"),
            "shard_id": shard,
            "precision": "fp32",
            "image_width": 640 if ok else None,
            "image_height": 480 if ok else None,
            "decoder": "pil" if ok else None,
        }
        for name in SCHEMA.names:
            columns[name].append(values[name])
    return pa.table(columns, schema=SCHEMA)


def write(dest: Path, table: pa.Table, revision: str, when: datetime, shard: str) -> None:
    write_shard(open_location(str(dest)), shard_path(model_slug(MODEL, revision), when, shard), table)


def make_dataset(dest: Path, shard_rows: int = 20) -> dict[str, int]:
    """Day 1: 60 images in site-a, day 2: 40 in site-b (old revision); day 3: the new revision
    reprocesses site-a's first 40. Small shards, like a nightly run with --shard-size 20."""
    plan = [
        (range(0, 60), OLD, FIRST_DAY, "site-a"),
        (range(0, 40), OLD, FIRST_DAY + timedelta(days=1), "site-b"),
        (range(0, 40), NEW, FIRST_DAY + timedelta(days=2), "site-a"),
    ]
    total = 0
    for number, (images, revision, when, folder) in enumerate(plan):
        for start in range(images.start, images.stop, shard_rows):
            shard = f"{number}x{start:05d}"
            chunk = range(start, min(start + shard_rows, images.stop))
            seed = start if revision == OLD else start + 7  # the new revision disagrees sometimes
            write(dest, rows(chunk, revision, when, seed, shard, folder), revision, when, shard)
            total += len(chunk)
    return {"rows": total, "images": 100}


def add_edits(dest: Path) -> dict[str, str]:
    """After make_dataset, the cases `latest` must get right; {image_uri: the revision `latest` shows}.

    - site-a/img_00005, reprocessed by the new revision on day 3, is edited on day 4 and the nightly
      run, still on the old revision, classifies its new content: the old revision's row (of the file
      as it is now), not the new revision's row of a file that is gone.
    - site-c/img_00000-4 appear on day 3: the new revision classifies them, then on day 4 the old
      revision does too, given as "/models/vit/" (another spelling of the same model): the new revision
      still, because the old one was first seen on day 1 whatever its path.
    """
    day4 = FIRST_DAY + timedelta(days=3)
    edited = rows(range(5, 6), OLD, day4, 98, "edited", "site-a")
    edited = edited.set_column(1, "fingerprint", pa.array(["3000:1800000000000000000"]))
    write(dest, edited, OLD, day4, "edited")
    day3 = FIRST_DAY + timedelta(days=2)
    write(dest, rows(range(5), NEW, day3 + timedelta(hours=1), 31, "c-new", "site-c"), NEW, day3, "c-new")
    again = rows(range(5), OLD, day4 + timedelta(hours=1), 32, "c-old", "site-c", model=MODEL + "/")
    write(dest, again, OLD, day4, "c-old")
    expected = {"file:///scans/site-a/img_00005.jpg": OLD}
    expected |= {f"file:///scans/site-c/img_{n:05d}.jpg": NEW for n in range(5)}
    return expected
