"""A 1,000,000-row query streamed through gRPC with bounded memory.

Server and client share this process, so the process's resident memory bounds both: it is
sampled while the rows flow, and its growth must stay far below what holding the result would
take (1,000,000 rows as Python tuples of an int and a 32-character string is ~180 MB).
"""

from __future__ import annotations

import asyncio
import gc

import psutil

from database_service.auth import Scope
from tests.fix_service import ClientFactory, TenantFactory

ROWS = 1_000_000
BOUND_MB = 64


async def test_million_rows_stream_in_bounded_memory(
    client_for: ClientFactory, new_tenant: TenantFactory
) -> None:
    client = await client_for(await new_tenant("big"), (Scope.READ,))
    process = psutil.Process()
    gc.collect()
    baseline = process.memory_info().rss
    peak = baseline
    count = 0
    total = 0
    stream = client.execute_query(
        "SELECT g, md5(g::text) FROM generate_series(1, $1) g", [ROWS], timeout=300
    )
    async for n, digest in stream:
        count += 1
        total += n
        if count % 20_000 == 0:
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0)
        assert len(digest) == 32
    peak = max(peak, process.memory_info().rss)
    growth_mb = (peak - baseline) / 1_048_576
    print(f"\n1,000,000 rows streamed; resident memory grew by {growth_mb:.1f} MB at peak")
    assert count == ROWS and total == ROWS * (ROWS + 1) // 2
    assert stream.summary is not None and stream.summary.row_count == ROWS
    assert growth_mb < BOUND_MB, f"memory grew by {growth_mb:.1f} MB while streaming"

    # Calibration: the same probe does see a result that is held (200,000 rows, ~36 MB).
    before = process.memory_info().rss
    held = await client.execute_query(
        "SELECT g, md5(g::text) FROM generate_series(1, 200000) g", timeout=300
    ).fetch_all()
    held_mb = (process.memory_info().rss - before) / 1_048_576
    print(f"holding 200,000 rows grew resident memory by {held_mb:.1f} MB")
    assert len(held.rows) == 200_000 and held_mb > 10
