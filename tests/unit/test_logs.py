"""Structured logs: JSON lines and text lines, the request and span a line belongs to, and what
never reaches a line (credentials; SQL parameter values unless asked for)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from database_service.observability.logs import (
    LogFormat,
    bind_request,
    configure_logging,
    current_request_id,
    request_id_from,
    sql_parameters,
)

log = logging.getLogger("tests.unit.logs")

TOKEN = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJzdmMiLCJ0ZW5hbnRzIjpbIioiXX0"
    ".c2lnbmF0dXJlLW9mLXRoZS10b2tlbi1ub3QtdG8tYmUtbG9nZ2Vk"
)
SIGNATURE = TOKEN.rsplit(".", 1)[1]
Configure = Callable[..., io.StringIO]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def configure() -> Iterator[Configure]:
    """``configure_logging`` writing to a buffer; the root logger as it was afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)

    def run(log_format: LogFormat = "json", **options: Any) -> io.StringIO:
        stream = options.pop("stream", None) or io.StringIO()
        configure_logging(log_format, logging.DEBUG, stream=stream, **options)
        return stream

    yield run
    configure_logging("json", stream=io.StringIO())  # the default: no SQL parameter values
    for handler in root.handlers:
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, str]]:
    """The test's JSON lines (at DEBUG, asyncio has some to say too)."""
    parsed = [json.loads(line) for line in stream.getvalue().splitlines()]
    return [line for line in parsed if line["logger"] == log.name]


# --- JSON lines -------------------------------------------------------------------------------


def test_json_lines_carry_the_request_and_trace_ids(configure: Configure) -> None:
    out = configure("json")
    tracer = TracerProvider().get_tracer("tests")  # a provider of the test's own, not global
    with (
        bind_request("req-1", tenant="acme", service="billing"),
        tracer.start_as_current_span("query") as span,
    ):
        log.warning("statement refused: %s", "permission_denied")
    [line] = lines(out)
    ids = span.get_span_context()
    assert line == {
        "timestamp": line["timestamp"],
        "level": "WARNING",
        "logger": "tests.unit.logs",
        "message": "statement refused: permission_denied",
        "request_id": "req-1",
        "tenant": "acme",
        "service": "billing",
        "trace_id": f"{ids.trace_id:032x}",
        "span_id": f"{ids.span_id:016x}",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])


def test_a_line_outside_a_request_and_a_span_has_only_what_is_known(configure: Configure) -> None:
    out = configure("json")
    invalid = trace.NonRecordingSpan(trace.INVALID_SPAN_CONTEXT)
    with trace.use_span(invalid):
        log.info("started")
    assert set(lines(out)[0]) == {"timestamp", "level", "logger", "message"}


def test_the_tenant_and_service_are_those_known_when_the_line_is_logged(
    configure: Configure,
) -> None:
    out = configure("json")
    with bind_request("req-2") as request:
        log.info("authenticating")
        request.service = "billing"
        request.tenant = "acme"
        log.info("authorized")
    first, second = lines(out)
    assert "service" not in first and "tenant" not in first
    assert (second["service"], second["tenant"]) == ("billing", "acme")


def test_an_exception_is_one_field_of_the_same_line(configure: Configure) -> None:
    out = configure("json")
    try:
        raise ValueError("the reason")
    except ValueError:
        log.exception("loop failed")
    assert len(out.getvalue().splitlines()) == 1
    [line] = lines(out)
    assert line["message"] == "loop failed"
    assert line["exception"].startswith("Traceback (most recent call last):")
    assert line["exception"].endswith("ValueError: the reason")


def test_a_task_started_during_a_request_logs_for_it(configure: Configure) -> None:
    out = configure("json")

    async def request() -> None:
        with bind_request("req-3"):
            await asyncio.create_task(later())
        log.info("after")

    async def later() -> None:
        log.info("in a task")

    asyncio.run(request())
    in_task, after = lines(out)
    assert in_task["request_id"] == "req-3" and "request_id" not in after


# --- text lines -------------------------------------------------------------------------------


def test_text_lines_are_the_plain_line_with_the_request_appended(configure: Configure) -> None:
    out = configure("text")
    log.info("started")
    with bind_request("req-4", tenant="acme"):
        log.info("tenant %s: pool opened", "acme")
    started, opened = out.getvalue().splitlines()
    assert started.endswith(" INFO tests.unit.logs: started")
    assert opened.endswith(
        " INFO tests.unit.logs: tenant acme: pool opened [request_id=req-4 tenant=acme]"
    )


def test_auto_is_text_on_a_terminal_and_json_elsewhere(configure: Configure) -> None:
    terminal = configure("auto", stream=Terminal())
    log.info("to a person")
    assert terminal.getvalue().rstrip().endswith("INFO tests.unit.logs: to a person")
    piped = configure("auto")
    log.info("to a collector")
    assert lines(piped)[0]["message"] == "to a collector"


def test_configuring_again_replaces_the_handler_instead_of_adding_one(
    configure: Configure,
) -> None:
    first = configure("json")
    second = configure("json")
    log.info("once")
    assert first.getvalue() == "" and len(lines(second)) == 1


# --- request ids ------------------------------------------------------------------------------


@pytest.mark.parametrize("incoming", ["abc", "7f3c-01:req.2_b", "r" * 128, b"from-a-header"])
def test_a_sane_incoming_request_id_is_kept(incoming: str | bytes) -> None:
    kept = incoming.decode() if isinstance(incoming, bytes) else incoming
    assert request_id_from(incoming) == kept


@pytest.mark.parametrize(
    "incoming",
    [None, "", "r" * 129, "two words", 'a"}, {"level": "ERROR', "line\nbreak", "é", b"\xff"],
)
def test_anything_else_gets_a_new_request_id(incoming: str | bytes | None) -> None:
    new = request_id_from(incoming)
    assert re.fullmatch(r"[0-9a-f]{32}", new)
    assert new != request_id_from(incoming)


def test_a_request_is_bound_until_its_block_ends() -> None:
    assert current_request_id() is None
    with bind_request() as request:
        assert current_request_id() == request.request_id
        assert re.fullmatch(r"[0-9a-f]{32}", request.request_id)
    assert current_request_id() is None


# --- redaction --------------------------------------------------------------------------------

SECRETS = {
    "bearer token": (f"header Authorization: Bearer {TOKEN}", TOKEN),
    "opaque bearer": ("sent 'Bearer test-admin-token-xxxxxxxx'", "test-admin-token-xxxxxxxx"),
    "basic credentials": ("Authorization: Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
    "bare JWT": (f"token {TOKEN} refused", SIGNATURE),
    "JWT in JSON": (f'{{"token": "{TOKEN}"}}', SIGNATURE),
    "DSN password": ("connect postgresql://dbsvc:hunter2@db:5432/x failed", "hunter2"),
    "DSN password with @": ("nats://u:p@ss-w0rd@nats:4222", "ss-w0rd"),
    "password pair": ("host=db password=hunter2 user=dbsvc", "hunter2"),
    "env secret": ("DBSVC_MASTER_KEY=k3y-material start", "k3y-material"),
    "dict secret": ("{'client_secret': 's3cr3t', 'name': 'x'}", "s3cr3t"),
    "JSON password": ('{"password": "hunter2"}', "hunter2"),
    "query string": ("GET /x?access_token=abc123&page=2", "abc123"),
}


@pytest.mark.parametrize(("message", "secret"), SECRETS.values(), ids=SECRETS.keys())
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_never_reach_a_line(
    configure: Configure, log_format: LogFormat, message: str, secret: str
) -> None:
    out = configure(log_format)
    log.warning("%s", message)
    assert secret not in out.getvalue()
    assert "***" in out.getvalue()


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_secrets_never_reach_a_line_through_an_exception(
    configure: Configure, log_format: LogFormat
) -> None:
    out = configure(log_format)
    try:
        raise ConnectionError(f"postgresql://owner:hunter2@db/x refused Bearer {TOKEN}")
    except ConnectionError:
        log.exception("connecting failed")
    assert "Traceback" in out.getvalue() and "ConnectionError" in out.getvalue()
    for secret in ("hunter2", TOKEN, SIGNATURE):
        assert secret not in out.getvalue()


KEPT = [
    "missing credentials: send 'Authorization: Bearer <token>'",
    "malformed Authorization header: expected 'Bearer <token>'",
    "unknown service or wrong secret",
    "invalid token: Signature verification failed",
    "token revoked: token_id=4f2a, tokens=3",
    "the basic limits apply to nats://nats:4222 and https://host:8443/path",
]


@pytest.mark.parametrize("message", KEPT)
def test_what_is_not_a_secret_is_left_as_it_is(configure: Configure, message: str) -> None:
    out = configure("json")
    log.info("%s", message)
    assert lines(out)[0]["message"] == message


# --- SQL parameter values ---------------------------------------------------------------------

ECHOED = (
    "invalid input for query argument $1: 'card-4111' (invalid literal for int() with base 10:"
    " 'card-4111')"
)


def test_sql_parameter_values_are_left_out_by_default(configure: Configure) -> None:
    out = configure("json")
    log.info("statement params=%s", sql_parameters([4111, "card-4111", None]))
    log.info("one: %s", sql_parameters(["card-4111"]))
    log.warning("refused: %s", ECHOED)
    log.warning('refused: invalid input syntax for type integer: "card-4111"')
    messages = [line["message"] for line in lines(out)]
    assert messages[:2] == ["statement params=<3 values redacted>", "one: <1 value redacted>"]
    assert "card-4111" not in out.getvalue()
    assert messages[2] == "refused: invalid input for query argument $1: ***"
    assert messages[3] == 'refused: invalid input syntax for type integer: "***"'


def test_sql_parameter_values_are_shown_with_log_sql_parameters(configure: Configure) -> None:
    out = configure("json", sql_parameters=True)
    log.info("statement params=%s", sql_parameters([4111, "card-4111", None]))
    log.warning("refused: %s", ECHOED)
    messages = [line["message"] for line in lines(out)]
    assert messages == ["statement params=[4111, 'card-4111', None]", f"refused: {ECHOED}"]


def test_sql_parameter_values_follow_the_settings(configure: Configure) -> None:
    from database_service.config import Settings

    out = io.StringIO()
    configure_logging(
        Settings.load(log_format="text", log_sql_parameters=True), logging.INFO, stream=out
    )
    log.info("params=%s", sql_parameters([1]))
    assert out.getvalue().rstrip().endswith("INFO tests.unit.logs: params=[1]")
