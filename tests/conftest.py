"""Fixtures are plugins, one per back end, each reading a ``DBSVC_TEST_*`` variable."""

import os

pytest_plugins = [
    "tests.fix_pg",
    "tests.fix_service",
    "tests.fix_pgwire",
    "tests.fix_nats",
    "tests.fix_kafka",
    "tests.fix_ingest",
    "tests.fix_otlp",
    "tests.fix_redis",
    "tests.fix_hub",
    "tests.fix_clickhouse",
    "tests.fix_weaviate",
    "tests.isolation.fix_attack",
    "tests.isolation.fix_frontends",
]

# A developer's OTEL_* (a collector they run) must not turn traces on for the suite: the tests
# that want traces configure them themselves, against their own receiver.
for _name in [n for n in os.environ if n.startswith("OTEL_")]:
    del os.environ[_name]
