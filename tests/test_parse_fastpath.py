"""parse_email's fast paths must give exactly what the slow ones give.

`_parse_bytes` feeds only the header block of a message that is not multipart or message/* to
the stdlib parser and takes the rest as the payload; here it is compared, field by field of
the resulting `Message` tree, with `_feed` (the whole message through the parser) over the
hostile corpus, the builders' messages, hand-made edge cases and generated messages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from email.message import Message
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handler.parse_email import _feed, _parse_bytes, parse_email
from tests.builders import (
    FileSpec,
    alternative_email,
    attachment_email,
    auto_reply_email,
    bounce_email,
    forwarded_email,
    html_email,
    plain_email,
    reply_email,
)
from tests.hostile_mail import corpus, generated_message

HEAD = b"From: <patient@example.org>\r\nTo: <enquiries@clinic.example>\r\nSubject: Hi\r\n"
EDGE_CASES = [
    HEAD + b"\r\nbody\r\n",
    HEAD + b"\r\n",
    HEAD,  # no blank line at all
    HEAD + b"\r\n\r\n\r\nbody after blank lines\r\n",
    b"\r\n\r\nonly a body\r\n",
    b"\r\n",
    b"",
    b"no header at all\r\n\r\nbody\r\n",
    HEAD + b"a line that is not a header\r\nX: y\r\n\r\nbody\r\n",  # missing separator
    HEAD + b"X: a\r\r\nY: b\r\n\r\nbody\r\n",  # bare CR: headers end before our blank line
    HEAD + b"X: a\n\nY: b\r\n\r\nbody\r\n",  # bare LF blank line first
    HEAD + b"X: a\n\r\nbody\r\n\r\nmore\r\n",
    HEAD + b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody \xc3\xa9\xff\r\n",
    HEAD + b"Content-Type: Multipart/Mixed; boundary=b\r\n\r\n--b\r\n\r\npart\r\n--b--\r\n",
    HEAD + b"Content-Type: multipart/mixed\r\n\r\nno boundary\r\n",
    HEAD + b"Content-Type: message/rfc822\r\n\r\n" + HEAD + b"\r\ninner\r\n",
    HEAD + b"Content-Type: MESSAGE/delivery-status\r\n\r\nReporting-MTA: x\r\n\r\nA: b\r\n",
    HEAD + b"Content-Type:\r\n multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    HEAD + b"Content-Type: multipart /mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\n",
    HEAD + b"Content-Type: text/plain\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
    b"--b\r\n\r\nx\r\n--b--\r\n",
    HEAD.replace(b"Hi", b"a multipart/mixed question") + b"\r\nbody\r\n",
    b"From someone@example.org Mon Jan 1 00:00:00 2024\r\n" + HEAD + b"\r\nbody\r\n",
    HEAD + b"X-Long: " + b"y" * 20_000 + b"\r\n\r\n" + b"body line\r\n" * 2000,
    HEAD + b"\r\n" + b"z" * 20_000 + b"\r\nlast line without end",
    HEAD + b"\r\nbody with bare \n LF and bare \r CR and \x00 NUL\r\n.\r\n",
    HEAD + b"Content-Transfer-Encoding: base64\r\n\r\naGVsbG8=\r\n",
    HEAD + b"Content-Transfer-Encoding: quoted-printable\r\n\r\nh=C3=A9llo=\r\n\r\n",
    HEAD + b" folded continuation of nothing\r\n\r\nbody\r\n",
    b" leading continuation\r\n" + HEAD + b"\r\nbody\r\n",
    HEAD + b"Bad Header Name: x\r\n\r\nbody\r\n",
]


def _builder_messages() -> list[bytes]:
    pdf = FileSpec("report.pdf", "application/pdf", bytes(range(256)) * 4)
    plain = plain_email()
    return [
        plain, plain_email("Grüße", charset="iso-8859-1"),
        plain_email("x", transfer_encoding="quoted-printable", subject="Zweitmeinung – ä"),
        html_email(), alternative_email("text", "<p>html</p>"), attachment_email("see", [pdf]),
        reply_email("<earlier@clinic.example>"), forwarded_email(plain), bounce_email(plain),
        auto_reply_email(),
    ]


def _shape(msg: Any) -> Any:
    """Everything a `Message` (tree) holds, comparable with ==."""
    if isinstance(msg, list):
        return [_shape(m) for m in msg]
    if not isinstance(msg, Message):
        return msg
    state = dict(vars(msg))
    state["defects"] = [(type(d).__name__, str(d)) for d in msg.defects]
    state["_payload"] = _shape(state.get("_payload"))
    return state


def _outcome(parse: Callable[[bytes], Message], data: bytes) -> Any:
    """The parsed tree's shape, or the exception type (deep nesting makes the stdlib
    parser raise RecursionError; the fast path must then raise it too)."""
    try:
        return _shape(parse(data))
    except Exception as exc:
        return type(exc)


def _assert_same(data: bytes) -> None:
    assert _outcome(_parse_bytes, data) == _outcome(_feed, data), data[:200]


@pytest.mark.parametrize("data", EDGE_CASES)
def test_edge_cases_parse_as_the_stdlib_does(data: bytes) -> None:
    _assert_same(data)
    _assert_same(data.replace(b"\r\n", b"\n"))  # parse_email is also given bare-LF mail


def test_corpus_and_builder_messages_parse_as_the_stdlib_does() -> None:
    messages = [case.data for case in corpus()] + _builder_messages()
    for data in messages:
        _assert_same(data)


def test_plain_messages_take_the_fast_path() -> None:
    """The payload of a plain message is not built by the parser (so this test is not
    comparing the slow path with itself)."""
    data = plain_email()
    body = data[data.index(b"\r\n\r\n") + 4:].decode("ascii", "surrogateescape")
    fast, slow = _parse_bytes(data).get_payload(), _feed(data).get_payload()
    assert fast == slow == body and fast is not slow


def test_random_mutations_parse_as_the_stdlib_does() -> None:
    rng = random.Random(2047)
    seeds = EDGE_CASES[:3] + _builder_messages()[:4]
    pieces = [b"\r\n", b"\n", b"\r", b"\r\n\r\n", b":", b" ", b"multipart/", b"Content-Type: ",
              b"message/rfc822", b"--", b"\xff", b"\x00", b"X: y\r\n"]
    for _ in range(1500):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            data[at:at + rng.randint(0, 3)] = rng.choice(pieces)
        _assert_same(bytes(data))


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=generated_message() | st.binary(max_size=300))
def test_generated_messages_parse_as_the_stdlib_does(data: bytes) -> None:
    _assert_same(data)
    assert parse_email(data).raw == data
