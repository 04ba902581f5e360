"""Steps longer than ``max_forward_tokens``, or with more attention entries (query row x
view segment) than a pass may keep partial states for, run as several forward passes
(engine.runner).

* ``split_passes`` on random steps: every token once, in order; an item that reads a
  segment another item of the step writes runs after that item's last pass; only groups
  of items that read each other exceed the budget.
* Engines with a budget of a few tokens give what one pass gives: scores, sampled tokens
  and log-probs of parallel samples, fork/join sessions (re-prefill joins, children fed
  with the prompt they read) and Hogwild workers (live views: their items read each
  other's new tokens and are never split).
* A failure in a later pass undoes the earlier passes' appends.
"""
from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch

from conftest import random_ids
from engine import SamplingParams
from engine.protocols import Hogwild
from engine.runner import DEFAULT_MAX_FORWARD_TOKENS, split_passes
from engine.step import StepItem

NAME = "qwen3"


def _random_step(rng: random.Random):
    """Items over segments 0..9: each writes its own segment and reads a few others."""
    n_items = rng.randint(1, 6)
    owns = rng.sample(range(10), n_items)
    seg = {i: SimpleNamespace(id=i) for i in range(10)}
    items = []
    for own in owns:
        others = rng.sample([i for i in range(10) if i != own], rng.randint(0, 3))
        view = [(seg[i], rng.randint(-3, 3)) for i in others] + [(seg[own], 0)]
        items.append(StepItem(seg[own], list(range(rng.randint(1, 40))), view))
    return items


@pytest.mark.parametrize("seed", range(300))
def test_split_passes_covers_every_token_once_in_an_order_that_sees_the_same(seed):
    """Every token once, each item's in order; an item that reads another's segment runs
    in passes no earlier than that item's last; only items that read each other exceed
    the budget, whole, in a pass of their own; without such groups, as few passes as the
    budget allows."""
    rng = random.Random(seed)
    items = _random_step(rng)
    budget = rng.randint(1, 50)
    total = sum(len(it.token_ids) for it in items)
    n = len(items)
    owner = {it.own.id: i for i, it in enumerate(items)}
    edge = [[False] * n for _ in range(n)]  # edge[r][w]: item r reads item w's segment
    for r, it in enumerate(items):
        for s, _ in it.view:
            if s.id in owner and owner[s.id] != r:
                edge[r][owner[s.id]] = True
    reach = [row[:] for row in edge]  # transitive closure
    for k in range(n):
        for a in range(n):
            for b in range(n):
                reach[a][b] = reach[a][b] or (reach[a][k] and reach[k][b])
    cyclic = [any(reach[i][j] and reach[j][i] for j in range(n)) for i in range(n)]
    passes = split_passes(items, budget)
    if total <= budget:
        assert passes is None
        return
    if passes is None:  # one pass: only when all items read each other
        assert n > 1 and all(reach[a][b] for a in range(n) for b in range(n) if a != b)
        return
    assert len(passes) >= 2
    next_token, first_pass, last_pass = [0] * n, [None] * n, [None] * n
    for p, pieces in enumerate(passes):
        assert len({i for i, _, _ in pieces}) == len(pieces), "an item twice in one pass"
        for i, start, count in pieces:
            assert count >= 1 and start == next_token[i], (p, i, start, count)
            next_token[i] += count
            first_pass[i] = p if first_pass[i] is None else first_pass[i]
            last_pass[i] = p
        size = sum(c for _, _, c in pieces)
        if size > budget:  # only a group of items that read each other, alone and whole
            assert all(cyclic[i] and start == 0 and c == len(items[i].token_ids) for i, start, c in pieces)
            assert all(reach[a][b] for a, _, _ in pieces for b, _, _ in pieces if a != b)
    assert next_token == [len(it.token_ids) for it in items]
    for r in range(n):
        for w in range(n):
            if edge[r][w]:
                assert first_pass[r] >= last_pass[w], f"item {r} reads item {w} before it is complete"
    if not any(cyclic):
        assert len(passes) == math.ceil(total / budget)


def count_passes(llm, monkeypatch) -> list[int]:
    """The token count of each forward pass ``llm`` runs from now on (for this test)."""
    sizes, real = [], llm.model.forward

    def counting(ids, *args, **kwargs):
        sizes.append(ids.shape[0])
        return real(ids, *args, **kwargs)
    monkeypatch.setattr(llm.model, "forward", counting)
    return sizes


def test_a_long_score_computes_its_logits_once_in_blocks(make_llm, monkeypatch):
    """The passes of a chunked score return hidden states; the head then runs in blocks of
    LOGITS_BLOCK_ROWS rows written into the one [P, vocab] result (no pass's own [rows,
    vocab] logits, no 16-bit copy of them)."""
    from engine.model import LOGITS_BLOCK_ROWS
    one = make_llm(NAME, kv_cache_tokens=4096)
    chunked = make_llm(NAME, kv_cache_tokens=4096, max_forward_tokens=300)
    ids = random_ids(2 * LOGITS_BLOCK_ROWS + 50, one.config.vocab_size, 12)
    want = one.score(ids)[0]
    seen, head = [], chunked.model.lm_head

    def recording(x):
        seen.append(x.shape[0])
        return head(x)
    monkeypatch.setattr(chunked.model, "lm_head", recording)
    got = chunked.score(ids)[0]
    assert seen == [LOGITS_BLOCK_ROWS, LOGITS_BLOCK_ROWS, 50], seen
    assert torch.allclose(want, got, atol=1e-4, rtol=0), (want - got).abs().max()


@pytest.fixture(scope="module")
def pair(make_llm):
    """The same model with the default budget and with a budget of 5 tokens a pass."""
    return make_llm(NAME, kv_cache_tokens=4096), make_llm(NAME, kv_cache_tokens=4096, max_forward_tokens=5)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_chunked_score_matches_one_pass(make_llm, backend, monkeypatch):
    one = make_llm(NAME, attention_backend=backend)
    chunked = make_llm(NAME, attention_backend=backend, max_forward_tokens=13)
    ids = random_ids(150, one.config.vocab_size, 3)
    a = one.score(ids)[0]
    sizes = count_passes(chunked, monkeypatch)
    b = chunked.score(ids)[0]
    assert sizes == [13] * 11 + [7]
    assert a.shape == b.shape == (150, one.config.vocab_size)
    assert torch.allclose(a, b, atol=1e-4, rtol=0), (a - b).abs().max()


def test_chunked_generate_matches_one_pass(pair, monkeypatch):
    one, chunked = pair
    V = one.config.vocab_size
    prompts = [random_ids(n, V, 10 + n) for n in (37, 3, 61)]
    p = SamplingParams(n=3, temperature=0.9, max_tokens=8, seed=4, logprobs=1, ignore_eos=True)
    a = one.generate(prompts, p)
    sizes = count_passes(chunked, monkeypatch)
    b = chunked.generate(prompts, p)
    assert sizes[:21] == [5] * 20 + [1], sizes  # 101 prompt tokens; then one token per thread
    assert max(sizes) <= 9
    for ra, rb in zip(a, b):
        for ca, cb in zip(ra.outputs, rb.outputs):
            assert ca.token_ids == cb.token_ids
            for la, lb in zip(ca.logprobs, cb.logprobs):
                assert la.keys() == lb.keys()
                assert max(abs(la[k] - lb[k]) for k in la) < 1e-4
    for llm in pair:
        assert llm.cache_stats()["pages_used"] == 0


def test_a_budget_of_one_token_a_pass_is_taken(pair, make_llm, monkeypatch):
    """max_forward_tokens=1, the least: every pass feeds one token, and the tokens are one pass's."""
    one = pair[0]
    tiny = make_llm(NAME, kv_cache_tokens=4096, max_forward_tokens=1)
    prompts = [random_ids(n, one.config.vocab_size, 20 + n) for n in (6, 3)]
    p = SamplingParams(n=2, temperature=0.9, max_tokens=3, seed=5, ignore_eos=True)
    a = one.generate(prompts, p)
    sizes = count_passes(tiny, monkeypatch)
    b = tiny.generate(prompts, p)
    assert set(sizes) == {1} and len(sizes) >= 9, sizes
    assert [c.token_ids for r in a for c in r.outputs] == [c.token_ids for r in b for c in r.outputs]
    assert tiny.cache_stats()["pages_used"] == 0


def test_chunked_session_with_a_reprefill_join_matches_one_pass(pair, monkeypatch):
    def run(llm):
        V = llm.config.vocab_size
        greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
        with llm.session(random_ids(23, V, 5)) as s:
            kids = s.fork(s.root, [random_ids(7, V, 6), [3], random_ids(4, V, 7)])
            outs = [o.token_ids for o in s.generate(kids, greedy)]
            j = s.join(kids, header=random_ids(9, V, 8), positions="reprefill")
            k, = s.fork(s.root, [[5, 6]])  # a fork's header in the same steps as the re-prefill
            sizes = count_passes(llm, monkeypatch)
            last = s.generate([j, k], greedy)
            budget = llm.runner.max_forward_tokens
            assert max(sizes) == min(41, budget), sizes  # the re-prefill: 41 tokens + the fork's 2
        return outs, [o.token_ids for o in last], [o.logprobs for o in last]

    a, b = run(pair[0]), run(pair[1])
    assert a[:2] == b[:2]
    for la, lb in zip(a[2], b[2]):
        assert max(abs(x[t] - y[t]) for x, y in zip(la, lb) for t in x) < 1e-4
    for llm in pair:
        assert llm.cache_stats()["pages_used"] == 0


def test_readers_of_a_segment_written_in_the_same_step_run_after_it(pair, monkeypatch):
    """Fork children whose long headers are fed in the step that writes their parent's
    prompt: they read the prompt's segment, so they run after its last pass, in passes
    within the budget, and see what one pass would show them."""
    def run(llm):
        V = llm.config.vocab_size
        sizes = count_passes(llm, monkeypatch)
        with llm.session(random_ids(30, V, 1)) as s:
            kids = s.fork(s.root, [random_ids(40, V, 2), random_ids(17, V, 3)])
            outs = s.generate(kids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0))
        monkeypatch.undo()
        return sizes, [o.token_ids for o in outs], [o.logprobs for o in outs]

    (s1, t1, l1), (s5, t5, l5) = run(pair[0]), run(pair[1])
    assert s1[0] == 87 and s5[:18] == [5] * 17 + [2], (s1, s5)  # 30 + 40 + 17 prompt and header tokens
    assert t1 == t5
    assert max(abs(x[t] - y[t]) for a, b in zip(l1, l5) for x, y in zip(a, b) for t in x) < 1e-4


def test_hogwild_live_views_are_not_split(pair, monkeypatch):
    """Hogwild workers read each other's new tokens in the step that writes them: their
    items stay whole (one pass may then exceed the budget) and the text is the same."""
    one, chunked = pair
    prompt = random_ids(30, one.config.vocab_size, 9)
    p = SamplingParams(temperature=0.8, max_tokens=10, seed=2, ignore_eos=True)
    a = one.generate([prompt], p, protocol=Hogwild(workers=2, finisher=False))[0].outputs[0]
    sizes = count_passes(chunked, monkeypatch)
    b = chunked.generate([prompt], p, protocol=Hogwild(workers=2, finisher=False))[0].outputs[0]
    assert a.text == b.text and a.token_ids == b.token_ids
    assert max(sizes) > 5, "no step fed more than the budget: the test shows nothing"
    assert chunked.cache_stats()["pages_used"] == 0


def test_a_failure_in_a_later_pass_undoes_the_earlier_ones(pair, monkeypatch):
    _, chunked = pair
    prompt = random_ids(40, chunked.config.vocab_size, 11)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    want = chunked.generate([prompt], greedy)[0].outputs[0].token_ids
    real, calls = chunked.model.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # the prompt's fourth chunk of five tokens
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(chunked.model, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        chunked.generate([prompt], greedy)
    monkeypatch.setattr(chunked.model, "forward", real)
    stats = chunked.cache_stats()
    assert stats["pages_used"] == 0 and stats["segments"] == 0, stats
    assert chunked.generate([prompt], greedy)[0].outputs[0].token_ids == want


@pytest.mark.parametrize("bad", [0, -3, 2.5, "8", None])
def test_max_forward_tokens_is_validated(model_dir, bad):
    from engine import LLM
    with pytest.raises(ValueError, match="max_forward_tokens"):
        LLM(model_dir(NAME), max_forward_tokens=bad)


def test_default_budget_is_one_pass_for_the_usual_prompt(make_llm):
    llm = make_llm(NAME, kv_cache_tokens=4096)
    assert llm.runner.max_forward_tokens == DEFAULT_MAX_FORWARD_TOKENS == 2048  # (README, DESIGN.md)
    items = [StepItem(SimpleNamespace(id=0), list(range(DEFAULT_MAX_FORWARD_TOKENS)),
                       [(SimpleNamespace(id=0), 0)])]
    assert split_passes(items, DEFAULT_MAX_FORWARD_TOKENS) is None


def test_a_pass_keeps_at_most_1_gib_of_attention_partial_states(make_llm):
    """A pass's attention entries (query row x view segment) are bounded so that their
    float32 partial states, (o, lse): head_dim + 2 floats per query head each, take at most
    1 GiB (README, DESIGN.md)."""
    from engine.runner import MAX_ATTENTION_STATE_BYTES
    llm = make_llm(NAME, kv_cache_tokens=4096)
    cfg = llm.model.cfg
    assert MAX_ATTENTION_STATE_BYTES == 1 << 30
    assert llm.runner.max_pass_entries == (1 << 30) // (4 * cfg.num_heads * (cfg.head_dim + 2))


def _max_positions(llm, monkeypatch) -> list:
    """Record each forward's (max_position, largest position fed)."""
    seen = []
    orig = llm.model.forward

    def forward(ids, pos, fb, k, v):
        seen.append((fb.max_position, int(pos.max())))
        return orig(ids, pos, fb, k, v)
    monkeypatch.setattr(llm.model, "forward", forward)
    return seen


def test_max_position_is_the_largest_position(make_llm, monkeypatch):
    """The rotary tables are extended to max_position (the C++ kernels index them without a
    bounds check): it must be the step's largest position, not its first."""
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    seen = _max_positions(llm, monkeypatch)
    llm.score(random_ids(40, llm.config.vocab_size, 1))
    llm.generate([random_ids(5, llm.config.vocab_size, 2)], SamplingParams(temperature=0, max_tokens=3))
    assert seen and all(a == b for a, b in seen), seen


@pytest.mark.parametrize("ends", [(4, 5, 4), (9, 3, 8)])
def test_max_position_is_the_largest_position_whatever_the_items_order(make_llm, monkeypatch, ends):
    """max_position over items whose last positions rise and fall by one (a larger one after,
    then a smaller one) is still the largest."""
    from engine.step import StepBatch
    llm = make_llm("qwen3", kv_cache_tokens=2048)
    seen = _max_positions(llm, monkeypatch)
    segs = [llm.cache.new_segment(0) for _ in ends]
    try:
        llm.runner.run(StepBatch([StepItem(s, list(range(3, e + 4)), ((s, 0),)) for s, e in zip(segs, ends)]))
    finally:
        for s in segs:
            llm.cache.release_segment(s)
    assert seen == [(max(ends), max(ends))]


def _items(spec):
    """spec: [(own, n_tokens, [read ids])]"""
    seg = {i: SimpleNamespace(id=i) for i in range(10)}
    return [StepItem(seg[o], list(range(n)), [(seg[r], 0) for r in reads] + [(seg[o], 0)]) for o, n, reads in spec]


def test_an_oversized_group_first_makes_no_empty_pass():
    from engine.runner import split_passes
    passes = split_passes(_items([(0, 30, [1]), (1, 30, [0]), (2, 5, [])]), 10)
    assert passes == [[(0, 0, 30), (1, 0, 30)], [(2, 0, 5)]], passes


def test_a_group_that_fills_the_budget_closes_its_pass():
    from engine.runner import split_passes
    passes = split_passes(_items([(0, 5, [1]), (1, 5, [0]), (2, 4, [])]), 10)
    assert passes == [[(0, 0, 5), (1, 0, 5)], [(2, 0, 4)]], passes


# (token budget, entry budget, items as _items takes them, the passes): each pass as full as its
# budgets allow, a group of items that read each other (0 and 1) whole; a pass closed before a
# group, or by it, starts the next one empty
PACKED = [
    (10, None, [(2, 4, []), (0, 3, [1]), (1, 3, [0]), (3, 5, [])],
     [[(0, 0, 4), (1, 0, 3), (2, 0, 3)], [(3, 0, 5)]]),  # (the group fills the first pass exactly)
    (10, None, [(2, 8, []), (0, 3, [1]), (1, 3, [0]), (3, 5, [])],
     [[(0, 0, 8)], [(1, 0, 3), (2, 0, 3), (3, 0, 4)], [(3, 4, 1)]]),
    (10, None, [(0, 5, [1]), (1, 5, [0]), (2, 10, [])], [[(0, 0, 5), (1, 0, 5)], [(2, 0, 10)]]),
    (100, 16, [(2, 4, []), (0, 3, [1]), (1, 3, [0]), (3, 5, [])],
     [[(0, 0, 4), (1, 0, 3), (2, 0, 3)], [(3, 0, 5)]]),
    (100, 16, [(2, 8, []), (0, 3, [1]), (1, 3, [0]), (3, 5, [])],
     [[(0, 0, 8)], [(1, 0, 3), (2, 0, 3), (3, 0, 4)], [(3, 4, 1)]]),
    (100, 20, [(0, 5, [1]), (1, 5, [0]), (2, 20, [])], [[(0, 0, 5), (1, 0, 5)], [(2, 0, 20)]]),
    # not one more token's entries fit (3 x 3 of 10 taken, a token of the next item takes 2)
    (4, 10, [(0, 3, [5, 6]), (1, 4, [7])], [[(0, 0, 3)], [(1, 0, 4)]]),
    (6, 10, [(0, 3, [5, 6]), (1, 5, [7])], [[(0, 0, 3)], [(1, 0, 5)]]),
    (100, 10, [(0, 30, [])], [[(0, 0, 10)], [(0, 10, 10)], [(0, 20, 10)]]),  # (one entry a token)
]


@pytest.mark.parametrize("budget,entry_budget,spec,want", PACKED)
def test_split_passes_packs_each_pass_as_full_as_its_budgets_allow(budget, entry_budget, spec, want):
    assert split_passes(_items(spec), budget, entry_budget) == want


@pytest.mark.parametrize("seed", range(200))
def test_split_passes_keeps_attention_entries_within_their_budget(seed):
    """Entries (query row x view segment: the attention's partial states) bound a pass as
    tokens do: every token once and in order, readers after their writers, and a pass over
    either budget only for a group of items that read each other, or one token whose view
    alone is wider than the entry budget."""
    rng = random.Random(1000 + seed)
    items = _random_step(rng)
    budget, entry_budget = rng.randint(1, 80), rng.randint(1, 60)
    width = [len(it.view) for it in items]
    n = len(items)
    owner = {it.own.id: i for i, it in enumerate(items)}
    edge = [[False] * n for _ in range(n)]  # edge[r][w]: item r reads item w's segment
    for r, it in enumerate(items):
        for s, _ in it.view:
            if owner.get(s.id, r) != r:
                edge[r][owner[s.id]] = True
    reach = [row[:] for row in edge]
    for k in range(n):
        for a in range(n):
            for b in range(n):
                reach[a][b] = reach[a][b] or (reach[a][k] and reach[k][b])
    passes = split_passes(items, budget, entry_budget)
    if passes is None:
        fits = (sum(len(it.token_ids) for it in items) <= budget
                and sum(len(it.token_ids) * w for it, w in zip(items, width)) <= entry_budget)
        assert fits or all(reach[a][b] for a in range(n) for b in range(n) if a != b) and n > 1
        return
    next_token, first_pass, last_pass = [0] * n, [None] * n, [None] * n
    for p, pieces in enumerate(passes):
        for i, start, count in pieces:
            assert count >= 1 and start == next_token[i]
            next_token[i] += count
            first_pass[i] = p if first_pass[i] is None else first_pass[i]
            last_pass[i] = p
        tokens = sum(c for _, _, c in pieces)
        entries = sum(c * width[i] for i, _, c in pieces)
        if tokens > budget or entries > entry_budget:
            alone = len(pieces) == 1 and pieces[0][2] == 1 and width[pieces[0][0]] > entry_budget
            group = len(pieces) > 1 and all(reach[a][b] for a, _, _ in pieces for b, _, _ in pieces if a != b)
            assert alone or group, (p, pieces, budget, entry_budget, width)
    assert next_token == [len(it.token_ids) for it in items]
    for r in range(n):
        for w in range(n):
            if edge[r][w] and not reach[w][r]:
                assert first_pass[r] >= last_pass[w], f"item {r} reads item {w} before it is complete"


def test_a_wide_step_is_split_by_its_attention_entries():
    """200 tokens over a 50-segment view with room for 1,000 entries a pass: five passes of
    20 tokens, then the rest; a step of narrow views is not split by entries."""
    seg = {i: SimpleNamespace(id=i) for i in range(60)}
    wide = StepItem(seg[0], list(range(200)), [(seg[i], 0) for i in range(1, 50)] + [(seg[0], 0)])
    passes = split_passes([wide], 4096, 1000)
    assert [p[0][2] for p in passes] == [20] * 10, passes
    narrow = [StepItem(seg[i], [1], [(seg[i], 0)]) for i in range(50)]
    assert split_passes(narrow, 4096, 1000) is None


def test_a_join_over_many_segments_in_passes_bounded_by_entries_matches_one_pass(pair, monkeypatch):
    """A session join whose header reads 12 children's segments, with room for 60 attention
    entries a pass (the engine's bound is 1 GiB of partial states): split into passes of a
    few tokens, it samples and scores as one pass does, and leaves no page held."""
    one = pair[0]
    V = one.config.vocab_size
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)

    def run(llm):
        with llm.session(random_ids(9, V, 21)) as s:
            kids = s.fork(s.root, [random_ids(3, V, 30 + i) for i in range(12)])
            s.generate(kids, greedy)
            j = s.join(kids, header=random_ids(25, V, 22))
            sizes = count_passes(llm, monkeypatch)
            out, = s.generate([j], greedy)
            monkeypatch.undo()
        return sizes, out

    (s1, a) = run(one)
    one_entries = one.runner.max_pass_entries
    assert one_entries > 10 ** 5  # (float32, 4 heads of 32: ~2 million)
    try:
        one.runner.max_pass_entries = 60
        (s2, b) = run(one)
    finally:
        one.runner.max_pass_entries = one_entries
    assert s1[0] == 37 and len(s2) > len(s1) and max(s2) < 37, (s1, s2)  # 25 + the children's last tokens
    assert a.token_ids == b.token_ids
    assert max(abs(x[t] - y[t]) for x, y in zip(a.logprobs, b.logprobs) for t in x) < 1e-4
    assert one.cache_stats()["pages_used"] == 0


def test_a_session_step_that_fails_in_a_later_pass_is_redone_whole(pair, monkeypatch):
    """A session outlives a failed step: after a failure in the fourth of a prompt's passes,
    every pass's appends are undone (one segment grown four times, rolled back to before
    the first), so the next generate writes the prompt once, at its positions."""
    _, chunked = pair
    prompt = random_ids(40, chunked.config.vocab_size, 11)
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    with chunked.session(prompt) as s:
        want = s.generate([s.root], greedy)[0].token_ids
    real, calls = chunked.model.forward, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    s = chunked.session(prompt)
    monkeypatch.setattr(chunked.model, "forward", failing)
    with pytest.raises(KeyboardInterrupt):
        s.generate([s.root], greedy)
    monkeypatch.setattr(chunked.model, "forward", real)
    assert s.generate([s.root], greedy)[0].token_ids == want
    s.close()
    assert chunked.cache_stats()["pages_used"] == 0
