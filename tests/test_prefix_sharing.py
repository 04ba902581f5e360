"""Prompt prefixes shared across the requests of one generate call (LLM.share_prompt_prefixes):
written once, read by every request that begins with them; the same tokens and log-probs
as when each request writes its whole prompt.

The model is a random tiny Llama from ``conftest``.
"""
from __future__ import annotations

import pytest

from conftest import VARIANTS, random_ids

NAME = "llama3_rope"
VOCAB = VARIANTS[NAME]["vocab"]


def SP(**kw):
    from engine import SamplingParams
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def llm(make_llm):
    return make_llm(NAME, kv_cache_tokens=4096)


def _prompts():
    sysp, mid = random_ids(50, VOCAB, seed=1), random_ids(40, VOCAB, seed=2)
    return [sysp + random_ids(5, VOCAB, seed=10),        # the 50 shared by five
            sysp + mid + random_ids(3, VOCAB, seed=11),  # then 40 more shared by four (nested)
            random_ids(30, VOCAB, seed=3),               # nothing shared
            sysp + mid + random_ids(7, VOCAB, seed=12),
            sysp + mid, sysp + mid,                      # equal prompts: each keeps its last token
            sysp[:20],                                   # the shared prefix but its last token
            sysp[:10] + random_ids(9, VOCAB, seed=4)]    # fewer than 16 shared: alone


def _fed(llm, monkeypatch):
    """Record each forward's items: (tokens, the view's segments) per item."""
    log = []
    run = llm.runner.run

    def spy(batch):
        log.append([(list(it.token_ids), [s for s, _ in it.view]) for it in batch.items])
        return run(batch)
    monkeypatch.setattr(llm.runner, "run", spy)
    return log


def _run(llm, prompts, sp, share: bool):
    llm.share_prompt_prefixes = share
    try:
        return llm.generate(prompts, sp)
    finally:
        llm.share_prompt_prefixes = True


def _run_proto(llm, prompts, sp, share: bool, protocol):
    llm.share_prompt_prefixes = share
    try:
        return llm.generate(prompts, sp, protocol=protocol)
    finally:
        llm.share_prompt_prefixes = True


def _assert_same(a, b, tol=1e-4):
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids
        for p, q in zip(x.outputs, y.outputs):
            assert p.token_ids == q.token_ids and p.finish_reason == q.finish_reason
            if p.logprobs is not None:
                for lp, lq, t in zip(p.logprobs, q.logprobs, p.token_ids):
                    assert abs(lp[t].logprob - lq[t].logprob) < tol


def test_shared_prefixes_give_the_same_tokens(llm, monkeypatch):
    prompts = _prompts()
    greedy = SP(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=1, n=2)
    log = _fed(llm, monkeypatch)
    alone = _run(llm, prompts, greedy, share=False)
    fed_alone = sum(len(t) for step in log for t, _ in step)
    log.clear()
    shared = _run(llm, prompts, greedy, share=True)
    _assert_same(alone, shared)
    assert [o.metrics.shared_prompt_tokens for o in shared] == [50, 89, 0, 89, 89, 89, 19, 0]
    assert [o.metrics.shared_prompt_tokens for o in alone] == [0] * 8
    # the prefixes written once, nested: the first 19 tokens (six prompts: the 20-token one keeps
    # its last), the next 31 (five), the next 39 (four: two equal 90-token prompts keep their
    # last); then each request's own rest
    fed_shared = sum(len(t) for step in log for t, _ in step)
    P = sum(len(p) for p in prompts)
    assert fed_alone - fed_shared == P - (19 + 31 + 39) - (5 + 4 + 30 + 8 + 1 + 1 + 1 + 19)
    # their decode steps read those segments, one object each for all the requests
    sysp = prompts[0][:50]
    decode = log[-1]
    assert len(decode) == 2 * len(prompts)
    for k, (start, end, readers) in enumerate(((0, 19, 6), (19, 50, 5), (50, 89, 4))):
        segs = [view[k] for _, view in decode if len(view) > k + 1 and view[k].tokens == (sysp + prompts[1][50:90])[start:end]]
        assert len(segs) == 2 * readers and len({id(s) for s in segs}) == 1 and segs[0].base == start
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0 and stats["pages_reserved"] == 0
    # seeded sampling: the same draws
    sampled = SP(temperature=1.0, max_tokens=12, seed=3, n=3, top_p=0.9)
    _assert_same(_run(llm, prompts, sampled, share=False), _run(llm, prompts, sampled, share=True))


@pytest.mark.parametrize("layout", ["combined", "contiguous"])
def test_hogwild_shares_with_the_same_outputs(llm, monkeypatch, layout):
    """Hogwild!'s workers read the prompt through live views of the root: a root reading a
    shared prefix is laid out from the prefix's start (ThreadTree.spawn / set_view put the
    root's lead segments first), so its outputs are those of each request alone; fewer
    tokens fed. (It wrote its own prompts.)"""
    from engine.protocols import Hogwild
    prompts = _prompts()
    sp = SP(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)
    log = _fed(llm, monkeypatch)

    def call(share):
        log.clear()
        out = _run_proto(llm, prompts, sp, share, Hogwild(workers=2, layout=layout, collab_prompt=None,
                                                          compact_after=4))
        return out, sum(len(t) for step in log for t, _ in step)
    (alone, fed_alone), (shared, fed_shared) = call(False), call(True)
    assert [o.metrics.shared_prompt_tokens for o in shared] == [50, 89, 0, 89, 89, 89, 19, 0]
    assert fed_alone - fed_shared == sum(len(p) for p in prompts) - (19 + 31 + 39) - (5 + 4 + 30 + 8 + 1 + 1 + 1 + 19)
    for a, b in zip(alone, shared):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.text, x.token_ids, x.events, x.answer) == (y.text, y.token_ids, y.events, y.answer)
        assert x.metrics == y.metrics and x.metrics["steps_committed"] >= 2
        for u, v in zip(x.workers, y.workers):
            assert (u["token_ids"], u["text"], u["steps"]) == (v["token_ids"], v["text"], v["steps"])
            assert all(abs(p - q) < 1e-4 for p, q in zip(u["logprobs"], v["logprobs"]))
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0 and stats["pages_reserved"] == 0


def test_a_protocol_that_does_not_say_it_shares_writes_its_own_prompts(llm, monkeypatch):
    """Protocol.shares_prompt_prefix False (a custom protocol's default): each request writes
    its whole prompt."""
    from engine.protocols import ParallelSampling

    class Own(ParallelSampling):
        shares_prompt_prefix = False
    prompts = _prompts()[:2]
    log = _fed(llm, monkeypatch)
    out = llm.generate(prompts, SP(temperature=0.0, max_tokens=4), protocol=Own())
    assert sum(len(t) for t, _ in log[0]) >= sum(len(p) for p in prompts)
    assert [o.metrics.shared_prompt_tokens for o in out] == [0, 0]
    assert llm.cache_stats()["pages_used"] == 0


def test_a_failure_while_writing_the_prefixes_gives_every_page_back(llm, monkeypatch):
    prompts = _prompts()
    want = _run(llm, prompts, SP(temperature=0.0, max_tokens=3, ignore_eos=True), share=False)
    run, calls = llm.runner.run, []

    def fail_first(batch):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return run(batch)
    monkeypatch.setattr(llm.runner, "run", fail_first)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, SP(temperature=0.0, max_tokens=3, ignore_eos=True))
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0 and stats["pages_reserved"] == 0
    monkeypatch.setattr(llm.runner, "run", run)
    _assert_same(want, llm.generate(prompts, SP(temperature=0.0, max_tokens=3, ignore_eos=True)))
    with pytest.raises(ZeroDivisionError):  # (a failure in the requests: the prefixes back too)
        llm.generate(prompts, SP(max_tokens=3), stream=lambda *a: 1 / 0)
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0 and stats["pages_reserved"] == 0


def test_requests_that_take_turns_share_and_a_cache_too_small_to_share(make_llm):
    """A cache where the requests run one or two at a time keeps the prefixes for all of
    them; one where the prefixes and a request would not fit together shares nothing."""
    prompts = [random_ids(60, VOCAB, seed=1) + random_ids(4, VOCAB, seed=k) for k in range(10, 15)]
    sp = SP(temperature=0.0, max_tokens=40, ignore_eos=True, n=2)
    def prefilled(m):
        log = []
        run = m.runner.run
        m.runner.run = lambda batch: (log.append(batch.num_tokens), run(batch))[1]
        try:
            outs = m.generate(prompts, sp)
        finally:
            del m.runner.run
        return outs, sum(log) - len(prompts) * 2 * 39  # (the tokens fed but the kids' sampled ones)
    small = make_llm(NAME, kv_cache_tokens=16 * 16)
    want = _run(small, prompts, sp, share=False)
    got, fed = prefilled(small)  # (a request: 4 + 2 x 3 pages, 1 + 2 x 3 with the 60-token prefix's 4 apart)
    _assert_same(want, got)
    assert fed == 60 + 5 * 4
    tiny = make_llm(NAME, kv_cache_tokens=16 * 10)  # (the prefix and a request: 11 pages; the cache 10)
    got, fed = prefilled(tiny)
    _assert_same(want, got)
    assert fed == 5 * 64
    for m in (small, tiny):
        assert m.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_prompt_families(llm, monkeypatch, seed):
    """Prompts made of a few random blocks (so that they share prefixes of many lengths,
    nested, some equal, some a prefix of another): the same tokens and log-probs as without
    sharing, each shared segment written once, each request's view its prompt in order."""
    import random
    rng = random.Random(seed)
    blocks = [random_ids(rng.choice([3, 9, 17, 24]), VOCAB, seed=100 * seed + b) for b in range(5)]
    prompts = [sum((blocks[rng.randrange(5)] for _ in range(rng.randint(1, 4))), [])
               + ([] if rng.random() < 0.3 else [rng.randrange(VOCAB)]) for _ in range(9)]
    sp = SP(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=0)
    want = _run(llm, prompts, sp, share=False)
    from engine.threads import ThreadTree
    roots, new_root = [], ThreadTree.new_root

    def record(tree, prompt_ids, prefix=()):
        roots.append((list(prompt_ids), [s for s, _ in prefix]))
        return new_root(tree, prompt_ids, prefix)
    monkeypatch.setattr(ThreadTree, "new_root", record)
    log = _fed(llm, monkeypatch)
    got = llm.generate(prompts, sp)
    _assert_same(want, got)
    owns = [id(view[-1]) for step in log for toks, view in step if len(toks) > 1]
    assert len(owns) == len(set(owns))  # (no segment written twice)
    assert sorted(p for p, _ in roots) == sorted(prompts)
    for prompt, prefix in roots:  # (each root reads its prompt's first tokens, in order, and writes the rest)
        head = sum((s.tokens for s in prefix), [])
        assert head == prompt[:len(head)] and len(head) < len(prompt)
        assert [s.base for s in prefix] == [sum(len(s.tokens) for s in prefix[:i]) for i in range(len(prefix))]
        assert all(len(s.tokens) >= 16 for s in prefix)
    assert any(prefix for _, prefix in roots)
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0


def test_admission_counts_only_the_tokens_past_the_shared_prefix(llm, monkeypatch):
    """A step admits requests while their prefill fits max_batched_tokens: a request whose
    prompt is mostly a shared prefix prefills only its rest, so all eight start together."""
    prompts = [random_ids(60, VOCAB, seed=1) + random_ids(4, VOCAB, seed=k) for k in range(10, 18)]
    monkeypatch.setattr(llm.scheduler, "max_batched_tokens", 100)
    log = _fed(llm, monkeypatch)
    outs = llm.generate(prompts, SP(temperature=0.0, max_tokens=3, ignore_eos=True))
    assert [len(t) for t, _ in log[0]] == [60] and [len(t) for t, _ in log[1]] == [4] * 8
    assert all(o.metrics.forward_steps == 3 for o in outs)
