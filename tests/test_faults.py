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


def test_a_fork_that_fails_partway_leaves_its_parent_unforked(make_llm):
    """A fork whose second child could not be made (a MemoryError making its segment) kept
    the first one, which the caller never got: the parent counted as forked and refused
    generate ("its children [2] see it"), and the ids taken changed the seeded draws of the
    session's later threads. The fork now takes back what it made: as if it never ran."""
    from engine import SamplingParams
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    prompt = random_ids(7, llm.config.vocab_size, 2)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=3)

    def run(fail: bool):
        s = llm.session(prompt)
        (c,) = s.fork(s.root, [[5]])
        s.generate([c], SamplingParams(temperature=0, max_tokens=2))
        if fail:
            held = whole(llm)
            with failing(llm.cache, "new_segment", 2):
                with pytest.raises(MemoryError):
                    s.fork(c, [[6], [7]])
            assert c.children == [] and whole(llm) == held
        a, b = s.fork(c, [[6], [7]])
        out = [o.token_ids for o in s.generate([a, b], seeded)], (a.id, b.id)
        s.close()
        return out
    want = run(False)
    assert run(True) == want
    assert whole(llm) == (0, 0, 0)
