"""A real S3 server for the tests (moto's, on 127.0.0.1) and a fault-injecting HTTP proxy in front of it.

test_s3.py imports the fixtures; `FaultyProxy` is plain code so other tests and benchmarks can use it.
"""

from __future__ import annotations

import http.client
import itertools
import logging
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import s3fs

ACCESS_KEY = "oncoflow-test-key"
SECRET_KEY = "oncoflow-test-secret"
REGION = "us-east-1"
BUCKETS = ("scans", "preds")
FAULTS = ("slowdown", "internal", "drop", "truncate")

SLOWDOWN = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"""
INTERNAL = b"""<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>InternalError</Code><Message>We encountered an internal error.</Message></Error>"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FaultyProxy:
    """An HTTP proxy on loopback that breaks one request in `every`, cycling through `faults`.

    slowdown: 503 SlowDown; internal: 500 InternalError (both without forwarding); drop: close the
    connection without an answer; truncate: forward, then send half the response body and close;
    cut_upload: forward only half of the request body, then close both connections.
    """

    def __init__(
        self, upstream: str, every: int = 4, faults: tuple[str, ...] = FAULTS, bare_412: bool = False
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.every, self.faults = every, faults
        # Answer failed conditional writes the way SeaweedFS 4 does: 412 without the <Condition> element.
        self.bare_412 = bare_412
        self.injected: Counter[str] = Counter()
        self._count = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def next_fault(self) -> str | None:
        with self._lock:
            number = next(self._count)
            if number % self.every:
                return None
            fault = self.faults[(number // self.every - 1) % len(self.faults)]
            self.injected[fault] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def relay(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.next_fault()
                if fault in {"slowdown", "internal"}:
                    self.answer(
                        503 if fault == "slowdown" else 500, SLOWDOWN if fault == "slowdown" else INTERNAL
                    )
                    return
                if fault == "drop":
                    self.close_connection = True
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                upstream = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    if fault == "cut_upload" and body:
                        upstream.putrequest(
                            self.command, self.path, skip_host=True, skip_accept_encoding=True
                        )
                        for key, value in headers.items():
                            upstream.putheader(key, value)
                        upstream.endheaders(body[: len(body) // 2])
                        self.close_connection = True
                        return
                    upstream.request(self.command, self.path, body=body or None, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                if proxy.bare_412 and response.status == 412:
                    data = re.sub(rb"<Condition>.*?</Condition>", b"", data)
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in {"content-length", "transfer-encoding", "connection"}:
                        self.send_header(key, value)
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.close_connection = True
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            def answer(self, status: int, xml: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(xml)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(xml)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = relay

        return Handler


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 (and IAM) server on 127.0.0.1 at a free port, for the whole session; yields its URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[s3fs.S3FileSystem]:
    """Empty buckets `scans` and `preds`, the AWS variables pointing at the test server, and a client.

    The AWS config files point nowhere and instance metadata is off, so nothing of the machine's own
    AWS setup leaks in. The server is reset after the test (buckets, IAM users, auth enforcement).
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True, use_listings_cache=False)
    for bucket in BUCKETS:
        client.mkdir(bucket)
    yield client
    requests.post(f"{s3_server}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()
    requests.post(f"{s3_server}/moto-api/reset", timeout=10).raise_for_status()


def upload_folder(client: s3fs.S3FileSystem, folder: Path, prefix: str) -> list[str]:
    """Copy every file under `folder` (hidden ones too) to `prefix`; return the keys written."""
    keys = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix}/{path.relative_to(folder).as_posix()}"
        client.pipe_file(key, path.read_bytes())
        keys.append(key)
    return keys
