"""Structured logs: JSON lines or text, the request a line belongs to, and no secrets.

``configure_logging`` installs one handler on the root logger: ``json`` writes one object per
line (``timestamp`` in RFC 3339 UTC with milliseconds, ``level``, ``logger``, ``message``, and
when known ``request_id``, ``tenant``, ``service``, ``trace_id``, ``span_id``, ``exception``);
``text`` writes the plain lines the service always wrote, with the request id, tenant and service
appended when there is a request; ``auto`` is text on a terminal and JSON anywhere else (a
collector reads the lines).

The request a line belongs to lives in a context variable: the front ends bind one per call
(``bind``; ``bind_request`` for anyone else), and every line logged while it is bound, from any
module, carries it. A request id is the caller's ``x-request-id`` when it is sane (at most 128
characters of ``[A-Za-z0-9._:-]``: it is echoed into logs and response headers), else a new one.
The trace and span ids are those of OpenTelemetry's current span, read only when something has
imported OpenTelemetry (``observability.tracing`` does so only with traces on): without it no
span can be current, and an admin command does not pay for the import.

No secret reaches a line, whatever a caller logs: ``RedactSecrets`` rewrites the message, the
exception text and the stack of every record the handler writes. It removes bearer and basic
credentials, anything shaped like a JWT, the values of ``password``, ``secret``, ``token``...
pairs (``key=value``, ``key: "value"``, JSON and Python dict notation; not ``key: value``, as
often prose: "invalid token: Signature verification failed") and the password of a URL
(``postgresql://user:***@host``). It is a second layer: the service never logs a token on
purpose. SQL parameter values are left out too unless ``DBSVC_LOG_SQL_PARAMETERS`` is on: a log
call shows them through ``sql_parameters`` (``<3 values redacted>``), and the values asyncpg
and PostgreSQL echo in their errors (``invalid input for query argument $1: ...``) are removed.
"""

from __future__ import annotations

import contextvars
import logging
import random
import re
import sys
import time
from collections.abc import Sequence
from types import TracebackType
from typing import IO, TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from database_service.config import Settings

__all__ = [
    "REQUEST_ID_HEADER",
    "Binding",
    "JsonFormatter",
    "LogFormat",
    "RedactSecrets",
    "RequestContext",
    "RequestInfo",
    "TextFormatter",
    "bind",
    "bind_request",
    "configure_logging",
    "current_request",
    "current_request_id",
    "make_handler",
    "new_request_id",
    "redact",
    "request_id_from",
    "sql_parameters",
    "unbind",
]

LogFormat = Literal["auto", "text", "json"]

REQUEST_ID_HEADER = "x-request-id"  # gRPC metadata keys and ASGI header names are lower case

_TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_REDACTED = "***"


# --- the request a line belongs to ------------------------------------------------------------


class RequestInfo(Protocol):
    """What a log line shows of the request it was logged for. A front end may bind an object
    of its own that learns the tenant and the service as the request goes on."""

    @property
    def request_id(self) -> str: ...

    @property
    def tenant(self) -> str | None: ...

    @property
    def service(self) -> str | None: ...


class RequestContext:
    """A request as ``bind_request`` binds it; set ``tenant`` and ``service`` once known."""

    __slots__ = ("request_id", "service", "tenant")

    def __init__(
        self, request_id: str, tenant: str | None = None, service: str | None = None
    ) -> None:
        self.request_id = request_id
        self.tenant = tenant
        self.service = service

    def __repr__(self) -> str:
        return f"RequestContext({self.request_id!r}, {self.tenant!r}, {self.service!r})"


_REQUEST: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "dbsvc_request", default=None
)


def new_request_id() -> str:
    """32 random hex digits (as many as a UUID4's, without making one). An id to find a
    request's lines by, not a secret: Python's generator, no system call per request."""
    return f"{random.getrandbits(128):032x}"


def request_id_from(incoming: str | bytes | None) -> str:
    """The caller's request id if it is sane, else a new one. It is echoed into every line and
    into the response, so anything longer or with other characters (a line break, quotes, a
    forged JSON field) is replaced, not cleaned."""
    if isinstance(incoming, bytes):
        incoming = incoming.decode("latin-1")
    if incoming and _SANE_REQUEST_ID.fullmatch(incoming):
        return incoming
    return new_request_id()


def bind(request: RequestInfo) -> contextvars.Token[RequestInfo | None]:
    """Make ``request`` the current one (for this task and the tasks it starts); reset the
    token when the request is over, unless its task ends with it."""
    return _REQUEST.set(request)


def unbind(token: contextvars.Token[RequestInfo | None]) -> None:
    _REQUEST.reset(token)


class Binding:
    """A bound ``RequestContext``: ``reset()`` it, or use it as a context manager."""

    __slots__ = ("_token", "context")

    def __init__(self, context: RequestContext) -> None:
        self.context = context
        self._token = _REQUEST.set(context)

    def reset(self) -> None:
        _REQUEST.reset(self._token)

    def __enter__(self) -> RequestContext:
        return self.context

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.reset()


def bind_request(
    request_id: str | None = None, *, tenant: str | None = None, service: str | None = None
) -> Binding:
    """Bind a request (a new id unless one is given, already checked: ``request_id_from``)."""
    return Binding(RequestContext(request_id or new_request_id(), tenant, service))


def current_request() -> RequestInfo | None:
    return _REQUEST.get()


def current_request_id() -> str | None:
    request = _REQUEST.get()
    return request.request_id if request is not None else None


_FIELDS = ("request_id", "tenant", "service", "trace_id", "span_id")
_STAMPED = "_dbsvc_request_fields"


def _stamp(record: logging.LogRecord) -> None:
    """Put the current request's and span's fields on ``record``, once (the first formatter to
    see it does it, where it was logged). A caller's ``extra={"tenant": ...}`` is kept."""
    fields = record.__dict__
    if _STAMPED in fields:
        return
    fields[_STAMPED] = True
    request = _REQUEST.get()
    trace_id = span_id = None
    trace = sys.modules.get("opentelemetry.trace")
    if trace is not None:  # else nothing imported OpenTelemetry, so no span can be current
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            trace_id, span_id = format(span.trace_id, "032x"), format(span.span_id, "016x")
    fields.setdefault("request_id", request.request_id if request is not None else None)
    fields.setdefault("tenant", request.tenant if request is not None else None)
    fields.setdefault("service", request.service if request is not None else None)
    fields.setdefault("trace_id", trace_id)
    fields.setdefault("span_id", span_id)


# --- formats ----------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields without a value are left out."""

    def __init__(self) -> None:
        super().__init__()
        import orjson  # noqa: PLC0415 (only where JSON is written: text mode never pays for it)

        self._dumps = orjson.dumps
        self._error = orjson.JSONEncodeError

    def format(self, record: logging.LogRecord) -> str:
        _stamp(record)
        document: dict[str, str] = {
            "timestamp": _rfc3339(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = record.__dict__
        for name in _FIELDS:
            value = fields[name]
            if value is not None:
                document[name] = str(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        try:
            return self._dumps(document).decode()
        except self._error:  # a lone surrogate (bytes decoded with surrogateescape)
            return self._dumps(
                {k: v.encode("utf-8", "backslashreplace").decode() for k, v in document.items()}
            ).decode()


def _rfc3339(record: logging.LogRecord) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{seconds}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    """The plain line (``time LEVEL logger: message``), then ``[request_id=… tenant=…
    service=…]`` when the line belongs to a request, then the traceback if any."""

    def __init__(self) -> None:
        super().__init__(_TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        _stamp(record)
        line = super().formatMessage(record)
        fields = record.__dict__
        shown = [f"{name}={fields[name]}" for name in _FIELDS[:3] if fields[name] is not None]
        return f"{line} [{' '.join(shown)}]" if shown else line


# --- redaction --------------------------------------------------------------------------------

# "bearer" in any case; "Basic" only as HTTP writes it ("basic" is a word of prose).
_SCHEME = r"(?:(?i:bearer)|Basic|BASIC)\s+"
# Keys whose value is a secret: the key ends with one of these words (access_token, PGPASSWORD,
# client_secret; not token_id or tokens). The words are what is matched, not whole keys: a
# pattern that scans every word for a key ending so is ten times slower.
_SECRET_KEY = (
    r"(?i:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key"
    r"|master[_-]?key|signing[_-]?key|authorization)"
)
_QUOTED = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'"
# key=value; "key": value and 'key': value (JSON, Python); key:value; key: "value"; key: Bearer
# value. Not an unquoted key: value, which is prose as often as not ("invalid token: Signature
# verification failed", the reason of every refused forgery).
_SECRET_PAIR = re.compile(
    rf"(?P<key>{_SECRET_KEY})"
    rf"(?P<sep>\s*=\s*|[\"']\s*:\s*|:(?=\S)|:\s+(?=[\"']|{_SCHEME}))"
    # A placeholder is not a secret: "send 'Authorization: Bearer <token>'" stays as it is.
    rf"(?!(?:{_SCHEME})?<)(?P<scheme>{_SCHEME})?(?P<value>{_QUOTED}|[^\s,;&)}}\]]+)"
)
_CREDENTIALS = re.compile(rf"\b(?P<scheme>{_SCHEME})[A-Za-z0-9._~+/=-]+")
# header.payload[.signature] (JWS), up to five parts (JWE); a JSON header always starts "eyJ".
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){1,4}")
# scheme://user:password@host; the password runs to the last "@" before the path.
_URL_PASSWORD = re.compile(r"\b(?P<head>[a-z][a-z0-9+.-]*://[^\s:/?#@]*:)[^\s/?#]+(?=@)", re.I)
# Values that drivers echo in their errors: asyncpg's encoding errors ("invalid input for query
# argument $1: 'abc' (invalid literal for int() ...: 'abc')": the rest of the line) and
# PostgreSQL's ('invalid input syntax for type integer: "abc"').
_ARGUMENT_ECHO = re.compile(r"(?P<head>invalid input for query argument \$\d+[^:\n]*: ).*")
_INPUT_ECHO = re.compile(
    r"(?P<head>invalid input (?:syntax|value) for [^:\n]*: )\"(?:[^\"\\]|\\.)*\""
)


def _pair(match: re.Match[str]) -> str:
    value = match["value"]
    quote = value[0] if value[0] in "\"'" else ""
    return f"{match['key']}{match['sep']}{match['scheme'] or ''}{quote}{_REDACTED}{quote}"


# Substrings without which a pattern cannot match: most lines hold none, and looking for them
# costs about 1 µs a line where running every pattern costs 10 to 20.
_SECRET_WORDS = ("pass", "pwd", "secret", "token", "key", "authorization")


def redact(text: str, *, sql_parameters: bool = False) -> str:
    """``text`` without credentials (and without echoed SQL values unless ``sql_parameters``)."""
    lowered = text.lower()
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"\g<head>{_REDACTED}", text)
    if any(word in lowered for word in _SECRET_WORDS):
        # Before _CREDENTIALS, so that "Authorization: Bearer x" is taken as one pair.
        text = _SECRET_PAIR.sub(_pair, text)
    if "bearer" in lowered or "basic" in lowered:
        text = _CREDENTIALS.sub(rf"\g<scheme>{_REDACTED}", text)
    if "eyJ" in text:
        text = _JWT.sub(_REDACTED, text)
    if not sql_parameters and "invalid input" in text:
        text = _ARGUMENT_ECHO.sub(rf"\g<head>{_REDACTED}", text)
        text = _INPUT_ECHO.sub(rf'\g<head>"{_REDACTED}"', text)
    return text


_PLAIN = logging.Formatter()  # a traceback as logging formats it


class RedactSecrets(logging.Filter):
    """Rewrites each record's message, exception text and stack with ``redact``; lets every
    record through. On a handler, so that it sees records from every logger.

    ``sql_parameters`` None follows ``configure_logging`` (``DBSVC_LOG_SQL_PARAMETERS``)."""

    def __init__(self, *, sql_parameters: bool | None = None) -> None:
        super().__init__()
        self._sql_parameters = sql_parameters

    def filter(self, record: logging.LogRecord) -> bool:
        shown = _SHOW_SQL_PARAMETERS if self._sql_parameters is None else self._sql_parameters
        try:
            message = record.getMessage()
        except Exception:  # bad arguments: the formatter fails the same way and says so
            return True
        record.msg, record.args = redact(message, sql_parameters=shown), None
        if record.exc_info and not record.exc_text:
            record.exc_text = _PLAIN.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, sql_parameters=shown)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, sql_parameters=shown)
        return True


# --- SQL parameter values ---------------------------------------------------------------------

_SHOW_SQL_PARAMETERS = False  # DBSVC_LOG_SQL_PARAMETERS, set by configure_logging


class _SqlParameters:
    """Formatted only when the line is written: a log call that is filtered out costs nothing."""

    __slots__ = ("_values",)

    def __init__(self, values: Sequence[object]) -> None:
        self._values = values

    def __str__(self) -> str:
        if _SHOW_SQL_PARAMETERS:
            return repr(list(self._values))
        count = len(self._values)
        return f"<{count} value{'' if count == 1 else 's'} redacted>"

    __repr__ = __str__


def sql_parameters(values: Sequence[object]) -> object:
    """SQL parameter values for a log call's arguments (``params=%s``): their number unless
    ``DBSVC_LOG_SQL_PARAMETERS`` is on. Values are the callers' data, not the service's."""
    return _SqlParameters(values)


# --- set-up -----------------------------------------------------------------------------------


def make_handler(
    log_format: LogFormat, stream: IO[str] | None = None, *, sql_parameters: bool | None = None
) -> logging.StreamHandler[IO[str]]:
    """A handler writing ``log_format`` to ``stream`` (stderr), secrets redacted."""
    stream = stream if stream is not None else sys.stderr
    if log_format == "auto":
        log_format = "text" if _is_terminal(stream) else "json"
    handler: logging.StreamHandler[IO[str]] = logging.StreamHandler(stream)
    handler.addFilter(RedactSecrets(sql_parameters=sql_parameters))
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    return handler


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


_INSTALLED: logging.Handler | None = None


def configure_logging(
    settings_or_format: Settings | LogFormat,
    level: int | str = logging.WARNING,
    *,
    sql_parameters: bool | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Install the service's handler on the root logger at ``level`` (replacing the one an
    earlier call installed; other handlers are left alone). ``settings_or_format``: the settings
    (``log_format``, ``log_sql_parameters``) or a format; ``sql_parameters`` overrides."""
    global _INSTALLED, _SHOW_SQL_PARAMETERS  # noqa: PLW0603 (the process's one logging set-up)
    if isinstance(settings_or_format, str):
        log_format: LogFormat = settings_or_format
        shown = bool(sql_parameters)
    else:
        log_format = settings_or_format.log_format
        shown = settings_or_format.log_sql_parameters if sql_parameters is None else sql_parameters
    _SHOW_SQL_PARAMETERS = shown
    root = logging.getLogger()
    if _INSTALLED is not None:
        root.removeHandler(_INSTALLED)
    _INSTALLED = make_handler(log_format, stream)
    root.addHandler(_INSTALLED)
    root.setLevel(level)
    return _INSTALLED
