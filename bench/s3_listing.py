"""How long discovery of N objects takes on S3: `list_images` (paged listing + filter + fingerprints).

Starts moto's S3 server on 127.0.0.1 unless --endpoint names another S3-compatible server, uploads N
small objects under s3://BUCKET/scans/ in 100 folders, then times discovery a few times.

    PYTHONPATH=. .venv/bin/python bench/s3_listing.py --objects 10000
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import time

from tasks.storage import check_source, list_images, open_location


def start_moto() -> str:
    """moto's S3 server on a free loopback port; any credentials do (defaults set when none are)."""
    from moto.server import ThreadedMotoServer

    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}.items():
        os.environ.setdefault(name, value)

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    return f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", help="an S3-compatible server to use instead of a local moto")
    parser.add_argument("--bucket", default="oncoflow-bench")
    args = parser.parse_args()

    endpoint = args.endpoint or start_moto()
    location = open_location(f"s3://{args.bucket}/scans", {"endpoint_url": endpoint})
    fs = location.fs
    if not fs.exists(args.bucket):
        fs.mkdir(args.bucket)
    started = time.perf_counter()
    fs.pipe({f"{args.bucket}/scans/d{i % 100:02d}/img{i:06d}.jpg": b"x" * 64 for i in range(args.objects)})
    print(f"uploaded {args.objects} objects to {endpoint} in {time.perf_counter() - started:.1f} s")

    timings = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        check_source(location)
        found = sum(1 for _ in list_images(location))
        timings.append(time.perf_counter() - started)
        assert found == args.objects, found
    best, median = min(timings), statistics.median(timings)
    print(
        f"discovery of {found} objects: best {best:.2f} s, median {median:.2f} s "
        f"({found / median:,.0f} objects/s) over {args.repeats} runs"
    )


if __name__ == "__main__":
    main()
