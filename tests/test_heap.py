"""The garbage collector around a long-lived engine (`ember serve`)."""

from __future__ import annotations

import gc
import weakref

from ember.engine.heap import startup_objects_frozen


class Node:
    other: Node


def test_what_lives_at_start_is_left_to_the_collector_only_after_the_block() -> None:
    """Objects alive on entry are skipped by full collections inside the block (what made them cheap), and
    collectable again after it: an engine dropped then is freed."""
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    alive = weakref.ref(a)
    with startup_objects_frozen():
        assert gc.get_freeze_count() > 0
        del a, b
        gc.collect()
        assert alive() is not None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert alive() is None
