"""Run Prefect's temporary server (uvicorn) so that it stops when the oncoflow command that started it dies.

    python -m flows.server_guard PARENT_PID [uvicorn arguments...]

Prefect stops its temporary server on the way out (an atexit hook), which a command killed with
SIGKILL (`kill -9`, the kernel's out-of-memory killer, a container runtime's hard stop) never reaches:
the server lived on, holding ~200 MB and a port, one more after every such night. Here uvicorn runs in
this same process (so Prefect's own terminate() still reaches it), and a thread checks once a second
whether PARENT_PID is still this process's parent; when it is not, it sends this process SIGTERM, which
uvicorn handles as a normal shutdown. Linux and macOS alike re-parent an orphan, so polling getppid()
needs no platform-specific call (prctl's parent-death signal would also follow the starting *thread*).

The other half is below: every oncoflow command that talks to Prefect, and `make demo`, spawns the
server itself, early (`start_temporary_server`, `use_temporary_server`); should that server not come
up, Prefect starts its own, with its `subprocess` swapped so that it starts the same way
(`detach_temporary_server`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import IO, Any

POLL_SECONDS = 1.0
HEALTH_POLL_SECONDS = 0.1

_early: dict[str, Any] = {}  # start_temporary_server()'s server: "process", "address"; "settings" once in use


def watch_parent(parent: int) -> None:
    """Return once `parent` is no longer this process's parent (it died, and this one was re-parented)."""
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)


def main() -> None:
    parent = int(sys.argv[1])

    def stop_when_orphaned() -> None:
        watch_parent(parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_orphaned, name="oncoflow-parent-watch", daemon=True).start()
    sys.argv = ["uvicorn", *sys.argv[2:]]
    runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)


def start_temporary_server() -> None:
    """Spawn the command's temporary Prefect server now, so that it boots on another core while this
    process loads the model. Prefect itself starts it only at the flow's first API call, after importing
    its whole server module in this process (~4 s of CPU on a 2-core machine) just to do so: a warm
    classify's flow began 17-20 s after launch, half of it spent waiting for the server
    (bench/cli_startup.py). The command line and environment are Prefect's own (SubprocessASGIServer),
    under this guard, in a session of its own; `use_temporary_server()` points the flow at it. Nothing
    happens with PREFECT_API_URL set or Prefect's temporary server disabled."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        get_current_settings,
    )

    if _early or PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return
    import prefect

    with socket.socket() as probe:  # a free port (if it is taken meanwhile, Prefect starts its own)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent)]
    args += ["--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--log-level", "error", "--lifespan", "on"]
    env = {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
    }
    settings = get_current_settings()
    env.update(settings.to_environment_variables(exclude_unset=True))
    with server_log(settings.home) as log:
        process = detached_popen(args, env=env, stdout=log, stderr=log)
    _early.update(process=process, address=f"http://127.0.0.1:{port}", log=getattr(log, "name", None))
    # Registered before any of Prefect's own exit hooks: it runs after them (last in, first out), once
    # their background services have sent the run's last logs and events to this server.
    atexit.register(stop_temporary_server)


SERVER_LOG = "temporary-server.log"
SERVER_LOG_LIMIT = 10 * 1024 * 1024  # bytes: a larger log starts again (the newest errors are what matter)


@contextlib.contextmanager
def server_log(home: Any) -> Iterator[IO[bytes] | None]:
    """PREFECT_HOME/temporary-server.log, opened to append, for the early server's output: its errors
    (it logs errors only) are kept there instead of interleaving with the command's own lines. A server
    stopped while its services flush the run's last events printed ~150 lines of tracebacks after the
    command's `stopped:` line (under load; the run's records were complete). None (the terminal, as
    before) when PREFECT_HOME cannot be written."""
    try:
        os.makedirs(home, exist_ok=True)
        path = os.path.join(home, SERVER_LOG)
        mode = "wb" if os.path.exists(path) and os.path.getsize(path) > SERVER_LOG_LIMIT else "ab"
        handle: IO[bytes] | None = open(path, mode)  # noqa: SIM115
    except OSError:
        handle = None
    try:
        yield handle
    finally:
        if handle is not None:
            handle.close()  # the server holds its own copy of the descriptor


def use_temporary_server() -> None:
    """For the rest of this command, Prefect's API is the early server, once it answers; its URL is set
    in Prefect's settings (as Prefect's own test harness does), so Prefect never imports its server
    module here. If it did not start (it exited, or did not answer in
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS), Prefect starts its temporary server itself, as
    before, detached and guarded."""
    import httpx
    from prefect.logging import get_logger
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        PREFECT_UI_URL,
        temporary_settings,
    )

    process = _early.get("process")
    if process is None or _early.get("settings") is not None:
        detach_temporary_server()
        return
    address = _early["address"]
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client() as client:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.get(f"{address}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_SECONDS)
        else:
            log = _early.get("log")
            stop_temporary_server()
            get_logger().warning(
                f"the temporary server did not answer (its errors, if any: {log or 'above'}); Prefect starts its own"
            )
            detach_temporary_server()
            return
    get_logger().info(f"Starting temporary server on {address}")  # Prefect's own words for its server
    # No UI link ("View at ...") in the log: the temporary server serves no UI and is gone after the run.
    settings = temporary_settings(updates={PREFECT_API_URL: f"{address}/api", PREFECT_UI_URL: ""})
    settings.__enter__()  # left open until the command ends (stop_temporary_server)
    _early["settings"] = settings


def is_temporary_server(api_url: str | None) -> bool:
    """Whether `api_url` is this command's early temporary server (not a server the user named)."""
    return bool(api_url) and "address" in _early and api_url == f"{_early['address']}/api"


def stop_temporary_server() -> None:
    """At exit: stop the early server (terminate, then kill after 5 s, as Prefect stops its own)."""
    process = _early.pop("process", None)
    if process is None:
        return
    if _early.get("settings") is not None:
        from prefect.logging import get_logger

        get_logger().info(f"Stopping temporary server on {_early['address']}")
    process.terminate()
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def detach_temporary_server() -> None:
    """Start Prefect's temporary server (used while PREFECT_API_URL is unset) in a session of its own.

    Ctrl-C in a terminal signals the whole foreground process group: the server died with the run,
    which then spent over a minute failing to report to it (hundreds of tracebacks), exited 1 and
    stayed Running in the history. In its own session only oncoflow gets the signal: the run is marked
    Crashed, the command exits 130, and the server is stopped on the way out (Prefect's atexit hook).
    Done by giving Prefect's server module a `subprocess` whose Popen starts a new session, and runs
    uvicorn under flows.server_guard, which stops the server if this process dies without that hook
    (SIGKILL, the out-of-memory killer). The commands start their server early instead
    (start_temporary_server, the same way); this is the fallback when that server does not come up."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    if server.subprocess is not subprocess:  # done already
        return
    detached = types.ModuleType("subprocess")
    detached.__dict__.update(vars(subprocess))
    detached.Popen = detached_popen  # type: ignore[attr-defined]
    server.subprocess = detached  # type: ignore[attr-defined]


def detached_popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen for Prefect's server module: a session of its own; `python -m uvicorn ...` (the temporary
    server) runs under flows.server_guard, watching this process."""
    if list(args[1:3]) == ["-m", "uvicorn"]:
        args = [args[0], "-m", "flows.server_guard", str(os.getpid()), *args[3:]]
    return subprocess.Popen(args, start_new_session=True, **kwargs)


if __name__ == "__main__":
    main()
