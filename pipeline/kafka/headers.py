"""Record headers rollcast reads and writes: each name and value defined here, once."""

from __future__ import annotations

# An observation or windows message whose value is an Arrow IPC stream (the producers' and the decoder's contract).
ARROW_CONTENT_TYPE = "application/vnd.apache.arrow.stream"
CONTENT_TYPE = "content-type"
ARROW_HEADERS = [(CONTENT_TYPE, ARROW_CONTENT_TYPE.encode())]


class HeaderKey(str):
    """A record header key that is not UTF-8: its text holds the bad bytes as surrogate escapes, and
    ``encode()`` gives back the original bytes (kafka-python's fetcher measures a key with
    ``key.encode("utf-8")``, its producer sends ``key.encode("utf-8")``: both work, byte for byte)."""

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return str.encode(self, "utf-8", "surrogateescape")


def header_key(raw: bytes) -> str:
    """A header key as the consumer gives it: ``str`` when it is UTF-8, else a :class:`HeaderKey`."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return HeaderKey(raw.decode("utf-8", "surrogateescape"))
