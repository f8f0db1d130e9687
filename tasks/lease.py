"""One writer at a time per (output dataset, model revision): a lease object inside DEST.

Why: shard files are named by their content, so a retried task or a re-run after `kill -9` overwrites
its own files. Two runs that overlap, though, list the source at different moments and cut different
shards of the same images, so one image could land in two files. The lease serialises them: a run lists
the source only once it holds the lease, so it sees every row the previous holder wrote and classifies
only what is still missing. Exactly once follows from lease + content-addressed shards + atomic writes.

Local folders: `fcntl.flock` on DEST/_leases/<key>.lease. The kernel drops the lock when its process
dies, even by SIGKILL, so a crashed run never blocks the next one. While held, the file records the
holder (run id, host, pid, since); release empties it. A record found by a new holder therefore names a
run that died holding the lease, which the caller can mark as crashed. (flock needs a local filesystem
or NFSv4; see docs/operations.md.)

Object stores (S3): a JSON object created with a conditional PUT (`If-None-Match: *`), renewed by a
heartbeat thread with `If-Match` on its ETag. A lease whose expiry has passed (its holder died or hung)
is taken over with `If-Match` on the stale ETag, so of two contenders exactly one wins. So is, at once,
the lease of a holder that certainly died on this machine (Holder.dead_on_this_machine: same boot and
PID namespace, pid gone or reused), so a rerun after `kill -9` does not wait for the TTL. A store that
ignores conditional writes is detected at acquire time and reported; overlapping runs are then not
excluded there.

The key is the model revision (the one in the rows' `model_revision`), known before the lease because
the model is loaded (or, on a cluster, its files hashed) first: two runs of one revision serialise
whatever folder or spelling each was given, runs of different revisions on the same DEST proceed in
parallel.
The `_leases` folder is invisible to readers: pyarrow skips names starting with `_`, and the
`**/*.parquet` glob of DuckDB or Spark does not match `.lease` files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from tasks.defaults import DEFAULT_WAIT_SECONDS
from tasks.redaction import redact
from tasks.storage import Location, output_error, s3_error_code, storage_call

LEASE_FOLDER = "_leases"


DEFAULT_TTL_SECONDS = 600.0  # object stores only: a lease not renewed for this long is free to take
POLL_SECONDS = 1.0

logger = logging.getLogger(__name__)


class LeaseBusy(Exception):
    """Another live run holds the lease and did not release it within the wait."""


class LeaseLost(Exception):
    """This run's lease expired or was taken over while it ran (object stores); its rows may overlap."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: enough to find the run in Prefect and the process on its machine.

    `scope` (boot id + PID namespace) and `started` (the process's start time) let a later run on the
    same machine tell for sure that the holder died (dead_on_this_machine); records without them,
    from older versions, are never judged dead that way."""

    run_id: str
    host: str
    pid: int
    since: str
    scope: str = ""
    started: str = ""

    @classmethod
    def me(cls, run_id: str) -> Holder:
        now = datetime.now(UTC).isoformat(timespec="seconds")
        pid = os.getpid()
        return cls(run_id, socket.gethostname(), pid, now, process_scope(), process_start(pid))

    def describe(self) -> str:
        return f"run {self.run_id} (pid {self.pid} on {self.host}, since {self.since})"

    def dead_on_this_machine(self) -> bool:
        """True only when the holder certainly died: it ran in this boot of this machine, in this PID
        namespace (so its pid means the same process here), and that pid is gone or now belongs to a
        process started at another time. Anything uncertain (another machine or container, an old
        record, /proc hidden) is False: the caller then waits for the record to expire."""
        if not self.scope or self.scope != process_scope():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            pass
        now = process_start(self.pid)
        return bool(self.started and now) and now != self.started


def process_scope() -> str:
    """This machine's boot and PID namespace ("" where /proc does not tell): the same scope, the same pids."""
    try:
        if os.readlink("/proc/self") != str(
            os.getpid()
        ):  # /proc of another PID namespace: its pids are not ours
            return ""
        with open("/proc/sys/kernel/random/boot_id") as handle:
            boot = handle.read().strip()
        return f"{socket.gethostname()}/{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def process_start(pid: int) -> str:
    """When `pid` started, in clock ticks since boot (field 22 of /proc/PID/stat); "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def lease_key(revision: str) -> str:
    """A file-safe name for a model revision (`sha256:<16 hex>` of a local folder, a hub commit).

    The revision, not the model as given: two spellings or two copies of one model folder (a model
    copied to each GPU machine) write the same rows, so they must take turns like one model does."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", revision).strip("-.") or "model"
    return f"{readable[:40]}-{hashlib.sha256(revision.encode()).hexdigest()[:12]}"


class Lease:
    """A held lease; release it with `release()` or by leaving the `with` block."""

    def __init__(self, location: Location, key: str, holder: Holder, previous: Holder | None) -> None:
        self.location, self.key, self.holder = location, key, holder
        self.previous = previous  # the record of a holder that died holding this lease, if any
        self.lost: str | None = None  # object stores: why the lease was lost, set by the heartbeat

    @property
    def path(self) -> str:
        return self.location.join(LEASE_FOLDER, f"{self.key}.lease")

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class FileLease(Lease):
    """flock on a local file: held while the descriptor is open, dropped by the kernel on process death."""

    def __init__(
        self, location: Location, key: str, holder: Holder, fd: int, previous: Holder | None
    ) -> None:
        super().__init__(location, key, holder, previous)
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is None:
            return
        # Empty the record before unlocking: a record left behind means its holder died.
        os.ftruncate(self.fd, 0)
        os.close(self.fd)  # closing drops the flock
        self.fd = None


class ObjectLease(Lease):
    """A conditional-write lease object, renewed by a daemon heartbeat thread."""

    def __init__(
        self, location: Location, key: str, holder: Holder, etag: str, ttl: float, previous: Holder | None
    ) -> None:
        super().__init__(location, key, holder, previous)
        self.etag, self.ttl = etag, ttl
        # This thread runs outside Prefect's run context: its records name the flow run themselves, so
        # they reach the run's logs in the UI (flows/logs.py).
        self.run = {"flow_run_id": holder.run_id} if is_flow_run_id(holder.run_id) else {}
        self.stopped = threading.Event()
        self.heartbeat = threading.Thread(target=self._renew, name=f"oncoflow-lease-{key}", daemon=True)
        self.heartbeat.start()

    def _renew(self) -> None:
        """Renew every ttl/4. A failed renewal is retried while the record written last is still well
        inside its TTL (an outage of a few minutes is survived); the lease is lost at once when another
        run has replaced the record, or when the time runs out. A condition that fails on this holder's
        own record (a renewal that reached the store but whose answer was lost) is no loss."""
        renewed = time.time()
        while not self.stopped.wait(self.ttl / 4):
            try:
                record = _record(self.holder, self.ttl)
                self.etag = _put(self.location, self.path, record, if_match=self.etag, retry=False)
                renewed = time.time()
            except Exception as exc:  # botocore's connection errors are not OSErrors
                replaced = isinstance(exc, FileExistsError)
                if replaced and self._still_mine():
                    # A renewal whose answer was lost wrote the record, at most one period ago.
                    renewed = time.time() - self.ttl / 4
                    continue
                next_try, expires = time.time() + self.ttl / 4, renewed + self.ttl
                if not replaced and next_try < expires - self.ttl / 8:
                    logger.warning("could not renew lease %s (%s); retrying", self.path, exc, extra=self.run)
                    continue
                self.lost = f"lease {self.path} could not be renewed ({exc}); another run may take it over"
                logger.error(self.lost, extra=self.run)
                return

    def _still_mine(self) -> bool:
        """After a renewal's condition failed: True (and the ETag now current) when the record is this
        holder's own, i.e. an earlier renewal reached the store but its answer was lost, so self.etag
        is one renewal behind; False when another run took the lease over."""
        try:
            etag = str(_call(self.location, "head_object", self.path, retry=False)["ETag"])
            data = self.location.fs.cat_file(self.path)
        except Exception:  # gone or unreadable: not provably ours
            return False
        if _parse(data) != self.holder:
            return False
        self.etag = etag
        return True

    def release(self) -> None:
        if self.stopped.is_set():
            return
        self.stopped.set()
        self.heartbeat.join()
        if self.lost is None:
            try:
                _call(self.location, "delete_object", self.path, IfMatch=self.etag)
            except Exception as exc:  # it expires on its own; a failed delete only delays the next run
                logger.warning(
                    "could not delete lease %s: %s (it expires on its own within %d s)",
                    redact(self.location.fs.unstrip_protocol(self.path)),
                    exc,
                    int(self.ttl),
                )


def acquire(
    location: Location,
    key: str,
    run_id: str,
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
) -> Lease:
    """Take the lease `key` in `location`, waiting up to `wait_seconds` for a live holder to finish."""
    holder = Holder.me(run_id)
    deadline = time.monotonic() + wait_seconds
    where = location.join(LEASE_FOLDER, f"{key}.lease")
    waiting_since = None
    while True:
        lease = (
            _try_file(location, key, holder)
            if location.is_local
            else _try_object(location, key, holder, ttl_seconds)
        )
        if isinstance(lease, Lease):
            if waiting_since is not None:
                logger.warning("took lease %s after waiting %.0f s", where, time.monotonic() - waiting_since)
            return lease
        if waiting_since is None and wait_seconds > 0:
            waiting_since = time.monotonic()
            logger.warning(
                "%s is held by %s: waiting up to %.0f s (ONCOFLOW_LEASE_WAIT_SECONDS) for it",
                where,
                lease.describe() if lease else "another run",
                wait_seconds,
            )
        if time.monotonic() >= deadline:
            waited = f" and was not released within {wait_seconds:.0f} s" if wait_seconds > 0 else ""
            raise LeaseBusy(
                f"{where} is held by {lease.describe() if lease else 'another run'}{waited}; wait for "
                "that run to finish (or stop it), then run again"
            )
        time.sleep(POLL_SECONDS)


def _try_file(location: Location, key: str, holder: Holder) -> Lease | Holder | None:
    """The lease, or the current holder's record (None if unreadable) when another process holds it."""
    folder = location.join(LEASE_FOLDER)
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(os.path.join(folder, f"{key}.lease"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, location.uri) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        current = _parse(os.pread(fd, 4096, 0))
        os.close(fd)
        return current
    previous = _parse(os.pread(fd, 4096, 0))
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record(holder, None), 0)
        os.fsync(fd)
    except OSError as exc:  # a full disk shows here first, before any shard
        os.close(fd)
        raise output_error(exc, location.uri) from exc
    return FileLease(location, key, holder, fd, previous)


def _try_object(location: Location, key: str, holder: Holder, ttl: float) -> Lease | Holder | None:
    path = location.join(LEASE_FOLDER, f"{key}.lease")
    previous = None
    try:
        etag = _put(location, path, _record(holder, ttl), if_none_match=True)
    except FileExistsError:
        try:
            # ETag first, then the body: the body is at least as new as the ETag, so a takeover
            # conditioned on that ETag can only replace the expired record it read.
            stale_etag = str(_call(location, "head_object", path)["ETag"])
            data = storage_call(location.fs, path, lambda: location.fs.cat_file(path))
        except FileNotFoundError:  # released in between: try again at once
            return _try_object(location, key, holder, ttl)
        current = _parse(data)
        if current == holder:  # our own create, retried after its answer was lost (a 500, a drop)
            return ObjectLease(location, key, holder, stale_etag, ttl, None)
        # A holder that died on this machine (kill -9, OOM) need not be waited for until its record
        # expires (up to the TTL, 10 minutes): take its lease over now, the same way as an expired one.
        if time.time() < _expiry(data) and not (current and current.dead_on_this_machine()):
            return current
        try:
            etag = _put(location, path, _record(holder, ttl), if_match=stale_etag)
        except OSError:  # another contender took over the stale lease first
            return current
        previous = current
    try:
        etag = _check_conditional_writes(location, path, _record(holder, ttl), etag)
    except Exception:
        with contextlib.suppress(Exception):  # leave no record that would make the next run wait
            _call(location, "delete_object", path, IfMatch=etag)
        raise
    return ObjectLease(location, key, holder, etag, ttl, previous)


def _check_conditional_writes(location: Location, path: str, record: bytes, etag: str) -> str:
    """A second create must fail; where it succeeds the store cannot exclude overlapping runs. The ETag now."""
    try:
        etag = _put(location, path, record, if_none_match=True)
    except FileExistsError:
        return etag
    logger.warning(
        "the object store behind %s ignores conditional writes (If-None-Match); overlapping runs on this "
        "output are not excluded there: schedule them so they do not overlap",
        location.uri,
    )
    return etag


def _record(holder: Holder, ttl: float | None) -> bytes:
    fields: dict[str, Any] = asdict(holder)
    if ttl is not None:
        fields["expires"] = time.time() + ttl
    return json.dumps(fields).encode()


def _expiry(data: bytes) -> float:
    try:
        return float(json.loads(data).get("expires", 0))
    except (ValueError, AttributeError):
        return 0.0


def is_flow_run_id(text: str) -> bool:
    """A Prefect flow run id is a UUID (run ids made outside Prefect, `compact-…`, are not)."""
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _parse(data: bytes) -> Holder | None:
    try:
        fields = json.loads(data)
        return Holder(
            str(fields["run_id"]),
            str(fields["host"]),
            int(fields["pid"]),
            str(fields["since"]),
            str(fields.get("scope", "")),
            str(fields.get("started", "")),
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _call(location: Location, method: str, path: str, retry: bool = True, **kwargs: Any) -> dict[str, Any]:
    """One S3 call through s3fs, which turns botocore errors into Python's own; a conditional write
    that lost (412/409, whichever condition) raises FileExistsError.

    With `retry`, through storage_call: transient errors (a 500, a dropped connection) are retried and
    the others name the lease's URI and the fix. The heartbeat calls without: it has its own retries,
    timed against the lease's expiry."""
    bucket, key, _ = location.fs.split_path(path)

    def call() -> dict[str, Any]:
        try:
            return location.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)
        except FileExistsError:
            raise
        except OSError as exc:
            if s3_error_code(exc) in PRECONDITION_FAILED:
                raise FileExistsError(f"{path}: condition not met ({s3_error_code(exc)})") from exc
            raise

    return storage_call(location.fs, path, call) if retry else call()


# A conditional write that lost: 412 (the condition did not hold) or 409 (AWS: a concurrent conditional
# write to the same key is in progress).
PRECONDITION_FAILED = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409"})


def _put(
    location: Location,
    path: str,
    data: bytes,
    if_none_match: bool = False,
    if_match: str | None = None,
    retry: bool = True,
) -> str:
    """PUT the record; one whose condition fails (a create that finds an object, a renewal or
    takeover whose ETag is no longer current) raises FileExistsError.

    s3fs says FileExistsError only when the 412 names its condition; SeaweedFS (and others) send 412
    without it, which s3fs turns into OSError(EINVAL): _call looks at the status instead."""
    conditions: dict[str, str] = {}
    if if_none_match:
        conditions["IfNoneMatch"] = "*"
    if if_match:
        conditions["IfMatch"] = if_match
    return str(_call(location, "put_object", path, retry, Body=data, **conditions)["ETag"])
