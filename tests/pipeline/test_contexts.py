"""ContextBuffers: the last windows of every series, as contexts."""

from __future__ import annotations

import numpy as np

from pipeline.contexts import ContextBuffers
from tests.support.forecast import STEP


def test_buffers_give_the_context_ending_at_a_window_and_replace_repeats() -> None:
    buf = ContextBuffers(capacity=5, step_ms=STEP)
    for i in range(1, 8):
        buf.put(["a"], np.array([i * STEP]), np.array([float(i)]))
    buf.put(["b", "b"], np.array([2000, 1000]), np.array([20.0, 10.0]))  # out of order within a batch
    rows = buf.row_of(["a", "a", "a", "a", "b"])
    ctx, ok, evicted = buf.contexts(rows, np.array([7000, 5000, 5000, 7500, 2000]), 3)
    np.testing.assert_array_equal(ctx[0], [5.0, 6.0, 7.0])
    np.testing.assert_array_equal(ctx[1], [3.0, 4.0, 5.0])
    assert ok.tolist() == [True, True, True, False, False]  # 7500 ends no window; "b" has only 2 windows
    assert evicted.tolist() == [False, False, False, False, False]
    _, ok, evicted = buf.contexts(buf.row_of(["a"]), np.array([5000]), 4)  # 2000 was pushed out: bounded
    assert not ok[0] and evicted[0]  # older than the buffer: the job reads the store for it
    _, ok, evicted = buf.contexts(buf.row_of(["a"]), np.array([7000]), 6)  # longer than the buffer
    assert not ok[0] and evicted[0]
    _, ok, _ = buf.contexts(buf.row_of(["b"]), np.array([2000]), 2)
    assert ok[0]
    buf.put(["a"], np.array([6000]), np.array([60.0]))  # a repeat after a restart replaces the value
    ctx, _, _ = buf.contexts(buf.row_of(["a"]), np.array([7000]), 3)
    np.testing.assert_array_equal(ctx[0], [5.0, 60.0, 7.0])
    buf.put(["a"], np.array([1000]), np.array([99.0]))  # older than everything held: not stored
    ctx, ok, _ = buf.contexts(buf.row_of(["a"]), np.array([7000]), 5)
    assert ok[0] and ctx[0].tolist() == [3.0, 4.0, 5.0, 60.0, 7.0]
    gaps = ContextBuffers(capacity=10, step_ms=STEP)
    gaps.put(["c"] * 3, np.array([1000, 2000, 4000]), np.ones(3))
    _, ok, evicted = gaps.contexts(gaps.row_of(["c"]), np.array([4000]), 3)
    assert not ok[0] and not evicted[0]  # 3000 missing: not a regular grid, and not older than the buffer
    many = ContextBuffers(capacity=4, step_ms=STEP)  # rows grow as series arrive
    names = [f"s{i}" for i in range(200)]
    many.put(names, np.full(200, 1000), np.arange(200.0))
    ctx, ok, _ = many.contexts(many.row_of(names[::-1]), np.full(200, 1000), 1)
    assert ok.all() and ctx[:, 0].tolist() == list(np.arange(200.0)[::-1]) and len(many) == 200
