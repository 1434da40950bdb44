"""rollcast's streaming pipeline: settings, decoding, windows, the history store.

The names most users need::

    from pipeline import load_settings, HistoryStore, decode_windows
    store = HistoryStore(load_settings())
    df = store.read(start_ms=..., end_ms=...)
"""

from pipeline.aggregators import Aggregator
from pipeline.config import Settings, load_settings
from pipeline.ingest.decode import Decoder
from pipeline.kafka.headers import ARROW_CONTENT_TYPE
from pipeline.kafka.partitioning import partition_for
from pipeline.store import HistoryStore
from pipeline.windows import WINDOW_SCHEMA, TumblingWindow, WindowState
from pipeline.windows_io import decode_windows, encode_windows

__all__ = [
    "ARROW_CONTENT_TYPE",
    "Aggregator",
    "Decoder",
    "HistoryStore",
    "Settings",
    "TumblingWindow",
    "WINDOW_SCHEMA",
    "WindowState",
    "decode_windows",
    "encode_windows",
    "load_settings",
    "partition_for",
]
