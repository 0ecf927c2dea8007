"""The Python client, end to end: queries, parameters by name, a transaction, bulk insert,
time series and a large result read with flow control.

Run it against `make run` after examples/quickstart.sh (or with your own service and token):

    SERVICE_TOKEN=$(.venv/bin/database-service token issue --service trading-engine \\
        --register --tenants abc --scopes read,write) .venv/bin/python examples/client_quickstart.py
"""

import asyncio
import contextlib
import datetime as dt
import os

from database_service_client import AlreadyExists, MultiDatabaseClient


async def main() -> None:
    target = os.environ.get("DBSVC_GRPC", "127.0.0.1:50051")
    token = os.environ["SERVICE_TOKEN"]
    tenant = os.environ.get("TENANT", "abc")
    async with MultiDatabaseClient(target, {"company_id": tenant}, token) as db:
        # Parameters by position (a second run finds the user there already) ...
        with contextlib.suppress(AlreadyExists):
            await db.fetch_all("INSERT INTO users VALUES ($1, $2, 'pro')", ["u2", "u2@abc.example"])
        # ... or by name: a dict binds to :name placeholders (never by its keys).
        signal = {"signal_id": "sig-42", "user_id": "u2", "symbol": "EURUSD", "action": "buy"}
        await db.execute_multi_db_operation(
            {
                "postgresql": {
                    "query": "INSERT INTO trading_signals (signal_id, user_id, symbol, action)"
                    " VALUES (:signal_id, :user_id, :symbol, :action)"
                    " ON CONFLICT (signal_id) DO NOTHING",
                    "params": signal,
                    "company_id": tenant,
                }
            }
        )
        async for user_id, email in db.execute_query("SELECT user_id, email FROM users"):
            print("user", user_id, email)
        await db.transaction(
            [
                ("UPDATE users SET subscription_tier = :tier WHERE user_id = :id",
                 {"tier": "enterprise", "id": "u2"}),
                "UPDATE trading_signals SET action = 'hold' WHERE signal_id = 'sig-42'",
            ],
            isolation="serializable",
        )  # fmt: skip
        await db.bulk_insert(
            "notification_logs",
            ["user_id", "channel", "status", "message"],
            [("u2", "email", "sent", f"note {i}") for i in range(1000)],
        )
        end = dt.datetime.now(dt.UTC)
        start = end - dt.timedelta(hours=1)
        ticks = await db.time_series("EURUSD", start, end)
        hourly = await db.candles("EURUSD", start, end, dt.timedelta(minutes=15))
        print("ticks", len(ticks.rows), "candles", len(hourly.rows))
        # A large result, read with flow control: the server's cursor waits for this reader.
        count = 0
        async for _ in db.stream_query("SELECT g FROM generate_series(1, 100000) g", window=4):
            count += 1
        print("streamed", count, "rows")
        print("health:", (await db.health())["status"])


if __name__ == "__main__":
    asyncio.run(main())
