"""The relay's shapes (native/wire/src/shape.rs): texts that share a relay key must share
pg_query's normalisation, the key of the guard's shape verdicts, or the relay could run a text
under another text's verdict. Checked against pglast (pg_query) over templates whose
constants vary, and for what the relay must leave to Python."""

from __future__ import annotations

import random

import pglast
import pytest

from database_service.pgwire import relay

_TEMPLATES = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = {};",
    "select * from t where a = {} and b = {} limit {}",
    "UPDATE market_data SET symbol = {} WHERE symbol = {}",
    'SELECT {}::int + {}, "col 1" FROM "T" WHERE x IN ({}, {})',
    "INSERT INTO orders (id, note) VALUES ({}, {}) RETURNING id",
    "SELECT a[{}] FROM t WHERE b >= -{} OR c <> {}",
    "SELECT pg_sleep({})",
]


def _constant(rng: random.Random) -> str:
    kind = rng.choice("ids")
    if kind == "i":
        return str(rng.randrange(0, 10**12))
    if kind == "d":
        return f"{rng.randrange(0, 10**6)}.{rng.randrange(0, 10**4)}"
    text = "".join(rng.choice("ab c'é😀%_;,()-/*") for _ in range(rng.randrange(0, 12)))
    return "'" + text.replace("'", "''") + "'"


def test_texts_of_one_relay_key_have_one_pg_query_normalisation() -> None:
    rng = random.Random(16)
    for template in _TEMPLATES:
        keys: dict[bytes, str] = {}
        for _ in range(200):
            text = template.format(*(_constant(rng) for _ in range(template.count("{}"))))
            shaped = relay.shape_of(text.encode())
            if shaped is None:
                continue
            normalized, kinds = shaped
            key = normalized + b"\x00" + kinds
            pg = pglast.parser.normalize(text)
            seen = keys.setdefault(key, pg)
            assert seen == pg, (template, text)
        assert keys, template


def test_the_relay_shape_is_pg_querys_where_the_lexers_agree() -> None:
    for text in (
        "SELECT abalance FROM pgbench_accounts WHERE aid = 4523;",
        "SELECT 'x''y', 1.5, 7 FROM t1 WHERE \"a'b\" = 'c'",
        "SELECT pg_sleep(0.01)",
    ):
        shaped = relay.shape_of(text.encode())
        assert shaped is not None
        assert shaped[0] == pglast.parser.normalize(text).encode()


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1 -- a comment",
        "SELECT /* a comment */ 1",
        "SELECT $1",
        "SELECT $$dollar$$",
        "SELECT E'\\x41'",
        "SELECT B'101', X'1F'",
        "SELECT U&'\\0041'",
        "SELECT 'back\\slash'",
        "SELECT 1e5, 0x1F, 1_000",
        "SELECT .5",
        "SELECT 'a'\n'b'",
        "SELECT 'open",
    ],
)
def test_what_the_lexers_may_read_differently_is_left_to_python(text: str) -> None:
    assert relay.shape_of(text.encode()) is None
