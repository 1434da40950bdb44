"""pipeline/kafka/headers.py: header keys that are not UTF-8 keep their bytes; the Arrow content type."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.kafka.headers import ARROW_CONTENT_TYPE, ARROW_HEADERS, HeaderKey, header_key


def test_a_utf8_key_is_a_plain_str() -> None:
    key = header_key(b"content-type")
    assert key == "content-type" and type(key) is str


def test_a_key_that_is_not_utf8_encodes_back_to_its_bytes() -> None:
    raw = b"\xff\xfekey\x80"
    key = header_key(raw)
    assert isinstance(key, HeaderKey)
    assert key.encode() == raw and key.encode("utf-8") == raw


@given(st.binary(max_size=64))
def test_every_key_encodes_back_to_the_bytes_it_came_from(raw: bytes) -> None:
    assert header_key(raw).encode() == raw


def test_the_arrow_headers_carry_the_content_type() -> None:
    assert ARROW_HEADERS == [("content-type", b"application/vnd.apache.arrow.stream")]
    assert ARROW_CONTENT_TYPE == "application/vnd.apache.arrow.stream"
