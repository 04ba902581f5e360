"""Ctrl-C at any point of an engine call leaves the engine whole: every page, segment and
reservation back, no call refused afterwards, the same results as before. SIGINT is sent
from a tracer at the k-th line the engine runs (as a real Ctrl-C lands between any two
bytecodes), for k spread over whole calls."""
from __future__ import annotations

import inspect
import os
import signal
import sys
import threading

import pytest

from conftest import engine_held, random_ids, wait_in_line
from engine import SamplingParams
from engine.interrupts import DEFERRED
from engine.llm import engine_call
from engine.protocols import Multiverse, ParallelSampling

pytestmark = [pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                                 reason="SIGINT is delivered to the main thread"),
              pytest.mark.skipif(signal.getsignal(signal.SIGINT) is not signal.default_int_handler,
                                 reason="SIGINT does not raise KeyboardInterrupt in this process (e.g. started "
                                 "in the background by a shell, which ignores it): run in the foreground")]


def _sigint_at(call, k: int, seen: list | None = None) -> str | None:
    """Run ``call`` with SIGINT raised at the k-th engine line; the line, or None if the
    call ran fewer lines. ``seen``: a list to append every engine line run to ('file.py:N')."""
    state = {"n": 0, "where": None}

    def local(frame, event, arg):
        if event == "line":
            state["n"] += 1
            if seen is not None or state["n"] == k:
                line = f"{frame.f_code.co_filename.rsplit('/engine/', 1)[1]}:{frame.f_lineno}"
                if seen is not None:
                    seen.append(line)
                if state["n"] == k:
                    state["where"] = line
                    signal.raise_signal(signal.SIGINT)
        return local

    def tracer(frame, event, arg):
        return local if "/engine/" in frame.f_code.co_filename else None
    sys.settrace(tracer)
    try:
        call()
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    return state["where"], state["n"]


def _lines_of(call) -> list[str]:
    """The engine lines ``call`` runs, in order (as _sigint_at counts them)."""
    seen = []

    def local(frame, event, arg):
        if event == "line":
            seen.append(f"{frame.f_code.co_filename.rsplit('/engine/', 1)[1]}:{frame.f_lineno}")
        return local

    sys.settrace(lambda frame, event, arg: local if "/engine/" in frame.f_code.co_filename else None)
    try:
        call()
    finally:
        sys.settrace(None)
    return seen


class _Failing(ParallelSampling):
    """Parallel sampling whose run raises from its first token's callback."""
    def __init__(self, fail):
        super().__init__()
        self.fail = fail

    def start(self, tree, core, params, make_generator):
        run = super().start(tree, core, params, make_generator)
        on_token = run.on_token

        def failing(*a, **kw):
            on_token(*a, **kw)
            self.fail()
        run.on_token = failing
        return run


def _calls(llm):
    V = llm.config.vocab_size
    prompt = random_ids(9, V, 3)

    def gen():
        outs = llm.generate([prompt, prompt[:4]], [SamplingParams(n=2, temperature=0.9, seed=5, max_tokens=5),
                                                   SamplingParams(temperature=0, max_tokens=4)])
        return [[c.token_ids for c in o.outputs] for o in outs]

    def session():
        s = llm.session(prompt)
        a, b = s.fork(s.root, [[5], [6, 7]])
        s.generate([a, b], SamplingParams(temperature=0, max_tokens=3))
        c = s.join([a, b], header=[8], positions="sequential")
        out = s.generate([c], SamplingParams(temperature=0, max_tokens=3))[0].token_ids
        s.close()
        return out

    def score():
        return llm.score([prompt, prompt[:3]])[0].sum().item()

    def tree():
        return llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6),
                            protocol=Multiverse())[0].outputs[0].token_ids
    return {"generate": gen, "session": session, "score": score, "multiverse": tree}


# (a Ctrl-C landing in Session.__del__ outside any engine call is dropped by Python itself,
# which reports it as an unraisable exception)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("kind", ["generate", "session", "score", "multiverse"])
def test_ctrl_c_anywhere_leaves_the_engine_whole(make_llm, kind):
    llm = make_llm("qwen3", kv_cache_tokens=8192)
    call = _calls(llm)[kind]
    want = call()
    _, total = _sigint_at(call, 10 ** 9)       # count the lines of one call
    assert total > 50
    # spread over the call, and every line of its first and last 30 (the call's edges: the
    # lock, the deferral's own entry and exit, the busy flag)
    probes = sorted({1 + (total - 1) * i // 23 for i in range(24)} | set(range(1, 31))
                    | set(range(max(1, total - 30), total)))
    for k in probes:
        where, _ = _sigint_at(call, k)
        st = llm.cache_stats()
        assert (st["pages_used"], st["segments"], st["pages_reserved"]) == (0, 0, 0), (where, st)
        assert llm._busy is None and not DEFERRED.pending, where
        got = call()
        assert got == want, (k, total, where)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _session_state(s):
    return [(t.id, list(t.tokens), list(t.pending), [k.id for k in t.children],
             t.joined_into and t.joined_into.id, list(t.events), t.live and [u.id for u in t.live],
             [seg.id for seg, _ in t.view]) for t in s.tree.threads], sorted(s._handles)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("verb", ["fork", "join", "spawn", "set_view", "inject"])
def test_a_ctrl_c_during_a_session_verb_leaves_the_session_as_it_was(make_llm, verb):
    """A session verb has no safe point: a Ctrl-C during it is raised at its end, and the
    caller never gets its result. The verb had been made all the same: a fork's parent took
    no more tokens, the threads of a join were joined into a continuation of no parent,
    which no handle reached (their branch of the session was lost)."""
    llm = make_llm("qwen3", kv_cache_tokens=8192)

    def setup():  # a session, and the verb's call on it
        s = llm.session(random_ids(9, llm.config.vocab_size, 3))
        a, b = s.fork(s.root, [[5], [6, 7]])
        x, = s.fork(a, [[9]])
        w = s.spawn([s.root, b], header=[4])
        call = {"fork": lambda: s.fork(b, [[1], [2]]), "join": lambda: s.join([x, b], header=[8]),
                "spawn": lambda: s.spawn([x, b], header=[3]), "set_view": lambda: s.set_view(w, [x]),
                "inject": lambda: s.inject(x, [1, 2, 3])}[verb]
        return s, [x, b, w], call
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=3)
    s, ts, call = setup()
    before, pages = _session_state(s), llm.cache_stats()
    want = [c.token_ids for c in s.generate(ts, params)]
    s.close()
    # every line up to the call's last safe point (engine_call's final DEFERRED.check(); see
    # test_a_stopped_call_leaves_the_random_generator), counted in each run (a verb taken back
    # leaves the cache's free segment ids, which a line more or less reuses)
    src, first = inspect.getsourcelines(engine_call)
    final = f"llm.py:{first + next(i for i, line in enumerate(src) if 'DEFERRED.check()' in line)}"
    s, ts, call = setup()
    probed = 0
    for k in range(1, 1000):
        seen = []
        where, _ = _sigint_at(call, k, seen)
        if where is None or final in seen[:k - 1]:  # (it ran through, or was stopped after its last safe point)
            break
        probed += 1
        assert (_session_state(s), llm.cache_stats()) == (before, pages), (k, where)
    assert probed > 50
    assert [c.token_ids for c in s.generate(ts, params)] == want
    s.close()
    s, ts, call = setup()
    call()
    del s, ts, call  # (nothing keeps a session dropped after its verb: it is closed at once)
    assert llm.cache.stats()["segments"] == 0


def test_a_second_ctrl_c_is_raised_at_once():
    """While one Ctrl-C waits for a safe point, a second one is raised where it lands."""
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with DEFERRED:
            signal.raise_signal(signal.SIGINT)
            assert DEFERRED.pending
            signal.raise_signal(signal.SIGINT)
            reached.append("after the second Ctrl-C")  # (pytest.fail here was replaced by the call's
    assert not reached, "the second Ctrl-C waited"      # deferred KeyboardInterrupt: it could not fail)
    assert not DEFERRED.pending and signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):   # one Ctrl-C: raised when the call ends
        with DEFERRED:
            signal.raise_signal(signal.SIGINT)
    assert not DEFERRED.pending


def test_a_ctrl_c_is_not_lost_when_the_call_then_fails():
    """A Ctrl-C that waited while the call failed with another error is raised, with that
    error as its context (it was dropped: a loop that skips failed items never stopped)."""
    with pytest.raises(KeyboardInterrupt) as info:
        with DEFERRED:
            signal.raise_signal(signal.SIGINT)
            raise ValueError("a callback failed")
    assert isinstance(info.value.__context__, ValueError)
    assert not DEFERRED.pending and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_handler_left_by_an_interrupted_exit_acts_as_pythons():
    """A Ctrl-C at the edge of a call (the deferring handler still installed, no call open)
    raises at once, and the next call puts Python's handler back when it ends."""
    signal.signal(signal.SIGINT, DEFERRED._on_sigint)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
        with DEFERRED:
            pass
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_inside_a_call_gets_pythons_handler():
    """A worker forked inside an engine call (from a protocol's callback) did not stop on
    Ctrl-C: it inherited the deferral, with no call of its own to end it."""
    with DEFERRED:
        pid = os.fork()
        if pid == 0:
            ok = signal.getsignal(signal.SIGINT) is signal.default_int_handler and not DEFERRED.pending
            os._exit(0 if ok and DEFERRED._depth == 0 else 1)
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


@pytest.mark.parametrize("kind", ["generate", "session"])
def test_a_stopped_call_leaves_the_random_generator(make_llm, kind):
    """Unseeded sampling draws each thread's seed from the engine's generator: a call stopped
    by Ctrl-C (anywhere, its deferred end included) or failing in a protocol's callback leaves
    it as it was, so the next call samples as on an engine where the stopped one never ran.
    A session's generate that stops after its threads took tokens keeps them, and the draws
    that made them: the next call draws new seeds (the same ones would correlate them)."""
    llm = make_llm("qwen3", kv_cache_tokens=8192, seed=0)
    prompt = random_ids(7, llm.config.vocab_size, 4)
    params = SamplingParams(n=3, temperature=1.0, max_tokens=4)
    sessions, kids = [], []

    def prepare():  # the traced call is one engine call (a session's own verbs run before it)
        if kind == "generate":
            return lambda: [c.token_ids for c in llm.generate([prompt], params)[0].outputs]
        s = llm.session(prompt)
        sessions.append(s)
        kids[:] = s.fork(s.root, [[5], [6]])
        ks = list(kids)
        return lambda: [c.token_ids for c in s.generate(ks, SamplingParams(temperature=1.0, max_tokens=4))]

    def call():
        return prepare()()
    state = llm._rng.get_state()
    want = call()
    assert call() != want  # (unseeded: the generator moved on)
    _, total = _sigint_at(prepare(), 10 ** 9)
    # every line up to the call's last safe point (engine_call's final DEFERRED.check()); the
    # lines after it let go of the lock once the call has run (a Ctrl-C there is one after
    # the call returned: the deferral raises it as the call ends)
    src, first = inspect.getsourcelines(engine_call)
    final = f"llm.py:{first + next(i for i, line in enumerate(src) if 'DEFERRED.check()' in line)}"
    lines = _lines_of(prepare())
    last = max(i for i, w in enumerate(lines) if w == final) + 1  # (k counts from 1)
    kept = 0
    for k in sorted({1 + (last - 1) * i // 9 for i in range(10)} | set(range(last - 12, last + 1))):
        llm._rng.set_state(state)
        where, _ = _sigint_at(prepare(), k)
        assert where is not None
        took = kind == "session" and any(len(h.token_ids) > 1 for h in kids)  # (header + sampled)
        kept += took
        assert (call() == want) != took, (k, total, where, took)
    assert kind == "generate" or kept > 0
    for s in sessions:
        s.close()
    assert llm.cache_stats()["pages_used"] == 0
    if kind == "generate":  # an error raised by a protocol's callback
        llm._rng.set_state(state)

        def boom(*a):
            raise ZeroDivisionError("callback")
        with pytest.raises(ZeroDivisionError):
            llm.generate([prompt], params, protocol=_Failing(boom))
        assert call() == want


def test_a_ctrl_c_where_a_dropped_session_closes_frees_it_and_reaches_the_call(make_llm, monkeypatch):
    """A Ctrl-C raised where a dropped session starts to close (a second one, inside a call
    with one waiting; or one outside any call) would be dropped by Python with the rest of
    Session.__del__: the session is closed all the same, and inside a call the Ctrl-C is
    handed to the call, raised when it ends; outside any call nothing is left pending."""
    from engine.session import Session
    llm = make_llm("qwen3", kv_cache_tokens=8192)
    close, hits = Session._close_or_hand_over, []

    def ctrl_c_first(self):
        if not hits:
            hits.append(1)
            signal.raise_signal(signal.SIGINT)  # (before the lock was tried)
        close(self)
    monkeypatch.setattr(Session, "_close_or_hand_over", ctrl_c_first)
    params = SamplingParams(temperature=0, max_tokens=2)
    s = llm.session(random_ids(20, llm.config.vocab_size, 1))
    s.generate([s.root], params)
    with pytest.raises(KeyboardInterrupt):
        with DEFERRED:  # (an engine call, with one Ctrl-C waiting: a second one is raised at once)
            signal.raise_signal(signal.SIGINT)
            del s
            inside = (len(hits), llm.cache.stats()["pages_used"], DEFERRED.pending)
    assert inside == (1, 0, True)  # (asserted out here: the call's Ctrl-C would replace the error)
    assert not DEFERRED.pending
    hits.clear()
    s = llm.session(random_ids(20, llm.config.vocab_size, 2))
    s.generate([s.root], params)
    del s  # (outside any call: the Ctrl-C raises where it lands)
    assert len(hits) == 1 and not DEFERRED.pending  # (before any call: the next one clears it)
    assert llm.cache_stats()["pages_used"] == 0
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_stale_pending_flag_does_not_interrupt_the_next_call():
    DEFERRED.pending = True  # (left by a Ctrl-C landing inside a previous __exit__)
    try:
        with DEFERRED:
            DEFERRED.check()
    except KeyboardInterrupt:
        pytest.fail("a stale Ctrl-C interrupted a new call")
    finally:
        DEFERRED.pending = False


def test_a_ctrl_c_while_waiting_for_the_engine_gives_up_the_turn(make_llm):
    """A Ctrl-C while the main thread waits for another Python thread's engine call stops the
    wait at once (the lock polls for it) and leaves the line: the other thread's call and
    every later one run as before."""
    llm = make_llm("qwen3", kv_cache_tokens=4096)
    timer = threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGINT))
    try:
        with engine_held(llm) as (_, t):
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                llm.cache_stats()  # (waits: the other thread holds the engine)
            assert t.is_alive() and len(llm._lock._line) == 0
    finally:
        timer.cancel()
    assert llm._lock._owner is None and not DEFERRED.pending
    assert llm.cache_stats()["pages_used"] == 0
    out = llm.generate([random_ids(5, llm.config.vocab_size, 1)], SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 2


def test_a_ctrl_c_at_any_line_of_a_call_that_waits_its_turn(make_llm):
    """A Ctrl-C at each engine line of a main-thread call that waits behind another thread's
    call (taking its place in line, waiting, taking the lock, the call, letting go) leaves
    the lock whole: the other thread's call runs, nobody is left in line or holding it,
    and the engine answers as before."""
    llm = make_llm("qwen3", kv_cache_tokens=4096)
    lock = llm._lock
    prompt = random_ids(6, llm.config.vocab_size, 1)
    params = SamplingParams(max_tokens=2, temperature=0)
    want = llm.generate([prompt], params)[0].outputs[0].token_ids
    k = 0
    while True:
        k += 1
        results = []
        with engine_held(llm, timeout=10) as (release, _):
            o = threading.Thread(target=lambda: results.append(llm.cache_stats()["pages_used"]))
            o.start()
            wait_in_line(lock, 1)
            timer = threading.Timer(0.03, release.set)
            timer.start()
            where, _ = _sigint_at(llm.cache_stats, k)
            timer.cancel()
        o.join(10)
        assert results == [0] and lock._owner is None and not lock._line and lock._depth == 0, (k, where)
        assert not DEFERRED.pending
        if where is None:
            break
    assert k > 20  # (the call's lines, the waits included, were all reached)
    assert llm.generate([prompt], params)[0].outputs[0].token_ids == want


def test_check_raises_the_waiting_ctrl_c_on_the_main_thread_only():
    with DEFERRED:
        signal.raise_signal(signal.SIGINT)
        errs = []
        t = threading.Thread(target=lambda: errs.append(DEFERRED.check()))
        t.start()
        t.join()
        assert errs == [None] and DEFERRED.pending  # another thread: not its Ctrl-C
        with pytest.raises(KeyboardInterrupt):
            DEFERRED.check()
        assert not DEFERRED.pending
    # (raised once: the call's end does not raise it again)


@pytest.mark.parametrize("path", ["fused", "python"])
def test_a_ctrl_c_stops_a_forward_between_layers(make_llm, path):
    """A Ctrl-C during a forward is raised before the next layer (README: a long prefill
    stops between two layers), on the fused C++ layer path and the Python one, and the
    forward is undone."""
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    model, layers = llm.model, []
    name = "layer_step" if path == "fused" else "append_kv"
    fused, orig = model.layer_step, getattr(model, name)
    assert fused is not None and llm.config.num_layers > 1

    def spy(*args, **kw):  # (once per layer on either path)
        layers.append(1)
        if len(layers) == 1:
            signal.raise_signal(signal.SIGINT)
        return orig(*args, **kw)
    if path == "python":
        model.layer_step = None
    setattr(model, name, spy)
    try:
        with pytest.raises(KeyboardInterrupt):
            llm.score(random_ids(9, llm.config.vocab_size, 1))
    finally:
        model.layer_step = fused
        if path == "python":
            model.append_kv = orig
    assert len(layers) == 1, f"{len(layers)} layers ran after the Ctrl-C"
    assert llm.cache_stats()["pages_used"] == 0
    assert llm.score(random_ids(9, llm.config.vocab_size, 1))[0].isfinite().all()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_drops_a_handler_left_installed():
    prev = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, DEFERRED._on_sigint)  # left by an interrupted exit (no _prev)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        signal.signal(signal.SIGINT, prev)


def test_an_exit_without_an_entry_keeps_the_deferral_working():
    """A forked child returns through __exit__ of a call it did not enter (depth 0 after
    the fork): that must not unbalance the depth and switch the deferral off for good."""
    assert DEFERRED._depth == 0
    assert DEFERRED.__exit__(None, None, None) is False
    assert DEFERRED._depth == 0
    with DEFERRED:
        assert signal.getsignal(signal.SIGINT) == DEFERRED._on_sigint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
