"""The wire port's messages, without sockets."""

from __future__ import annotations

import struct

import pytest

from database_service.pgwire import codec


def test_a_message_header_gives_its_type_and_payload_length() -> None:
    raw = codec.message(b"Q", codec.cstring("SELECT 1"))
    assert codec.split_header(raw[:5], 1000) == (b"Q", len(raw) - 5)
    assert codec.query_text(raw[5:]) == "SELECT 1"


@pytest.mark.parametrize("length", [0, 3])
def test_a_length_below_its_own_size_is_a_protocol_violation(length: int) -> None:
    with pytest.raises(codec.ProtocolViolation, match="invalid message length"):
        codec.split_header(b"Q" + struct.pack("!I", length), 1000)


def test_an_oversized_message_is_refused_before_it_is_read() -> None:
    with pytest.raises(codec.ProtocolViolation, match="exceeds the port's limit"):
        codec.split_header(b"Q" + struct.pack("!I", 1 << 30), 16 * 1_048_576)


def test_a_startup_packet_gives_its_parameters() -> None:
    body = struct.pack("!I", codec.PROTOCOL_3_0) + b"user\x00svc\x00database\x00t1\x00\x00"
    assert codec.startup_length(struct.pack("!I", len(body) + 4)) == len(body)
    startup = codec.parse_startup(body)
    assert isinstance(startup, codec.Startup)
    assert startup.parameters == {"user": "svc", "database": "t1"}


def test_ssl_and_cancel_requests_are_recognised() -> None:
    assert codec.parse_startup(struct.pack("!I", codec.SSL_REQUEST_CODE)) == codec.SSL_REQUEST_CODE
    cancel = codec.parse_startup(struct.pack("!III", codec.CANCEL_REQUEST_CODE, 42, 7))
    assert cancel == codec.CancelRequest(42, 7)


@pytest.mark.parametrize(
    "body",
    [
        struct.pack("!I", 2 << 16) + b"\x00",  # protocol 2
        struct.pack("!I", codec.PROTOCOL_3_0) + b"user\x00svc\x00",  # no terminator
        struct.pack("!I", codec.PROTOCOL_3_0) + b"user\x00\x00",  # a name without a value
        struct.pack("!I", codec.PROTOCOL_3_0) + b"user\x00\xff\x00\x00",  # not UTF-8
        struct.pack("!III", codec.CANCEL_REQUEST_CODE, 1, 2) + b"x",
    ],
)
def test_malformed_startup_packets_are_protocol_violations(body: bytes) -> None:
    with pytest.raises(codec.ProtocolViolation):
        codec.parse_startup(body)


@pytest.mark.parametrize("length", [4, 7, 10_001])
def test_a_startup_length_out_of_bounds_is_refused(length: int) -> None:
    with pytest.raises(codec.ProtocolViolation):
        codec.startup_length(struct.pack("!I", length))


def test_an_error_response_carries_its_sqlstate_and_fields() -> None:
    raw = codec.error_response("42501", "refused", H="ask the admin")
    kind, length = codec.split_header(raw[:5], 1000)
    fields = codec.parse_error_fields(raw[5:])
    assert kind == b"E" and length == len(raw) - 5
    assert fields["C"] == "42501" and fields["M"] == "refused" and fields["S"] == "ERROR"
    assert fields["H"] == "ask the admin"
    assert codec.parse_error_fields(codec.notice_response("01000", "note")[5:])["S"] == "NOTICE"


def test_builders_match_the_protocol() -> None:
    assert codec.ready_for_query(b"I") == b"Z\x00\x00\x00\x05I"
    assert codec.authentication_ok() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert codec.backend_key_data(1, 2) == b"K\x00\x00\x00\x0c" + struct.pack("!II", 1, 2)
    assert codec.parameter_status("a", "b") == b"S\x00\x00\x00\x08a\x00b\x00"
    assert codec.authentication_sasl() == codec.message(
        b"R", struct.pack("!I", 10) + b"SCRAM-SHA-256\x00\x00"
    )


def test_parse_and_bind_statement_names_are_rewritten_in_place() -> None:
    types = struct.pack("!HI", 1, 23)
    parse = codec.cstring("s1") + codec.cstring("SELECT $1") + types
    assert codec.parse_parse(parse) == ("s1", "SELECT $1", types)
    renamed = codec.replace_parse_name("srv", "SELECT $1", types)
    assert codec.parse_parse(renamed[5:]) == ("srv", "SELECT $1", types)
    bind = codec.cstring("p") + codec.cstring("s1") + b"\x00\x00\x00\x01\x00\x00\x00\x011"
    assert codec.bind_statement(bind)[0] == "s1"
    rebound = codec.replace_bind_statement(bind, "srv")
    assert rebound[5:] == codec.cstring("p") + codec.cstring("srv") + bind[5:]


def test_a_parse_whose_types_do_not_match_their_count_is_refused() -> None:
    with pytest.raises(codec.ProtocolViolation):
        codec.parse_parse(codec.cstring("") + codec.cstring("SELECT 1") + struct.pack("!H", 2))
