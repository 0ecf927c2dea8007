"""Fixtures are plugins, one per back end, each reading a ``DBSVC_TEST_*`` variable."""

pytest_plugins = [
    "tests.fix_pg",
    "tests.fix_service",
    "tests.fix_nats",
    "tests.fix_kafka",
    "tests.fix_ingest",
    "tests.fix_otlp",
    "tests.isolation.fix_attack",
    "tests.isolation.fix_frontends",
]
