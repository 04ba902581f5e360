"""Errors other than Ctrl-C (an out-of-memory RuntimeError, a MemoryError, ...) raised inside
an engine call: the caller gets the error, and the engine is left whole (every page and
reservation back, the next call as if the failed one never ran)."""
from __future__ import annotations

import contextlib

import pytest

from conftest import random_ids


@contextlib.contextmanager
def failing(obj, name: str, k: int | None, exc=MemoryError):
    """``obj.name``'s k-th call (from the block's start) raises ``exc`` (None: none does);
    yields the list of calls. ``obj``: an instance, a class or a module."""
    orig = getattr(obj, name)
    own = vars(obj).get(name, None) if name in vars(obj) else None
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
        if own is not None:
            setattr(obj, name, own)
        else:
            delattr(obj, name)  # (an instance attribute over the class's method)


def whole(llm) -> tuple:
    st = llm.cache_stats()
    return st["pages_used"], st["pages_reserved"], st["segments"]


def same_with_and_without_the_fault(llm, run) -> None:
    """``run(fail)`` gives the same with the injected fault as without, and leaves the
    engine whole."""
    want = run(False)
    assert run(True) == want
    assert whole(llm) == (0, 0, 0)


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
    same_with_and_without_the_fault(llm, run)


def _points(llm):
    import engine.core
    from engine.threads import ThreadTree
    from engine.tokenizer import TextStream
    return {"forward": (llm.model, "layer_step"), "plan": (llm.runner, "_plan_arrays"),
            "page": (llm.cache, "_take_page"), "segment": (llm.cache, "new_segment"),
            "sample": (engine.core, "sample"), "decode": (TextStream, "push"), "accept": (llm.core, "accept"),
            "fork": (ThreadTree, "fork"), "join": (ThreadTree, "join")}


def _calls(llm):
    from engine import SamplingParams
    from engine.protocols import ParaThinker
    V = llm.config.vocab_size
    prompt = random_ids(11, V, 3)

    def gen():
        outs = llm.generate([prompt, prompt[:5]], [SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=5),
                                                   SamplingParams(temperature=0, max_tokens=4, stop=["zz"])])
        return [[c.token_ids for c in o.outputs] for o in outs]

    def unseeded():
        return [c.token_ids for c in llm.generate([prompt], SamplingParams(n=2, max_tokens=4))[0].outputs]

    def session():
        s = llm.session(prompt)
        try:
            a, b = s.fork(s.root, [[5], [6, 7]])
            s.generate([a, b], SamplingParams(temperature=0.9, seed=2, max_tokens=3))
            c = s.join([a, b], header=[8], positions="reprefill")
            return s.generate([c], SamplingParams(temperature=0, max_tokens=3, stop=["zz"]))[0].token_ids
        finally:
            s.close()

    def score():
        return [x.sum().item() for x in llm.score([prompt, prompt[:3]])]

    def parathinker():
        return llm.generate([prompt], SamplingParams(temperature=0.9, seed=1, max_tokens=4),
                            protocol=ParaThinker(paths=2))[0].outputs[0].token_ids
    return {"generate": gen, "unseeded": unseeded, "session": session, "score": score,
            "parathinker": parathinker}


@pytest.mark.parametrize("kind", ["generate", "unseeded", "session", "score", "parathinker"])
def test_an_error_at_any_call_leaves_the_engine_whole(make_llm, kind):
    """An error (here a MemoryError, as an allocation that fails) raised at the k-th call of
    the forward, the plan builder, the page allocator, the sampler, the detokenizer, the stop
    rules, a fork or a join, for every k of a whole call (prompts prefilled in chunks of 4
    tokens: faults between passes too): the caller gets that error, every page, reservation
    and segment is back, the lock is free, the random generator is as before, and the same
    call then gives what it gave before."""
    from engine.interrupts import DEFERRED
    llm = make_llm("qwen3", kv_cache_tokens=8192, max_forward_tokens=4, seed=0)
    call = _calls(llm)[kind]
    rng = llm._rng.get_state()
    want = call()
    landed = 0
    for name, (obj, attr) in _points(llm).items():
        llm._rng.set_state(rng)
        with failing(obj, attr, None) as calls:
            assert call() == want
        total = len(calls)  # (0: this kind of call does not reach it)
        for k in sorted(set(range(1, min(total, 6) + 1)) | {1 + (total - 1) * i // 5 for i in range(6) if total}):
            llm._rng.set_state(rng)
            with failing(obj, attr, k) as calls:
                with pytest.raises(MemoryError, match=f"injected at {attr} call {k}$"):
                    call()
            landed += 1
            where = (name, k, total)
            st = llm.cache_stats()
            assert (st["pages_used"], st["pages_reserved"], st["segments"]) == (0, 0, 0), (where, st)
            assert llm._busy is None and llm._lock._owner is None and not DEFERRED.pending, where
            assert not llm.scheduler.running and not llm.scheduler.waiting, where
            if kind != "session":  # (one engine call; a session's earlier verbs drew theirs and ran)
                assert llm._rng.get_state().equal(rng), where
            assert call() == want, where
    assert landed >= 10


def test_a_live_threads_rewritten_last_token_is_put_back_when_its_step_fails(make_llm):
    """A spawned thread written in a step where it did not sample, whose view then grew, has
    its last token written again (same slot) when it next samples; a fault in that step's
    forward after its layers wrote it puts the slot back as it was (a thread that reads it
    then sees what it saw before) and the token is no longer pending."""
    from engine import SamplingParams
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    prompt = random_ids(7, llm.config.vocab_size, 5)
    g = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=0)

    def run(fail: bool):
        s = llm.session(prompt)
        (a,) = s.fork(s.root, [[5]])
        w = s.spawn([a], header=[6])
        s.generate([a, w], g)
        x = s.spawn([w], header=[7])
        s.generate([x], g)  # (w's pending token is written for x: w did not sample)
        s.generate([a], g)  # (w's view grows)
        if fail:
            with failing(llm.model, "logits", 1):  # (after every layer wrote the slot again)
                with pytest.raises(MemoryError):
                    s.generate([w], g)
            assert w._t.pending == [] and w._t.logits_stale
        out = s.generate([x], g)[0]
        res = list(out.token_ids), [lp[t].logprob for lp, t in zip(out.logprobs, out.token_ids)]
        s.close()
        return res
    same_with_and_without_the_fault(llm, run)


@pytest.mark.parametrize("where", ["queueing the prompt", "making the root's handle"])
def test_a_session_that_fails_to_start_holds_nothing(make_llm, where):
    """llm.session() failing as it makes its root (a MemoryError queueing the prompt) left the
    root's segment in the cache for as long as the error was kept (its traceback holds the
    half-made Session: an `except ... as e` block, a REPL's last error). So does a failure
    after the root was made (making its handle): the session frees the tree itself."""
    from engine.session import ThreadHandle
    from engine.threads import ThreadTree
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    ids = random_ids(9, llm.config.vocab_size, 4)
    obj, name = (ThreadTree, "inject") if where == "queueing the prompt" else (ThreadHandle, "__init__")
    with failing(obj, name, 1):
        with pytest.raises(MemoryError) as info:
            llm.session(ids)
    assert info.value.__traceback__ is not None
    assert whole(llm) == (0, 0, 0)
    from engine import SamplingParams
    s = llm.session(ids)
    assert len(s.generate([s.root], SamplingParams(temperature=0, max_tokens=2))[0].token_ids) == 2
    s.close()
    assert whole(llm) == (0, 0, 0)


@pytest.mark.parametrize("verb", ["join", "spawn"])
def test_a_session_join_or_spawn_that_fails_changes_nothing(make_llm, verb):
    """A session's join (or spawn) that failed after making its new thread (a MemoryError
    queueing its header) kept that thread, which the caller never got: its pages held until
    the session closed, the joined threads' parent one child more, and the id it took
    changed the seeded draws of the session's later threads (fork already undid its own)."""
    from engine import SamplingParams
    from engine.threads import ThreadTree
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    prompt = random_ids(7, llm.config.vocab_size, 5)
    seeded = SamplingParams(temperature=1.0, seed=3, max_tokens=3)

    def run(fail: bool):
        s = llm.session(prompt)
        a, b = s.fork(s.root, [[5], [6]])
        s.generate([a, b], SamplingParams(temperature=0, max_tokens=2))
        if fail:
            held, n = whole(llm), len(s.tree.threads)
            with failing(ThreadTree, "inject", 1):
                with pytest.raises(MemoryError):
                    s.join([a, b], [7]) if verb == "join" else s.spawn([s.root], [7])
            assert whole(llm) == held and len(s.tree.threads) == n
            assert len(s.tree.root.children) == 2
        c = s.join([a, b], [7]) if verb == "join" else s.spawn([s.root], [7])
        out = [o.token_ids for o in s.generate([c], seeded)], c.id
        s.close()
        return out
    same_with_and_without_the_fault(llm, run)


def test_a_request_failing_to_make_its_tree_gives_its_reservation_back(make_llm):
    """The scheduler reserved a request's pages, then made its thread tree outside anything
    that gives them back: an error there (a MemoryError) kept the reservation for good."""
    import engine.scheduler
    from engine import SamplingParams
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    ids = random_ids(9, llm.config.vocab_size, 2)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    want = llm.generate([ids], greedy)[0].outputs[0].token_ids
    for k in (1, 2):  # the first request's tree, the second's
        with failing(engine.scheduler, "ThreadTree", k) as calls:
            with pytest.raises(MemoryError):
                llm.generate([ids, ids], greedy)
        assert len(calls) == k
        assert whole(llm) == (0, 0, 0)
    assert llm.generate([ids], greedy)[0].outputs[0].token_ids == want
