"""pipeline.runtime: the heap helpers of long-running processes."""

from __future__ import annotations


def test_freeze_heap_exempts_the_objects_alive_at_start_from_collection() -> None:
    import gc

    from pipeline.runtime import freeze_heap

    try:
        frozen = freeze_heap()
        # this process's imports (torch, polars, ...); the count only falls later, as frozen objects
        # are freed (a daemon thread of an earlier test dropping its last references)
        assert 10_000 < gc.get_freeze_count() <= frozen
        assert len(gc.get_objects()) < frozen / 10  # a full collection now walks only what came later
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0
