"""The C++ plan builder (torch.ops.loom.build_plan) against build_plan_py, exactly."""
from __future__ import annotations

import random

import pytest
import torch

from engine.attention.plan import AttentionPlan, ThreadStep, build_plan_py
from conftest import i32

_ops = pytest.importorskip("engine._ops", reason="engine._C is not built (pip install -e .)")


def random_tree(seed: int, n_threads: int, max_len: int = 300, page_size: int = 16):
    """Segments form a tree (prompt -> forks); each thread owns a leaf and views its root
    path, plus random other segments (Hogwild-style), with random shifts."""
    rng = random.Random(seed)
    parent = {0: None}
    while len(parent) < 2 * n_threads + 1:
        parent[len(parent)] = rng.randrange(len(parent))
    seg_len = {s: rng.randint(1, max_len) for s in parent}
    pages = list(range(sum(-(-n // page_size) for n in seg_len.values()) + 5))
    rng.shuffle(pages)
    seg_pages, i = {}, 0
    for s, n in seg_len.items():
        k = -(-n // page_size)
        seg_pages[s] = pages[i:i + k]
        i += k
    threads = []
    for own in rng.sample(sorted(parent), n_threads):
        path, s = [], own
        while s is not None:
            path.append(s)
            s = parent[s]
        view = [(s, 0) for s in reversed(path)]
        extra = rng.sample(sorted(set(parent) - set(path)), rng.randint(0, min(5, len(parent) - len(path))))
        for s in extra:
            view.insert(rng.randint(0, len(view)), (s, rng.randint(-1000, 1000)))
        threads.append(ThreadStep(view, own, rng.randint(1, min(5, seg_len[own]))))
    return threads, seg_len, seg_pages


def assert_same(a: AttentionPlan, b: AttentionPlan):
    for name in ("kv_indptr", "kv_page_ids", "kv_len", "q_indptr", "q_rows", "shift", "causal_limit",
                 "merge_indptr", "merge_entries"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.int32, name
        assert torch.equal(x, y), name
    assert a.num_rows == b.num_rows and a.has_shift == b.has_shift


@pytest.mark.parametrize("seed", range(20))
def test_random_trees(seed):
    threads, seg_len, seg_pages = random_tree(seed, n_threads=1 + seed % 9)
    assert_same(_ops.build_plan_cpp(threads, seg_len, seg_pages), build_plan_py(threads, seg_len, seg_pages))


def test_large_tree():
    threads, seg_len, seg_pages = random_tree(123, n_threads=200, max_len=40)
    assert_same(_ops.build_plan_cpp(threads, seg_len, seg_pages), build_plan_py(threads, seg_len, seg_pages))


def test_edge_cases():
    """Duplicate segments in one view, a thread with no new rows, sparse segment ids."""
    seg_len = {10: 5, 7000000: 3, 42: 9}
    seg_pages = {10: [4], 7000000: [1], 42: [0, 2]}
    threads = [ThreadStep([(10, 0), (42, 3), (10, -2)], 42, 2),
               ThreadStep([(7000000, 0)], 7000000, 0),
               ThreadStep([(7000000, 1), (10, 0)], 10, 1)]
    assert_same(_ops.build_plan_cpp(threads, seg_len, seg_pages), build_plan_py(threads, seg_len, seg_pages))
    assert_same(_ops.build_plan_cpp([], {}, {}), build_plan_py([], {}, {}))


def test_unknown_segment_is_an_error():
    with pytest.raises(KeyError):
        _ops.build_plan_cpp([ThreadStep([(3, 0)], 0, 1)], {0: 1}, {0: [0]})
    with pytest.raises(KeyError, match="not a known segment"):
        _ops.build_plan_cpp([ThreadStep([(2, 0)], 0, 1)], {0: 1, 1: 1, 3: 1}, {0: [0], 1: [1], 3: [2]})


def test_own_segment_shorter_than_its_new_tokens_is_an_error():
    """A thread's own segment's length counts its new tokens; shorter, the causal limits of
    its first rows would be negative (they saw none of their own tokens, silently)."""
    with pytest.raises(RuntimeError, match="own segment 0 has 3 tokens, fewer than its 5 new ones"):
        torch.ops.loom.build_plan(i32([0, 1]), i32([0]), i32([0]), i32([0]), i32([5]), i32([3]), i32([0, 1]),
                                  i32([0]))
    with pytest.raises(ValueError, match="own segment 0 has 3 tokens, fewer than its 5 new ones"):
        build_plan_py([ThreadStep([(0, 0)], 0, 5)], {0: 3}, {0: [0]})


def test_non_monotone_view_indptr_is_an_error():
    """thread_view_indptr [0, 2^20, 3]: thread 0's range would run far past view_seg; the
    whole indptr is checked before any of it is read."""
    with pytest.raises(RuntimeError, match="thread_view_indptr decreases at index 2"):
        torch.ops.loom.build_plan(i32([0, 1 << 20, 3]), i32([0, 0, 0]), i32([0, 0, 0]), i32([0, 0]),
                                  i32([1, 1]), i32([1]), i32([0, 1]), i32([0]))


def test_array_entry_point():
    threads, seg_len, seg_pages = random_tree(7, n_threads=6)
    ref = build_plan_py(threads, seg_len, seg_pages)
    n_seg = max(seg_len) + 1
    indptr = [0]
    for th in threads:
        indptr.append(indptr[-1] + len(th.view))
    page_indptr = [0]
    for s in range(n_seg):
        page_indptr.append(page_indptr[-1] + len(seg_pages[s]))
    plan = _ops.build_plan_arrays(
        i32(indptr), i32([s for th in threads for s, _ in th.view]), i32([x for th in threads for _, x in th.view]),
        i32([th.own for th in threads]), i32([th.num_new for th in threads]),
        i32([seg_len[s] for s in range(n_seg)]), i32(page_indptr),
        i32([p for s in range(n_seg) for p in seg_pages[s]]))
    assert_same(plan, ref)


def _plans_equal(a: AttentionPlan, b: AttentionPlan):
    for f in ("kv_indptr", "kv_page_ids", "kv_len", "q_indptr", "q_rows", "shift", "causal_limit",
              "merge_indptr", "merge_entries"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert (a.num_rows, a.has_shift) == (b.num_rows, b.has_shift)


@pytest.mark.parametrize("seed", range(4))
def test_runner_flat_plan_matches_threadstep_plan(model_dir, seed):
    """The runner's step plan from flat arrays (views' arrays kept between steps, the
    cache's whole segment table) equals the ThreadStep-list plan, over steps in which
    segments grow, views are reassigned, list views are mixed in, and the cache holds
    segments no view names."""
    from engine import LLM
    from engine.step import StepBatch, StepItem

    llm = LLM(model_dir("qwen3"), kv_cache_tokens=4096, page_size=4)
    runner, cache = llm.runner, llm.cache
    assert runner._plan_arrays is not None
    rng = random.Random(seed)
    segs = [cache.new_segment(rng.randint(0, 50)) for _ in range(12)]
    for s in segs:
        cache.append_slots(s, rng.randint(1, 9))
    cache.release_segment(segs.pop(3))  # a free id below the highest
    owners = segs[:5]
    views = {o.id: tuple((s, rng.randint(-20, 20)) for s in rng.sample(segs[5:], 3)) + ((o, 0),) for o in owners}
    for step in range(4):
        if step == 2:  # reassign one view; make another a list
            o = owners[0]
            views[o.id] = tuple((s, 0) for s in rng.sample(segs[5:], 2)) + ((o, 0),)
            views[owners[1].id] = list(views[owners[1].id])
        items = [StepItem(o, [1] * rng.randint(1, 3), views[o.id]) for o in owners]
        for it in items:
            cache.append_slots(it.own, len(it.token_ids))
        _plans_equal(runner._plan_flat(StepBatch(items)), runner._plan_threads(StepBatch(items)))
    # Only the tuple views of the last step are kept.
    assert {id(v) for v, _, _ in runner._views.values()} == {id(views[o.id]) for o in owners
                                                               if isinstance(views[o.id], tuple)}
    stranger = cache.new_segment(0)
    cache.release_segment(stranger)  # gone from the cache, still named by a view
    with pytest.raises(KeyError, match="not a known segment"):
        runner._plan_flat(StepBatch([StepItem(owners[0], [1], ((stranger, 0), (owners[0], 0)))]))


def test_segment_table_and_smallest_free_ids():
    """The runner's per-step segment table (indexed by segment id, live segments only) against
    a plain construction, on random live sets with gaps; and the cache hands out the smallest
    free id, so that after a burst of segments the table is as small as the live set again
    (it was as long as the largest id ever used: 1,792 entries a step after one batch of 200
    prompts x 8 samples, 6x the per-step planning time for every later request)."""
    from engine.cache import KVCache
    from engine.runner import segment_table
    cache = KVCache(num_layers=1, num_kv_heads=1, head_dim=4, num_pages=64, page_size=2,
                    dtype=torch.float32, device="cpu")
    res = cache.reserve(64)
    rng = random.Random(0)
    segs = [cache.new_segment(0, res) for _ in range(40)]
    for rnd in range(30):
        rng.shuffle(segs)
        for s in segs[:rng.randrange(len(segs) + 1)]:
            cache.release_segment(s)
        segs = [s for s in segs if s.id in cache.segments and cache.segments[s.id] is s]
        for _ in range(rng.randrange(8)):
            free = min(set(range(len(cache.segments) + 1)) - set(cache.segments))
            segs.append(cache.new_segment(0, res))
            assert segs[-1].id == free  # (the smallest free id)
        for s in segs:
            if rng.random() < 0.3 and cache.pages_free > 0:
                cache.append_slots(s, rng.randrange(1, 4))
        live = sorted(cache.segments)
        lens, indptr, pages = segment_table(cache.segments)
        n = max(live, default=-1) + 1
        assert list(lens) == [cache.segments[i].length if i in cache.segments else -1 for i in range(n)]
        want = [0]
        for i in range(n):
            want.append(want[-1] + (len(cache.segments[i].pages) if i in cache.segments else 0))
        assert list(indptr) == want and list(pages) == [p for i in range(n) if i in cache.segments
                                                        for p in cache.segments[i].pages]
        some = set(rng.sample(live, len(live) // 2))  # (the segments a step's views read)
        lens, indptr, pages = segment_table(cache.segments, some)
        n = max(some, default=-1) + 1
        assert list(lens) == [cache.segments[i].length if i in some else -1 for i in range(n)]
        assert list(pages) == [p for i in sorted(some) for p in cache.segments[i].pages]
        assert all(indptr[i + 1] - indptr[i] == (len(cache.segments[i].pages) if i in some else 0) for i in range(n))
        gone = max(live, default=-1) + 2  # (a view naming a freed segment, the largest id: -1, no pages)
        lens, indptr, pages = segment_table(cache.segments, some | {gone})
        assert len(lens) == gone + 1 and len(indptr) == gone + 2 and lens[gone] == -1
        assert list(pages) == [p for i in sorted(some) for p in cache.segments[i].pages]
        assert all(indptr[i + 1] - indptr[i] == (len(cache.segments[i].pages) if i in some else 0)
                   for i in range(gone + 1))
    for s in segs:
        cache.release_segment(s)
    assert cache.new_segment(0, res).id == 0


def test_runner_does_not_reuse_the_arrays_of_a_list_view(model_dir):
    """The runner reuses last step's flat view arrays only when every view is an immutable
    tuple it keeps: a list view edited in place between steps (same object, other segments
    or shifts) is read anew, not taken from last step's arrays."""
    from engine import LLM
    from engine.step import StepBatch, StepItem

    llm = LLM(model_dir("qwen3"), kv_cache_tokens=1024, page_size=4)
    runner, cache = llm.runner, llm.cache
    assert runner._plan_arrays is not None
    a, b, own = (cache.new_segment(0) for _ in range(3))
    for s, n in ((a, 5), (b, 7), (own, 2)):
        cache.append_slots(s, n)
    view = [(a, 0), (own, 0)]
    for step in range(3):
        if step:  # edited in place: the other segment, then another shift
            view[0] = (b, 0) if step == 1 else (b, 3)
        items = [StepItem(own, [1], view)]
        cache.append_slots(own, 1)
        _plans_equal(runner._plan_flat(StepBatch(items)), runner._plan_threads(StepBatch(items)))
    for s in (a, b, own):
        cache.release_segment(s)


def test_runner_keeps_the_arrays_of_tuple_views_between_steps(model_dir):
    """The flat view arrays are built once per tuple view, not once a step: a step with the
    same views in the same order reuses last step's flat arrays whole, and a step with other
    items reuses the arrays of each view it kept (the plan builder's ~1 ms at 1,000 threads)."""
    from engine import LLM
    from engine.step import StepBatch, StepItem

    llm = LLM(model_dir("qwen3"), kv_cache_tokens=1024, page_size=4)
    runner, cache = llm.runner, llm.cache
    assert runner._plan_arrays is not None
    a, b, x, y = (cache.new_segment(0) for _ in range(4))
    for s, n in ((a, 5), (b, 7), (x, 2), (y, 3)):
        cache.append_slots(s, n)
    vx, vy = ((a, 0), (x, 0)), ((b, 2), (a, 0), (y, 0))

    def plan(items):
        for it in items:
            cache.append_slots(it.own, 1)
        _plans_equal(runner._plan_flat(StepBatch(items)), runner._plan_threads(StepBatch(items)))
    plan([StepItem(x, [1], vx), StepItem(y, [1], vy)])
    flat, ent = runner._flat, runner._views[id(vx)]
    plan([StepItem(x, [1], vx), StepItem(y, [1], vy)])
    assert runner._flat is flat  # the same views in the same order
    plan([StepItem(x, [1], vx)])
    assert runner._flat is not flat and runner._views == {id(vx): ent}  # (vx's arrays kept)
    assert runner._views[id(vx)] is ent
    for s in (a, b, x, y):
        cache.release_segment(s)


def test_runner_without_the_extension_plans_through_threadstep_lists(model_dir, make_llm, monkeypatch):
    """Without engine._C (a build that failed: the 'torch' backend's fallback) the runner
    plans each step with build_plan_py over ThreadStep lists, and samples what the C++
    plan builder's engine samples (forked threads over a shared prompt)."""
    import engine.attention
    from engine import LLM, SamplingParams

    want_llm = make_llm("qwen3", attention_backend="torch")
    monkeypatch.setattr(engine.attention, "ops_available", lambda: False)
    llm = LLM(model_dir("qwen3"), attention_backend="torch")
    monkeypatch.undo()
    assert llm.runner._plan_arrays is None and llm.runner._build_plan is build_plan_py
    p = SamplingParams(n=3, temperature=0.9, max_tokens=5, seed=7, logprobs=0, ignore_eos=True)
    prompts = [list(range(3, 30)), [5, 9]]
    got, want = llm.generate(prompts, p), want_llm.generate(prompts, p)
    for g, w in zip(got, want):
        assert [c.token_ids for c in g.outputs] == [c.token_ids for c in w.outputs]
        for cg, cw in zip(g.outputs, w.outputs):
            assert max(abs(a[t].logprob - b[t].logprob) for a, b in zip(cg.logprobs, cw.logprobs) for t in a) < 1e-4
    assert llm.cache_stats()["pages_used"] == 0


def test_build_plan_fake_indptr_sizes():
    """kv_indptr and q_indptr have one more element than kv_len (jobs + 1), symbolically."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, statically_known_true
    args = (i32([0, 2, 3]), i32([0, 1, 0]), i32([0, 0, 4]), i32([1, 2]), i32([2, 1]), i32([10, 4, 3]),
            i32([0, 1, 2, 3]), i32([5, 6, 7]))
    mode = FakeTensorMode(shape_env=ShapeEnv())
    fargs = [mode.from_tensor(a) for a in args]
    with mode:
        out = torch.ops.loom.build_plan(*fargs)
    jobs = out[2].shape[0]
    assert statically_known_true(out[0].shape[0] == jobs + 1)
    assert statically_known_true(out[3].shape[0] == jobs + 1)
    assert all(o.dtype == torch.int32 for o in out)


def test_negative_segment_ids_are_renumbered():
    seg_len, seg_pages = {-5: 3, 2: 2}, {-5: [0], 2: [1]}
    threads = [ThreadStep([(-5, 0), (2, 1)], 2, 2), ThreadStep([(-5, 0)], -5, 1)]
    assert_same(_ops.build_plan_cpp(threads, seg_len, seg_pages), build_plan_py(threads, seg_len, seg_pages))


def test_unknown_segment_with_sparse_ids_is_an_error():
    """Sparse ids take the renumbering path: an unknown one must still be a KeyError, not
    silently become another segment."""
    seg_len, seg_pages = {0: 1, 7000000: 1}, {0: [0], 7000000: [1]}
    with pytest.raises(KeyError):
        _ops.build_plan_cpp([ThreadStep([(5, 0)], 0, 1)], seg_len, seg_pages)
    with pytest.raises(KeyError):
        _ops.build_plan_cpp([ThreadStep([(0, 0)], 5, 1)], seg_len, seg_pages)


def _cache():
    from engine.cache import KVCache
    return KVCache(num_layers=1, num_pages=8, page_size=4, num_kv_heads=1, head_dim=2, dtype=torch.float32,
                   device="cpu")


def test_rollback_append_restores_lengths_pages_and_reservations():
    cache = _cache()
    res = cache.reserve(2)
    seg = cache.new_segment(0, res)
    cache.append_slots(seg, 3)
    full = cache.reserve(1)
    seg2 = cache.new_segment(0, full)
    cache.append_slots(seg2, 4)  # its reservation is used up
    assert (res.pages, full.pages) == (1, 0)
    before = cache.stats()
    cache.begin_append()
    cache.append_slots(seg, 3)   # a page from res
    cache.append_slots(seg2, 1)  # a page from the free pool (full has none left)
    cache.rollback_append()
    assert (seg.length, len(seg.pages), seg2.length, len(seg2.pages)) == (3, 1, 4, 1)
    assert (res.pages, full.pages) == (1, 0)
    assert cache.stats() == before
    assert cache.append_slots(seg, 1) == [seg.pages[0] * 4 + 3]


def test_release_segment_after_its_reservation_closed_frees_to_pool():
    cache = _cache()
    res = cache.reserve(3)
    seg = cache.new_segment(0, res)
    cache.append_slots(seg, 5)  # 2 pages
    cache.release(res)
    cache.release_segment(seg)
    assert res.pages == 0
    assert cache.stats()["pages_reserved"] == 0 and cache.pages_free == 8 and cache.pages_unreserved == 8


def test_page_bookkeeping_is_compact_and_keeps_the_page_order():
    """A cache of many small pages (page_size 1, a model of few K/V bytes a token) keeps its
    free pages in a few bytes each: the list of every page id as Python ints that the cache
    built when made took ~45 bytes a page, uncounted by LLM's memory check (a 10M-page cache
    of 8-byte tokens took 80 MB of K/V and 450 MB of bookkeeping; at 3e8 pages, a
    MemoryError or the OOM killer). Pages are still taken in order, the last freed first."""
    import tracemalloc
    from engine.cache import KVCache
    n = 1 << 20
    tracemalloc.start()
    try:
        cache = KVCache(num_layers=1, num_pages=n, page_size=1, num_kv_heads=1, head_dim=2,
                        dtype=torch.bfloat16, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * n, peak  # (torch's allocations are not traced: the bookkeeping's only)
    assert (cache.pages_free, cache.pages_used, cache.pages_unreserved) == (n, 0, n)
    res = cache.reserve(4)
    a, b = cache.new_segment(0, res), cache.new_segment(0, res)
    assert cache.append_slots(a, 2) == [0, 1] and cache.append_slots(b, 1) == [2]
    cache.release_segment(a)  # pages 0 and 1 back: 1 is taken first, then 0, then 3
    c = cache.new_segment(0, res)
    assert cache.append_slots(c, 3) == [1, 0, 3]
    assert (cache.pages_free, cache.pages_used) == (n - 4, 4)
    cache.begin_append()
    cache.append_slots(b, 2)
    assert cache.pages_used == 6
    cache.rollback_append()
    assert (cache.pages_free, cache.pages_used) == (n - 4, 4)
    for s in (b, c):
        cache.release_segment(s)
    cache.release(res)
    assert cache.stats() == {"pages_total": n, "pages_free": n, "pages_used": 0, "pages_reserved": 0,
                             "page_size": 1, "segments": 0}


def _plan_inputs(**change):
    """build_plan's arrays for one thread that views segments 0 and 1 and owns 1 (two
    segments of one page each), with some replaced (lists become int32 tensors)."""
    a = dict(thread_view_indptr=[0, 2], view_seg=[0, 1], view_shift=[0, 0], thread_own_seg=[1],
             thread_num_new=[1], seg_len=[3, 2], seg_page_indptr=[0, 1, 2], seg_page_ids=[4, 5])
    a.update(change)
    return [v if isinstance(v, torch.Tensor) else i32(v) for v in a.values()]


# seg_len / seg_page_indptr as views of longer arrays whose next entries make a valid
# segment 2: an id one past the table is read from there unless the range check refuses it.
_LEN_2 = torch.tensor([3, 2, 5], dtype=torch.int32)[:2]
_INDPTR_2 = torch.tensor([0, 1, 2, 2], dtype=torch.int32)[:3]


@pytest.mark.parametrize("change,match", [
    (dict(thread_own_seg=[2], seg_len=_LEN_2, seg_page_indptr=_INDPTR_2), r"thread_own_seg\[0\] = 2 is not a known"),
    (dict(view_seg=[0, 2], seg_len=_LEN_2, seg_page_indptr=_INDPTR_2), r"view_seg\[1\] = 2 is not a known"),
    (dict(seg_page_indptr=[0, 1, 3]), "end within seg_page_ids"),
    (dict(seg_page_indptr=[0, 2, 1]), "seg_page_indptr decreases at index 2"),
    (dict(thread_view_indptr=[1, 2]), "must run from 0 to 2"),
    (dict(thread_num_new=[-1]), r"thread_num_new\[0\] = -1 is negative"),
])
def test_array_inputs_out_of_range_are_errors(change, match):
    """The array entry point checks every id, index and count it reads: an id one past the
    segment table, a page range past seg_page_ids or running backwards, a view range not
    starting at 0, a negative number of new rows."""
    assert len(torch.ops.loom.build_plan(*_plan_inputs())) == 9  # (the unchanged inputs are valid)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.loom.build_plan(*_plan_inputs(**change))
