"""Hogwild! live views against independent oracles.

* The shift rule: attention with the query rotated by -shift equals attention over
  keys explicitly re-rotated by +shift (random tensors, many shifts, every backend).
* End to end: scripted 2- and 3-worker greedy runs whose workers see each other
  live. An oracle built from the transformers model's own modules recomputes every
  step layer by layer, rebuilding each worker's current view as one contiguous
  cache (pre-RoPE keys rotated at their view positions; tokens written in the same
  step visible to all), and must give the same log-prob for every sampled token.
"""
from __future__ import annotations

import math

import pytest
import torch

from conftest import random_ids
from engine import SamplingParams
from engine.attention import get_backend
from engine.attention.plan import ThreadStep, build_plan_py
from engine.attention.reference import rotate_by

ATOL = 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("shift", [-37, -1, 1, 5, 64, 1000])
def test_shift_rule(backend, shift):
    g = torch.Generator().manual_seed(abs(shift))
    Hq, Hkv, D, ps, L, R = 4, 2, 64, 16, 45, 3
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pages = torch.randperm(8, generator=g)[:3].tolist()
    k_pool = torch.randn(8, ps, Hkv, D, generator=g)
    v_pool = torch.randn(8, ps, Hkv, D, generator=g)
    q = torch.randn(R, Hq, D, generator=g)
    # rows 0..2 of one thread read segment 0 (shifted) and their own segment 1 (empty view part)
    plan = build_plan_py([ThreadStep([(0, shift), (1, 0)], 1, R)], {0: L, 1: R},
                         {0: pages, 1: [pages[-1]]})
    _, fn = get_backend(backend, torch.device("cpu"))
    out = fn(q, k_pool, v_pool, plan, inv_freq, 0.125)
    # explicit: segment 0's keys re-rotated by +shift, own rows causal
    k0 = k_pool[pages].reshape(-1, Hkv, D)[:L]
    k0 = rotate_by(k0, torch.full((L,), shift), inv_freq)
    v0 = v_pool[pages].reshape(-1, Hkv, D)[:L]
    k1 = k_pool[pages[-1]][:R]
    v1 = v_pool[pages[-1]][:R]
    for r in range(R):
        k = torch.cat([k0, k1[:r + 1]]).repeat_interleave(Hq // Hkv, 1)
        v = torch.cat([v0, v1[:r + 1]]).repeat_interleave(Hq // Hkv, 1)
        s = torch.einsum("hd,lhd->hl", q[r], k) * 0.125
        ref = torch.einsum("hl,lhd->hd", s.softmax(-1), v)
        torch.testing.assert_close(out[r], ref, atol=1e-5, rtol=1e-5)


class Oracle:
    """A transformers-module forward over explicit per-view contiguous caches."""

    def __init__(self, hf):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
        self.hf, self.m = hf, hf.model
        self.rope = apply_rotary_pos_emb
        self.kraw: dict[tuple[int, int], list[torch.Tensor]] = {}  # (thread, idx) -> per-layer k
        self.vals: dict[tuple[int, int], list[torch.Tensor]] = {}
        cfg = hf.config
        self.Hq, self.Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.D = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.Hq

    def _rot(self, x, pos):  # x [n, H, D] pre-RoPE -> rotated at pos [n]
        cos, sin = self.m.rotary_emb(x, pos[None])
        xr, _ = self.rope(x.transpose(0, 1)[None], x.transpose(0, 1)[None], cos, sin)
        return xr[0].transpose(0, 1)

    @torch.no_grad()
    def step(self, new: list[tuple[int, int, int]], views: dict[int, list[tuple[int, int]]]):
        """new: (thread, idx, token) written this step; views[thread]: the (thread, length)
        runs it sees in order, its own last (lengths after this step). Returns the
        log-probs after each thread's last new token."""
        h = self.m.embed_tokens(torch.tensor([tok for _, _, tok in new]))
        for li, layer in enumerate(self.m.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = a.q_proj(x).view(len(new), self.Hq, self.D)
            k = a.k_proj(x).view(len(new), self.Hkv, self.D)
            v = a.v_proj(x).view(len(new), self.Hkv, self.D)
            if hasattr(a, "q_norm"):
                q, k = a.q_norm(q), a.k_norm(k)
            for n, (t, i, _) in enumerate(new):
                self.kraw.setdefault((t, i), []).append(k[n])
                self.vals.setdefault((t, i), []).append(v[n])
            outs = []
            for n, (t, i, _) in enumerate(new):
                keys, pos, = [], []
                p = 0
                for u, length in views[t]:
                    lim = i + 1 if u == t else length
                    for j in range(lim):
                        keys.append((u, j))
                        pos.append(p + j)
                    if u == t:
                        qpos = p + i
                    p += length
                K = self._rot(torch.stack([self.kraw[kk][li] for kk in keys]), torch.tensor(pos))
                V = torch.stack([self.vals[kk][li] for kk in keys])
                qq = self._rot(q[n][None], torch.tensor([qpos]))[0]
                K = K.repeat_interleave(self.Hq // self.Hkv, 1)
                V = V.repeat_interleave(self.Hq // self.Hkv, 1)
                s = torch.einsum("hd,lhd->hl", qq, K) / math.sqrt(self.D)
                outs.append(torch.einsum("hl,lhd->hd", s.softmax(-1), V).reshape(-1))
            h = h + a.o_proj(torch.stack(outs))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        logits = self.hf.lm_head(self.m.norm(h)).float().log_softmax(-1)
        last = {}
        for n, (t, _, _) in enumerate(new):
            last[t] = logits[n]
        return last


def _views(workers, lengths):
    return {w.id: [(u.id, lengths[u.id]) for u in w._t.live] + [(w.id, lengths[w.id])]
            for w in workers}


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name,nworkers,page_size", [("qwen3", 2, 16), ("llama", 3, 1),
                                                      ("qwen3", 3, 5)])
def test_live_views_match_oracle(make_llm, hf_ref, name, nworkers, page_size, backend):
    llm = make_llm(name, page_size=page_size, attention_backend=backend)
    V = llm.config.vocab_size
    prompt = random_ids(7, V, 3)
    s = llm.session(prompt)
    names = ["Alice", "Bob", "Carol"][:nworkers]
    hdrs = [random_ids(len(n) // 2 + 1, V, 10 + i) for i, n in enumerate(names)]
    ws = [s.spawn(view=[s.root], header=hdrs[0])]
    for i in range(1, nworkers):
        ws.append(s.spawn(view=[s.root] + ws[:i], header=hdrs[i]))
    for i in range(nworkers):  # every worker sees all the others: cycles through live views
        s.set_view(ws[i], [s.root] + [w for w in ws if w is not ws[i]])
    T = 6
    outs = s.generate(ws, SamplingParams(temperature=0, max_tokens=T, ignore_eos=True, logprobs=0))

    oracle = Oracle(hf_ref(name))
    root = s.root._t.id
    oracle.step([(root, i, tok) for i, tok in enumerate(prompt)], {root: [(root, len(prompt))]})
    lengths = {root: len(prompt)}
    for k in range(T):
        new = []
        for w, h, o in zip(ws, hdrs, outs):
            toks = h if k == 0 else [o.token_ids[k - 1]]
            base = 0 if k == 0 else len(h) + k - 1
            new += [(w.id, base + j, tok) for j, tok in enumerate(toks)]
            lengths[w.id] = len(h) + k
        lp = oracle.step(new, _views(ws, lengths))
        for w, o in zip(ws, outs):
            tok = o.token_ids[k]
            assert abs(lp[w.id][tok].item() - o.logprobs[k][tok]) < ATOL, (w.id, k)
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_spawn_errors(make_llm):
    llm = make_llm("qwen3", attention_backend="torch")
    s = llm.session([1, 2, 3])
    a = s.spawn(view=[s.root], header=[4])
    with pytest.raises(ValueError, match="itself"):
        s.set_view(a, [s.root, a])
    with pytest.raises(ValueError, match="twice"):
        s.set_view(a, [s.root, s.root])
    (f,) = s.fork(s.root, [[5]])
    with pytest.raises(ValueError, match="spawn"):
        s.set_view(f, [s.root])
    with pytest.raises(ValueError, match="non-empty view"):
        s.spawn(view=[], header=[1])
    with pytest.raises(ValueError, match="twice"):
        s.spawn(view=[s.root, s.root], header=[1])
    # a thread with no tokens samples its first token from the root's logits: its view stays [root]
    bare = s.spawn(view=[s.root])
    with pytest.raises(ValueError, match="has no tokens yet"):
        s.set_view(bare, [s.root, a])
    s.set_view(bare, [s.root])
    # pack() lays out forks and joins, not live views: refused by name, whether the view has
    # been re-laid out (shifted) or not yet (the threads it reads grew since it last sampled:
    # packing it as if it saw them was accepted and gave a wrong mask)
    from engine.trie import pack
    s.close()
    for relaid in (True, False):
        with llm.session(random_ids(12, llm.config.vocab_size, seed=3)) as s:
            (f,) = s.fork(s.root, [[5]])
            s.generate([f], SamplingParams(temperature=0, max_tokens=2))
            w = s.spawn(view=[s.root, f], header=[6])
            s.generate([w], SamplingParams(temperature=0, max_tokens=1))
            s.generate([f], SamplingParams(temperature=0, max_tokens=2))  # f grows
            if relaid:
                s.generate([w], SamplingParams(temperature=0, max_tokens=1))  # w's view re-laid out
            with pytest.raises(ValueError, match=f"thread {w.id}'s live view"):
                pack(s)
    assert llm.cache_stats()["pages_used"] == 0


def _interrupted_after_the_forward(llm, call):
    """``call``, with a Ctrl-C raised after its first step's forward (after the step's
    appends, which the runner then rolls back)."""
    inner = llm.runner._run

    def boom(batch):
        inner(batch)
        raise KeyboardInterrupt
    llm.runner._run = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        del llm.runner._run


def _resumed_logprob(llm, stale: bool, interrupt: bool = False) -> tuple[int, float]:
    """w2 reads [root, w1] live; w3 reads [root, w2]. w2 samples 2 tokens, w1 grows; with
    ``stale`` w3 then samples one token, which writes w2's pending token (w2 does not
    sample in that step); w1 grows again; w2 resumes: (its token, its log-prob)."""
    s = llm.session([1, 2, 3, 4, 5])
    (w1,) = s.fork(s.root, [[6]])
    w2 = s.spawn([s.root, w1], header=[7, 8])
    w3 = s.spawn([s.root, w2], header=[9])
    g = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)
    s.generate([w2], g(2))
    s.generate([w1], g(3))
    if stale:
        s.generate([w3], g(1))
    s.generate([w1], g(9))
    if interrupt:  # the resuming step fails: its re-written token is rolled back with the rest
        _interrupted_after_the_forward(llm, lambda: s.generate([w2], g(1)))
        assert all(t.seg.length == len(t.tokens) - len(t.pending) for t in s.tree.threads)
    out = s.generate([w2], g(1))[0]
    tok = out.token_ids[0]
    s.close()
    assert llm.cache_stats()["pages_used"] == 0
    return tok, out.logprobs[0][tok]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_a_resumed_live_thread_sees_its_view_as_it_is_now(make_llm, backend):
    """A live thread whose last token was written in another thread's step (it did not
    sample then) writes that token again when it resumes, so its next token sees what its
    view gained since: the same token and log-prob as when the token was first written at
    the resume. (It used to sample from the logits of that earlier step.)"""
    llm = make_llm("qwen3", attention_backend=backend, page_size=1)  # (every length a page boundary)
    fresh, stale = _resumed_logprob(llm, False), _resumed_logprob(llm, True)
    assert fresh[0] == stale[0] and abs(fresh[1] - stale[1]) < 1e-5, (fresh, stale)
    again = _resumed_logprob(llm, True, interrupt=True)
    assert again[0] == fresh[0] and abs(again[1] - fresh[1]) < 1e-5, (fresh, again)


def _injected_logprob(llm, stale: bool) -> tuple[int, float]:
    """w2 reads [root, w1] live; w3 reads [root, w2]. w2 samples 2 tokens; with ``stale`` w3
    then samples one token, which writes w2's pending token (w2 does not sample in that step);
    two tokens are injected into w2, which then samples one: (its token, its log-prob)."""
    s = llm.session([1, 2, 3, 4, 5])
    (w1,) = s.fork(s.root, [[6]])
    w2 = s.spawn([s.root, w1], header=[7, 8])
    w3 = s.spawn([s.root, w2], header=[9])
    g = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)  # noqa: E731
    s.generate([w2], g(2))
    if stale:
        s.generate([w3], g(1))
    s.inject(w2, [10, 11])
    out = s.generate([w2], g(1))[0]
    assert all(t.seg.length == len(t.tokens) - len(t.pending) for t in s.tree.threads)
    tok = out.token_ids[0]
    s.close()
    assert llm.cache_stats()["pages_used"] == 0
    return tok, out.logprobs[0][tok]


def test_tokens_injected_into_a_stale_live_thread_are_all_written(make_llm):
    """A live thread written in another thread's step, then given injected tokens, resumes by
    writing them (its last token is not written again: its next token is after the injected
    ones): the same token and log-prob as when it was not written before. (A mutation that
    re-wrote its last token whenever it was stale passed the suite: the injected tokens but the
    last were dropped and that one written over the thread's last slot.)"""
    llm = make_llm("qwen3", attention_backend="cpu", page_size=1)
    fresh, stale = _injected_logprob(llm, False), _injected_logprob(llm, True)
    assert fresh[0] == stale[0] and abs(fresh[1] - stale[1]) < 1e-5, (fresh, stale)


def _reader_after_a_failed_resume(llm, fail: str | None) -> tuple[int, float]:
    """w2 reads [root, w1] live, w3 reads [root, w2]. w3's step writes w2's last token (w2 is
    then stale); w1 grows; w2's resume (which writes that token again) fails with ``fail``
    ("interrupt": in the forward; "cache_full": refused before it), or is not tried; w1
    grows again; w3 samples one token: (its token, its log-prob). A failed call changes
    nothing, so every run gives what the run without it gives."""
    V = llm.config.vocab_size
    g = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=0)  # noqa: E731
    s = llm.session(random_ids(10, V, seed=1))
    (w1,) = s.fork(s.root, [[6]])
    w2 = s.spawn([s.root, w1], header=[7, 8])
    w3 = s.spawn([s.root, w2], header=[9])
    s.generate([w2], g(1))
    s.generate([w3], g(1))
    s.generate([w1], g(6))
    if fail == "interrupt":
        _interrupted_after_the_forward(llm, lambda: s.generate([w2], g(1)))
    elif fail == "cache_full":
        filler = llm.session(random_ids(llm.cache_stats()["pages_free"], V, seed=2))
        (f,) = filler.fork(filler.root, [[]])
        filler.generate([f], g(1))  # its prompt written: no page left
        with pytest.raises(ValueError, match="The KV cache is full"):
            s.generate([w2], g(1))  # (w1's last token needs a page)
        filler.close()
    assert all(t.seg.length == len(t.tokens) - len(t.pending) for t in s.tree.threads)
    s.generate([w1], g(2))
    out = s.generate([w3], g(1))[0]
    s.close()
    assert llm.cache_stats()["pages_used"] == 0
    return out.token_ids[0], out.logprobs[0][out.token_ids[0]]


def test_a_failed_resume_of_a_stale_live_thread_changes_nothing(make_llm):
    """(Its last token's slot was re-written in the failed step's context and left pending,
    so that a reader's later step wrote it again in its own.)"""
    llm = make_llm("qwen3", attention_backend="cpu", page_size=1, kv_cache_tokens=64)
    want = _reader_after_a_failed_resume(llm, None)
    for fail in ("interrupt", "cache_full"):
        got = _reader_after_a_failed_resume(llm, fail)
        assert got[0] == want[0] and abs(got[1] - want[1]) < 1e-6, (fail, want, got)


def test_live_views_stop_at_the_models_context(make_llm):
    """A live thread's positions are its view's layout, then its own tokens: set_view past
    the model's context is refused, and generation ends ("length") where the layout
    reaches it, though the thread's own home positions are far below."""
    llm = make_llm("qwen3", attention_backend="cpu")
    M, V = llm.config.max_position_embeddings, llm.config.vocab_size
    s = llm.session(random_ids(16, V, seed=1))
    (a,) = s.fork(s.root, [random_ids(M - 40, V, seed=2)])
    w = s.spawn([s.root], header=[5] * 30)
    with pytest.raises(ValueError, match=f"new view of thread {w.id}.*past the model's context of {M}"):
        s.set_view(w, [s.root, a])
    w2 = s.spawn([s.root], header=[5] * 10)
    s.set_view(w2, [s.root, a])  # laid out: 16 + M - 40 + 10 = M - 14 positions
    with pytest.raises(ValueError, match=f"Injecting 15 tokens into thread {w2.id} would reach position {M + 1}"):
        s.inject(w2, [6] * 15)  # (checked against its home end, far below, it passed)
    out = s.generate([w2], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 14
    assert s.generate([w2], SamplingParams(temperature=0, max_tokens=5))[0].token_ids == []
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_a_live_threads_tokens_are_not_written_past_the_context(make_llm):
    """A live thread's view grows after it sampled (here its root, by an injection) so that
    its pending tokens would sit past the model's context: a reader's step does not write
    them (no K/V past the context); it reads the thread as far as it is written."""
    llm = make_llm("qwen3", attention_backend="cpu")
    M, V = llm.config.max_position_embeddings, llm.config.vocab_size
    s = llm.session(random_ids(20, V, seed=1))
    w = s.spawn([s.root], header=[5])
    s.generate([w], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # its token pending
    s.inject(s.root, [9] * (M - 21))  # the root ends at M - 1: w's pending token would sit at M + 1
    t = w._t
    before = (t.seg.length, list(t.pending))
    r = s.spawn([s.root], header=[6])
    s.set_view(r, [w])  # (laid out: w's view, then w: within the context as written)
    s.generate([r], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    assert (t.seg.length, list(t.pending)) == before
    s.close()
    assert llm.cache_stats()["pages_used"] == 0
    # one position less: w's pending token sits at M - 1, the context's last position: written
    s = llm.session(random_ids(20, V, seed=1))
    w = s.spawn([s.root], header=[5])
    s.generate([w], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    s.inject(s.root, [9] * (M - 22))
    r = s.spawn([s.root], header=[6])
    s.set_view(r, [w])
    s.generate([r], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    t = w._t
    assert t.pending == [] and t.seg.length == len(t.tokens)
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_live_thread_bookkeeping(make_llm):
    """A live thread spawned from a fork child starts after that child (its view's base is
    the child's, not 0); spawning a live reader of the root does not freeze the root (it is
    not forked); a live thread's token re-written at the start of a page keeps its page."""
    greedy = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    llm = make_llm("qwen3", page_size=4, attention_backend="torch")
    V = llm.config.vocab_size
    s = llm.session(random_ids(10, V, seed=2))
    a, = s.fork(s.root, [[5]])
    s.generate([a], greedy)
    w = s.spawn([a], header=[6])
    assert w.position == a.position + 1
    s.close()
    with llm.session([1, 2, 3]) as s:
        s.spawn([s.root])  # (no header: it reads the root live)
        s.inject(s.root, [4, 5])
        assert s.root.token_ids == [1, 2, 3, 4, 5]
    s = llm.session([1, 2, 3, 4, 5])
    w1, = s.fork(s.root, [[6]])
    w2 = s.spawn([s.root, w1], header=[7, 8, 9])  # (w2's fifth token, index 4, opens its second page)
    w3 = s.spawn([s.root, w2], header=[9])
    s.generate([w2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    s.generate([w3], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # (writes w2's pending token)
    s.generate([w1], greedy)
    s.generate([w2], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))  # (its last token re-written)
    seg = w2._t.seg
    assert len(seg.pages) == -(-seg.length // 4)
    s.close()
    assert llm.cache_stats()["pages_used"] == 0


def test_a_spawn_without_a_header_reads_only_the_root(make_llm):
    """A spawned thread's first token is sampled after its header, seeing its view; with no
    header it would be sampled from the root's logits, so a headerless spawn is refused
    unless its view is just the root (and nothing changes)."""
    llm = make_llm("qwen3", attention_backend="torch")
    s = llm.session([1, 2, 3])
    a = s.spawn(view=[s.root], header=[4])
    for view in ([a], [s.root, a]):
        with pytest.raises(ValueError, match=r"spawn\(\) needs a non-empty header unless the view is just the root"):
            s.spawn(view=view)
        assert len(s.tree.threads) == 2
    bare = s.spawn(view=[s.root])
    assert bare.parent is s.root
    s.close()
    assert llm.cache_stats()["pages_used"] == 0
