"""Errors other than Ctrl-C (an out-of-memory RuntimeError, a MemoryError, ...) raised inside
an engine call: the caller gets the error, and the engine is left whole (every page and
reservation back, the next call as if the failed one never ran)."""
from __future__ import annotations

import contextlib

import pytest

from conftest import random_ids


@contextlib.contextmanager
def failing(obj, name: str, k: int, exc=MemoryError):
    """``obj.name``'s k-th call (from the block's start) raises ``exc``; yields the list of calls."""
    orig = getattr(obj, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            raise exc(f"injected at {name} call {k}")
        return orig(*args, **kwargs)
    setattr(obj, name, wrapper)
    try:
        yield calls
    finally:
        delattr(obj, name)  # (an instance attribute over the class's method)


def whole(llm) -> tuple:
    st = llm.cache_stats()
    return st["pages_used"], st["pages_reserved"], st["segments"]


def test_score_failing_to_make_its_segment_gives_its_reservation_back(make_llm):
    """score() reserved its pages, then made its segment outside the try that releases the
    reservation: an error there (a MemoryError) left the pages reserved for good, and every
    later request had that many fewer (found by fault injection at each cache call)."""
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    ids = random_ids(9, llm.config.vocab_size, 1)
    want = llm.score(ids)[0]
    with failing(llm.cache, "new_segment", 1) as calls:
        with pytest.raises(MemoryError):
            llm.score(ids)
    assert calls == [1]
    assert whole(llm) == (0, 0, 0)
    assert llm.score(ids)[0].equal(want)
