"""oncoflow's Prefect flows and the `oncoflow` CLI."""

import atexit
import os

from flows.quick_exit import skip_teardown

# First of all exit hooks, so it runs last: a CLI command ends right after them (flows/quick_exit.py).
atexit.register(skip_teardown)

# Without PREFECT_API_URL, Prefect starts a temporary local server and gives it 20 s by default; on a
# busy two-core machine that is too little, and the run dies before it starts. Users can still override.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# Hospitals run this offline and do not expect telemetry; opt back in with the variable set to true.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Prefect's client prints a telemetry notice ("To opt out: ...") on a terminal unless this is set too.
os.environ.setdefault("DO_NOT_TRACK", "1")

# Redact every log record of any process that loads the flows (a worker or `serve` subprocess too, not
# only the CLI): storage libraries log signed URLs and keys. tasks.redaction imports only the stdlib.
from tasks.redaction import install_log_redaction  # noqa: E402

install_log_redaction()
