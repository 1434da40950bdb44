"""The decoder takes any input: the fuzzer's regression cases, a short fuzzing pass, and the poison
messages of issue 18 (deep JSON, invalid UTF-8, bad Arrow IPC, header keys that are not UTF-8)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

import pipeline.kafka.clients  # noqa: F401 - installs the tolerant header key decoding
from pipeline.config import FieldSettings
from pipeline.ingest.decode import BAD_ARROW, MALFORMED_JSON, MISSING_FIELD, UNDECODABLE, Decoder
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.windows import TumblingWindow, WindowState
from tests.support.fuzz_decode import check

HERE = Path(__file__).parent
REGRESSIONS = sorted((HERE / "fuzz_corpus" / "regressions").iterdir())
SEEDS = HERE / "fuzz_corpus" / "seeds"  # the minimised corpus of the long runs (BENCHMARKS.md)
ARROW = [("content-type", ARROW_CONTENT_TYPE.encode())]
T = 1_700_000_000_000


def rec(offset: int, value: bytes | None, headers: list | None = None) -> ConsumerRecord:
    return ConsumerRecord("obs", 0, -1, offset, 0, 0, b"k", value, headers or [], None, -1, -1, -1)


def good(offset: int) -> ConsumerRecord:
    return rec(offset, json.dumps({"series": "a", "ts": T + offset, "value": float(offset)}).encode())


def ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_fuzzer_regression_case(path: Path) -> None:
    check(path.read_bytes())


def test_the_fuzzers_corpus_still_passes() -> None:
    seeds = sorted(SEEDS.iterdir())
    assert len(seeds) > 50
    for path in seeds:
        check(path.read_bytes())


def test_a_short_fuzzing_pass_finds_nothing(tmp_path: Path) -> None:
    """A few seconds of coverage-guided fuzzing from the regression corpus (``make fuzz`` runs longer)."""
    pytest.importorskip("atheris")
    argv = [
        sys.executable,
        str(HERE.parents[2] / "tests" / "support" / "fuzz_decode.py"),
        "-max_total_time=5",
        "-max_len=4096",
        "-len_control=0",
        "-timeout=30",
        f"-artifact_prefix={tmp_path}/",
        str(tmp_path / "corpus"),
        str(SEEDS),
        str(HERE / "fuzz_corpus" / "regressions"),
    ]
    (tmp_path / "corpus").mkdir()
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[2]), "RUST_BACKTRACE": "0"}
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Done" in out.stderr, out.stderr[-3000:]
    assert not list(tmp_path.glob("crash-*"))


POISON = {
    "deep array": b"[" * 5000 + b"]" * 5000,
    "deep array in an object": b'{"series": "a", "ts": [' + b"[" * 5000 + b"]" * 5000 + b'], "value": 1.0}',
    "invalid UTF-8 in series": b'{"series": "\xff\xfe", "ts": 1700000000000, "value": 1.0}',
    "invalid UTF-8 in a key": b'{"ser\xffies": "a", "ts": 1700000000000, "value": 1.0}',
    "invalid UTF-8 in an unknown field": b'{"series": "a", "ts": 1700000000000, "value": 1.0, "x": "\xc0"}',
    "lone surrogate escape": b'{"series": "\\ud800", "ts": 1700000000000, "value": 1.0}',
    "UTF-16": '{"series": "a", "ts": 1700000000000, "value": 1.0}'.encode("utf-16"),
}


def test_a_deep_object_without_the_fields_is_missing_them() -> None:
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000  # JSON, as pyarrow reads it: an object with an unknown field
    out = Decoder(FieldSettings(), 0, 2**62).decode([good(0), rec(1, deep), good(2)])
    assert [(r.record.offset, r.reason) for r in out.rejected] == [(1, MISSING_FIELD)]


@pytest.mark.parametrize("name", POISON)
def test_poison_json_is_rejected_and_its_neighbours_windowed(name: str) -> None:
    decoder = Decoder(FieldSettings(), 0, 2**62)
    batch = [good(0), rec(1, POISON[name]), good(2)]
    out = decoder.decode(batch)
    assert [(r.record.offset, r.reason) for r in out.rejected] == [(1, MALFORMED_JSON)]
    assert out.events["offset"].to_list() == [0, 2]
    WindowState(TumblingWindow(1000)).add(out.events)  # polars panicked here on invalid UTF-8


def test_deep_nesting_in_an_unknown_field_is_accepted_alone_or_in_a_batch() -> None:
    """pyarrow's reader (the fast path) skips a deep unknown field; the slow path must agree."""
    deep = b'{"series": "a", "ts": 1700000000001, "value": 2.0, "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    decoder = Decoder(FieldSettings(), 0, 2**62)
    for batch in ([rec(1, deep)], [good(0), rec(1, deep), rec(2, b"not json")]):
        out = decoder.decode(batch)
        assert 1 in out.events["offset"].to_list()


def _arrow_cases() -> dict[str, bytes]:
    bad_utf8 = pa.array([b"\xff\xfe", b"ok"], pa.binary()).view(pa.string())
    ts, v = pa.array([T, T + 1]), pa.array([1.0, 2.0])
    good_table = ipc(pa.table({"series": ["a", "b"], "ts": ts, "value": v}))
    return {
        "invalid UTF-8 in series": ipc(pa.table({"series": bad_utf8, "ts": ts, "value": v})),
        "invalid UTF-8 in a dictionary": ipc(
            pa.table({"series": bad_utf8.dictionary_encode(), "ts": ts, "value": v})
        ),
        "invalid UTF-8 in an unused column": ipc(
            pa.table({"series": ["a", "b"], "ts": ts, "value": v, "x": bad_utf8})
        ),
        "truncated": good_table[: len(good_table) // 2],
        "garbage": b"\xff\xff\xff\xff\x10\x00\x00\x00" + b"\x00" * 40,
    }


@pytest.mark.parametrize("name", list(_arrow_cases()))
def test_a_bad_arrow_stream_is_rejected_and_its_neighbours_windowed(name: str) -> None:
    decoder = Decoder(FieldSettings(), 0, 2**62)
    out = decoder.decode([good(0), rec(1, _arrow_cases()[name], ARROW), good(2)])
    assert [(r.record.offset, r.reason) for r in out.rejected] == [(1, BAD_ARROW)]
    assert out.events["offset"].to_list() == [0, 2]


@pytest.mark.parametrize(
    "column,arr",
    [
        ("ts", pa.array([2**64 - 1], pa.uint64())),
        ("ts", pa.array([2**62], pa.int64()).cast(pa.timestamp("s"))),
        ("value", pa.array([2**53 + 1], pa.int64())),
        ("series", pa.array([[1]], pa.list_(pa.int64()))),
    ],
)
def test_arrow_columns_that_do_not_convert_are_wrong_type(column: str, arr: pa.Array) -> None:
    cols = {"series": pa.array(["a"]), "ts": pa.array([T]), "value": pa.array([1.0]), column: arr}
    out = Decoder(FieldSettings(), 0, 2**62).decode([rec(0, ipc(pa.table(cols)), ARROW)])
    assert [r.reason for r in out.rejected] == ["wrong_type"] and out.events.height == 0


def test_a_record_that_makes_the_batch_raise_is_undecodable_and_its_neighbours_windowed(monkeypatch) -> None:
    """The last resort: whatever a decoder raises, a PanicException (a BaseException) included, costs
    only the record that raised."""
    from pipeline.ingest import decode

    real = decode._classify_json

    class PanicException(BaseException):  # what pyo3 raises on a Rust panic
        pass

    def classify(value, f):
        if value == b"boom":
            raise PanicException("PyObject pointer is null")
        return real(value, f)

    monkeypatch.setattr(decode, "_classify_json", classify)
    out = Decoder(FieldSettings(), 0, 2**62).decode([good(0), rec(1, b"boom"), good(2), rec(3, b"[")])
    assert [(r.record.offset, r.reason) for r in out.rejected] == [(1, UNDECODABLE), (3, MALFORMED_JSON)]
    assert "PanicException: PyObject pointer is null" in out.rejected[0].detail
    assert out.events["offset"].to_list() == [0, 2]
    assert out.json_messages == 4


def test_keyboard_interrupt_is_not_turned_into_a_rejection(monkeypatch) -> None:
    from pipeline.ingest import decode

    def classify(value, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(decode, "_classify_json", classify)
    with pytest.raises(KeyboardInterrupt):
        Decoder(FieldSettings(), 0, 2**62).decode([rec(0, b"[")])


def test_a_header_key_that_is_not_utf8_reaches_the_decoder() -> None:
    """kafka-python decoded header keys strictly: poll() raised at such a record on every try."""

    class RawKey(str):  # a producer that writes these bytes as the key
        def encode(self, *args, **kwargs) -> bytes:
            return b"\xffbad"

    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    builder.append(0, timestamp=0, key=b"k", value=b"[", headers=[(RawKey("x"), b"v")])
    (record,) = list(DefaultRecordBatch(bytes(builder.build())))
    assert record.headers == [("\udcffbad", b"v")]
    ((key, _),) = record.headers
    assert key.encode("utf-8") == b"\xffbad"  # what the fetcher measures and the DLQ producer sends
    out = Decoder(FieldSettings(), 0, 2**62).decode([rec(0, record.value, record.headers)])
    assert [r.reason for r in out.rejected] == [MALFORMED_JSON]
    assert pl.DataFrame(out.events).height == 0


def test_a_blank_message_does_not_take_a_row_of_its_neighbour() -> None:
    """Found by the fuzzer: pyarrow skips a blank line, so a blank message next to one holding two
    objects gave the batch its row count with the second object given to the blank message."""
    two = b'{"series": "a", "ts": 1700000000000, "value": 1}{"series": "b", "ts": 1700000000001, "value": 2}'
    both = [(0, MALFORMED_JSON), (1, MALFORMED_JSON)]
    for blank in (b"", b"  ", b"\r"):
        out = Decoder(FieldSettings(), 0, 2**62).decode([rec(0, two), rec(1, blank), good(2)])
        assert [(r.record.offset, r.reason) for r in out.rejected] == both
        assert out.events["offset"].to_list() == [2]
        out = Decoder(FieldSettings(), 0, 2**62).decode([rec(0, two), rec(1, blank)])  # blank and last
        assert [(r.record.offset, r.reason) for r in out.rejected] == both


def test_arrow_streams_that_decode_to_too_much_are_rejected_before_decoding(monkeypatch) -> None:
    """ZSTD-compressed zeros (ratio ~30,000:1) or a long dictionary entry repeated by one-byte indices:
    a message of a few KB would decode to gigabytes and have the process killed for memory, on every
    restart. Here with a limit of 1 MB (256 MB in production)."""
    from pipeline.ingest import decode

    monkeypatch.setattr(decode, "MAX_ARROW_BYTES", 1 << 20)
    n = 200_000  # 1.6 MB of int64 zeros
    zeros = pa.table(
        {
            "series": pa.array(["a"] * n).dictionary_encode(),
            "ts": pa.array([0] * n, pa.int64()),
            "value": pa.array([1.0] * n),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, zeros.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(zeros)
    compressed = sink.getvalue().to_pybytes()
    assert len(compressed) < 20_000
    entry = pa.array(["x" * 10_000])
    repeated = pa.DictionaryArray.from_arrays(pa.array([0] * 200, pa.int8()), entry)  # 2 MB of text
    dictionary = ipc(
        pa.table({"series": repeated, "ts": pa.array([T] * 200), "value": pa.array([1.0] * 200)})
    )
    assert len(dictionary) < 20_000
    decoder = Decoder(FieldSettings(), 0, 2**62)
    out = decoder.decode([good(0), rec(1, compressed, ARROW), rec(2, dictionary, ARROW), good(3)])
    assert [(r.record.offset, r.reason) for r in out.rejected] == [(1, BAD_ARROW), (2, "wrong_type")]
    assert "over the limit" in out.rejected[0].detail and "over the limit" in out.rejected[1].detail
    assert out.events["offset"].to_list() == [0, 3]
    monkeypatch.setattr(decode, "MAX_ARROW_BYTES", 256 << 20)  # under the real limit both decode
    out = decoder.decode([rec(1, compressed, ARROW), rec(2, dictionary, ARROW)])
    assert out.rejected == [] and out.events.height == n + 200
