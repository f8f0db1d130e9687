"""oncoflow's Prefect flows and the `oncoflow` CLI."""

import os

# Without PREFECT_API_URL, Prefect starts a temporary local server and gives it 20 s by default; on a
# busy two-core machine that is too little, and the run dies before it starts. Users can still override.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
