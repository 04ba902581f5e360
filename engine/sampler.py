"""Batched sampling with per-thread parameters and per-thread generators.

Each thread draws from its own ``torch.Generator`` so a seeded request makes the
same draws whatever else shares its batch (its logits, and so a near-tie or a
16-bit model's token, may still round differently in another batch: README).
"""
from __future__ import annotations

import math

import torch

from .outputs import Logprob
from .sampling_params import SamplingParams


def _filtered_logprobs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, then min-p, then top-k and top-p (vLLM's order: top-p takes its mass
    from what min-p left) applied to one row; returns log-probs with disallowed tokens at
    -inf."""
    x = logits / p.temperature
    if p.min_p > 0.0:
        probs = x.softmax(-1)
        x = x.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    if p.top_k != -1 and p.top_k < x.numel():
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, idx = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = (probs.cumsum(-1) - probs) >= p.top_p
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, idx, drop), float("-inf"))
    return x.log_softmax(-1)


def _filtered_rows(logits: torch.Tensor, p: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """_filtered_logprobs for rows [n, V] that share ``p``, without sorting the vocabulary:
    (ids [n, W], log-probs [n, W]), each row's kept tokens in increasing id order, then
    padding (log-prob -inf). min-p, top-k and top-p each keep a prefix of the row sorted by
    logit, so a row looks at its K largest logits (``_top_logits``; K = top_k + 1, else
    _WINDOW, then _GROW times more while the window does not show where the prefix ends;
    past V / 4 the reference itself). The tokens above the window's smallest logit are
    the row's tokens above it; the prefix ends inside them when min-p cuts that smallest
    logit, when they hold top-k's k tokens, or (top-p alone, whose mass is the whole row's
    softmax) when top-p drops the first token at that logit.
    min-p compares logits, x < x_max + log(min_p), for p < min_p * p_max (no softmax of
    the row). The same kept set but at float rounding edges (that comparison; top-p's
    softmax adds its sum in another order) and for ties at top-p's cut: the reference
    keeps those its unstable sort puts first, this the lowest ids (as many). A row's path
    depends on its own logits and ``p`` only."""
    n, V = logits.shape
    dev = logits.device
    top_k = p.top_k if p.top_k != -1 and p.top_k < V else 0
    # (top-p alone: its probabilities are the whole row's softmax)
    full = (logits / p.temperature).softmax(-1) if not top_k and p.min_p == 0.0 else None
    ninf = float("-inf")
    out: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (row numbers, ids, log-probs)
    rows = torch.arange(n, device=dev)
    K = top_k + 1 if top_k else _WINDOW
    while rows.numel():
        if K > V // 4:  # (the window would be much of the row: the reference)
            lp = torch.stack([_filtered_logprobs(logits[r], p) for r in rows.tolist()])
            out.append((rows, torch.arange(V, device=dev).expand(len(rows), V), lp))
            break
        vals, idx = _top_logits(logits if len(rows) == n else logits.index_select(0, rows), K)
        if not vals[:, 0].isfinite().all():  # (NaN / +inf come first: reported by the caller)
            raise RuntimeError("a row has a NaN / inf logit, or no finite one")
        vals = vals / p.temperature  # (x's values: the same division)
        inside = vals > vals[:, -1:]
        done = vals[:, -1] == ninf  # (every finite logit is in the window)
        if p.min_p > 0.0:  # (p < min_p * p_max in logits: no softmax of the row)
            cut = vals < vals[:, :1] + math.log(p.min_p)
            vals = vals.masked_fill(cut, ninf)
            done |= cut[:, -1]
        if top_k:
            done |= inside.sum(1) >= top_k
            vals = vals.masked_fill(vals < vals[:, top_k - 1:top_k], ninf)
        if p.top_p < 1.0:
            if full is None:
                ps = vals.softmax(-1)
            else:
                ps = (full if len(rows) == n else full.index_select(0, rows)).gather(1, idx)
            cut = (ps.cumsum(1) - ps) >= p.top_p
            if full is not None:
                done |= (cut | inside).all(1)
            vals = vals.masked_fill(cut, ninf)
        if done.any():
            d = done.nonzero()[:, 0]
            vals, idx = vals.index_select(0, d), idx.index_select(0, d)
            o = idx.masked_fill(vals == ninf, V).argsort(1)  # (kept tokens first, in id order)
            out.append((rows.index_select(0, d), idx.gather(1, o), vals.gather(1, o).log_softmax(-1)))
        rows = rows[~done]
        K *= _GROW
    if len(out) == 1 and len(out[0][0]) == n:  # (every row's prefix in the first window)
        return out[0][1], out[0][2]
    W = max(ids.shape[1] for _, ids, _ in out)
    ids = torch.zeros(n, W, dtype=torch.long, device=dev)
    lp = torch.full((n, W), ninf, dtype=logits.dtype, device=dev)
    for r, i, v in out:
        ids[r, :i.shape[1]], lp[r, :v.shape[1]] = i, v
    return ids, lp


_WINDOW, _GROW = 64, 16  # (tests make them small)


def _top_logits(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's first k logits sorted by value, descending, equal values in id order (and
    their ids): engine._C's top_logits (one pass a row), else torch.topk and two sorts of its
    k (which of the values tied at the k-th it keeps may differ)."""
    op = _loom_op("top_logits")
    if op is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        return op(x, k)
    vals, idx = x.topk(k)
    idx, o = idx.sort(dim=1)
    vals, o = vals.gather(1, o).sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, o)


class Penalties:
    """A thread's state for SamplingParams' penalties (as vLLM's): how often it sampled each
    token in this call (presence / frequency) and which tokens its context holds
    (repetition: its view's tokens when it samples its first token of the call, then what
    it samples). ``carried``: sampled-token counts it continues (a Hogwild! worker's).
    ``ids()`` are the tokens whose logits a penalty can change (seen or counted): a step
    penalizes those, not the whole vocabulary."""

    def __init__(self, params: SamplingParams, vocab: int, context: list[list[int]], device,
                 carried: torch.Tensor | None = None):
        self.params = params
        self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
        self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)
        if params.repetition_penalty != 1.0:
            for ids in context:
                if ids:
                    self.seen[torch.tensor(ids, device=device)] = True
        if carried is not None:
            self.counts += carried
        self._ids = (self.seen | (self.counts != 0)).nonzero()[:, 0]
        self._new: list[int] = []  # touched since _ids was made

    def add(self, tok: int):
        if not (self.seen[tok] or self.counts[tok]):  # (its first touch)
            self._new.append(tok)
        self.counts[tok] += 1
        self.seen[tok] = True

    def ids(self) -> torch.Tensor:
        """int64 [n]: the tokens seen or counted, each once."""
        if self._new:
            self._ids = torch.cat([self._ids, torch.tensor(self._new, dtype=torch.long, device=self._ids.device)])
            self._new = []
        return self._ids


def apply_penalties(logits: torch.Tensor, rows: list[int], states: list[Penalties]) -> torch.Tensor:
    """``logits`` [R, V] with each row of ``rows`` penalized by its state (a new tensor):
    a token of the context has a positive logit divided by repetition_penalty, a negative
    one multiplied by it; a token sampled c times loses c x frequency_penalty, and
    presence_penalty once (the order of vLLM's penalties, before temperature). Only each
    state's ``ids()`` are computed (the others are left as they are: the penalties' terms
    are 0 there), the same arithmetic per entry as over whole rows (which, 15 passes over
    [R, vocab], took 31 ms of a 236 ms decode step at n=8 and a 152k vocabulary)."""
    dev = logits.device
    ids = [s.ids() for s in states]
    lens = torch.tensor([len(i) for i in ids], device=dev)
    c = torch.cat(ids)
    r = torch.tensor(rows, device=dev).repeat_interleave(lens)
    col = lambda name: torch.tensor([getattr(s.params, name) for s in states], dtype=torch.float32,  # noqa: E731
                                    device=dev).repeat_interleave(lens)
    x = logits[r, c]  # (float32, as every logits table)
    counts = torch.cat([s.counts[i] for s, i in zip(states, ids)])
    seen = torch.cat([s.seen[i] for s, i in zip(states, ids)])
    rep = col("repetition_penalty")
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - counts * col("frequency_penalty") - (counts > 0) * col("presence_penalty")
    out = logits.clone()
    out[r, c] = x
    return out


def _loom_op(name: str):
    """torch.ops.loom.<name> when engine._C is built, else None."""
    if name not in _OPS:
        try:
            from . import linear_ops  # noqa: F401  (loads engine._C and its fakes)
            _OPS[name] = getattr(torch.ops.loom, name)
        except (ImportError, AttributeError, RuntimeError):
            _OPS[name] = None
    return _OPS[name]


_OPS: dict = {}


def pick(probs: torch.Tensor, u: torch.Tensor) -> list[int]:
    """Inverse-CDF draw: per row, the first index whose prefix sum exceeds u * row sum
    (rows need not be normalised; tokens of zero probability are never picked)."""
    op = _loom_op("pick_from_probs")
    if op is not None and probs.device.type == "cpu" and probs.dtype == torch.float32:
        return op(probs, u).tolist()
    cdf = probs.cumsum(-1)
    total = cdf[:, -1]
    target = torch.minimum(u.to(cdf.dtype) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target[:, None], right=True)[:, 0].tolist()


def uniform_draws(generators: list[torch.Generator]) -> torch.Tensor:
    """float32 [len(generators)]: the i-th number is ``torch.rand(1, generator=generators[i])``'s,
    drawn in list order (each generator left as those calls leave it). CPU generators in one
    C++ call (engine._C.uniform_draws: a torch.rand call costs ~4.5 us of Python and dispatch,
    1.2 ms a step at 256 threads), else one torch.rand each."""
    op = _UNIFORM[0] if _UNIFORM else _uniform_op()
    if op is not None:
        try:
            return op(generators)
        except ValueError:  # (a CUDA generator: checked before any draw)
            pass
    if not generators:
        return torch.empty(0)
    return torch.cat([torch.rand(1, generator=g, device=g.device).cpu() for g in generators])


def _uniform_op():
    try:
        from . import _ops
        op = getattr(_ops._C, "uniform_draws", None)
    except ImportError:
        op = None
    _UNIFORM.append(op)
    return op


_UNIFORM: list = []


_HALF = (torch.float16, torch.bfloat16)


def logit_processed(logits: torch.Tensor, rows: list[int], params: list[SamplingParams],
                    banned: list | None = None) -> torch.Tensor:
    """``logits`` [R, V] with each row of ``rows`` shaped by its params (a new float32 or
    float64 tensor): tokens outside ``allowed_token_ids`` and the row's ``banned`` tokens
    (its bad words' now) at -inf, then ``logit_bias`` added (vLLM's order, before the
    penalties). One masked fill, one indexed fill and one indexed add for all the rows."""
    x = logits.float() if logits.dtype in _HALF else logits.clone()
    dev, V = x.device, x.shape[1]
    allow = [(r, p.allowed_token_ids) for r, p in zip(rows, params) if p.allowed_token_ids is not None]
    if allow:
        keep = torch.zeros(len(allow), V, dtype=torch.bool)
        keep[torch.tensor([j for j, (_, ids) in enumerate(allow) for _ in ids]),
             torch.tensor([i for _, ids in allow for i in ids])] = True
        idx = torch.tensor([r for r, _ in allow], device=dev)
        x[idx] = x[idx].masked_fill(~keep.to(dev), float("-inf"))
    if banned is not None and any(banned):
        x[torch.tensor([r for r, b in zip(rows, banned) for _ in b], device=dev),
          torch.tensor([i for b in banned for i in b], device=dev)] = float("-inf")
    bias = [(r, p.logit_bias) for r, p in zip(rows, params) if p.logit_bias]
    if bias:
        r = torch.tensor([r for r, b in bias for _ in b], device=dev)
        c = torch.tensor([i for _, b in bias for i in b], device=dev)
        v = torch.tensor([w for _, b in bias for w in b.values()], dtype=x.dtype, device=dev)
        x.index_put_((r, c), v, accumulate=True)
    return x


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
           raw: torch.Tensor | None = None) -> tuple[list[int], torch.Tensor | None]:
    """logits [R, V] (float32; 16-bit logits are converted, float64 kept) -> (one token per row, raw log-probs [R, V], or None when no
    row asked for log-probs). ``raw``: the logits the log-probs come from when ``logits``
    are not the model's (penalized), else ``logits`` themselves.

    Random rows are drawn by inverse CDF (``pick``): one uniform number per row from the
    row's own generator. (An exponential race would need V random numbers per row: on a
    CPU drawing them cost more than the whole forward pass of a small model.)
    """
    if logits.dtype in _HALF:  # (a softmax and prefix sums in 16 bits draw from another distribution)
        logits = logits.float()
    if raw is not None and raw.dtype in _HALF:
        raw = raw.float()
    # (a request's threads share one params object: its properties are read once, not per row)
    distinct = list({id(p): p for p in params}.values())
    want_lp = any(p.logprobs is not None for p in distinct)
    logprobs = (logits if raw is None else raw).log_softmax(-1) if want_lp else None
    tokens = [0] * len(params)
    # (top_k=1 is not greedy: as vLLM, tokens tied at the top stay in and are drawn evenly)
    if len(distinct) == 1:
        every = list(range(len(params)))
        greedy, rows = (every, []) if distinct[0].greedy else ([], every)
    else:
        greedy = [r for r, p in enumerate(params) if p.greedy]
        rows = [r for r, p in enumerate(params) if not p.greedy]
    if greedy:
        best, idx = _take_rows(logits, greedy).max(-1)  # (max, not argmax: a NaN row shows in best)
        _check_finite(greedy, best)
        for r, tok in zip(greedy, idx.tolist()):
            tokens[r] = tok
    if not rows:
        return tokens, logprobs
    u = uniform_draws([generators[r] for r in rows])  # [len(rows)], in rows' order
    # Each row's path depends on its own parameters only (not on its batch): the fused draw
    # and the filtered one may round a probability differently, so a seeded row that took
    # one path alone and the other in a batch could pick another token.
    plain, filtered = [], []
    if len(distinct) == 1:
        p = distinct[0]
        plain, filtered = (rows, []) if p.top_k == -1 and p.top_p >= 1.0 and p.min_p == 0.0 else ([], rows)
    else:
        for r in rows:
            p = params[r]
            (plain if p.top_k == -1 and p.top_p >= 1.0 and p.min_p == 0.0 else filtered).append(r)
    at = None if plain is rows else {r: i for i, r in enumerate(rows)}  # (a row's place in u)
    picked: list[int] = []
    try:
        if plain:
            temps = torch.tensor([params[r].temperature for r in plain] if len(distinct) > 1 else
                                 [distinct[0].temperature] * len(plain), dtype=torch.float32, device=logits.device)
            sub = _take_rows(logits, plain)
            up = (u if plain is rows else _take_rows(u, [at[r] for r in plain])).to(logits.device)
            op = _loom_op("pick_from_logits")
            if op is not None and sub.device.type == "cpu" and sub.dtype == torch.float32:
                picked += op(sub, temps, up).tolist()  # softmax(x / T) and the draw in one pass
            else:
                picked += pick((sub / temps[:, None].to(sub.dtype)).softmax(-1), up)
        if filtered:
            uf = _take_rows(u, [at[r] for r in filtered]).to(logits.device)
            # (rows sharing a params object, as a request's threads do, filter together)
            groups: dict[int, list[int]] = {}
            for j, r in enumerate(filtered):
                groups.setdefault(id(params[r]), []).append(j)
            got = [0] * len(filtered)
            for js in groups.values():
                rs = [filtered[j] for j in js]
                ids, lp = _filtered_rows(_take_rows(logits, rs), params[rs[0]])
                pos = torch.tensor(pick(lp.exp(), uf if len(js) == len(filtered) else _take_rows(uf, js)))
                for j, tok in zip(js, ids.gather(1, pos[:, None].to(ids.device))[:, 0].tolist()):
                    got[j] = tok
            picked += got
        # (the torch fallback's searchsorted on a NaN row lands past the end instead of raising)
        failed = any(not 0 <= tok < logits.shape[1] for tok in picked)
    except RuntimeError:  # (the C++ draws refuse a row with no finite logit)
        _check_finite(rows, _take_rows(logits, rows).max(-1).values)
        raise
    if failed:
        _check_finite(rows, _take_rows(logits, rows).max(-1).values)
    rows = plain + filtered
    for r, tok in zip(rows, picked):
        tokens[r] = tok
    return tokens, logprobs


def _check_finite(rows: list[int], best: torch.Tensor):
    """One clear error when some row's largest logit is NaN or infinite: no token can be
    chosen from it (argmax would silently return token 0 for a NaN row)."""
    bad = [r for r, v in zip(rows, best.tolist()) if not math.isfinite(v)]
    if bad:
        err = FloatingPointError(
            f"The model's logits are not finite (NaN or inf) in batch rows {bad[:8]}: no token can be chosen. "
            "The weights may hold NaN / inf, or float16 activations overflowed (try dtype='bfloat16' or "
            "'float32').")
        err.rows = bad  # (the scheduler names the requests they belong to)
        raise err


def _take_rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """x[rows] without a copy when rows are all of x in order."""
    if len(rows) == x.shape[0] and rows == list(range(x.shape[0])):
        return x
    return x.index_select(0, torch.tensor(rows, device=x.device))


def _no_text(i: int) -> None:
    return None


def top_logprobs(logprobs_row: torch.Tensor, chosen: int, k: int, text=_no_text) -> dict[int, Logprob]:
    """The ``k`` most likely tokens' log-probs and the chosen token's, each a Logprob (a
    float with vLLM's .logprob, .rank and .decoded_token: ``text(token id)``)."""
    out = {}
    if k > 0:
        vals, idx = torch.topk(logprobs_row, min(k, logprobs_row.numel()))
        out = {i: Logprob(v, r + 1, text(i)) for r, (i, v) in enumerate(zip(idx.tolist(), vals.tolist()))}
    if chosen not in out:
        v = logprobs_row[chosen]
        out[chosen] = Logprob(float(v), int((logprobs_row >= v).sum()), text(chosen))  # (ties count: vLLM v1's rank)
    return out


def top_logprobs_rows(logprobs: torch.Tensor, rows: list[int], chosen: list[int],
                      ks: list[int], texts: list | None = None) -> list[dict[int, Logprob]]:
    """``top_logprobs(logprobs[r], c, k)`` for each (r, c, k) of (rows, chosen, ks), in a few
    tensor calls for all of them (one topk per distinct k, one compare for the ranks) instead
    of a topk, an index and a compare per row (~10 us a row: a step's largest host cost with
    many threads asking for log-probs). The same numbers: each row's topk as alone (rows are
    independent in a batched topk), its chosen token's log-prob and rank counted the same way;
    ``texts``: each row's ``text`` (None: no decoded_token)."""
    texts = texts or [_no_text] * len(rows)
    sub = _take_rows(logprobs, rows)
    ch = torch.tensor(chosen, dtype=torch.long, device=sub.device)
    cv = sub.gather(1, ch[:, None])
    ranks = (sub >= cv).sum(-1).tolist()
    cvals = cv[:, 0].tolist()
    out: list[dict[int, Logprob]] = [{} for _ in rows]
    by_k: dict[int, list[int]] = {}
    for j, k in enumerate(ks):
        if k > 0:
            by_k.setdefault(k, []).append(j)
    for k, js in by_k.items():
        vals, idx = torch.topk(_take_rows(sub, js), min(k, sub.shape[1]))
        for j, iv, vv in zip(js, idx.tolist(), vals.tolist()):
            out[j] = {i: Logprob(v, r + 1, texts[j](i)) for r, (i, v) in enumerate(zip(iv, vv))}
    for j, c in enumerate(chosen):
        if c not in out[j]:
            out[j][c] = Logprob(cvals[j], ranks[j], texts[j](c))  # (ties count: vLLM v1's rank)
    return out
