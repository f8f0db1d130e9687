"""Run Prefect's temporary server (uvicorn) so that it stops when the oncoflow command that started it dies.

    python -m flows.server_guard PARENT_PID [uvicorn arguments...]

Prefect stops its temporary server on the way out (an atexit hook), which a command killed with
SIGKILL (`kill -9`, the kernel's out-of-memory killer, a container runtime's hard stop) never reaches:
the server lived on, holding ~200 MB and a port, one more after every such night. Here uvicorn runs in
this same process (so Prefect's own terminate() still reaches it), and a thread checks once a second
whether PARENT_PID is still this process's parent; when it is not, it sends this process SIGTERM, which
uvicorn handles as a normal shutdown. Linux and macOS alike re-parent an orphan, so polling getppid()
needs no platform-specific call (prctl's parent-death signal would also follow the starting *thread*).

`detach_temporary_server()` is the other half: every oncoflow command and `make demo` call it before
Prefect starts its temporary server, so that the server starts in a session of its own under this guard.
"""

from __future__ import annotations

import atexit
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from typing import Any

POLL_SECONDS = 1.0
HEALTH_POLL_SECONDS = 0.1

_early: dict[str, Any] = {}  # the server start_temporary_server() spawned: "process", "port"


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
    """Spawn Prefect's temporary server now, before this process loads the model and imports Prefect's
    server module, so that it boots on another core meanwhile: a command's flow began ~17 s after launch
    on a 2-core machine, half of it waiting for the server, which Prefect starts only at the flow's first
    API call (bench/cli_startup.py). `detach_temporary_server()` later hands it to Prefect, which then
    uses and stops it as its own. Nothing happens with PREFECT_API_URL set or the temporary server
    disabled. The command line and environment are Prefect's own (SubprocessASGIServer), under the guard."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE,
        get_current_settings,
    )

    if _early or PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return
    import prefect

    with socket.socket() as probe:  # a free port, as the server's (Prefect retries if it is taken)
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
    env.update(get_current_settings().to_environment_variables(exclude_unset=True))
    _early.update(process=detached_popen(args, env=env), port=port)
    atexit.register(stop_unclaimed_server)


def stop_unclaimed_server() -> None:
    """At exit: stop an early server that Prefect never took over (the command failed before its flow)."""
    process = _early.pop("process", None)
    if process is not None and not _early.get("claimed"):
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()


def detach_temporary_server() -> None:
    """Start Prefect's temporary server (used while PREFECT_API_URL is unset) in a session of its own.

    Ctrl-C in a terminal signals the whole foreground process group: the server died with the run,
    which then spent over a minute failing to report to it (hundreds of tracebacks), exited 1 and
    stayed Running in the history. In its own session only oncoflow gets the signal: the run is marked
    Crashed, the command exits 130, and the server is stopped on the way out (Prefect's atexit hook).
    Done by giving Prefect's server module a `subprocess` whose Popen starts a new session, and runs
    uvicorn under flows.server_guard, which stops the server if this process dies without that hook
    (SIGKILL, the out-of-memory killer). A server spawned early (start_temporary_server) is waited for
    here and becomes Prefect's; if it failed to start, Prefect starts one itself as before."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api import server

    if server.subprocess is subprocess:  # not done yet
        detached = types.ModuleType("subprocess")
        detached.__dict__.update(vars(subprocess))
        detached.Popen = detached_popen  # type: ignore[attr-defined]
        server.subprocess = detached  # type: ignore[attr-defined]
    if _early.get("process") is not None and not _early.get("claimed"):
        claim_early_server(server)


def claim_early_server(server: types.ModuleType) -> None:
    """Wait for the early server to answer, then register it as the SubprocessASGIServer Prefect would
    have started (the one for no particular port), so Prefect's clients use it and its exit hook stops it."""
    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    process, port = _early["process"], _early["port"]
    instance = server.SubprocessASGIServer()
    if instance.running:  # Prefect started one already
        return
    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    with httpx.Client() as client:
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(HEALTH_POLL_SECONDS)
        else:  # exited (the port was taken meanwhile) or too slow: Prefect starts its own when asked
            stop_unclaimed_server()
            return
    server.subprocess_server_logger.info(f"Starting temporary server on http://127.0.0.1:{port}")
    instance.port, instance.server_process, instance.running = port, process, True
    atexit.register(instance.stop)
    _early["claimed"] = True


def detached_popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """Popen for Prefect's server module: a session of its own; `python -m uvicorn ...` (the temporary
    server) runs under flows.server_guard, watching this process."""
    if list(args[1:3]) == ["-m", "uvicorn"]:
        args = [args[0], "-m", "flows.server_guard", str(os.getpid()), *args[3:]]
    return subprocess.Popen(args, start_new_session=True, **kwargs)


if __name__ == "__main__":
    main()
