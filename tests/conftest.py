"""Fixtures are plugins, one per back end, each reading a ``DBSVC_TEST_*`` variable."""

pytest_plugins = ["tests.fix_pg", "tests.fix_service", "tests.isolation.fix_attack"]
