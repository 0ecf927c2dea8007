"""Per-tenant export and restore of a large tenant, through the running service's REST jobs.

Loads ``--rows`` rows (default 1,000,000) into one tenant — 80% ticks in the shared, partitioned
``trading_ticks`` (the candle rollup maintained as they go in), 20% rows of its own
``trading_history`` — then: an export job (as the tenant's role, to a signed file), the file's
download, an upload restoring it into a new tenant id (rows re-keyed), and a check that the copy
holds the same rows. Export and restore seconds are the jobs' own (start to finish, server
side); transfer seconds are the download and the upload.

    .venv/bin/python bench/tenant_backup.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import asyncpg
import httpx
from harness import reporting, running_service  # bench/ is on sys.path when run as a script

TENANT = "bench_backup"
COPY = "bench_backup_copy"


async def _job(http: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, Any]:
    while True:
        answer = await http.get(url, headers=headers)
        answer.raise_for_status()
        job: dict[str, Any] = answer.json()
        if job["state"] != "running":
            if job["state"] != "done":
                raise SystemExit(f"job failed: {job}")
            return job
        await asyncio.sleep(0.2)


async def main(rows: int) -> None:
    with reporting("tenant_backup") as figures:
        async with running_service() as service:
            admin = {"Authorization": f"Bearer {service.admin_token}"}
            async with httpx.AsyncClient(base_url=service.http, timeout=600) as http:
                body = {"tenant_id": TENANT}
                (
                    await http.post("/api/v1/admin/schema/create", json=body, headers=admin)
                ).raise_for_status()
                platform = {
                    "service": "bench-platform", "tenants": ["*"],
                    "scopes": ["admin", "read", "write"], "with_secret": False,
                }  # fmt: skip
                (
                    await http.post("/api/v1/admin/services", json=platform, headers=admin)
                ).raise_for_status()
                issued = await http.post(
                    "/api/v1/admin/tokens", json={"service": "bench-platform"}, headers=admin
                )
                issued.raise_for_status()
                headers = {"Authorization": f"Bearer {issued.json()['access_token']}"}

                ticks, history = rows * 4 // 5, rows - rows * 4 // 5
                started = time.perf_counter()
                conn = await asyncpg.connect(service.dsn)
                try:
                    schema = await conn.fetchval(
                        "SELECT schema_name FROM dbsvc_control.tenants WHERE tenant_id = $1", TENANT
                    )
                    await conn.execute(
                        "INSERT INTO shared.trading_ticks (time, company_id, user_id, symbol, bid,"
                        " ask, volume, spread) SELECT now() - i * interval '50 ms', $1,"
                        " 'u' || (i % 100), 'SYM' || (i % 20), 1 + (i % 1000) / 1e4,"
                        " 1.0002 + (i % 1000) / 1e4, i % 500, 0.2 FROM generate_series(1, $2) i",
                        TENANT,
                        ticks,
                    )
                    await conn.execute(
                        f'INSERT INTO "{schema}".trading_history (symbol, side, volume,'
                        " open_price, close_price, profit, opened_at)"
                        " SELECT 'SYM' || (i % 20), CASE WHEN i % 2 = 0 THEN 'buy' ELSE 'sell'"
                        " END, 1 + i % 10, 1.1, 1.2, i % 77, now() - i * interval '1 s'"
                        " FROM generate_series(1, $1) i",
                        history,
                    )
                finally:
                    await conn.close()
                figures["rows"] = rows
                figures["load_s"] = time.perf_counter() - started
                print(f"loaded {rows:,} rows in {figures['load_s']:.1f} s", flush=True)

                wall = time.perf_counter()
                started_job = await http.post(
                    f"/api/v1/admin/tenants/{TENANT}/export", headers=headers
                )
                started_job.raise_for_status()
                job_id = started_job.json()["id"]
                job = await _job(http, f"/api/v1/admin/tenants/{TENANT}/exports/{job_id}", headers)
                figures["export_s"] = job["finished_at"] - job["started_at"]
                figures["export_wall_s"] = time.perf_counter() - wall
                figures["exported_rows"] = job["result"]["rows"]
                figures["file_mb"] = job["result"]["bytes"] / 1e6
                print(
                    f"export: {figures['export_s']:.1f} s, {figures['file_mb']:.0f} MB", flush=True
                )

                wall = time.perf_counter()
                download = await http.get(
                    f"/api/v1/admin/tenants/{TENANT}/exports/{job_id}/file", headers=headers
                )
                download.raise_for_status()
                figures["download_s"] = time.perf_counter() - wall

                wall = time.perf_counter()
                upload = await http.post(
                    f"/api/v1/admin/tenants/{COPY}/restore?from_tenant={TENANT}",
                    content=download.content,
                    headers={**headers, "Content-Type": "application/octet-stream"},
                )
                upload.raise_for_status()
                figures["upload_verify_s"] = time.perf_counter() - wall
                job = await _job(
                    http, f"/api/v1/admin/tenants/{COPY}/restores/{upload.json()['id']}", headers
                )
                figures["restore_s"] = job["finished_at"] - job["started_at"]
                figures["restored_rows"] = job["result"]["rows"]
                print(f"restore: {figures['restore_s']:.1f} s", flush=True)

            conn = await asyncpg.connect(service.dsn)
            try:
                counts = await conn.fetch(
                    "SELECT company_id, count(*) FROM shared.trading_ticks GROUP BY 1 ORDER BY 1"
                )
                candles = await conn.fetch(
                    "SELECT company_id, count(*), sum(ticks) FROM shared.candles_1m GROUP BY 1"
                    " ORDER BY 1"
                )
            finally:
                await conn.close()
            same = (
                len({r["count"] for r in counts}) == 1 and len({tuple(r)[1:] for r in candles}) == 1
            )
            figures["copy_matches"] = same and figures["restored_rows"] == figures["exported_rows"]
            figures["export_rows_per_s"] = figures["exported_rows"] / figures["export_s"]
            figures["restore_rows_per_s"] = figures["restored_rows"] / figures["restore_s"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    asyncio.run(main(parser.parse_args().rows))
