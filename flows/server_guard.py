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

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
import types
from typing import Any

POLL_SECONDS = 1.0


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


def detach_temporary_server() -> None:
    """Start Prefect's temporary server (used while PREFECT_API_URL is unset) in a session of its own.

    Ctrl-C in a terminal signals the whole foreground process group: the server died with the run,
    which then spent over a minute failing to report to it (hundreds of tracebacks), exited 1 and
    stayed Running in the history. In its own session only oncoflow gets the signal: the run is marked
    Crashed, the command exits 130, and the server is stopped on the way out (Prefect's atexit hook).
    Done by giving Prefect's server module a `subprocess` whose Popen starts a new session, and runs
    uvicorn under flows.server_guard, which stops the server if this process dies without that hook
    (SIGKILL, the out-of-memory killer)."""
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
