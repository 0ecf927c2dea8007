#!/usr/bin/env bash
# The same with the command line (works whether or not the service runs; same data directory).
# `make run` installs it in .venv/bin; safe to run again.
set -euo pipefail
DBSVC="${DBSVC:-.venv/bin/database-service}"
TENANT="${TENANT:-abc}"

"$DBSVC" tenant create "$TENANT" || true          # tenant_exists on a second run
"$DBSVC" tenant list
# `token issue` prints the token alone; --register creates the service if it does not exist.
SERVICE_TOKEN="$("$DBSVC" token issue --service reporting --register --tenants "$TENANT" --scopes read --ttl 3600)"
echo "token for 'reporting': ${SERVICE_TOKEN:0:16}..."
# A producer's token holds `ingest` for its tenant only (never the admin token).
"$DBSVC" token issue --service feed --register --tenants "$TENANT" --scopes ingest --ttl 600 > /dev/null
"$DBSVC" migrate
