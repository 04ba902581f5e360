"""Fork/join sessions against transformers.

* ``max`` trees: every generated token's logprob equals transformers run on the
  packed sequence (``engine.trie.pack``) with a 4D ancestor mask and position ids.
* ``sequential`` joins: equal to transformers continuing from a cache whose
  sibling keys were explicitly re-rotated to their sequential positions.
* ``reprefill`` joins: equal to transformers on the plain concatenated text.
* Forks and max/sequential joins write no K/V; closing frees every page.
"""
from __future__ import annotations

import gc
import inspect
import random
import weakref

import pytest
import torch

from conftest import hf_logprobs, random_ids
from engine import SamplingParams
from engine.attention.reference import rotate_by
from engine.cache import KVCache
from engine.threads import ThreadTree, effective_end
from engine.trie import pack

ATOL = 1e-4


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)


def grow(s, th, depth: int, max_depth: int, rng: random.Random, vocab: int, record: list):
    """Randomly fork ``th`` into 1..5 children, grow each, join them (max); returns the tip."""
    if depth >= max_depth or rng.random() < 0.25:
        return th
    k = rng.randint(1, 5)
    hdrs = [random_ids(rng.randint(1, 3), vocab, rng.randint(0, 10**6)) for _ in range(k)]
    kids = s.fork(th, hdrs)
    outs = s.generate(kids, greedy(rng.randint(1, 5)))
    record += list(zip(kids, outs))
    tips = [grow(s, kid, depth + 1, max_depth, rng, vocab, record) for kid in kids]
    c = s.join(tips, header=random_ids(rng.randint(1, 2), vocab, rng.randint(0, 10**6)))
    record.append((c, s.generate([c], greedy(rng.randint(1, 4)))[0]))
    return c


def packed_logprobs(hf, s) -> tuple[torch.Tensor, dict[int, int]]:
    ids, pos, mask = pack(s)
    m = torch.zeros(mask.shape, dtype=torch.float32).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        lp = hf(ids[None], position_ids=pos[None], attention_mask=m[None, None]).logits[0].log_softmax(-1)
    start, off = {}, 0
    for t in s.tree.threads:
        if t.tokens:
            start[t.id], off = off, off + len(t.tokens)
    return lp, start


def check_record(hf, s, record):
    lp, start = packed_logprobs(hf, s)
    n = 0
    for h, out in record:
        t = h._t
        # a generate call's tokens follow everything the thread held before it
        k0 = start[t.id] + _end_of(t, out) - len(out.token_ids)
        for i, tok in enumerate(out.token_ids):
            assert abs(lp[k0 + i - 1, tok].item() - out.logprobs[i][tok]) < ATOL, (t.id, i)
            n += 1
    return n


def _end_of(t, out) -> int:
    """Index just past ``out``'s tokens in ``t.tokens`` (later calls may have appended more)."""
    toks = t.tokens
    L = len(out.token_ids)
    for e in range(len(toks), L - 1, -1):
        if toks[e - L:e] == out.token_ids:
            return e
    raise AssertionError("generated tokens not found in the thread")


@pytest.mark.parametrize("name,page_size,max_depth,seed", [
    ("qwen3", 16, 1, 0), ("qwen3", 1, 2, 1), ("llama3_rope", 16, 3, 2), ("qwen2", 5, 2, 3),
])
def test_max_trees_match_packed_transformers(make_llm, hf_ref, name, page_size, max_depth, seed):
    llm = make_llm(name, page_size=page_size, attention_backend="torch")
    hf = hf_ref(name)
    rng = random.Random(seed)
    V = llm.config.vocab_size
    s = llm.session(random_ids(rng.randint(3, 20), V, seed))
    record = []
    (main,) = s.fork(s.root, [[]])
    record.append((main, s.generate([main], greedy(3))[0]))
    grow(s, main, 0, max_depth, rng, V, record)
    if len(record) == 1:  # make sure there is at least one fork
        grow(s, main, 0, 1, random.Random(seed + 100), V, record)
    assert check_record(hf, s, record) > 0
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_fork_and_join_write_no_kv(make_llm, backend):
    llm = make_llm("qwen3", attention_backend=backend)
    s = llm.session(random_ids(40, llm.config.vocab_size, 0))
    a, b = s.fork(s.root, [[5], [6, 7]])
    s.generate([a, b], greedy(20))
    used = llm.cache_stats()["pages_used"]
    held = s.pages_held()
    c = s.join([a, b], header=[9], positions="max")
    assert llm.cache_stats()["pages_used"] == used == held   # a join allocates nothing
    e, f = s.fork(c, [[1], [2]])
    assert llm.cache_stats()["pages_used"] == used           # nor does a fork
    s.generate([e, f], greedy(2))
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def _cache_name(hf) -> str:
    """The forward's K/V cache argument and output field: ``cache`` since transformers 5.2x
    (``past_key_values`` still works there but is deprecated, to be removed in 5.40)."""
    return "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"


def _hf_cache_for(hf, ids, positions):
    """transformers K/V (post-RoPE) of ``ids`` at ``positions``: list per layer of (k, v)."""
    with torch.no_grad():
        out = hf(torch.tensor([ids]), position_ids=torch.tensor([positions]), use_cache=True)
    cache = getattr(out, _cache_name(hf))
    return [(cache.layers[i].keys, cache.layers[i].values) for i in range(len(cache.layers))]


@pytest.mark.parametrize("name", ["qwen3", "llama"])
def test_sequential_join_matches_rerotated_keys(make_llm, hf_ref, name):
    """Siblings placed one after another by shifts == transformers over a cache in which the
    second sibling's keys are explicitly re-rotated to the sequential positions."""
    from transformers import DynamicCache
    llm = make_llm(name, page_size=4, attention_backend="torch")
    hf = hf_ref(name)
    V = llm.config.vocab_size
    prompt = random_ids(11, V, 1)
    s = llm.session(prompt)
    a, b = s.fork(s.root, [[3], [4, 5]])
    s.generate([a, b], greedy(6))
    c = s.join([a, b], header=[7, 8], positions="sequential")
    out = s.generate([c], greedy(5))[0]
    P, A, B = len(prompt), a.token_ids, b.token_ids
    # reference K/V: prompt+a causally; b computed at its home positions after the prompt only
    kv_a = _hf_cache_for(hf, prompt + A, list(range(P + len(A))))
    kv_b = _hf_cache_for(hf, prompt + B, list(range(P + len(B))))
    inv_freq = llm.model.inv_freq
    cache = DynamicCache()
    for li, ((ka, va), (kb, vb)) in enumerate(zip(kv_a, kv_b)):
        kb_own = kb[:, :, P:]  # [1, Hkv, len(B), D], rotated at P + i
        kb_seq = rotate_by(kb_own[0].transpose(0, 1), torch.full((len(B),), len(A)), inv_freq)
        kb_seq = kb_seq.transpose(0, 1)[None]  # now rotated at P + len(A) + i
        cache.update(torch.cat([ka, kb_seq], 2), torch.cat([va, vb[:, :, P:]], 2), li)
    cont = c.token_ids  # header + generated
    base = P + len(A) + len(B)
    with torch.no_grad():
        logits = hf(torch.tensor([cont]), position_ids=torch.arange(base, base + len(cont))[None],
                    **{_cache_name(hf): cache}).logits[0].log_softmax(-1)
    h = 2  # header length
    for i, tok in enumerate(out.token_ids):
        assert abs(logits[h - 1 + i, tok].item() - out.logprobs[i][tok]) < ATOL
    s.close()


def test_nested_sequential_joins_lay_every_thread_out_once(make_llm):
    """A sequential join of a sequential join and a sibling: its continuation starts after
    every token laid out before it (the prompt, p, x, y, their join, q), none overlapping."""
    llm = make_llm("qwen3", attention_backend="torch")
    s = llm.session(random_ids(8, llm.config.vocab_size, 1))
    p, q = s.fork(s.root, [[3], [4]])
    s.generate([p], greedy(2))
    s.generate([q], greedy(3))
    x, y = s.fork(p, [[5], [6]])
    s.generate([x, y], greedy(2))
    c = s.join([x, y], [7], positions="sequential")
    s.generate([c], greedy(2))
    assert c.position == 8 + sum(len(t.token_ids) for t in (p, x, y, c))
    d = s.join([c, q], [9], positions="sequential")
    assert d.position == 8 + sum(len(t.token_ids) for t in (p, x, y, c, q, d))
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def _shown_positions(h) -> list[int]:
    """The position at which each token of ``h``'s view is shown (its segments with their
    shifts), its own tokens included."""
    return [seg.base + sh + i for seg, sh in h._t.view for i in range(len(seg.tokens))]


def test_a_sequential_join_of_threads_forked_at_different_depths_lays_them_out_once(make_llm):
    """join([x, y, q], "sequential") with x, y children of p and p, q children of the root:
    p is shown once (its segment is in the view once), so y follows x and q follows y with
    no gap; the continuation follows q. (Each thread's shift added the length of its whole
    part after the fork, p included for y too: y and q sat len(p) positions late, the
    continuation too, in front of an empty run of positions. Found by differential fuzzing
    of session programs against a transformers-module reference.)"""
    llm = make_llm("qwen3", attention_backend="torch")
    V = llm.config.vocab_size
    s = llm.session(random_ids(5, V, 4))
    p, q = s.fork(s.root, [[3, 4], [5]])
    s.generate([p, q], greedy(2))
    x, y = s.fork(p, [[6], [7]])
    s.generate([x, y], greedy(3))
    c = s.join([x, y, q], [8], positions="sequential")
    shown = _shown_positions(c)
    assert sorted(shown) == list(range(len(shown))), shown  # every token once, no gap
    assert c.position == 5 + sum(len(t.token_ids) for t in (p, x, y, q, c))
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_reprefill_join_matches_plain_text(make_llm, hf_ref):
    llm = make_llm("qwen3", attention_backend="torch")
    hf = hf_ref("qwen3")
    V = llm.config.vocab_size
    prompt = random_ids(9, V, 2)
    s = llm.session(prompt)
    a, b, c = s.fork(s.root, [[3], [4], [5, 6]])
    s.generate([a, b, c], greedy(4))
    j = s.join([a, b, c], header=[8], positions="reprefill")
    out = s.generate([j], greedy(6))[0]
    text = prompt + a.token_ids + b.token_ids + c.token_ids + [8]
    ref = hf_logprobs(hf, text + out.token_ids)
    for i, tok in enumerate(out.token_ids):
        assert abs(ref[len(text) - 1 + i, tok].item() - out.logprobs[i][tok]) < ATOL
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_a_reprefill_join_prefills_its_text_after_the_common_context(make_llm, hf_ref):
    """join([x, m], "reprefill") with x a child of a, m the max join of a and b: their common
    context is the prompt and a; the joined text (x, then b and m) is prefilled after it,
    as the plain text prompt + a + x + b + m + header. (It started where the first thread
    part the joined threads do not share began, b's fork position, so it took a's positions
    again: two tokens at one position. Found by differential fuzzing of session programs.)"""
    llm = make_llm("qwen3", attention_backend="torch")
    hf = hf_ref("qwen3")
    V = llm.config.vocab_size
    prompt = random_ids(5, V, 5)
    s = llm.session(prompt)
    a, b = s.fork(s.root, [[3, 4], [5]])
    s.generate([a, b], greedy(2))
    m = s.join([a, b], [6], positions="max")
    (x,) = s.fork(a, [[7]])
    s.generate([x], greedy(2))
    r = s.join([x, m], [8], positions="reprefill")
    out = s.generate([r], greedy(4))[0]
    text = prompt + a.token_ids + x.token_ids + b.token_ids + m.token_ids + [8]
    assert r.token_ids == x.token_ids + b.token_ids + m.token_ids + [8] + out.token_ids
    ref = hf_logprobs(hf, text + out.token_ids)
    for i, tok in enumerate(out.token_ids):
        assert abs(ref[len(text) - 1 + i, tok].item() - out.logprobs[i][tok]) < ATOL, i
    assert r.position == len(text) + len(out.token_ids)
    s.close()
    # a common segment with no tokens adds no positions, wherever a view shows it: e (no header,
    # no tokens) is shown after b in j's view, and the text still follows the prompt
    s = llm.session(prompt)
    e, b = s.fork(s.root, [[], [5]])
    j = s.join([b, e], [6], positions="sequential")
    (x,) = s.fork(e, [[7]])
    r = s.join([j, x], [8], positions="reprefill")
    out = s.generate([r], greedy(3))[0]
    text = prompt + b.token_ids + j.token_ids + x.token_ids + [8]
    ref = hf_logprobs(hf, text + out.token_ids)
    for i, tok in enumerate(out.token_ids):
        assert abs(ref[len(text) - 1 + i, tok].item() - out.logprobs[i][tok]) < ATOL, i
    assert r.position == len(text) + len(out.token_ids)
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_session_errors_leave_it_usable(make_llm):
    llm = make_llm("qwen3", attention_backend="torch")
    s = llm.session([1, 2, 3])
    a, b = s.fork(s.root, [[4], [5]])
    with pytest.raises(ValueError, match="header"):
        s.join([a, b], header=[])
    with pytest.raises(ValueError, match="join scheme"):
        s.join([a, b], header=[1], positions="diagonal")
    with pytest.raises(ValueError, match="n=1"):
        s.generate([a], SamplingParams(n=2))
    other = llm.session([1])
    with pytest.raises(ValueError, match="not a thread of this session"):
        s.generate([other.root])
    other.close()
    outs = s.generate([a, b], greedy(3))
    assert [len(o.token_ids) for o in outs] == [3, 3]
    s.close()
    with pytest.raises(ValueError, match="closed"):
        s.fork(a, [[1]])
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_forked_and_joined_threads_take_no_more_tokens(make_llm, backend):
    """Children see their parent, and a join its threads, as they were: a token added to
    those afterwards would sit at the positions of the viewers' own tokens (a silently
    wrong context), so it is refused with one clear error and the session goes on."""
    llm = make_llm("qwen3", attention_backend=backend)
    V = llm.config.vocab_size
    prompt = random_ids(9, V, 3)

    def run(poke: bool):
        s = llm.session(prompt)
        a, b = s.fork(s.root, [[4], [5]])
        if poke:
            with pytest.raises(ValueError, match=r"thread 0 was forked: its children \[1, 2\]"):
                s.generate([s.root], greedy(2))
            with pytest.raises(ValueError, match="fork one more child"):
                s.inject(s.root, [7])
        ab = [o.token_ids for o in s.generate([a, b], greedy(4))]
        c = s.join([a, b], header=[6])
        if poke:
            with pytest.raises(ValueError, match=f"thread {a.id} was joined into thread {c.id}"):
                s.generate([c, a], greedy(2))
            with pytest.raises(ValueError, match=f"continue from thread {c.id}"):
                s.inject(b, [7])
        out = s.generate([c], greedy(4))[0]
        (d,) = s.fork(s.root, [[8]])  # the parent's text goes on in one more child
        more = s.generate([d], greedy(2))[0]
        s.close()
        return ab, out.token_ids, out.logprobs, more.token_ids

    assert run(True) == run(False)  # the refused calls changed nothing
    assert llm.cache_stats()["pages_used"] == 0
    # a live view (spawn) reads its threads as they grow: those may still take tokens
    s = llm.session(prompt)
    w = s.spawn([s.root], header=[4])
    s.inject(s.root, [5, 6])
    assert len(s.generate([w], greedy(2))[0].token_ids) == 2
    # ... and a fork or join would keep a copy of its shifts that the growth outruns
    with pytest.raises(ValueError, match=f"thread {w.id} reads a live view.*cannot keep"):
        s.fork(w, [[4]])
    with pytest.raises(ValueError, match="live view"):
        s.join([w], header=[4])
    assert len(s.generate([w], greedy(1))[0].token_ids) == 1
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_session_tokens_past_the_context_are_refused(make_llm):
    """Headers, injections and join continuations that would sit past the model's context
    (max_position_embeddings) are refused before anything changes; the session goes on."""
    llm = make_llm("qwen3", attention_backend="cpu")
    M = llm.config.max_position_embeddings
    V = llm.config.vocab_size
    s = llm.session(random_ids(M - 4, V, 1))
    with pytest.raises(ValueError, match=rf"Injecting 5 tokens into thread 0 would reach position {M + 1}, past "
                                         rf"the model's context of {M} tokens"):
        s.inject(s.root, [1] * 5)
    with pytest.raises(ValueError, match=f"header of 5 tokens after thread 0 would reach position {M + 1}"):
        s.fork(s.root, [[1], [2] * 5])  # (the first child is not created either)
    with pytest.raises(ValueError, match="spawned thread's header"):
        s.spawn([s.root], header=[3] * 5)
    assert s.root.children == [] and len(s.tree.threads) == 1
    (a,) = s.fork(s.root, [[1, 2]])
    assert not llm.core.at_context_end(a._t)
    out = s.generate([a], greedy(8))[0]
    assert out.finish_reason == "length" and a.position == M  # stops at the context's end
    # (EngineCore.at_context_end of a thread without a live view, as Hogwild asks it of its
    # threads: its own end, not only a live view's, counts)
    assert llm.core.at_context_end(a._t)
    # a header that ends exactly at the context: nothing more is sampled (it used to take one
    # token past the context per call)
    (b,) = s.fork(s.root, [[1] * 4])
    for _ in range(2):
        out = s.generate([b], greedy(3))[0]
        assert out.token_ids == [] and out.finish_reason == "length" and b.position == M
    s.close()
    s = llm.session(random_ids(8, V, 2))
    half = (M - 8) // 2 + 1
    a, b = s.fork(s.root, [[1] * half, [2] * half])
    with pytest.raises(ValueError, match="sequential join's continuation"):
        s.join([a, b], header=[3], positions="sequential")
    c = s.join([a, b], header=[3], positions="max")  # (the refused join changed nothing)
    assert len(s.generate([c], greedy(2))[0].token_ids) == 2
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_session_verbs_refuse_what_they_cannot_do(make_llm):
    """join() of a thread twice, or with a thread that already sees it; a header that can
    never fit the cache; arguments of the wrong type: one ValueError each, nothing changed."""
    llm = make_llm("qwen3", attention_backend="cpu", kv_cache_tokens=256, page_size=4)
    V = llm.config.vocab_size
    s = llm.session(random_ids(6, V, seed=1))
    a, b = s.fork(s.root, [[1], [2]])
    s.generate([a, b], greedy(2))
    with pytest.raises(ValueError, match="names a thread twice"):
        s.join([a, a], header=[3])
    with pytest.raises(ValueError, match="which sees it already"):
        s.join([s.root, a], header=[3])
    with pytest.raises(ValueError, match="would need 65 pages of the KV cache, which has 64"):
        s.fork(a, [[1], [4] * 257])
    assert a.children == []
    for call in (lambda: s.fork(a, [5, 6]), lambda: s.join(a, header=[3]), lambda: s.generate(a, greedy(1))):
        with pytest.raises(ValueError):
            call()
    for headers in (None, ([h] for h in (5, 6)), {(5,): 1}):  # (not a list or tuple of headers)
        with pytest.raises(ValueError, match="fork\\(\\) takes a list of headers"):
            s.fork(a, headers)
    with pytest.raises(ValueError, match=rf"injected text \[{V}\] must be a string or token ids in \[0, {V}\)"):
        s.inject(b, [V])
    with pytest.raises(ValueError, match="twice"):
        s.generate([a, a], greedy(1))
    c = s.join([a, b], header=[3])
    with pytest.raises(ValueError, match="already joined"):
        s.join([a, c], header=[3])
    assert len(s.generate([c], greedy(2))[0].token_ids) == 2
    pack(s)  # (forks and max joins: a single-sequence view)
    e, f = s.fork(c, [[5], [6]])
    s.generate([e, f], greedy(1))
    s.join([e, f], header=[4], positions="sequential")
    with pytest.raises(ValueError, match="sequential"):
        pack(s)  # (f shifted past e: no single-sequence view)
    s.close()
    with pytest.raises(ValueError, match="The 300-token prompt would need 75 pages of the KV cache, which has 64"):
        llm.session(random_ids(300, V, seed=2))
    assert llm.cache_stats()["pages_used"] == 0


def test_a_header_of_exactly_the_whole_cache_is_taken(make_llm):
    """Only a header that needs more pages than the whole cache is refused: one of exactly its
    pages is taken (it can be written once nothing else holds pages)."""
    llm = make_llm("qwen3", attention_backend="cpu", kv_cache_tokens=256, page_size=4)
    with llm.session(random_ids(6, llm.config.vocab_size, seed=1)) as s:
        (a,) = s.fork(s.root, [[4] * 256])
        assert len(a.token_ids) == 256
        with pytest.raises(ValueError, match="would need 65 pages of the KV cache, which has 64"):
            s.fork(s.root, [[4] * 257])
    assert llm.cache_stats()["pages_used"] == 0


def test_pack_of_a_deep_chain_and_a_wide_join(make_llm):
    """pack() builds each thread's rows from its view's column ranges at once (a slice
    assignment per range took 17 s on a 1,500-deep chain): a 300-deep chain of one-token
    forks sees every ancestor (a lower triangle), a join of 40 of its siblings' children
    sees each of their tokens and not a sibling's own, and the rows of a thread stay
    causal among themselves."""
    llm = make_llm("qwen3", attention_backend="cpu", kv_cache_tokens=8192)
    with llm.session([1, 2, 3]) as s:
        t = s.root
        for i in range(300):
            t, = s.fork(t, [[5 + i % 50]])
        ids, pos, mask = pack(s)
        N = len(ids)
        assert N == 303 and torch.equal(mask, torch.tril(torch.ones(N, N, dtype=torch.bool)))
        assert pos.tolist() == list(range(N))
        kids = s.fork(s.root, [[7, 8 + i % 40] for i in range(40)])
        j = s.join(kids, header=[9, 10])
        ids, pos, mask = pack(s)
        assert len(ids) == N + 80 + 2
        head = mask[-2:]  # the join's two header rows: the prompt, every child's two tokens, causal
        want = torch.zeros(2, len(ids), dtype=torch.bool)
        want[:, :3] = want[:, N:N + 80] = True
        want[1, -2:] = want[0, -2] = True
        assert torch.equal(head, want)
        kid_rows = mask[N:N + 80]  # a child: the prompt and its own two tokens, causally
        assert int(kid_rows.sum()) == 40 * (2 * 3 + 3) and not kid_rows[:, 3:N].any()
        assert j is not None


def test_pack_refuses_a_live_thread_only_once_it_has_tokens(make_llm):
    """A live thread (spawn) has no packed view, and pack() refuses it once it has tokens; one
    spawned without a header that has sampled nothing yet holds no token: the tree packs as
    without it."""
    llm = make_llm("qwen3", attention_backend="cpu")
    with llm.session([1, 2, 3]) as s:
        a, b = s.fork(s.root, [[4], [5, 6]])
        want = [x.tolist() for x in pack(s)]
        w = s.spawn([s.root])  # (no header: it reads the root alone, and has no tokens yet)
        assert [x.tolist() for x in pack(s)] == want
        s.generate([w], greedy(1))
        with pytest.raises(ValueError, match="live view"):
            pack(s)


def test_a_join_is_a_child_of_its_threads_parent_only_when_they_share_it(make_llm):
    """A join of one fork's children is that parent's child; a join of threads of different
    parents has no parent, and is no one's child (it was made the first thread's parent's)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    with llm.session([1, 2, 3]) as s:
        a, b = s.fork(s.root, [[4], [5]])
        (c,) = s.fork(a, [[6]])
        j = s.join([c, b], header=[7])
        assert j.parent is None and a.children == [c] and s.root.children == [a, b]
        d, e = s.fork(s.root, [[8], [9]])
        k = s.join([d, e], header=[10])
        assert k.parent is s.root and s.root.children == [a, b, d, e, k]


def test_fork_of_a_child_with_no_tokens(make_llm):
    """A fork child with an empty header, forked again with an empty header: the grandchild
    sees the prompt alone and samples from its logits, as a direct child does (it found no
    logits one level up and failed, taking every thread of that generate call with it)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    V = llm.config.vocab_size
    s = llm.session(random_ids(9, V, seed=4))
    (a,) = s.fork(s.root, [[]])
    (b,) = s.fork(a, [[]])
    (c,) = s.fork(s.root, [[]])
    got_b, got_c = s.generate([b, c], greedy(5))
    assert got_b.token_ids == got_c.token_ids and len(got_b.token_ids) == 5
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_an_empty_header_child_of_a_child_with_tokens_samples_after_them(make_llm):
    """A fork child with an empty header samples from its nearest ancestor that has tokens:
    its parent's, after the parent's own tokens, not the prompt's."""
    llm = make_llm("qwen3", attention_backend="cpu")
    V = llm.config.vocab_size
    prompt = random_ids(9, V, seed=6)
    want = llm.generate([prompt], greedy(6))[0].outputs[0].token_ids
    s = llm.session(prompt)
    (a,) = s.fork(s.root, [[]])
    assert s.generate([a], greedy(3))[0].token_ids == want[:3]
    (b,) = s.fork(a, [[]])
    assert s.generate([b], greedy(3))[0].token_ids == want[3:]
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_a_pending_header_that_does_not_fit_now_blocks_only_its_thread(make_llm):
    """generate() writes the pending tokens of the threads it samples and of what they read,
    not every pending token of the session: a thread whose header cannot fit the cache now
    (other threads hold it) fails only when it is itself generated."""
    llm = make_llm("qwen3", attention_backend="cpu", kv_cache_tokens=256, page_size=4)
    V = llm.config.vocab_size
    s = llm.session(random_ids(100, V, seed=1))  # 25 pages
    (a,) = s.fork(s.root, [[1]])
    (big,) = s.fork(s.root, [[2] * 160])  # 40 pages: never with the prompt's 25 held too
    want = s.generate([a], greedy(6))[0].token_ids
    with pytest.raises(Exception, match="KV cache is full"):
        s.generate([big], greedy(1))
    s.close()
    s = llm.session(random_ids(100, V, seed=1))
    (a,) = s.fork(s.root, [[1]])
    assert s.generate([a], greedy(6))[0].token_ids == want
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_a_dropped_session_frees_its_pages_at_once(make_llm):
    """No reference cycle between a session and its handles: dropping the session frees
    its pages at once, not when the cycle collector runs (until then generate() was
    refused: 'open sessions hold the pages'); its handles still read their tokens, and
    the verbs' checks refuse them with a clear error. Its close lets go of the engine's
    lock: another Python thread's call runs."""
    import threading
    llm = make_llm("qwen3")
    was = gc.isenabled()
    gc.disable()  # (the cycle collector must not be what frees it)
    try:
        s = llm.session("hello world " * 5)
        a, b = s.fork(s.root, ["A", "B"])
        s.generate([a, b], greedy(3))
        text, ids = a.text, a.token_ids
        assert llm.cache_stats()["pages_used"] > 0
        del s
        assert llm._lock._owner is None  # (its close took the lock and let it go)
        other = threading.Thread(target=llm.cache_stats, daemon=True)
        other.start()
        other.join(60)
        assert not other.is_alive(), "another thread's call waited for the lock the dropped session took"
        assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
        assert a.text == text and a.token_ids == ids and a.position > 0
        with pytest.raises(ValueError, match="session was dropped"):
            a.parent
        s2 = llm.session("hi")
        with pytest.raises(ValueError, match="session was dropped"):
            s2.fork(a, ["x"])
        import copy
        import pickle
        assert copy.deepcopy(s2.root) is s2.root and copy.copy(s2.root) is s2.root  # (no phantom threads)
        with pytest.raises(TypeError, match="cannot be pickled"):
            pickle.dumps(s2.root)
        s2.close()
    finally:
        if was:
            gc.enable()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_many_random_sessions_free_every_page(make_llm, backend):
    llm = make_llm("qwen3", page_size=3, attention_backend=backend)
    V = llm.config.vocab_size
    rng = random.Random(7)
    for it in range(6):
        s = llm.session(random_ids(rng.randint(1, 30), V, it))
        (m,) = s.fork(s.root, [[]])
        s.generate([m], greedy(2))
        grow(s, m, 0, 2, rng, V, [])
        assert s.pages_held() == llm.cache_stats()["pages_used"] > 0
        if it % 2:
            s.close()
        else:
            del s, m  # a dropped session gives its pages back too
            gc.collect()
        assert llm.cache_stats()["pages_used"] == 0
        assert llm.cache_stats()["segments"] == 0


def test_threads_that_stop_at_different_steps_keep_one_logits_row_each(make_llm):
    """A thread keeps its last logits for later (a child with no header samples from them).
    Kept as a view of its step's logits, each thread that stopped at another step pinned a
    whole [rows, vocab] batch (64 session threads: 1 GB for 32 MB of rows); then each held a
    copy of its row, though its last sampled token is pending, so that those logits are not
    after it (a child is sampled after the parent is fed): a session of many finished threads
    held a dead [vocab] row each, beyond the KV cache's budget. Now none is held; a child with
    no header samples after its parent's every token."""
    llm = make_llm("qwen3")
    eos, K = llm.eos_ids[0], 12
    with llm.session(random_ids(llm.config.vocab_size, 9, seed=1)) as s:
        kids = s.fork(s.root, [[]] * K)
        order = {k._t.id: i for i, k in enumerate(kids)}
        steps = [0]

        def src(threads):  # kid i stops on EOS at step i + 1
            steps[0] += 1
            return [eos if order[t.id] < steps[0] else 5 for t in threads]
        llm.core.token_source = src
        try:
            outs = s.generate(kids, SamplingParams(max_tokens=K + 2))
        finally:
            llm.core.token_source = None
        assert [len(o.token_ids) for o in outs] == list(range(1, K + 1))
        # (each kid's last token, its EOS, is pending: kid 0 sampled from the prompt's logits)
        assert all(k._t.pending == [eos] for k in kids)
        held = [k._t.id for k in kids if k._t.last_logits is not None]
        assert held == []
        last = kids[-1]
        child, = s.fork(last, [[]])
        tok = s.generate([child], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[0].token_ids
        ids = s.root.token_ids + last.token_ids
        assert tok == [int(llm.score(ids)[0][-1].argmax())]
        del last, child
    # and nothing of the call's last step stays referenced by the engine once it returns
    assert llm.core._row_views == []
    ref = weakref.ref(kids[0]._t)
    del s, kids
    gc.collect()
    assert ref() is None


def test_a_sampled_threads_logits_are_its_steps_row_by_index_until_settled(make_llm, monkeypatch):
    """A thread that sampled in a step keeps that step's logits and its row index, not a view
    of its row (one view a thread and step cost ~1-2 us: most threads are fed again the next
    step and never read it); core.logits_of reads the row. settle() then leaves a thread fed
    again as it is, and gives one that is not its own copy of the row (None when its sampled
    token is pending); the sampler's rows of threads not in the step are those rows."""
    from engine.core import EngineCore, logits_of
    llm = make_llm("qwen3")
    core, seen = llm.core, []
    settle = core.settle

    def check_then_settle(fed=None):  # (the last step's samplers, as the step left them)
        for t, logits in core._row_views:
            assert t.last_logits is logits and logits.dim() == 2 and t.logits_row is not None
            assert torch.equal(logits_of(t), logits[t.logits_row])
            seen.append(t.id)
        return settle(fed)
    monkeypatch.setattr(core, "settle", check_then_settle)
    with llm.session(random_ids(8, llm.config.vocab_size, 3)) as s:
        a, b, c = s.fork(s.root, [[], [], []])
        s.generate([a, b, c], SamplingParams(temperature=0.7, seed=1, max_tokens=3, ignore_eos=True))
        assert sorted(set(seen)) == sorted(k._t.id for k in (a, b, c))
        ts = [k._t for k in (a, b, c)]
        assert all(t.last_logits is None and t.logits_row is None for t in ts)  # (their tokens pending)
    # settle on its own: a thread fed again keeps the step's row; one not fed gets its copy
    batch = torch.randn(3, 7)
    with llm.session(random_ids(8, llm.config.vocab_size, 3)) as s:
        ts = [k._t for k in s.fork(s.root, [[], [], []])]
        for i, t in enumerate(ts):
            t.last_logits, t.logits_row, t.pending = batch, i, []
        ts[2].pending = [5]
        core._row_views = [(t, batch) for t in ts]
        settle(fed={id(ts[0])})
        assert ts[0].last_logits is batch and ts[0].logits_row == 0
        assert torch.equal(ts[1].last_logits, batch[1]) and ts[1].logits_row is None
        assert ts[1].last_logits.untyped_storage().data_ptr() != batch.untyped_storage().data_ptr()
        assert ts[2].last_logits is None and ts[2].logits_row is None
        # the sampler's table: a row of this step's logits, one held by index, one held as a copy
        step, root = torch.randn(2, 7), s.root._t
        root.last_logits, root.logits_row = step, 1  # (as the step leaves a thread it fed, that samples)
        table = EngineCore._logits_rows([ts[0], ts[1], root], step, {id(root): 1})
        assert torch.equal(table, torch.stack([batch[0], batch[1], step[1]]))
        for t in ts + [root]:
            t.pending, t.last_logits, t.logits_row = [], None, None
    # a protocol that accepts another token than the one drawn: its log-prob from the step's row
    from engine.protocols.sampling import _SamplingRun
    on_token = _SamplingRun.on_token
    monkeypatch.setattr(_SamplingRun, "on_token", lambda self, t, tok: on_token(self, t, 7))
    prompts = [random_ids(8, llm.config.vocab_size, 4), random_ids(5, llm.config.vocab_size, 5)]
    for prompt, r in zip(prompts, llm.generate(prompts, SamplingParams(max_tokens=1, logprobs=1))):
        (o,) = r.outputs
        want = torch.log_softmax(llm.score(prompt)[0][-1].float(), -1)[7].item()
        assert o.token_ids == [7] and abs(o.logprobs[0][7].logprob - want) < 1e-4, (o.logprobs, want)


def test_feed_and_pages_held_match_their_plain_definitions(make_llm, monkeypatch):
    """Session._feed (the threads a step writes: the samplers and what their views read,
    transitively) and ThreadTree.pages_held (the pages of the open threads' views) avoid
    scanning every thread and view each step (a 200-round fork / join session spent 22-29 ms
    a step in _feed); on random sessions of forks, joins of every kind, live views and
    injections they equal the plain definitions at every step."""
    from engine.session import Session
    from engine.threads import ThreadTree

    def plain_feed(self, active):
        owner = {t.seg.id: t for t in self.tree.threads if not t.closed}
        need, stack = {}, list(active)
        while stack:
            t = stack.pop()
            if t.id not in need:
                need[t.id] = t
                stack += [owner[s.id] for s, _ in t.view[:-1] if s.id in owner]
        return [t for t in self.tree.threads if t.id in need and t.pending and not t.closed]
    checked = {"feed": 0, "pages": 0}
    fast_feed, fast_pages = Session._feed, ThreadTree.pages_held

    def feed(self, active):
        got = fast_feed(self, active)
        assert [t.id for t in got] == [t.id for t in plain_feed(self, active)]
        checked["feed"] += 1
        return got

    def pages_held(self):
        got = fast_pages(self)
        assert got == sum(len(s.pages) for s in {s.id: s for t in self.threads if not t.closed
                                                  for s, _ in t.view}.values())
        assert list(self.open.values()) == [t for t in self.threads if not t.closed]
        checked["pages"] += 1
        return got
    monkeypatch.setattr(Session, "_feed", feed)
    monkeypatch.setattr(ThreadTree, "pages_held", pages_held)
    llm = make_llm("qwen3", attention_backend="cpu", page_size=4)
    V = llm.config.vocab_size
    for seed in range(6):
        rng = random.Random(seed)
        s = llm.session(random_ids(rng.randint(3, 9), V, seed=seed))
        tips, live = [s.root], []
        for _ in range(14):
            op = rng.random()
            if op < 0.3:
                kids = s.fork(rng.choice(tips), [[rng.randrange(V)] for _ in range(rng.randint(1, 3))])
                tips = [t for t in tips if t.children == []] + kids
            elif op < 0.5 and len(tips) >= 2:
                a, b = rng.sample(tips, 2)
                try:
                    c = s.join([a, b], header=[rng.randrange(V)],
                               positions=rng.choice(["max", "sequential", "reprefill"]))
                    tips = [t for t in tips if t not in (a, b)] + [c]
                except ValueError:  # (one sees the other)
                    pass
            elif op < 0.65:
                live.append(s.spawn(rng.sample(tips, min(2, len(tips))), header=[rng.randrange(V)]))
            elif op < 0.75 and live:
                w = rng.choice(live)
                others = tips + [u for u in live if u is not w]
                s.set_view(w, rng.sample(others, min(2, len(others))))
            elif op < 0.85:
                s.inject(rng.choice(tips), [rng.randrange(V)])
            go = rng.sample(tips + live, min(len(tips + live), rng.randint(1, 3)))
            s.generate(go, SamplingParams(temperature=0, max_tokens=rng.randint(1, 3), ignore_eos=True))
            s.pages_held()
        s.close()
    assert checked["feed"] > 100 and checked["pages"] > 50, checked
    assert llm.cache_stats()["pages_used"] == 0



def test_a_step_looks_only_at_the_threads_its_samplers_read(make_llm):
    """A long-lived session that forks a child per request (each child left with its last
    sampled token pending, as every thread is after generate) must not look at those children
    at every later step: Session._feed went over every open thread of the session, so each
    step took longer with each child made (3,400 children: 4.4 ms of Python a step for
    0.3 ms of model). Here the finished children's pending lists count every look."""
    llm = make_llm("qwen3")
    s = llm.session("a shared system prompt")
    looked = []

    class Watched(list):
        def __bool__(self):
            looked.append(1)
            return len(self) > 0

    done = []
    for _ in range(20):
        k, = s.fork(s.root, [""])
        s.generate([k], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        done.append(k)
    for k in done:
        assert len(k._t.pending) == 1  # (its last token: written only when a step reads it)
        k._t.pending = Watched(k._t.pending)
    k, = s.fork(s.root, [" next"])
    out = s.generate([k], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    assert looked == []
    assert all(len(d._t.pending) == 1 for d in done)  # (not written: nothing read them)
    s.close()
    assert llm.cache_stats()["pages_used"] == 0

def test_handles_read_from_another_python_thread_during_a_fork(make_llm, monkeypatch):
    """A handle's ``children`` / ``parent`` (read without the engine's lock, e.g. by a server
    thread showing a session's tree) may make a thread's handle while fork() is making its
    own for the same thread: both must get the one handle the session knows. The second
    handle used to replace the first, which every verb then refused ('is not a thread of
    this session'). The interleaving is forced here: while fork() builds the handle of its
    first child, another Python thread reads the root's children."""
    import threading
    import engine.session as session_mod
    llm = make_llm("qwen3")
    s = llm.session("hello world")
    seen, init = [], session_mod.ThreadHandle.__init__

    def racing_init(self, session, thread):
        init(self, session, thread)
        if not seen:  # (once: the reader's own handles are built by this too)
            seen.append(None)
            reader = threading.Thread(target=lambda: seen.extend(s.root.children))
            reader.start()
            reader.join()

    monkeypatch.setattr(session_mod.ThreadHandle, "__init__", racing_init)
    a, b = s.fork(s.root, ["A", "B"])
    monkeypatch.undo()
    read = seen[1:]
    assert [h.id for h in read] == [a.id, b.id]
    assert read[0] is a and read[1] is b, "fork() and the reader got different handles for one thread"
    assert s.root.children == [a, b]
    s.inject(a, "x")  # (the verbs take them)
    s.generate([read[0], b], greedy(2))
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_session_generate_bounds_its_total_tokens(make_llm):
    """SamplingParams(max_total_tokens=...) bounds the tokens a session's generate samples over
    all its threads, as a protocol's: the first threads take what is left, the others end
    ("length") there (it was ignored: 10 + 10 tokens for max_total_tokens=5)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    with llm.session(random_ids(9, llm.config.vocab_size, seed=4)) as s:
        a, b, c = s.fork(s.root, [[], [5], [6]])
        outs = s.generate([a, b, c], SamplingParams(max_tokens=10, max_total_tokens=7, ignore_eos=True, seed=0))
        assert [len(o.token_ids) for o in outs] == [3, 2, 2] and {o.finish_reason for o in outs} == {"length"}
        assert [len(o.token_ids) for o in s.generate([a], greedy(4))] == [4]  # (not the next call's bound)
    assert llm.cache_stats()["pages_used"] == 0


def test_a_fork_with_no_headers_is_refused(make_llm):
    """fork(parent, []) would make no children: it is refused with one clear error, and
    nothing changes (the parent has no children and may still grow)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    s = llm.session(random_ids(5, llm.config.vocab_size, 1))
    with pytest.raises(ValueError, match="fork\\(\\) needs at least one child header"):
        s.fork(s.root, [])
    assert s.root.children == [] and len(s.tree.threads) == 1
    s.inject(s.root, [3])  # (not forked: it may still grow)
    s.close()


def test_a_fork_given_one_string_is_refused(make_llm):
    """fork() takes a list of headers, one per child: a single string is refused (iterated,
    it forked one child per character), and nothing changes."""
    llm = make_llm("qwen3", attention_backend="cpu")
    s = llm.session(random_ids(5, llm.config.vocab_size, 1))
    with pytest.raises(ValueError, match=r"fork\(\) takes a list of headers, one per child"):
        s.fork(s.root, "ab")
    assert s.root.children == [] and len(s.tree.threads) == 1
    s.close()


def test_a_session_generate_takes_one_forward_pass_a_step(make_llm):
    """generate() advances its threads together: one batched forward pass per step, counted
    in Session.forward_steps (threads of different lengths included)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    s = llm.session(random_ids(5, llm.config.vocab_size, 1))
    a, b = s.fork(s.root, [[1], [2, 3, 4]])
    assert s.forward_steps == 0
    s.generate([a, b], greedy(3))
    assert s.forward_steps == 3
    s.generate([a], greedy(2))
    assert s.forward_steps == 5
    s.close()


def test_a_closed_session_says_so(make_llm):
    """After close() every verb, and pack(), names the session as closed (not one of its
    threads), and close() may be called again."""
    llm = make_llm("qwen3", attention_backend="cpu")
    s = llm.session(random_ids(5, llm.config.vocab_size, 1))
    (a,) = s.fork(s.root, [[1]])
    s.close()
    for call in (lambda: s.fork(a, [[1]]), lambda: s.inject(a, [1]), lambda: s.generate([a], greedy(1)),
                 lambda: s.spawn([s.root], header=[2]), lambda: s.join([a], header=[2]),
                 lambda: s.set_view(a, [s.root])):
        with pytest.raises(ValueError, match="This session is closed"):
            call()
    with pytest.raises(ValueError, match=r"pack\(\) needs an open session .*this session is closed"):
        pack(s)
    s.close()
    assert s.pages_held() == 0 and llm.cache_stats()["pages_used"] == 0


def _tree(**kw) -> ThreadTree:
    # Tree verbs take no pages (a step does), so a one-page cache builds any tree.
    return ThreadTree(KVCache(1, 1, 1, 1, 2, torch.float32, "cpu"), **kw)


def test_tree_verbs_keep_header_lengths_path_tokens_and_events():
    """What protocols read off the tree: header_len (injected, not sampled: a reprefill
    continuation's whole re-read text), path_tokens (a fork child's and a continuation's
    sampled path so far) and the fork / join events."""
    tree = _tree()
    root = tree.new_root([1, 2, 3])
    tree.inject(root, [4])
    assert (root.header_len, root.path_tokens) == (3, 0)
    root.path_tokens = 5
    a, b = tree.fork(root, [[7], [8, 9]])
    assert (a.header_len, b.header_len, a.path_tokens, b.path_tokens) == (1, 2, 5, 5)
    assert root.events == [{"event": "fork", "children": [a.id, b.id]}]
    b.path_tokens = 9
    c = tree.join([b, a], [10, 11])
    assert (c.header_len, c.path_tokens) == (2, 9)
    assert a.events == b.events == [{"event": "join", "into": c.id, "positions": "max"}]
    d, e = tree.fork(c, [[12], [13, 14]])
    r = tree.join([d, e], [15], positions="reprefill")
    assert r.tokens == [12, 13, 14, 15] and r.header_len == 4 and r.path_tokens == 9


def test_tree_verbs_refuse_a_discarded_thread():
    """Protocols discard threads (a session closes them all at once): a discarded thread lets
    go of its logits (a view of its step's), and no verb takes it."""
    tree = _tree()
    root = tree.new_root([1, 2])
    a, b = tree.fork(root, [[3], [4]])
    a.last_logits, a.logits_row = torch.zeros(2, 8), 1  # (a step's logits: its row 1)
    tree.discard(a)
    assert a.last_logits is None and a.logits_row is None
    for call in (lambda: tree.join([b, a], [5]), lambda: tree.fork(a, [[5]]), lambda: tree.inject(a, [5]),
                 lambda: tree.spawn([root, a], [5]), lambda: tree.set_view(a, [root]),
                 lambda: tree.check_growable(a)):
        with pytest.raises(ValueError, match=f"thread {a.id} is closed"):
            call()
    assert [t.id for t in tree.threads] == [root.id, a.id, b.id] and b.joined_into is None


def test_a_reprefill_join_starts_after_a_shifted_common_context():
    """The common context's end counts its segments at their shifted positions (here a
    sequential join's second thread, placed after the first)."""
    tree = _tree()
    root = tree.new_root([1, 2])
    a, b = tree.fork(root, [[3, 4, 5], [6, 7]])
    c = tree.join([a, b], [], positions="sequential")  # (no header: b's shifted end is the context's)
    assert c.view[2] == (b.seg, 3) and c.seg.base == 7
    d, e = tree.fork(c, [[8], [9]])
    assert tree.join([d, e], [10], positions="reprefill").seg.base == 7


def test_tree_growth_checks_count_the_whole_segment():
    """inject() refuses a segment that would outgrow the whole cache (its tokens so far
    included), and check_growable() a forked thread."""
    tree = ThreadTree(KVCache(1, 2, 2, 1, 2, torch.float32, "cpu"), max_positions=100)
    root = tree.new_root([1, 2, 3])
    tree.inject(root, [4])  # (4 tokens: the cache's 2 pages)
    with pytest.raises(ValueError, match="Injecting 1 tokens into thread 0 would need 3 pages"):
        tree.inject(root, [5])
    tree.check_growable(root)
    tree.fork(root, [[5]])
    with pytest.raises(ValueError, match="thread 0 was forked"):
        tree.check_growable(root)


def test_a_live_thread_with_an_empty_view_is_laid_out_from_zero():
    """A live view lays its threads out from the first one's base, then the thread's own
    tokens: with no thread in view, its next token's position is its own length."""
    tree = _tree()
    root = tree.new_root([1, 2, 3])
    th = tree.spawn([root], [4, 5])
    assert effective_end(th) == 5
    tree.set_view(th, [])
    assert effective_end(th) == 2 and th.view == ((th.seg, 0),)


def test_drop_view_lets_a_finished_written_thread_read_only_itself():
    """(Hogwild! history steps) drop_view() takes only a finished thread with nothing left to
    write; its view becomes its own segment, no longer live, and the segments it read are let go."""
    tree = _tree()
    root = tree.new_root([1, 2])
    th = tree.spawn([root], [3])
    refs = root.seg.refs
    for finished, pending in ((None, []), ("step", [3]), (None, [3])):
        th.finish_reason, th.pending = finished, pending
        with pytest.raises(ValueError, match=f"thread {th.id} may still need its view"):
            tree.drop_view(th)
    th.finish_reason, th.pending = "step", []
    tree.drop_view(th)
    assert th.view == ((th.seg, 0),) and th.live is None and effective_end(th) == th.end == 3
    assert root.seg.refs == refs - 1


def test_a_join_that_fails_queueing_its_header_changes_nothing(monkeypatch):
    """A continuation made but not handed back (here a MemoryError queueing its header) is
    taken back: its place in the tree, its references and its id."""
    tree = _tree()
    root = tree.new_root([1, 2])
    a, b = tree.fork(root, [[3], [4]])
    refs = [s.refs for s in (root.seg, a.seg, b.seg)]

    def fail(th, tokens, header=False):
        raise MemoryError
    monkeypatch.setattr(tree, "inject", fail)
    with pytest.raises(MemoryError):
        tree.join([a, b], [5])
    monkeypatch.undo()
    assert tree.threads == [root, a, b] and list(tree.open) == [0, 1, 2] and root.children == [a, b]
    assert [s.refs for s in (root.seg, a.seg, b.seg)] == refs and a.joined_into is None
    assert tree.join([a, b], [5]).id == 3


def test_compact_returns_a_finished_thread_with_the_keys_rerotated():
    """compact() writes the threads' K/V once into one new segment at ``base``: V copied, K
    turned from each token's old home position to its new one; the thread it returns is
    finished (it never samples)."""
    cache = KVCache(1, 8, 2, 1, 4, torch.float32, "cpu")
    k, v = cache.k[0].view(-1, 1, 4), cache.v[0].view(-1, 1, 4)
    tree = ThreadTree(cache)
    root = tree.new_root([1, 2, 3])
    (a,) = tree.fork(root, [[4, 5]])
    g = torch.Generator().manual_seed(0)
    for t in (root, a):
        slots = torch.tensor(cache.append_slots(t.seg, len(t.tokens)))
        k[slots], v[slots] = torch.randn(2, len(slots), 1, 4, generator=g)
        t.pending.clear()

    def slots_of(seg):
        return torch.tensor([seg.pages[i // 2] * 2 + i % 2 for i in range(seg.length)])
    old_k, old_v = (torch.cat([x[slots_of(t.seg)] for t in (root, a)]) for x in (k, v))
    inv_freq = torch.tensor([1.0, 0.1])
    m = tree.compact([root, a], 7, inv_freq)
    assert m.finish_reason == "compacted" and m.tokens == [1, 2, 3, 4, 5] and (m.seg.base, m.seg.length) == (7, 5)
    assert torch.equal(v[slots_of(m.seg)], old_v)
    assert torch.allclose(k[slots_of(m.seg)], rotate_by(old_k, torch.full((5,), 7), inv_freq), atol=1e-6)


def test_live_threads_that_see_each_other_generate(make_llm):
    """Two live threads whose views name each other (Hogwild!'s workers, by hand), read by a
    third: a step finds the threads its samplers read through live views once each, not
    round the cycle for good, and writes each pending header once."""
    from engine import SamplingParams
    llm = make_llm("qwen3")
    V = llm.config.vocab_size
    with llm.session(random_ids(6, V, seed=1)) as s:
        a = s.spawn([s.root], header=[1 % V])
        b = s.spawn([s.root, a], header=[2 % V])
        s.set_view(a, [s.root, b])  # (a sees b, b sees a: both headers pending)
        x = s.spawn([a], header=[3 % V])  # (x reads the cycle from outside it)
        outs = s.generate([x], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
        assert len(outs[0].token_ids) == 3
        assert [len(s._thread(t).tokens) for t in (a, b)] == [1, 1]  # (headers written once, for x)
        assert s._thread(a).pending == [] == s._thread(b).pending
        outs = s.generate([a, b], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
        assert [len(o.token_ids) for o in outs] == [2, 2]
    assert llm.cache_stats()["pages_used"] == 0


def test_live_views_of_a_root_reading_a_shared_prefix():
    """A root whose prompt begins in shared prefix segments (LLM._share_prefixes): a live view
    starting with it reads those segments first, at the root's shift, and holds them while it
    does (spawn, set_view, drop_view); a view naming it later than first is refused (its
    layout would not include the prefix)."""
    cache = KVCache(1, 8, 4, 1, 2, torch.float32, "cpu")
    p1, p2 = cache.new_segment(0), cache.new_segment(5)
    p1.tokens, p2.tokens = [1, 2, 3, 4, 5], [6, 7]
    p1.length, p2.length = 5, 2  # (as if written: tree verbs take no pages)
    tree = ThreadTree(cache)
    root = tree.new_root(list(range(1, 8)) + [8, 9], ((p1, 0), (p2, 0)))
    assert root.lead == (p1, p2) and root.seg.base == 7 and tree.prompt_ids() == list(range(1, 10))
    a = tree.spawn([root], [20])
    assert a.seg.base == 9 and [s for s, _ in a.view] == [p1, p2, root.seg, a.seg]
    assert [sh for _, sh in a.view] == [0, 0, 0, 0]
    b = tree.spawn([root, a], [30, 31])
    tree.inject(a, [21])  # (a grows: b's view lays it out longer, its own tokens later)
    from engine.threads import refresh_view
    refresh_view(b)
    assert [s for s, _ in b.view] == [p1, p2, root.seg, a.seg, b.seg]
    own = 9 + 2 - b.seg.base  # (the layout's end, prompt then a's two tokens, against b's home)
    assert [sh for _, sh in b.view][:4] == [-own, -own, -own, -own]
    refs = (p1.refs, p2.refs)
    tree.set_view(b, [root])
    assert (p1.refs, p2.refs) == refs and [s for s, _ in b.view] == [p1, p2, root.seg, b.seg]
    with pytest.raises(ValueError, match="reading a shared prompt prefix .* must come first in a live view"):
        tree.set_view(b, [a, root])
    b.finish_reason = "stop"
    b.pending.clear()
    tree.drop_view(b)
    assert (p1.refs, p2.refs) == (refs[0] - 1, refs[1] - 1)
