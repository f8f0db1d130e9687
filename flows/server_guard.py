"""Run Prefect's temporary server (uvicorn) so that it stops when the oncoflow command that started it dies.

    python -m flows.server_guard PARENT_PID [uvicorn arguments...]

Prefect stops its temporary server on the way out (an atexit hook), which a command killed with
SIGKILL (`kill -9`, the kernel's out-of-memory killer, a container runtime's hard stop) never reaches:
the server lived on, holding ~200 MB and a port, one more after every such night. Here uvicorn runs in
this same process (so Prefect's own terminate() still reaches it), and a thread checks once a second
whether PARENT_PID is still this process's parent; when it is not, it sends this process SIGTERM, which
uvicorn handles as a normal shutdown. Linux and macOS alike re-parent an orphan, so polling getppid()
needs no platform-specific call (prctl's parent-death signal would also follow the starting *thread*).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time

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


if __name__ == "__main__":
    main()
