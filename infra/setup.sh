#!/usr/bin/env sh
# Creates what every imgedit worker shares on a Prefect server: the work pool, the API limit,
# the zombie automation (flows/zombies.py) and the deployments of prefect.yaml. Idempotent;
# needs PREFECT_API_URL and IMGEDIT_HOME.
set -eu
cd "${IMGEDIT_HOME:?set IMGEDIT_HOME to where workers find the imgedit code}"
prefect work-pool inspect imgedit >/dev/null 2>&1 || prefect work-pool create imgedit --type process
imgedit setup --limit "${IMGEDIT_API_LIMIT:-32}" ${IMGEDIT_API_RPM:+--requests-per-minute "$IMGEDIT_API_RPM"} \
  --heartbeat "${PREFECT_FLOWS_HEARTBEAT_FREQUENCY:-180}"
prefect --no-prompt deploy --all
