#!/usr/bin/env bash
# REST, step by step: a tenant, a service identity, a token for it, a query as the tenant.
# Runs against `make run` as it starts (override with DBSVC_URL, DBSVC_DATA_DIR, TENANT); safe to
# run again (what exists is kept).
set -euo pipefail
BASE="${DBSVC_URL:-http://127.0.0.1:8080}"
ADMIN_TOKEN="$(cat "${DBSVC_DATA_DIR:-.data}/admin.token")"
TENANT="${TENANT:-abc}"
field() { python3 -c "import json, sys; print(json.load(sys.stdin)$1)"; }

# A tenant (409 tenant_exists on a second run is fine).
curl -s -XPOST "$BASE/api/v1/admin/schema/create" -H "Authorization: Bearer $ADMIN_TOKEN" \
     -H 'content-type: application/json' -d "{\"tenant_id\": \"$TENANT\"}"; echo

# A service identity for it, without a secret (409 conflict on a second run is fine) ...
curl -s -XPOST "$BASE/api/v1/admin/services" -H "Authorization: Bearer $ADMIN_TOKEN" \
     -H 'content-type: application/json' \
     -d "{\"service\": \"trading-engine\", \"tenants\": [\"$TENANT\"], \"scopes\": [\"read\", \"write\"], \"with_secret\": false}"; echo

# ... and a token for it.
SERVICE_TOKEN="$(curl -sf -XPOST "$BASE/api/v1/admin/tokens" -H "Authorization: Bearer $ADMIN_TOKEN" \
     -H 'content-type: application/json' -d '{"service": "trading-engine"}' | field '["access_token"]')"

# The service writes and reads as the tenant.
curl -sf -XPOST "$BASE/api/v1/query" -H "Authorization: Bearer $SERVICE_TOKEN" \
     -H "X-Tenant-Id: $TENANT" -H 'content-type: application/json' \
     -d '{"sql": "INSERT INTO users VALUES ($1, $2, $3) ON CONFLICT (user_id) DO NOTHING", "params": ["u1", "u1@abc.example", "pro"]}'; echo
curl -sf -XPOST "$BASE/api/v1/query" -H "Authorization: Bearer $SERVICE_TOKEN" \
     -H "X-Tenant-Id: $TENANT" -H 'content-type: application/json' \
     -d '{"sql": "SELECT user_id, email FROM users WHERE subscription_tier = $1", "params": ["pro"]}'; echo
