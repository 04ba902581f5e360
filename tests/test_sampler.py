"""The sampler's inverse-CDF pick: the C++ op (csrc/sample_cpu.cpp) against the plain
cumulative-sum search, zero-probability tokens, and errors; the filters' and penalties'
arithmetic on rows worked out by hand."""
from __future__ import annotations

import pytest
import torch

import engine.linear_ops  # noqa: F401  registers torch.ops.loom.* and their fakes
from engine import sampler
from conftest import torch_threads


def _reference(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """First index whose prefix sum (float64) exceeds u * total."""
    out = []
    for p, x in zip(probs.double(), u.double()):
        cdf = p.cumsum(0)
        out.append(int((cdf > x * cdf[-1]).nonzero()[0]))
    return out


@pytest.mark.parametrize("V", [1, 7, 256, 257, 1000, 32768])
def test_pick_matches_prefix_sum_search(V):
    g = torch.Generator().manual_seed(V)
    probs = torch.rand(12, V, generator=g) ** 4
    probs[:, ::3] = 0.0  # zero-probability tokens
    probs[:, -1] = 0.0
    if V == 1:
        probs[:] = 1.0
    u = torch.rand(12, generator=g)
    u[0], u[1] = 0.0, 1.0 - 2 ** -24
    got = torch.ops.loom.pick_from_probs(probs, u).tolist()
    want = _reference(probs, u)
    for r, (a, b) in enumerate(zip(got, want)):
        assert probs[r, a] > 0, f"row {r}: picked a token of zero probability"
        if a != b:  # only where float32 and float64 prefix sums straddle the target
            cdf = probs[r].double().cumsum(0)
            gap = (cdf[min(a, b)] - u[r].double() * cdf[-1]).abs().item()
            assert gap < 1e-5 * cdf[-1].item(), f"row {r}: picked {a}, prefix sums say {b}"


def test_pick_fallback_agrees_and_frequencies_follow_probs():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.0, 0.4])
    u = torch.rand(20000, generator=g)
    probs = p.expand(20000, -1).contiguous()
    op = torch.ops.loom.pick_from_probs(probs, u)
    counts = torch.bincount(op, minlength=6).double() / 20000
    assert counts[1] == 0 and counts[4] == 0
    torch.testing.assert_close(counts, p.double(), atol=0.015, rtol=0)
    # pick's torch fallback (taken without engine._C, off the CPU, or for float64 rows) is the
    # same rule: the same tokens but where the float32 / float64 prefix sums straddle u
    fallback = torch.tensor(sampler.pick(probs.double(), u))
    assert (fallback != op).sum().item() <= 5
    assert sampler.pick(torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64), torch.tensor([0.9999])) == [1]


def test_pick_errors_and_opcheck():
    with pytest.raises(RuntimeError, match="or no positive one"):
        torch.ops.loom.pick_from_probs(torch.zeros(2, 5), torch.rand(2))
    # one NaN probability: an error (it used to return the last token, whatever u was)
    p = torch.rand(2, 1000)
    p[1, 17] = float("nan")
    with pytest.raises(RuntimeError, match="row 1 has a NaN / inf probability"):
        torch.ops.loom.pick_from_probs(p, torch.rand(2))
    with pytest.raises(RuntimeError, match="one number per row"):
        torch.ops.loom.pick_from_probs(torch.rand(2, 5), torch.rand(3))
    torch.library.opcheck(torch.ops.loom.pick_from_probs, (torch.rand(3, 300), torch.rand(3)))


def test_sample_mixes_greedy_and_random_rows():
    from engine.sampling_params import SamplingParams
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 50, generator=g) * 3
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(top_k=1), SamplingParams(temperature=1.0, top_k=5, seed=2)]
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    tokens, lp = sampler.sample(logits, params, gens)
    assert lp is None  # nobody asked for log-probs
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert tokens[3] in logits[3].topk(5).indices.tolist()
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    assert sampler.sample(logits, params, gens)[0] == tokens  # same generators, same draw


def test_each_row_of_a_mixed_batch_draws_as_alone():
    """Greedy, plain and filtering rows of different params in one batch (all five kinds,
    in either order, or two of them): each row takes its own params' path and draws its
    token alone (a greedy row its argmax, a random row its own draw)."""
    from engine.sampling_params import SamplingParams as SP
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(16))
    x[1:3] = 0.0  # (nearly uniform: an unfiltered draw is seldom the argmax)
    x[2, 5] = 0.5
    params = [SP(temperature=0), SP(temperature=1.0), SP(temperature=1.0, top_k=1),
              SP(temperature=0.8, top_p=0.5), SP(temperature=1.2, min_p=0.3), SP(temperature=0.05)]
    x = torch.cat([x, x[1:2]])
    x[5, 9] = 0.5  # (at a low temperature, mostly token 9; at 1.0, seldom)
    for order in ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0], [0, 1], [1, 0], [1, 3], [3, 1], [2, 4], [1, 5], [5, 1]):
        got = sampler.sample(x[order], [params[r] for r in order], _gens(order))[0]
        alone = [sampler.sample(x[r:r + 1], [params[r]], _gens([r]))[0][0] for r in order]
        assert got == alone, order
        if len(order) == 5:
            assert alone[order.index(0)] == int(x[0].argmax()) and alone[order.index(2)] == int(x[2].argmax())
            assert alone[order.index(1)] != 0


def test_a_rows_draw_does_not_depend_on_its_batch():
    """A seeded row draws the same token alone or batched with rows that filter (top-k /
    top-p / min-p): its path is chosen by its own parameters. (The whole batch used to take
    the filtered path when one row filtered; it rounds some probabilities differently from
    the fused draw, and about 1 draw in 2,000 at a 32k vocabulary changed.)"""
    from engine.sampling_params import SamplingParams
    g = torch.Generator().manual_seed(5)
    V = 32000
    plain = SamplingParams(temperature=0.9)
    others = [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0, min_p=0.05)]
    for i in range(4000):
        logits = torch.randn(3, V, generator=g) * 2 if i % 50 == 0 else logits
        alone = sampler.sample(logits[:1], [plain], [torch.Generator().manual_seed(i)])[0]
        batch = sampler.sample(logits, [plain] + others,
                               [torch.Generator().manual_seed(s) for s in (i, 7, 8)])[0]
        assert batch[0] == alone[0], i
        assert batch[1] in logits[1].topk(5).indices.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_logits_draw_as_their_float32_values(dtype):
    """16-bit logits sample (and give log-probs) as the same values in float32: a softmax
    and prefix sums taken in 16 bits drew from another distribution (bfloat16: tokens of the
    flat tail far too often)."""
    from engine.sampling_params import SamplingParams as SP
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(64, 5003, generator=g) * 2).to(dtype)
    params = [SP(temperature=1.0, seed=1, logprobs=2), SP(temperature=0.7, top_p=0.9), SP(top_k=50, min_p=0.01)]
    params = [params[r % 3] for r in range(64)]
    tokens, lp = sampler.sample(x, params, _gens(range(64)))
    want, want_lp = sampler.sample(x.float(), params, _gens(range(64)))
    assert tokens == want and lp.dtype == torch.float32 and torch.equal(lp, want_lp)


@pytest.mark.parametrize("V", [1, 255, 4097, 32768])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_pick_from_logits_is_softmax_then_pick(V, temperature):
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(9, V, generator=g) * 4
    logits[:, 1::5] = float("-inf")  # masked tokens
    if V == 1:
        logits[:] = 0.3
    u = torch.rand(9, generator=g)
    temps = torch.full((9,), temperature)
    got = torch.ops.loom.pick_from_logits(logits, temps, u).tolist()
    probs = (logits / temperature).softmax(-1)
    want = _reference(probs, u)
    for r, (a, b) in enumerate(zip(got, want)):
        assert probs[r, a] > 0, f"row {r}: picked a masked token"
        if a != b:  # only where the two exponentials straddle the target
            cdf = probs[r].double().cumsum(0)
            assert abs(cdf[min(a, b)].item() - u[r].item()) < 1e-5, f"row {r}: picked {a}, softmax says {b}"


def test_pick_from_logits_frequencies_and_errors():
    g = torch.Generator().manual_seed(3)
    logits = torch.tensor([1.0, float("-inf"), 0.0, 2.0, -1.0])
    temps = torch.full((20000,), 0.7)
    got = torch.ops.loom.pick_from_logits(logits.expand(20000, -1).contiguous(), temps, torch.rand(20000, generator=g))
    freq = torch.bincount(got, minlength=5).double() / 20000
    torch.testing.assert_close(freq, (logits / 0.7).softmax(-1).double(), atol=0.015, rtol=0)
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        torch.ops.loom.pick_from_logits(torch.randn(2, 5), torch.tensor([1.0, 0.0]), torch.rand(2))
    with pytest.raises(RuntimeError, match="or no finite one"):
        torch.ops.loom.pick_from_logits(torch.full((1, 4), float("-inf")), torch.ones(1), torch.rand(1))
    for bad in (float("nan"), float("inf")):  # (a NaN used to give the last token every time)
        x = torch.randn(1, 1000)
        x[0, 3] = bad
        with pytest.raises(RuntimeError, match="has a NaN / \\+inf logit"):
            torch.ops.loom.pick_from_logits(x, torch.ones(1), torch.rand(1))
    torch.library.opcheck(torch.ops.loom.pick_from_logits, (torch.randn(3, 300), torch.ones(3), torch.rand(3)))


def test_top_k_1_keeps_ties_and_ranks_count_them():
    """top_k=1 with a temperature is not greedy: as vLLM's top-k (logits below the k-th
    value masked), tokens tied at the top stay in and are drawn evenly (it took the lowest
    id every time). A chosen token's rank counts the tokens at least as likely (vLLM v1's)."""
    from engine.sampling_params import SamplingParams
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    counts = [0] * 6
    for i in range(1500):
        tok, _ = sampler.sample(logits, [SamplingParams(temperature=1.0, top_k=1)],
                                [torch.Generator().manual_seed(i)])
        counts[tok[0]] += 1
    assert counts[0] == counts[3] == counts[5] == 0 and min(counts[1], counts[2], counts[4]) > 400, counts
    tok, _ = sampler.sample(logits, [SamplingParams(temperature=0.0, top_k=1)], [torch.Generator()])
    assert tok == [1]  # (greedy: the first of the tied tokens, as argmax)
    lp = logits[0].log_softmax(-1)
    got = sampler.top_logprobs(lp, 2, 0)
    assert list(got) == [2] and got[2].rank == 3  # (three tokens at least as likely: ranks 3, as vLLM v1)
    got = sampler.top_logprobs(lp, 3, 1)
    assert len(got) == 2 and got[3].rank == 4 and sorted(r.rank for r in got.values()) == [1, 4]


def test_filters_temper_first_and_top_p_keeps_the_smallest_prefix():
    """Temperature divides the logits before min-p / top-k / top-p look at them (vLLM's
    order), and top-p keeps the smallest prefix whose mass reaches it (a prefix of exactly
    top_p's mass takes no more)."""
    from engine.sampling_params import SamplingParams as SP
    kept = lambda x: x.isfinite().nonzero().flatten().tolist()  # noqa: E731
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    got = sampler._filtered_logprobs(logits, SP(temperature=0.5, top_k=3))
    torch.testing.assert_close(got[:3], torch.log_softmax(logits[:3] / 0.5, -1))
    assert got[3] == float("-inf")
    three = torch.tensor([0.5, 0.3, 0.2]).log()
    assert kept(sampler._filtered_logprobs(three, SP(temperature=1.0, top_p=0.6))) == [0, 1]
    assert kept(sampler._filtered_logprobs(three, SP(temperature=0.5, top_p=0.6))) == [0]  # (0.66 at T=0.5)
    assert kept(sampler._filtered_logprobs(torch.zeros(2), SP(top_p=0.5))) == [0]
    # min-p on the tempered probabilities: 0.3 / 0.5 = 0.6 at T=1, sqrt(0.6) = 0.77 at T=2
    assert kept(sampler._filtered_logprobs(three, SP(temperature=1.0, min_p=0.7))) == [0]
    assert kept(sampler._filtered_logprobs(three, SP(temperature=2.0, min_p=0.7))) == [0, 1]


def test_penalties_arithmetic():
    """Repetition divides a seen token's positive logit and multiplies a negative one;
    frequency takes its penalty once per time sampled, presence once (vLLM's definitions)."""
    from engine.sampling_params import SamplingParams as SP
    st = sampler.Penalties(SP(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.3), 5,
                           [[0, 1]], "cpu")
    st.add(2)
    st.add(2)
    st.add(3)
    out = sampler.apply_penalties(torch.tensor([[2.0, -2.0, 1.0, 0.5, 4.0]]), [0], [st])
    # token 0 seen: 2 / 2; token 1 seen: -2 * 2; token 2 sampled twice (and so seen): 1 / 2 - 2 * 0.5
    # - 0.3; token 3 once: 0.5 / 2 - 0.5 - 0.3; token 4 untouched
    torch.testing.assert_close(out[0], torch.tensor([1.0, -4.0, 0.5 - 1.0 - 0.3, 0.25 - 0.5 - 0.3, 4.0]))


def test_penalties_touch_only_seen_or_counted_tokens():
    """apply_penalties computes only each state's ids() (tokens seen or counted, carried
    counts included): those are every entry whose penalties are not all 0, and the result is
    the whole-row arithmetic's, bit for bit."""
    from engine.sampling_params import SamplingParams as SP
    V, g = 300, torch.Generator().manual_seed(0)
    carried = torch.zeros(V)
    carried[[5, 77, 299]] = torch.tensor([1.0, 3.0, 2.0])
    states = [sampler.Penalties(SP(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.2), V,
                                [[1, 2, 2, 9], [], [9, 250]], "cpu"),
              sampler.Penalties(SP(presence_penalty=0.7), V, [[3, 4]], "cpu", carried),
              sampler.Penalties(SP(repetition_penalty=0.8), V, [[0]], "cpu")]
    for k, st in enumerate(states):
        for tok in torch.randint(0, V, (20,), generator=g).tolist() + [2, 2, 77]:
            st.add(tok)
        if k == 1:
            st.ids()  # (made, then grown)
            st.add(123)
        ids = st.ids().tolist()
        assert len(ids) == len(set(ids)) and set(ids) == set((st.seen | (st.counts != 0)).nonzero()[:, 0].tolist())
    logits = torch.randn(5, V, generator=g) * 3
    rows = [4, 0, 2]
    out = sampler.apply_penalties(logits, rows, states)
    ref = logits.clone()
    for r, st in zip(rows, states):
        p, x = st.params, logits[r]
        x = torch.where(st.seen, torch.where(x > 0, x / p.repetition_penalty, x * p.repetition_penalty), x)
        ref[r] = x - st.counts * p.frequency_penalty - (st.counts > 0) * p.presence_penalty
    assert torch.equal(out, ref) and torch.equal(logits[[1, 3]], out[[1, 3]])


@pytest.mark.parametrize("fill", [float("-inf"), float("inf"), float("nan")])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.0, -1, 1.0), (0.8, 3, 1.0), (0.8, -1, 0.9)])
@pytest.mark.parametrize("V", [8, 3000])
def test_rows_without_a_finite_logit_raise(fill, temperature, top_k, top_p, V):
    """A row whose logits are all -inf / inf / NaN (float16 overflow, NaN weights) raises
    one FloatingPointError, greedy, sampled or filtered (argmax would return token 0; at
    V=3000 the filters look at a window of the largest logits, not the whole row)."""
    from engine.sampling_params import SamplingParams as SP
    logits = torch.randn(3, V)
    logits[1] = fill
    params = [SP(temperature=temperature, top_k=top_k, top_p=top_p, seed=1)] * 3
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) in batch rows \[1\]"):
        sampler.sample(logits, params, [torch.Generator().manual_seed(i) for i in range(3)])


@pytest.mark.parametrize("fill", [float("-inf"), float("nan")])
def test_rows_without_a_finite_logit_raise_on_torchs_path(fill):
    """The same error from the torch fallback (float64 logits), whose search lands past the
    row's end on a NaN row instead of raising; the other rows' params still filter."""
    from engine.sampling_params import SamplingParams as SP
    logits = torch.randn(3, 50, dtype=torch.float64)
    logits[1] = fill
    with pytest.raises(FloatingPointError, match=r"not finite \(NaN or inf\) in batch rows \[1\]"):
        sampler.sample(logits, [SP(seed=1), SP(temperature=0.5), SP(top_k=3)], _gens([0, 1, 2]))


@pytest.mark.parametrize("op", ["probs", "logits", "fallback"])
def test_pick_at_an_exact_prefix_sum_takes_the_next_token(op):
    """u * total equal to a prefix sum (here inside a 256-token block, and at the end of
    one): the first prefix sum that exceeds it is the next token's. Uniform rows of 512,
    every sum exact."""
    u = torch.tensor([0.25, 0.5, 0.75, 0.0])
    if op == "probs":
        got = torch.ops.loom.pick_from_probs(torch.ones(4, 512), u)
    elif op == "logits":
        got = torch.ops.loom.pick_from_logits(torch.zeros(4, 512), torch.ones(4), u)
    else:  # (pick's torch fallback: float64 rows)
        got = torch.tensor(sampler.pick(torch.ones(4, 512, dtype=torch.float64), u))
    assert got.tolist() == [128, 256, 384, 0]


def test_pick_from_logits_large_logits_and_low_temperature():
    """The exponentials are taken of (logit - max) / temperature: logits far from zero at a
    low temperature draw as the same logits near zero (the tempered logits themselves
    overflow exp). Quarters: logit + offset - max is exact."""
    g = torch.Generator().manual_seed(9)
    logits = torch.randint(-40, 41, (9, 300), generator=g) / 4
    u, temps = torch.rand(9, generator=g), torch.full((9,), 0.3)
    want = torch.ops.loom.pick_from_logits(logits, temps, u)
    for offset in (1000.0, -1000.0):
        assert torch.equal(torch.ops.loom.pick_from_logits(logits + offset, temps, u), want)


def test_pick_from_logits_one_temperature_per_row():
    with pytest.raises(RuntimeError, match="temperature and u must have one number per row"):
        torch.ops.loom.pick_from_logits(torch.randn(3, 5), torch.ones(2), torch.rand(3))
    with pytest.raises(RuntimeError, match="temperature and u must have one number per row"):
        torch.ops.loom.pick_from_logits(torch.randn(3, 5), torch.ones(3), torch.rand(4))


def test_pick_on_two_threads():
    """Rows are split between threads (4 a task): each row draws with its own u and
    temperature."""
    g = torch.Generator().manual_seed(8)
    probs, logits = torch.rand(16, 700, generator=g), torch.randn(16, 700, generator=g) * 3
    u, temps = torch.rand(16, generator=g), torch.rand(16, generator=g) + 0.5
    with torch_threads(2):
        from_probs = torch.ops.loom.pick_from_probs(probs, u)
        from_logits = torch.ops.loom.pick_from_logits(logits, temps, u)
    assert from_probs.tolist() == [int(torch.ops.loom.pick_from_probs(probs[r:r + 1], u[r:r + 1])) for r in range(16)]
    assert from_logits.tolist() == [int(torch.ops.loom.pick_from_logits(logits[r:r + 1], temps[r:r + 1], u[r:r + 1]))
                                    for r in range(16)]


def test_pick_where_the_block_sum_rounds_up_takes_the_blocks_last_token():
    """A block's float32 sum can exceed its exact sum (each of 255 additions of 0.75 ulp
    rounds up): u * total between the two lies in no token's exact range, and the pick is
    the block's last positive token, not its first."""
    p = torch.full((1, 256), 0.75 * 2 ** -23)
    p[0, 0] = 1.0
    got = torch.ops.loom.pick_from_probs(p, torch.tensor([1 - 2 ** -24]))
    assert got.tolist() == [255]
    p[0, 255] = 0.0
    assert torch.ops.loom.pick_from_probs(p, torch.tensor([1 - 2 ** -24])).tolist() == [254]


def test_uniform_draws_are_torch_rands():
    """engine._C.uniform_draws (the sampler's one call for every row's number) draws what
    torch.rand(1, generator=g) draws, from the same state, and leaves each generator in
    the state those calls leave it: a seeded thread's tokens do not depend on which path drew."""
    seeds = [0, 1, 7, 2**31 + 5, 123456789, 2**62 + 3] * 3  # (a generator listed more than once too)
    mine = {s: torch.Generator().manual_seed(s) for s in set(seeds)}
    ref = {s: torch.Generator().manual_seed(s) for s in set(seeds)}
    for step in range(50):
        got = sampler.uniform_draws([mine[s] for s in seeds])
        want = torch.cat([torch.rand(1, generator=ref[s]) for s in seeds])
        assert got.dtype == torch.float32 and got.shape == (len(seeds),)
        assert torch.equal(got, want), step
        if step % 7 == 3:  # other draws in between, from torch itself
            for s in mine:
                torch.randn(5, generator=mine[s]), torch.randn(5, generator=ref[s])
    for s in mine:
        assert torch.equal(mine[s].get_state(), ref[s].get_state())
    assert sampler.uniform_draws([]).shape == (0,)
    import engine._ops as ops
    with pytest.raises(TypeError):
        ops._C.uniform_draws([torch.Generator(), 3])


def test_uniform_draws_without_engine_c_are_torch_rands(monkeypatch):
    """Without engine._C's uniform_draws, one torch.rand each: the same numbers."""
    monkeypatch.setattr(sampler, "_UNIFORM", [None])
    want = torch.cat([torch.rand(1, generator=g) for g in _gens([3, 4, 3])])
    assert torch.equal(sampler.uniform_draws(_gens([3, 4, 3])), want)
    assert sampler.uniform_draws([]).shape == (0,)


def test_top_logprobs_rows_are_each_rows_top_logprobs():
    """The step's log-prob entries for all its threads at once (one topk per distinct k, one
    compare for the ranks) are each row's own top_logprobs: same tokens, values, ranks,
    order, ties included (rows of equal values, a chosen token inside and outside the top k)."""
    g = torch.Generator().manual_seed(3)
    lp = torch.randn(9, 50, generator=g).log_softmax(-1)
    lp[2] = lp[2].round(decimals=0)  # ties
    lp[5, :] = lp[5, 0]  # all tied
    rows = [0, 2, 5, 8, 3, 2]
    chosen = [int(lp[0].argmax()), 7, 11, 49, int(lp[3].argmin()), 0]
    ks = [0, 1, 3, 20, 2, 50]
    got = sampler.top_logprobs_rows(lp, rows, chosen, ks)
    for (r, c, k), d in zip(zip(rows, chosen, ks), got):
        want = sampler.top_logprobs(lp[r], c, k)
        assert list(d.items()) == list(want.items())
        assert [x.rank for x in d.values()] == [x.rank for x in want.values()]


_COMBOS = [{"temperature": 0.6, "top_p": 0.95, "top_k": 20}, {"temperature": 0.7, "top_p": 0.8}, {"top_k": 20},
           {"min_p": 0.05}, {"min_p": 0.1, "top_k": 5}, {"min_p": 0.05, "top_p": 0.9}, {"top_k": 1},
           {"temperature": 1.3, "top_k": 3, "top_p": 0.5}, {"min_p": 1.0}, {"top_p": 0.3},
           {"min_p": 0.2, "top_k": 7, "top_p": 0.7}, {"top_p": 0.999}, {"temperature": 0.4, "top_k": 300}]


def _rows(V: int, g: torch.Generator) -> torch.Tensor:
    """8 rows of V logits: flat to peaked, ties (whole numbers, quarters), -inf tokens."""
    x = torch.randn(8, V, generator=g) * torch.tensor([0.3, 1, 2, 4, 8, 3, 3, 3])[:, None]
    x[5] = x[5].round()
    x[6] = (x[6] * 4).round() / 4
    x[7, ::3] = float("-inf")
    x[4, :V // 2] = float("-inf")
    return x


@pytest.fixture(params=["op", "torch"])
def windows(request, monkeypatch):
    """Both _top_logits (engine._C's op, torch.topk): the default windows on the first
    pass, then windows of 2, 4, 8, ... (every step of the growth)."""
    if request.param == "torch":
        monkeypatch.setitem(sampler._OPS, "top_logits", None)
    return monkeypatch


@pytest.mark.parametrize("small", [False, True])
def test_filtered_rows_keep_the_references_tokens(windows, small):
    """The filtered rows' kept tokens (sample's path, which does not sort the vocabulary)
    are _filtered_logprobs' (the reference): a prefix of the row sorted by tempered logit,
    as many tokens as the reference keeps (ties at top-p's cut: the lowest ids, where the
    reference keeps those its unstable sort puts first), or for top-p, between the
    reference's at top_p -/+ 1e-5 (the softmax's sum may round differently)."""
    from engine.sampling_params import SamplingParams as SP
    if small:
        windows.setattr(sampler, "_WINDOW", 2)
        windows.setattr(sampler, "_GROW", 2)
    g = torch.Generator().manual_seed(11)

    def count(row, c):
        return int(sampler._filtered_logprobs(row, SP(**c)).isfinite().sum())

    inexact = 0
    for V in (1, 7, 97, 1000, 4097, 20011):
        for c in _COMBOS:
            p = SP(**c)
            x = _rows(V, g)
            ids, lp = sampler._filtered_rows(x, p)
            for r in range(8):
                got = ids[r][lp[r].isfinite()]
                assert got.tolist() == sorted(set(got.tolist())), (V, c, r)
                xt = x[r] / p.temperature
                assert torch.equal(xt[got].sort(descending=True).values,
                                   xt.sort(descending=True).values[:len(got)]), (V, c, r)
                want = count(x[r], c)
                if len(got) != want:
                    inexact += 1
                    assert "top_p" in c, (V, c, r, len(got), want)
                    lo = count(x[r], {**c, "top_p": c["top_p"] - 1e-5})
                    hi = count(x[r], {**c, "top_p": c["top_p"] + 1e-5})
                    assert lo <= len(got) <= hi, (V, c, r, len(got), want)
                torch.testing.assert_close(lp[r][lp[r].isfinite()], xt[got].log_softmax(-1))
    assert inexact <= 5


def test_filtered_draws_are_the_references(windows):
    """sample's filtered rows draw the reference's token (pick over _filtered_logprobs'
    whole row) with the same uniform number, but where u lies within float rounding of a
    kept token's cumulative probability (the sum over the kept tokens, in id order, adds
    the same terms)."""
    from engine.sampling_params import SamplingParams as SP
    g = torch.Generator().manual_seed(12)
    edges = 0
    for V in (300, 5001, 20011):
        for c in _COMBOS:
            p = SP(**c)
            x = torch.randn(8, V, generator=g) * torch.tensor([0.5, 1, 2, 3, 4, 5, 6, 8])[:, None]
            x[:, :3] += 6.0  # (a few likely tokens, as a model's)
            for seed in range(2):
                seeds = [100 * seed + r for r in range(8)]
                got, _ = sampler.sample(x, [p] * 8, [torch.Generator().manual_seed(s) for s in seeds])
                u = torch.cat([torch.rand(1, generator=torch.Generator().manual_seed(s)) for s in seeds])
                ref = torch.stack([sampler._filtered_logprobs(row, p) for row in x]).exp()
                want = sampler.pick(ref, u)
                for r, (a, b) in enumerate(zip(got, want)):
                    if a != b:
                        edges += 1
                        cdf = ref[r].double().cumsum(0)
                        assert ref[r, a] > 0 and (cdf[min(a, b)] - u[r].double() * cdf[-1]).abs() < 1e-5, (V, c, r)
    assert edges <= 3


def _gens(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_filtered_rows_draw_as_alone_in_any_batch():
    """A seeded filtering row draws the same token alone, among rows sharing its params
    object (which filter together), and among rows of other params, on 1 or 2 threads
    (min-p then top-p from a window; top-p alone, whose probabilities are the row's softmax)."""
    from engine.sampling_params import SamplingParams as SP
    g = torch.Generator().manual_seed(13)
    V = 30011
    x = torch.randn(6, V, generator=g) * 3
    x[:, 7] += 9.0
    others = [SP(temperature=0.6, top_p=0.95, top_k=20), SP(top_k=3), SP(temperature=0.9)]
    for mine in (SP(temperature=0.7, top_p=0.8, min_p=0.01), SP(temperature=0.8, top_p=0.9)):
        for threads in (1, 2):
            with torch_threads(threads):
                for seed in range(4):
                    seeds = range(seed, seed + 6)
                    alone = [sampler.sample(x[r:r + 1], [mine], _gens([s]))[0][0] for r, s in enumerate(seeds)]
                    shared = sampler.sample(x, [mine] * 6, _gens(seeds))[0]
                    mixed = sampler.sample(x, [mine, others[0], mine, others[1], mine, others[2]], _gens(seeds))[0]
                    assert shared == alone and mixed[::2] == alone[::2], (mine, threads, seed)


def test_filtered_rows_stop_at_the_first_window_that_shows_the_prefix(windows):
    """A row whose kept tokens are among its largest logits comes back in the first
    window's width (top_k + 1, else _WINDOW), not the vocabulary's: min-p's cut, top-k's k
    tokens and top-p's mass (alone: the whole row's softmax) each show where the prefix
    ends, so the row neither grows its window nor falls back to the reference (a sort of
    the row). Its kept tokens are the reference's."""
    from engine.sampling_params import SamplingParams as SP
    g = torch.Generator().manual_seed(14)
    x = torch.randn(3, 4096, generator=g)
    x[:, :5] += 12.0  # (a few likely tokens, as a model's)
    for c, width in (({"top_p": 0.9}, 64), ({"min_p": 0.05}, 64), ({"top_k": 20}, 21),
                     ({"top_k": 20, "top_p": 0.9, "min_p": 0.01}, 21), ({"min_p": 0.05, "top_p": 0.9}, 64)):
        ids, lp = sampler._filtered_rows(x, SP(**c))
        assert ids.shape == lp.shape == (3, width), c
        for r in range(3):
            want = sampler._filtered_logprobs(x[r], SP(**c)).isfinite().nonzero()[:, 0]
            assert ids[r][lp[r].isfinite()].tolist() == want.tolist(), (c, r)
    y = torch.full((1, 4096), -20.0)  # (min-p cuts the window's last logit only)
    y[0, :63] = 0.0
    y[0, 63] = -10.0
    ids, lp = sampler._filtered_rows(y, SP(min_p=0.01))
    assert ids.shape == (1, 64) and ids[0][lp[0].isfinite()].tolist() == list(range(63))


def test_filtered_rows_of_few_finite_logits():
    """Rows where most logits are -inf (masked): the first window shows every finite one
    (its last logit is -inf), even for top-k with more tokens than the row has. From a
    window too, top-p keeps the smallest prefix whose mass reaches top_p: two tokens of
    probability 0.5 each at top_p=0.5 keep one, the lower id (the whole row's softmax for
    top-p alone, the window's with min-p or top-k). A row of one finite logit draws it."""
    from engine.sampling_params import SamplingParams as SP
    x = torch.full((3, 300), float("-inf"))
    x[:2, [3, 7]] = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    x[2, 11] = -5.0
    for c, width in (({"top_p": 0.5}, 64), ({"top_p": 0.5, "min_p": 0.01}, 64), ({"top_p": 0.5, "top_k": 5}, 6),
                     ({"top_k": 20}, 21)):
        ids, lp = sampler._filtered_rows(x, SP(**c))
        assert ids.shape == (3, width), c
        want = [[3], [3], [11]] if "top_p" in c else [[3, 7], [3, 7], [11]]
        assert [ids[r][lp[r].isfinite()].tolist() for r in range(3)] == want, c
        tok, _ = sampler.sample(x, [SP(**c)] * 3, _gens([0, 1, 2]))
        assert tok[0] in want[0] and tok[1] in want[1] and tok[2] == 11, c


def test_cpu_float32_rows_take_engine_cs_ops(monkeypatch):
    """With engine._C built, float32 CPU rows go through its ops (the one-pass draws and
    top_logits, and one call for every row's uniform number), other dtypes through torch:
    the fallbacks draw the same tokens, so only a count of the calls tells the paths apart."""
    from engine.sampling_params import SamplingParams as SP
    calls = []

    def spy(name, op):
        def f(*args):
            calls.append(name)
            return op(*args)
        return f
    for name in ("pick_from_probs", "pick_from_logits", "top_logits"):
        assert sampler._loom_op(name) is getattr(torch.ops.loom, name)
        monkeypatch.setitem(sampler._OPS, name, spy(name, getattr(torch.ops.loom, name)))
    monkeypatch.setattr(sampler, "_UNIFORM", [spy("uniform_draws", sampler._uniform_op())])
    x = torch.randn(2, 400, generator=torch.Generator().manual_seed(15))
    tokens = []
    for dtype in (torch.float32, torch.float64):
        calls.clear()
        tokens.append(sampler.sample(x.to(dtype), [SP(seed=1), SP(top_k=30, seed=2)], _gens([1, 2]))[0])
        assert sorted(calls) == (["pick_from_logits", "pick_from_probs", "top_logits", "uniform_draws"]
                                 if dtype == torch.float32 else ["uniform_draws"]), dtype
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("V", [1, 5, 16, 17, 300, 5000])
def test_top_logits_is_a_stable_sorts_first_k(V):
    """engine._C's top_logits: a row's first k of a stable descending sort (ties at the
    k-th value: the lowest ids), for every k; NaN rows start with NaN; errors; opcheck."""
    g = torch.Generator().manual_seed(V)
    x = torch.randn(6, V, generator=g) * 3
    x[1] = x[1].round()  # ties
    x[2, ::2] = float("-inf")
    x[3] = 1.0
    x[4] = torch.arange(V, dtype=torch.float32)  # (ascending: every value a new candidate)
    x[5, V // 2] = float("inf")
    want_v, want_i = x.sort(dim=1, descending=True, stable=True)
    for k in sorted({1, min(2, V), min(3, V), V // 3 or 1, V // 2 or 1, V - 1 or 1, V}):
        v, i = torch.ops.loom.top_logits(x, k)
        assert torch.equal(v, want_v[:, :k]) and torch.equal(i, want_i[:, :k]), k
    y = x.clone()
    y[2, V - 1] = float("nan")
    v, _ = torch.ops.loom.top_logits(y, 1)
    assert v[2, 0].isnan() and not v[[0, 1, 3, 4, 5], 0].isnan().any()
    with pytest.raises(RuntimeError, match=r"k must be in \[1, vocab\]"):
        torch.ops.loom.top_logits(x, V + 1)
    with pytest.raises(RuntimeError, match="float32 CPU"):
        torch.ops.loom.top_logits(x.double(), 1)
    torch.library.opcheck(torch.ops.loom.top_logits, (x, min(3, V)))
