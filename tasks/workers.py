"""Worker processes for the host share of a DecodeSplit: an Executor over fresh interpreters that run
tasks.images.host_resize_chunk, beside the GPU engine and off its GIL.

Why not concurrent.futures.ProcessPoolExecutor: with every multiprocessing start method each worker
imports the parent's main module, and with the `oncoflow` CLI that is torch, Prefect and pyarrow
(measured here: ~200 MB of private memory and ~2 s per worker; Python 3.11's forkserver does not
import it once for all, whatever its preload says), while forking the engine's process itself would
copy its CUDA context and threads. These workers run `python -m tasks.workers`: a decode worker then
holds numpy, Pillow and tasks.images (~30 MB).

Nothing crosses the pipes as a pickle: a call is JSON (the preprocessor's numbers, the limit, the
names, the sizes) plus the files' bytes, a reply JSON (each image's shape and source size, or its
error text) plus the pixels. So the
engine's process never unpickles what a worker that decodes untrusted files sends back, and a worker
runs nothing but its one function.

Semantics follow ProcessPoolExecutor where they matter: results and exceptions come back through the
Future; if a worker process dies (killed for memory, a crash in a decoder), the pool is broken: the
Futures in flight and queued fail with BrokenExecutor, later submits raise it, and the caller starts a
new pool (tasks.inference.renewed_pool).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import queue
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import BrokenExecutor, Executor, Future
from pathlib import Path
from typing import IO, Any

import numpy as np

from tasks.images import Decoded, Preprocessor, host_resize_chunk

HEADER = struct.Struct("!Q")  # each message: its length, then its bytes
Chunk = list[Decoded | str]
Call = tuple[Future[Chunk], dict[str, Any]]  # a future and host_resize_chunk's arguments by name
CALL = inspect.signature(host_resize_chunk)


def send(stream: IO[bytes], header: bytes, body: list[memoryview] | bytes) -> None:
    """Two messages: the header, then the body, written from its parts as they are (no joined copy)."""
    parts = [body] if isinstance(body, bytes) else body
    stream.write(HEADER.pack(len(header)))
    stream.write(header)
    stream.write(
        HEADER.pack(sum(part.nbytes if isinstance(part, memoryview) else len(part) for part in parts))
    )
    for part in parts:
        stream.write(part)
    stream.flush()


def receive(stream: IO[bytes]) -> bytes | None:
    """The next message, or None at the end of the stream (the other side is gone)."""
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None
    (size,) = HEADER.unpack(header)
    payload = stream.read(size)
    return payload if len(payload) == size else None


def encode_call(arguments: dict[str, Any]) -> tuple[bytes, list[memoryview]]:
    """A host_resize_chunk call (its arguments by name) as a JSON header and the files' bytes."""
    items = arguments["items"]
    header = {
        "preprocessor": dataclasses.asdict(arguments["preprocessor"]),
        "max_pixels": arguments["max_pixels"],
        "names": arguments.get("names"),
        "exif_orientation": arguments.get("exif_orientation", False),
        "sizes": [item.nbytes for item in items],
    }
    return json.dumps(header).encode(), join(items)


def decode_call(header: bytes, body: bytes) -> dict[str, Any]:
    fields = json.loads(header)
    config = fields["preprocessor"]
    return {
        "preprocessor": Preprocessor(
            **{**config, "mean": tuple(config["mean"]), "std": tuple(config["std"])}
        ),
        "items": split_body(body, fields["sizes"]),
        "max_pixels": int(fields["max_pixels"]),
        "names": fields["names"],
        "exif_orientation": bool(fields["exif_orientation"]),
    }


def encode_reply(results: Chunk) -> tuple[bytes, list[memoryview]]:
    described = [
        {"error": result} if isinstance(result, str) else {"shape": list(result[0].shape), "size": result[1:]}
        for result in results
    ]
    return json.dumps(described).encode(), join([r[0] for r in results if not isinstance(r, str)])


def decode_reply(header: bytes, body: bytes) -> Chunk:
    described = json.loads(header)
    if isinstance(described, dict):  # the worker could not run the call at all
        raise RuntimeError(f"decode worker failed: {described['failed']}")
    shapes = [tuple(d["shape"]) for d in described if "shape" in d]
    arrays = iter(
        array.reshape(shape)
        for array, shape in zip(split_body(body, [int(np.prod(s)) for s in shapes]), shapes, strict=True)
    )
    return [d["error"] if "error" in d else (next(arrays), *d["size"]) for d in described]


def join(arrays: list[np.ndarray]) -> list[memoryview]:
    """The arrays' bytes, one after another, as views for `send` to write (no copy of contiguous ones)."""
    return [np.ascontiguousarray(array).data.cast("B") for array in arrays]


def split_body(body: bytes, sizes: list[int]) -> list[np.ndarray]:
    """uint8 views of consecutive `sizes` bytes of `body` (no copies)."""
    views, offset = [], 0
    for size in sizes:
        views.append(np.frombuffer(body, np.uint8, size, offset))
        offset += size
    if offset != len(body):
        raise ValueError(f"message of {len(body)} bytes, {offset} described")
    return views


def worker_process() -> subprocess.Popen[bytes]:
    """Start one worker: `-P` keeps the working directory off its module path, and this package's own
    folder comes first, so a different `tasks` package where the engine happens to run cannot be the one
    imported. Its own session keeps a Ctrl-C in the terminal from reaching it (it ends when its input
    closes: when this process shuts the pool down or exits)."""
    ours = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join([ours, *(entry for entry in sys.path if entry and entry != ours)])
    return subprocess.Popen(
        [sys.executable, "-P", "-m", "tasks.workers"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=path),
        start_new_session=True,
    )


class DecodeWorkers(Executor):
    """`workers` worker processes, each fed by one thread of this process that sends it a call and
    waits for the reply (the waiting releases the GIL; encoding holds it for a copy of the bytes).
    Only tasks.images.host_resize_chunk can be submitted."""

    def __init__(self, workers: int) -> None:
        self._calls: queue.SimpleQueue[Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._broken: str | None = None
        self._shutdown = False
        self._processes = [worker_process() for _ in range(max(1, workers))]
        self._threads = [
            threading.Thread(target=self._serve, args=(process,), name="oncoflow-worker-io", daemon=True)
            for process in self._processes
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        if fn is not host_resize_chunk:
            raise TypeError("decode workers run tasks.images.host_resize_chunk only")
        arguments = dict(CALL.bind(*args, **kwargs).arguments)
        with self._lock:
            if self._broken is not None:
                raise BrokenExecutor(self._broken)
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future: Future[Chunk] = Future()
            self._calls.put((future, arguments))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._shutdown:
                return
            self._shutdown = True
        if cancel_futures:
            self._cancel_queued()
        for _ in self._threads:
            self._calls.put(None)  # each serving thread stops after the calls queued before it
        if wait:
            for thread in self._threads:
                thread.join()
            for process in self._processes:
                self._stop(process)

    def _serve(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdin is not None and process.stdout is not None
        while (call := self._calls.get()) is not None:
            future, arguments = call
            if not future.set_running_or_notify_cancel():
                continue
            if self._broken is not None:
                future.set_exception(BrokenExecutor(self._broken))
                continue
            try:
                call_header, call_body = encode_call(arguments)
            except Exception as exc:  # arguments this protocol cannot carry: that call fails alone
                future.set_exception(exc)
                continue
            try:
                send(process.stdin, call_header, call_body)
                header, body = receive(process.stdout), receive(process.stdout)
            except OSError:  # the pipe broke: the worker is gone
                header = body = None
            except BaseException as exc:  # out of memory mid-message: this worker's stream is unusable
                self._break(f"a call to a decode worker failed: {exc!r}")
                future.set_exception(BrokenExecutor(self._broken))
                continue
            if header is None or body is None:
                self._break(f"a decode worker process ended abruptly (exit code {process.wait()})")
                future.set_exception(BrokenExecutor(self._broken))
                continue
            try:
                future.set_result(decode_reply(header, body))
            except Exception as exc:
                future.set_exception(exc)
        self._stop(process)

    def _break(self, reason: str) -> None:
        """One worker died: the pool is broken, its other workers stop (their calls in flight fail)."""
        with self._lock:
            if self._broken is None:
                self._broken = reason
        for process in self._processes:
            if process.poll() is None:
                process.kill()

    def _cancel_queued(self) -> None:
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            if call is None:
                self._calls.put(None)
                return
            call[0].cancel()

    @staticmethod
    def _stop(process: subprocess.Popen[bytes]) -> None:
        """End a worker: closing its input ends its loop; kill it if it does not end in 5 s."""
        if process.stdin is not None and not process.stdin.closed:
            with contextlib.suppress(OSError):  # a worker already gone
                process.stdin.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


def main() -> None:
    """A worker: decode each chunk that arrives on stdin, reply on stdout, until stdin ends."""
    calls, replies = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    while (header := receive(calls)) is not None and (body := receive(calls)) is not None:
        try:
            send(replies, *encode_reply(host_resize_chunk(**decode_call(header, body))))
        except Exception as exc:  # a malformed call: that call fails, the worker goes on
            send(replies, json.dumps({"failed": f"{type(exc).__name__}: {exc}"}).encode(), b"")


if __name__ == "__main__":
    main()
