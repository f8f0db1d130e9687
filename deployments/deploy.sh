#!/usr/bin/env bash
# Deploy oncoflow's three deployments (deployments/prefect.yaml) to a Prefect work pool.
#
#   export ONCOFLOW_REPO=... ONCOFLOW_SOURCE=... ONCOFLOW_OUTPUT=... ONCOFLOW_MODEL=... ONCOFLOW_TIMEZONE=...
#   deployments/deploy.sh                                   # the file's pool: oncoflow-local (process)
#   deployments/deploy.sh --pool oncoflow-gpu --job-variable image=registry.example.org/oncoflow:1.0 \
#       --job-variable gpu_count=1                          # any other pool, with its job variables
#
# Why a script and not `prefect deploy --all`:
# - `prefect deploy --all` ignores --pool and --job-variable ("These options will be ignored"), so a
#   GPU pool chosen on the command line would silently stay the file's process pool. Deploying each
#   deployment by name (--name) applies them.
# - `{{ $VAR }}` of an unset variable deploys as an empty string: an empty source fails only at 02:00,
#   and an empty time zone silently schedules in UTC. The variables are checked here first.
# Extra arguments go to every `prefect deploy`. Exit code 2: a variable is missing or invalid (unset,
# empty, a relative path, a time zone that is not an IANA name).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."

missing=()
for variable in ONCOFLOW_REPO ONCOFLOW_SOURCE ONCOFLOW_OUTPUT ONCOFLOW_MODEL ONCOFLOW_TIMEZONE; do
    [ -n "${!variable:-}" ] || missing+=("$variable")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "error: set ${missing[*]} before deploying: deployments/prefect.yaml reads them at deploy time," \
        "and an unset one would deploy as an empty string (see docs/operations.md)" >&2
    exit 2
fi
# The worker runs each flow in ONCOFLOW_REPO, maybe as another account: a relative path (or a relative
# model folder, which would be read as a hub id) would name something else there, or nothing, and a
# quoted "~" another account's home.
relative=()
for variable in ONCOFLOW_REPO ONCOFLOW_SOURCE ONCOFLOW_OUTPUT ONCOFLOW_MODEL; do
    value=${!variable}
    case $value in
        /* | *://*) ;;
        *) if [ "$variable" != ONCOFLOW_MODEL ] || [ -d "$caller/$value" ] || [[ $value == "~"* ]]; then
            relative+=("$variable=$value")
        fi ;;
    esac
done
if [ ${#relative[@]} -gt 0 ]; then
    echo "error: ${relative[*]}: give absolute paths (e.g. \$(realpath PATH)) or s3:// URIs; the worker" \
        "runs the flows in ONCOFLOW_REPO, where a relative path names another folder or none" >&2
    exit 2
fi
# The Python with Prefect and oncoflow: $PYTHON, else this checkout's .venv (`make install`), else python3.
if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x .venv/bin/python ]; then
    python=.venv/bin/python
else
    python=python3
fi
if ! "$python" -c 'import prefect, flows' 2>/dev/null; then
    echo "error: $python cannot import prefect and oncoflow's flows; run \`make install\` here, or set" \
        "PYTHON to the interpreter of the environment oncoflow is installed in" >&2
    exit 2
fi
if ! "$python" -c 'import sys, zoneinfo; zoneinfo.ZoneInfo(sys.argv[1])' "$ONCOFLOW_TIMEZONE" 2>/dev/null; then
    echo "error: ONCOFLOW_TIMEZONE=$ONCOFLOW_TIMEZONE is not an IANA time zone (e.g. UTC, Europe/Berlin)" >&2
    exit 2
fi

for name in classify-nightly reprocess-archive evaluate; do
    "$python" -m prefect --no-prompt deploy --prefect-file deployments/prefect.yaml --name "$name" "$@"
done
