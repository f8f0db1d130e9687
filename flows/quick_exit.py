"""End an oncoflow command as soon as its work and Python's exit hooks are done.

After the last exit hook, CPython tears the interpreter down: it frees every module and object that
torch, transformers, pyarrow and Prefect loaded, one by one. Nothing of the command's work happens
there (files are written and closed, Prefect's workers have sent their logs and events, the temporary
server is stopped: all of that is done by then), yet on a 2-core machine it took 1.5 s after a
classify run and 0.6 s after `--help` (bench/README.md, "Start-up as a user sees it"). So a command
started from the CLI (`oncoflow ...`, `python -m flows.cli`, `python -m flows.demo`) ends the process
right after the exit hooks, with the same exit code, once its output is flushed.

`skip_teardown` is registered by `flows/__init__.py` before anything else registers an exit hook, so it
runs last of them (they run last-in, first-out); it does nothing unless `run_command` recorded an exit
code, so importing the flows elsewhere (a Prefect worker, a notebook, the tests) changes nothing. An
exception other than SystemExit leaves the normal exit alone (its traceback and exit status are
Python's own)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable

_exit_code: list[int] = []


def run_command(main: Callable[[], object]) -> None:
    """Run a CLI entry point; on its normal end or `sys.exit(int)`, let the process skip the teardown."""
    try:
        main()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            _exit_code.append(stop.code or 0)
        raise
    _exit_code.append(0)


def skip_teardown() -> None:
    """The last exit hook: flush what is buffered, then end the process with the command's exit code."""
    if not _exit_code:
        return
    import logging

    logging.shutdown()  # already done by its own hook; repeated in case logging was set up before us
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe: Python drops it too
            stream.flush()
    with contextlib.suppress(OSError, AttributeError):  # what C libraries printed through stdio
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(_exit_code[-1])
