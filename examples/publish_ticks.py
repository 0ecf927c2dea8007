"""Publish ticks to the service's ingestion (NATS JetStream, which `make run` starts) with a
producer token that holds `ingest` for the tenant only. The report counts what the stream
acknowledged; the service stores them within about a second (client_quickstart.py reads them).

    INGEST_TOKEN=$(.venv/bin/database-service token issue --service feed --register \\
        --tenants abc --scopes ingest) .venv/bin/python examples/publish_ticks.py
"""

import asyncio
import datetime as dt
import os

from database_service_client import MarketDataPublisher, event_id_for, tick


async def main() -> None:
    tenant = os.environ.get("TENANT", "abc")
    nats_url = os.environ.get("DBSVC_NATS", "nats://127.0.0.1:4222")
    # The last minute, so that a read of "the last hour" finds them all.
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=1)
    times = [start + dt.timedelta(milliseconds=250 * i) for i in range(200)]
    async with MarketDataPublisher(os.environ["INGEST_TOKEN"], nats_url=nats_url) as publisher:
        report = await publisher.publish_ticks(
            tick(tenant, "EURUSD", t, bid=1.1 + i * 1e-5, ask=1.1002 + i * 1e-5, volume=3,
                 # A stable id: publishing the same tick again stores it once.
                 event_id=event_id_for(tenant, "example-feed", "EURUSD", start.isoformat(), i))
            for i, t in enumerate(times)
        )  # fmt: skip
    print(report)


if __name__ == "__main__":
    asyncio.run(main())
