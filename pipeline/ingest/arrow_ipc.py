"""How many bytes an Arrow IPC stream decodes to, read from its metadata before anything is decompressed.

An IPC stream may compress its buffers (LZ4 or ZSTD); each compressed buffer
starts with its uncompressed length. A message of a few KB can so declare
(and really hold, ZSTD reaches ratios near 30,000:1) gigabytes of zeros,
enough to have the process killed for memory on every restart. The decoder
asks :func:`decoded_bytes` first and rejects a stream over its limit.

Only what pyarrow does not expose is read here: the ``buffers`` and
``compression`` fields of each ``RecordBatch`` (and ``DictionaryBatch``)
flatbuffer in ``Message.fbs`` of the Arrow format, found through the
flatbuffer tables' vtables. Anything that does not parse raises ``ValueError``.

>>> import pyarrow as pa
>>> sink = pa.BufferOutputStream()
>>> t = pa.table({"x": pa.array([0] * 1000, pa.int64())})
>>> with pa.ipc.new_stream(sink, t.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
...     w.write_table(t)
>>> data = sink.getvalue().to_pybytes()
>>> len(data) < 1000, decoded_bytes(data)
(True, 8000)
"""

from __future__ import annotations

import struct

import pyarrow as pa

# Message table fields (Message.fbs): 0 version, 1 header_type, 2 header, 3 bodyLength, 4 custom_metadata.
_MESSAGE_HEADER = 2
# RecordBatch: 0 length, 1 nodes, 2 buffers, 3 compression; DictionaryBatch: 0 id, 1 data, 2 isDelta.
_BATCH_BUFFERS, _BATCH_COMPRESSION, _DICTIONARY_DATA = 2, 3, 1


def decoded_bytes(data: bytes) -> int:
    """Total size of the buffers of every batch in the stream once decompressed (bytes)."""
    try:
        return _decoded_bytes(data)
    except (struct.error, IndexError, OverflowError) as e:
        raise ValueError(f"unreadable IPC message metadata: {e}") from e


def _decoded_bytes(data: bytes) -> int:
    total = 0
    reader = pa.ipc.MessageReader.open_stream(pa.py_buffer(data))
    while True:
        try:
            msg = reader.read_next_message()
        except StopIteration:
            return total
        if msg.type not in ("record batch", "dictionary"):
            continue
        meta = msg.metadata.to_pybytes()
        batch = _table(meta, _deref(meta, _field(meta, _table(meta, _deref(meta, 0)), _MESSAGE_HEADER)))
        if msg.type == "dictionary":
            batch = _table(meta, _deref(meta, _field(meta, batch, _DICTIONARY_DATA)))
        at = _field(meta, batch, _BATCH_BUFFERS)
        if at is None:
            continue
        compressed = _field(meta, batch, _BATCH_COMPRESSION) is not None
        vec = _deref(meta, at)
        (count,) = struct.unpack_from("<I", meta, vec)
        body = msg.body
        for k in range(count):
            offset, length = struct.unpack_from("<qq", meta, vec + 4 + 16 * k)
            if compressed and length >= 8:
                head = body[offset : offset + 8].to_pybytes()
                (size,) = struct.unpack("<q", head)  # struct.error if the buffer lies outside the body
                total += length - 8 if size == -1 else size  # -1: this buffer was left uncompressed
            else:
                total += length


def _table(buf: bytes, pos: int) -> tuple[int, list[int]]:
    """A flatbuffer table: its position and its vtable's field offsets."""
    vtable = pos - struct.unpack_from("<i", buf, pos)[0]
    (size,) = struct.unpack_from("<H", buf, vtable)
    if vtable < 0 or size < 4:
        raise IndexError(f"bad vtable at {vtable}")
    return pos, list(struct.unpack_from(f"<{(size - 4) // 2}H", buf, vtable + 4))


def _field(buf: bytes, table: tuple[int, list[int]], i: int) -> int | None:
    """Position of field ``i`` of ``table``, None when absent."""
    pos, fields = table
    return pos + fields[i] if i < len(fields) and fields[i] else None


def _deref(buf: bytes, at: int | None) -> int:
    """Follow the offset stored at ``at`` (a reference to a table or vector)."""
    if at is None:
        raise IndexError("a required field is missing")
    return at + struct.unpack_from("<I", buf, at)[0]
