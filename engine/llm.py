"""The user-facing engine: ``LLM(model).generate(prompts, SamplingParams(...))``.

Flow of one step (Scheduler.step; each arrow one object):
    requests' threads --EngineCore.step--> StepBatch --ModelRunner.run--> logits [R, V]
    --sampler--> tokens --protocol on_token (EngineCore.accept)--> finished RequestOutputs
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import threading
import weakref
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import KVCache, kv_token_bytes
from .config import ModelConfig, parse_dtype, read_json_object, token_id_list
from .model import CausalLM
from .core import EngineCore
from .interrupts import DEFERRED
from .outputs import RequestOutput
from .protocols import ParallelSampling, Protocol
from .runner import DEFAULT_MAX_FORWARD_TOKENS, ModelRunner
from .sampler import top_logprobs_rows
from .sampling_params import SamplingParams, _is_int
from .scheduler import Request, Scheduler, sessions_hold_pages
from .step import StepBatch, StepItem
from .tokenizer import TextStream, Tokenizer

if TYPE_CHECKING:  # (imported when a session is made: engine.session imports this module)
    from .session import Session

DEFAULT_KV_BYTES = 2 << 30       # default cache budget when kv_cache_tokens is None
DEFAULT_KV_TOKENS_MAX = 1 << 18


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _as_list(x):
    """A numpy array or tensor (of token ids) as a list; anything else as it is."""
    return x.tolist() if hasattr(x, "tolist") and not isinstance(x, str) else x


@dataclass
class _Streamed:
    """One streamed completion: its text stream (None: the thread's own stop-string stream,
    which the engine feeds), the tokens pushed into it, the text sent, whether it ended."""
    stream: TextStream | None
    read: int = 0
    sent: str = ""
    ended: bool = False


class _Streamer:
    """generate(stream=...): after each step, each completion's new text, held back while it
    could still be the start of a stop string, and at its end what its output's text adds."""

    def __init__(self, llm, reqs: list, fn):
        self.llm, self.reqs, self.fn = llm, reqs, fn
        self.state: dict[tuple[int, int], _Streamed] = {}  # (request, completion) -> its state

    def step(self):
        core = self.llm.core
        for i, r in enumerate(self.reqs):
            if not r.params.detokenize:  # (no text to send)
                continue
            for j, k in enumerate(getattr(r.run, "kids", None) or []):
                st = self.state.get((i, j))
                if st is None:
                    own = None if k.text_stream is not None else \
                        TextStream(self.llm.tokenizer, r.params.skip_special_tokens, k.text_context)
                    st = self.state[(i, j)] = _Streamed(own)
                if st.ended:
                    continue
                if k.finished:
                    text, hold, st.ended = core.text_of(k), 0, True
                else:
                    if st.stream is not None:
                        for tok in k.generated[st.read:]:
                            st.stream.push(tok)
                        st.read = len(k.generated)
                    text = (st.stream or k.text_stream).text
                    hold = max((len(s) for s in r.params.stop), default=1) - 1
                end = max(len(text) - hold, len(st.sent))
                if text.startswith(st.sent) and end > len(st.sent):
                    piece, st.sent = text[len(st.sent):end], text[:end]
                    self.fn(i, j, piece)


def _vllm_extras(lora_request, priority):
    """vLLM's generate() / chat() arguments Loom has no use for: taken at their no-op values."""
    if lora_request is not None:
        raise ValueError("lora_request: Loom does not load LoRA adapters; merge the adapter into the "
                         "weights (e.g. peft's merge_and_unload) and load that checkpoint.")
    if priority is not None and (not isinstance(priority, (list, tuple)) or any(p != 0 for p in priority)):
        raise ValueError(f"priority={priority!r}: Loom schedules first come, first served; leave it None "
                         "(or all 0).")


def _from_prompt_dict(p: Mapping) -> tuple[str | None, object]:
    """vLLM's TextPrompt {"prompt": text} / TokensPrompt {"prompt_token_ids": ids, "prompt"?}:
    (the output's prompt text for token ids, None otherwise; the prompt as generate() takes it)."""
    other = sorted(str(k) for k, v in p.items() if k not in ("prompt", "prompt_token_ids") and v is not None)
    if other:
        raise ValueError(f"A prompt dict's {', '.join(other)} {'is' if len(other) == 1 else 'are'} not "
                         "supported; Loom takes {'prompt': text} or {'prompt_token_ids': ids} (vLLM's "
                         "TextPrompt / TokensPrompt), text-only.")
    text = p.get("prompt")
    if p.get("prompt_token_ids") is not None:
        if text is not None and not isinstance(text, str):
            raise ValueError(f"A prompt dict's 'prompt' must be its text, got {type(text).__name__}.")
        return text, _as_list(p["prompt_token_ids"])
    if isinstance(text, str):
        return None, text
    raise ValueError(f"A prompt dict needs 'prompt' (a string) or 'prompt_token_ids' (token ids); got {p!r:.80}.")


def _common_prefix(a: list[int], b: list[int], cap: int) -> int:
    """How many first tokens ``a`` and ``b`` share, at most ``cap``: slices compared (in C)
    over growing steps, then halved, not a Python loop over tokens."""
    lo, step = 0, 16
    while lo < cap:
        hi = min(lo + step, cap)
        if a[lo:hi] != b[lo:hi]:
            while hi - lo > 1:  # (a[:lo] == b[:lo], a[:hi] != b[:hi])
                mid = (lo + hi) // 2
                if a[lo:mid] == b[lo:mid]:
                    lo = mid
                else:
                    hi = mid
            return lo
        lo, step = hi, step * 2
    return cap


def _log_softmax_(x: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """log_softmax over the last dim, in place, a block of rows at a time: score()'s [P, vocab]
    logits become its log-probs without a second [P, vocab] tensor (512 MB at 4k x 32k)."""
    for i in range(0, x.shape[0], rows):
        blk = x[i:i + rows]
        blk.sub_(blk.logsumexp(-1, keepdim=True))
    return x


def seed_of(*key: int) -> int:
    """A generator seed from integers of any size: a hash of all their digits, so that keys
    differing anywhere give different streams. (torch's CPU generator reads only the low 32
    bits of a seed: seeds that differ by a multiple of 2**32 drew the same tokens, as did
    (seed, thread 1,000,003) and (seed + 1, thread 0).)"""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8, person=b"loom-seed").digest()
    return int.from_bytes(digest, "little") >> 1


class ThreadGenerators:
    """A thread's random generator: from (seed, thread index) when its params have a seed,
    else from the LLM's own generator. (An object the scheduler holds, not a bound method
    of the LLM: that made a reference cycle, so `del llm` kept the LLM and its KV cache
    until Python's cycle collector ran.)"""

    def __init__(self, rng: torch.Generator):
        self.rng = rng

    def __call__(self, params: SamplingParams, i: int) -> torch.Generator:
        if params.seed is not None:
            seed = seed_of(params.seed, i)
        else:
            seed = int(torch.randint(0, 1 << 62, (1,), generator=self.rng))
        return torch.Generator().manual_seed(seed)


_LOCKS = weakref.WeakSet()  # every EngineLock, for the fork hook below the class


class EngineLock:
    """The engine's lock: re-entrant (a call inside a call of the same thread: a session
    closed or dropped in a stream callback) and first come, first served (with the C RLock
    it replaces, a thread that ended a call took the next one before the threads already
    waiting: one server thread calling in a loop kept another waiting for 1,370 of its
    calls). Take and let go of it with Ctrl-C deferred (engine_call's ``DEFERRED``): a
    Ctrl-C then lands only where its state is whole, and one while the main thread waits
    for its turn gives up that turn and is raised (within ``POLL`` seconds)."""

    POLL = 0.05

    def __init__(self):
        self._cv = threading.Condition(threading.Lock())
        self._owner = None          # the holding thread's ident
        self._depth = 0
        self._line = deque()        # idents of the threads waiting, first come first
        self._orphaned = False      # held, at a fork, by a thread the child does not have
        _LOCKS.add(self)

    def _after_fork_in_child(self):
        """A process forked while another thread held the lock (a server thread's call) has
        no such thread: the lock would never be let go (every call of the child waited for
        good), and the engine's state is that call's half-made one. Calls raise instead.
        The forking thread's own hold (a fork from a protocol's callback) stays as it was."""
        self._cv = threading.Condition(threading.Lock())  # (its lock may be held by a lost thread)
        self._line = deque()                              # (no waiter exists here)
        if self._owner is not None and self._owner != threading.get_ident():
            self._orphaned = True

    def acquire(self, blocking: bool = True) -> bool:
        me = threading.get_ident()
        # (not blocking: nor for the condition's own lock, which this thread may hold already: the
        # garbage collector runs a dropped session's __del__ wherever it runs, in this bookkeeping
        # too, and its close waited here for good, and every engine call behind it)
        if not self._cv.acquire(blocking):
            return False
        try:
            if self._orphaned:
                if not blocking:  # (a dropped session's close: hands its tree over, harmless)
                    return False
                raise RuntimeError("This LLM was running a call in another thread when this process was "
                                   "forked: that thread does not exist here, and the engine's state is its "
                                   "half-made one. Create a new LLM in this process (or start it with the "
                                   "'spawn' or 'forkserver' method).")
            if self._owner == me:
                self._depth += 1
                return True
            if self._owner is None and not self._line:
                self._owner, self._depth = me, 1
                return True
            if not blocking:
                return False
            self._line.append(me)
            try:
                while self._owner is not None or self._line[0] != me:
                    self._cv.wait(self.POLL)
                    DEFERRED.check()  # (main thread: a Ctrl-C while waiting)
            except BaseException:
                self._line.remove(me)
                self._cv.notify_all()  # (the next in line may be free to go now)
                raise
            self._line.popleft()
            self._owner, self._depth = me, 1
            return True
        finally:
            self._cv.release()

    def release(self):
        with self._cv:
            if self._owner != threading.get_ident():
                raise RuntimeError("the engine's lock was let go by a thread that does not hold it")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cv.notify_all()

    def __enter__(self):
        with DEFERRED:
            self.acquire()
        return self

    def __exit__(self, *exc):
        with DEFERRED:
            self.release()
        return False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [lock._after_fork_in_child() for lock in list(_LOCKS)])


def engine_call(llm, fn, args, kwargs, exclusive: bool):
    """Run ``fn`` holding ``llm``'s lock: calls from several Python threads take turns, in
    the order they came (the cache, scheduler and step state are shared; interleaved
    steps corrupt them). An exclusive call (one that steps the engine or changes its
    threads) is refused while another runs in the same thread, e.g. a generate from
    inside a protocol's callback.
    An exclusive call that raises (an error, or a Ctrl-C, even one deferred to its end)
    leaves the engine's random generator as it found it: the next call draws as if the
    failed one never ran (its pages are back by then: the scheduler's abort, Session's),
    unless it keeps tokens it sampled (``llm._rng_kept``: a session's threads keep theirs,
    and drawing their seeds again would correlate what follows with them). Every call
    first closes the sessions dropped while another thread's call ran (Session.__del__)."""
    with DEFERRED:  # (Ctrl-C at a safe point, see engine.interrupts; the lock's bookkeeping too)
        llm._lock.acquire()  # (a Ctrl-C while the main thread waits for its turn: raised here)
        try:
            rng = llm._rng.get_state() if exclusive and not llm._busy else None
            if rng is not None:
                llm._rng_kept = False
            try:
                while llm._dropped:  # (before anything reads the cache; closing twice is harmless)
                    tree = llm._dropped.pop()  # (pop first: another thread may append meanwhile)
                    try:
                        tree.close()
                    except BaseException:
                        llm._dropped.append(tree)
                        raise
                if not exclusive:
                    return fn(*args, **kwargs)
                if llm._busy:
                    raise RuntimeError(f"{fn.__qualname__}() was called while this LLM runs {llm._busy}() in "
                                       "the same thread (e.g. from a protocol's callback); call it after that "
                                       "call returns.")
                llm._busy = fn.__qualname__
                llm._undo = None
                try:
                    out = fn(*args, **kwargs)
                finally:
                    llm._busy = None
                    llm.core.settle()  # (nothing of the call's last step stays referenced)
                if DEFERRED._depth == 1:
                    DEFERRED.check()  # (a Ctrl-C deferred to the call's end: raised where the rng goes back)
                llm._undo = None  # (it holds the session: a session dropped after its verb was kept)
                return out
            except BaseException:
                if rng is not None and not llm._rng_kept:
                    llm._rng.set_state(rng)
                if rng is not None and llm._undo is not None:  # (a session verb that ended: see _undo)
                    undo, llm._undo = llm._undo, None
                    undo()
                raise
        finally:
            llm._lock.release()


def engine_method(exclusive: bool, llm_of=lambda obj: obj):
    """Decorator: the method runs through engine_call on the LLM that ``llm_of(self)`` gives."""
    def decorate(fn):
        @functools.wraps(fn)
        def call(obj, *args, **kwargs):
            return engine_call(llm_of(obj), fn, (obj, *args), kwargs, exclusive)
        return call
    return decorate


serialized = engine_method(True)   # steps the engine or changes its threads
locked = engine_method(False)      # reads, or frees (Session.close, which the garbage collector
                                   # may run at any point): the lock without the exclusive check


class LLM:
    """The engine over one model. Safe to call from several Python threads: the calls
    (generate, chat, score, session verbs) run one after another, in the order they came.

    ``model``: a local Hugging Face checkpoint directory (config.json, safetensors,
    tokenizer files). ``device``: "cpu" or "cuda[:N]". ``dtype``: "auto" (config.json's),
    "float32", "bfloat16" or "float16". ``kv_cache_tokens``: the KV cache's size (None: 2 GiB
    of K/V or 262,144 tokens, whichever is fewer, and on the CPU at most half the available memory), in
    pages of ``page_size`` tokens (a size between two whole pages is rounded up; ``llm.kv_cache_tokens``
    is the size made). ``attention_backend``: "auto" (the device's: "cpu" or
    "triton"), "cpu", "torch" or "triton". ``seed``: draws the random generators of requests
    without a seed (None: random). ``kv_cache_dtype``: "auto" (the model's dtype) or, for a
    float32 model, "bfloat16" / "float16". ``max_forward_tokens``: the most tokens one forward
    pass feeds (a longer prompt is prefilled in chunks of that many)."""

    def __init__(self, model: str, device: str = "cpu", dtype="auto", kv_cache_tokens: int | None = None,
                 page_size: int = 16, attention_backend: str = "auto", seed: int | None = None,
                 kv_cache_dtype="auto", max_forward_tokens: int = DEFAULT_MAX_FORWARD_TOKENS):
        self._lock = EngineLock()  # (see engine_call)
        self._busy = None               # the exclusive call running, if any
        self._rng_kept = False          # the running call keeps tokens drawn from _rng (see engine_call)
        self._undo = None               # how to take back what the running session verb made, if a
        #                                 Ctrl-C deferred to its end is raised: the caller never gets
        #                                 its result (e.g. a join's continuation, of no parent)
        self._dropped = []              # trees of sessions dropped while another Python thread ran a
        #                                 call, for the next call to close (Session.__del__)
        model = os.fspath(model)
        self.model_dir = model
        self.config = ModelConfig.from_dir(model)
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError):
            self.device = None
        if self.device is None or self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device={device!r} is not supported; Loom runs on 'cpu' or 'cuda' (e.g. 'cuda:1').")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but torch sees no CUDA device; use device='cpu'.")
        if self.device.type == "cuda" and self.device.index is not None \
                and self.device.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValueError(f"device={device!r} but torch sees {n} CUDA device{'s' if n != 1 else ''} "
                             f"(cuda:0{f' .. cuda:{n - 1}' if n > 1 else ''}); pick one of them "
                             "(CUDA_VISIBLE_DEVICES renumbers the GPUs it lists from 0).")
        if (dtype is None or dtype == "auto") and self.config.torch_dtype is None:
            raise ValueError(f"config.json's torch_dtype {self.config.unsupported_dtype!r} is not one Loom runs; "
                             "pass dtype='float32', 'bfloat16' or 'float16'.")
        self.dtype = parse_dtype(dtype, self.config.torch_dtype)
        try:
            self.kv_cache_dtype = parse_dtype(kv_cache_dtype, self.dtype)
        except ValueError:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} is not supported; use 'auto' (the model's "
                             "dtype), 'bfloat16' or 'float16'.") from None
        if self.kv_cache_dtype != self.dtype and self.dtype != torch.float32:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} with a {self.dtype} model: the cache keeps the "
                             "model's dtype, or bfloat16 / float16 for a float32 model; use "
                             "kv_cache_dtype='auto'.")
        if not _is_int(page_size) or page_size < 1:
            raise ValueError(f"page_size={page_size!r} must be an integer >= 1.")
        if kv_cache_tokens is not None and (not _is_int(kv_cache_tokens) or kv_cache_tokens < page_size):
            raise ValueError(f"kv_cache_tokens={kv_cache_tokens!r} must be an integer >= page_size "
                             f"({page_size}).")
        if not _is_int(max_forward_tokens) or max_forward_tokens < 1:
            raise ValueError(f"max_forward_tokens={max_forward_tokens!r} must be an integer >= 1.")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed={seed!r} must be an integer or None.")
        page_size = int(page_size)  # (numpy integers pass as Python's)
        asked = kv_cache_tokens  # (the cache holds whole pages: a size between two is rounded up)
        kv_cache_tokens = None if kv_cache_tokens is None else -(-int(kv_cache_tokens) // page_size) * page_size
        seed = None if seed is None else int(seed)
        self.tokenizer = Tokenizer(model)
        self.eos_ids = self._eos_ids(model)
        self.model = CausalLM.from_dir(model, self.config, self.device, self.dtype,
                                       available_memory() if self.device.type == "cpu" else None)
        c = self.config
        per_tok = kv_token_bytes(c.num_layers, c.num_kv_heads, c.head_dim, self.kv_cache_dtype)
        # On the CPU the cache's memory is taken as pages are first written: a cache larger
        # than the memory the machine has would be killed when it fills, not refused.
        avail = available_memory() if self.device.type == "cpu" else None
        if kv_cache_tokens is None:
            kv_cache_tokens = min(DEFAULT_KV_TOKENS_MAX, DEFAULT_KV_BYTES // per_tok)
            if avail is not None:  # (at most half of what is free)
                kv_cache_tokens = max(min(kv_cache_tokens, avail // 2 // per_tok), page_size)
                if kv_cache_tokens * per_tok > avail:  # (one page: it was made, and killed when full)
                    raise ValueError(f"page_size={page_size:,} ({per_tok:,} bytes a token: "
                                     f"{page_size * per_tok / 2**30:,.1f} GiB a page) is more than this machine's "
                                     f"available memory ({avail / 2**30:,.1f} GiB) holds: the default KV cache "
                                     f"(at least one page) would get the process killed when it fills; lower "
                                     f"page_size (at most {avail // per_tok:,}).")
            elif kv_cache_tokens < page_size:  # (a device whose free memory is not known here)
                raise ValueError(f"page_size={page_size:,} is more than the default KV cache holds "
                                 f"({kv_cache_tokens:,} tokens: {DEFAULT_KV_BYTES / 2**30:g} GiB at {per_tok:,} "
                                 f"bytes a token, at most {DEFAULT_KV_TOKENS_MAX:,}); lower page_size, or give "
                                 "kv_cache_tokens (at least one page).")
        elif avail is not None and kv_cache_tokens * per_tok > avail:
            whole = "" if kv_cache_tokens == asked else f" ({kv_cache_tokens:,} in whole pages of {page_size})"
            raise ValueError(f"kv_cache_tokens={asked:,}{whole} ({per_tok:,} bytes a token: "
                             f"{kv_cache_tokens * per_tok / 2**30:,.1f} GiB) is more than this machine's available "
                             f"memory ({avail / 2**30:,.1f} GiB): the process would be killed when the cache fills; "
                             f"lower kv_cache_tokens (at most {avail // per_tok // page_size * page_size:,}).")
        self.cache = KVCache(self.config.num_layers, kv_cache_tokens // page_size, page_size,
                             self.config.num_kv_heads, self.config.head_dim, self.kv_cache_dtype, self.device)
        self.kv_cache_tokens = self.cache.num_pages * page_size  # (the cache's real size, whole pages)
        self.runner = ModelRunner(self.model, self.cache, attention_backend, int(max_forward_tokens))
        self.attention_backend = self.runner.backend_name
        if self.kv_cache_dtype != self.dtype and self.attention_backend not in ("cpu", "torch"):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} with a {self.dtype} model needs the 'cpu' or "
                             f"'torch' attention backend (the {self.attention_backend!r} kernels read the "
                             "cache in the model's dtype); use kv_cache_dtype='auto'.")
        self.core = EngineCore(self.runner, self.tokenizer, self.eos_ids,
                               self.config.max_position_embeddings, self.config.vocab_size)
        self._rng = torch.Generator().manual_seed(seed_of(seed) if seed is not None else
                                                  int.from_bytes(os.urandom(8), "little") >> 1)
        self._thread_generator = ThreadGenerators(self._rng)
        self.scheduler = Scheduler(self.core, self._thread_generator)
        self._next_id = 0

    @staticmethod
    def _eos_ids_from(path: str) -> list[int]:
        if not os.path.isfile(path):
            return []
        raw = read_json_object(path, "a JSON object (a generation config)")
        return token_id_list(raw.get("eos_token_id"), f"{path}'s eos_token_id")

    def _eos_ids(self, model_dir: str) -> list[int]:
        path = os.path.join(model_dir, "generation_config.json")
        ids = self._eos_ids_from(path)
        source = f"{path}'s eos_token_id"
        if not ids:
            ids, source = list(self.config.eos_token_ids), f"{os.path.join(model_dir, 'config.json')}'s eos_token_id"
        if not ids and self.tokenizer.eos_token is not None:
            tid = self.tokenizer.token_to_id(self.tokenizer.eos_token)
            ids = [] if tid is None else [tid]
            source = f"the tokenizer's eos_token {self.tokenizer.eos_token!r} (tokenizer_config.json), id"
        V = self.config.vocab_size
        if ids and all(i >= V for i in ids):  # (one out of range among others: never sampled, harmless)
            raise ValueError(f"{source} {ids if len(ids) > 1 else ids[0]} is outside the model's "
                             f"vocabulary [0, {V}): no end-of-sequence token could ever be sampled; use the "
                             "files that came with the weights.")
        return ids

    # ---- inputs ----------------------------------------------------------------------------
    def _normalize_prompts(self, prompts, empty: str = "A prompt is empty (no tokens); give at least one "
                           "token.") -> list[tuple[str | None, list[int]]]:
        prompts = _as_list(prompts)
        if isinstance(prompts, (list, tuple)):  # (a 0-d tensor's id as an int: list(torch.tensor(ids)))
            prompts = [_as_list(x) for x in prompts]
        if isinstance(prompts, (str, Mapping)):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(_is_int(x) for x in prompts):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a string, a list of strings, or a list of token-id lists (or of "
                             "vLLM's prompt dicts: {'prompt': text}, {'prompt_token_ids': ids}).")
        out = []
        for p in prompts:
            text, p = _from_prompt_dict(p) if isinstance(p, Mapping) else (None, p)
            if isinstance(p, (list, tuple)):
                p = [_as_list(x) for x in p]
            if isinstance(p, str):
                out.append((p, self.tokenizer.encode(p)))
            elif isinstance(p, (list, tuple)) and all(_is_int(x) for x in p):
                out.append((text, [int(x) for x in p]))
            else:
                raise ValueError(f"Prompt {p!r:.60} is neither a string nor a list of token ids.")
        V = self.config.vocab_size
        for text, ids in out:
            if not ids:
                raise ValueError(empty)
            bad = [t for t in ids if not 0 <= t < V]
            if bad:
                why = ""
                if 0 <= bad[0] < self.tokenizer.vocab_size:  # (e.g. a text's: the tokenizer makes it)
                    why = (f" The tokenizer has it ({self.tokenizer.vocab_size} tokens) but the model's vocab_size "
                           f"is {V}: tokenizer.json does not belong to these weights; use the files that came "
                           "with them.")
                raise ValueError(f"Token id {bad[0]} is outside the vocabulary [0, {V}).{why}")
        return out

    def _check_prompt_len(self, P: int, room: int = 1):
        """``room``: positions needed after the prompt (1 to generate; 0 to score it)."""
        maxpos = self.config.max_position_embeddings
        if P + room > maxpos:
            what = "prompt" if room else "sequence"
            raise ValueError(f"The {what} has {P} tokens but the model's context is {maxpos} "
                             f"({self.config.context_source}); shorten the {what}.")

    def _check_fits(self, ids: list[int], params: SamplingParams, protocol: Protocol) -> int:
        P, c = len(ids), self.cache
        self._check_prompt_len(P)
        if c.pages_for(P) > c.num_pages:  # (then no max_tokens / n would help)
            raise ValueError(
                f"The {P}-token prompt alone needs {c.pages_for(P)} pages but the KV cache has "
                f"{c.num_pages} pages of {c.page_size} tokens; raise kv_cache_tokens (now "
                f"{c.num_pages * c.page_size}) to at least {P} plus the tokens to generate.")
        need = protocol.pages_needed(c, P, params, self.config.max_position_embeddings)
        if need > c.num_pages:
            raise ValueError(
                f"This request can never fit the KV cache: it needs up to {need} pages "
                f"({P}-token prompt + {protocol.need_text(params)}) but the cache "
                f"has {c.num_pages} pages of {c.page_size} tokens; raise kv_cache_tokens "
                f"(now {c.num_pages * c.page_size}) or {protocol.need_fix()}.")
        if not c.can_reserve(need):  # (no request runs between calls: sessions hold the rest)
            raise sessions_hold_pages(c, need, "This request")
        return need

    # ---- generate --------------------------------------------------------------------------
    @serialized
    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False, protocol: Protocol | None = None, stream=None,
                 lora_request=None, priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; all threads of all prompts advance in one batched
        forward pass per step. ``protocol`` (engine.protocols) drives each request's
        threads; the default is plain parallel sampling of ``n`` completions. No prompts
        (an empty list): no outputs.

        ``stream(prompt_index, completion_index, text)``, plain sampling only: called after
        each step with the text each completion added (its pieces add up to the output's
        text; text that may still turn out to start a stop string is held back until it
        does not; none for SamplingParams(detokenize=False)). It runs inside the call and
        must not call the LLM; an exception from it ends the call as a Ctrl-C does.
        ``lora_request`` / ``priority``: vLLM's, taken at None (and priorities of 0)."""
        _vllm_extras(lora_request, priority)
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        items = self._normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        plist = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        if len(plist) != len(items):
            raise ValueError(f"Got {len(plist)} SamplingParams for {len(items)} prompts.")
        own: dict[int, SamplingParams] = {}  # each distinct object checked and copied once (EngineCore.call_params)
        for p in plist:
            if id(p) not in own:  # (a list of prompts mostly shares one object)
                own[id(p)] = self.core.call_params(p)
        plist = [own[id(p)] for p in plist]
        maxpos = self.config.max_position_embeddings
        items = [(text, ids if p.truncate_prompt_tokens is None else
                  ids[-(max(maxpos - 1, 1) if p.truncate_prompt_tokens == -1 else p.truncate_prompt_tokens):])
                 for (text, ids), p in zip(items, plist)]  # (as vLLM: the last tokens, the text as given)
        if protocol is None:
            protocol = ParallelSampling()
        if not isinstance(protocol, Protocol):
            raise ValueError(f"protocol must be an engine.protocols.Protocol, got {type(protocol).__name__}.")
        # Its settings may have changed since it was made: checked (and normalised, as its
        # constructor does) on the caller's object, then on the call's own copy (a change made
        # while the call runs does not reach it; one made by another Python thread between the
        # first check and the copy would have reached the call unchecked).
        protocol.check_config()
        protocol = protocol.for_call()
        protocol.check_config()
        if stream is not None and not callable(stream):
            raise ValueError(f"stream={stream!r} must be a function (prompt_index, completion_index, text).")
        if stream is not None and not (isinstance(protocol, ParallelSampling) and protocol.select == "all"):
            raise ValueError("stream applies to plain sampling (ParallelSampling with select='all'): a "
                             "protocol's output is made from its threads at the end.")
        for p in plist:
            protocol.check_params(p)
        if hasattr(protocol, "prepare_prompt"):
            given, items = items, [(text, protocol.prepare_prompt(self.tokenizer, text, ids)) for text, ids in items]
            maxpos = self.config.max_position_embeddings
            for (_, ids), (_, full) in zip(given, items):
                if len(full) + 1 > maxpos and len(ids) + 1 <= maxpos:  # (the protocol's text made it too long)
                    raise ValueError(f"The prompt has {len(ids)} tokens, {len(full)} with the text "
                                     f"{type(protocol).__name__} puts around it, but the model's context is {maxpos} "
                                     f"({self.config.context_source}); shorten that text (Hogwild: collab_prompt=None, "
                                     "loom generate --no-collab-prompt, leaves the prompt as it is; its default "
                                     "lists every worker's name).")
        reqs = []
        for (text, ids), p in zip(items, plist):
            need = self._check_fits(ids, p, protocol)
            req = Request(self._next_id, text, ids, p, protocol, need)
            req.metrics.prompt_tokens = len(ids)
            self._next_id += 1
            reqs.append(req)
        # (before the requests: nothing else holds pages now; a pass of its own over each prompt)
        plp = [None if r.params.prompt_logprobs is None else
               self._prompt_logprobs(r.prompt_ids, r.params.prompt_logprobs, self.core.namer(r.params)) for r in reqs]
        shared = self._share_prefixes(reqs) if self.share_prompt_prefixes and protocol.shares_prompt_prefix else None
        try:
            outs = self._run(reqs, use_tqdm, _Streamer(self, reqs, stream) if stream is not None else None)
        finally:
            if shared is not None:
                self._release_shared(*shared)
        for out, lp in zip(outs, plp):
            out.prompt_logprobs = lp
        return outs

    # Prompts of one generate call that begin with the same MIN_SHARED_PREFIX or more tokens
    # share them: written once, in segments every such request's root reads (its own segment
    # holds the rest of its prompt), so they are prefilled once and each decode step reads
    # them once for all those requests' threads. share_prompt_prefixes=False: each request
    # writes its whole prompt (the tokens and log-probs are the same up to float rounding).
    share_prompt_prefixes = True
    MIN_SHARED_PREFIX = 16

    def _share_prefixes(self, reqs: list[Request]):
        """Write the prompt prefixes ``reqs`` share (when the protocol's shares_prompt_prefix)
        and set each sharing request's ``prefix`` and its
        ``pages_needed`` (less the prompt pages it no longer writes). The prefixes are the
        lcp intervals of the sorted prompts (each a range of them sharing l >= MIN_SHARED_PREFIX
        tokens), nested: a segment for an interval holds the tokens past its enclosing
        interval's, kept when they are MIN_SHARED_PREFIX or more; each request keeps at least
        its last prompt token. Returns (segments, reservation) for _release_shared, or None:
        nothing shared, or the prefixes' pages with the largest request's need would not fit
        the free pages (each request must still be able to run alone beside them)."""
        c, M = self.cache, self.MIN_SHARED_PREFIX
        order = sorted((r for r in reqs if len(r.prompt_ids) > M), key=lambda r: r.prompt_ids)
        if len(order) < 2:
            return None
        lcp = [_common_prefix(a.prompt_ids, b.prompt_ids, min(len(a.prompt_ids), len(b.prompt_ids)) - 1)
               for a, b in zip(order, order[1:])]
        # The lcp-interval tree (one bottom-up pass with a stack): a node [l, lb, rb, children]
        # is a range of the sorted prompts whose first l tokens are equal, its children the
        # ranges within it that share more.
        stack = [[0, 0, len(order) - 1, []]]
        for i, l in enumerate(lcp + [0]):  # (l: between order[i] and order[i + 1]; then a sentinel)
            lb, last = i, None
            while l < stack[-1][0]:
                last = stack.pop()
                last[2], lb = i, last[1]
                if l <= stack[-1][0]:
                    stack[-1][3].append(last)
                    last = None
            if l > stack[-1][0]:
                stack.append([l, lb, None, [last] if last is not None else []])
        # Top down: a node becomes a segment when it shares MIN_SHARED_PREFIX tokens or more past
        # the last segment above it; a request reads the segments of the deepest one over it.
        kept, chain_of = [], [()] * len(order)  # (chain: (l, start, key) of each segment, outermost first)
        todo = [(stack[0], ())]
        while todo:
            (l, lb, rb, children), chain = todo.pop()
            start = chain[-1][0] if chain else 0
            if l >= M and l - start >= M:
                chain = chain + ((l, start, len(kept)),)
                kept.append((order[lb].prompt_ids[start:l], chain))
                for k in range(lb, rb + 1):
                    chain_of[k] = chain
            todo += [(child, chain) for child in children]
        if not kept:
            return None
        total = sum(c.pages_for(len(toks)) for toks, _ in kept)
        need = {id(r): r.pages_needed for r in reqs}
        for r, chain in zip(order, chain_of):
            if chain:
                P = len(r.prompt_ids)
                need[id(r)] = r.pages_needed - c.pages_for(P) + c.pages_for(P - chain[-1][0])
        if not c.can_reserve(total + max(need.values())):
            return None
        res = c.reserve(total)
        segs = []
        try:
            for toks, chain in kept:
                segs.append(c.new_segment(chain[-1][1], res))
                segs[-1].tokens = list(toks)
            # outer prefixes before the ones that read them: one forward per nesting depth
            for d in range(max(len(chain) for _, chain in kept)):
                with torch.inference_mode():
                    self.runner.run(StepBatch([StepItem(segs[chain[-1][2]], segs[chain[-1][2]].tokens,
                                                        [(segs[key], 0) for _, _, key in chain], want_logits=False)
                                               for _, chain in kept if len(chain) == d + 1]))
        except BaseException:
            self._release_shared(segs, res)
            raise
        for r, chain in zip(order, chain_of):
            if chain:
                r.prefix = tuple((segs[key], 0) for _, _, key in chain)
                r.pages_needed = need[id(r)]
                r.metrics.shared_prompt_tokens = chain[-1][0]
        return segs, res

    def _release_shared(self, segs: list, res):
        """The call's references to its shared prefixes (the requests' trees hold theirs while
        they run), and what is left of their reservation."""
        for seg in segs:
            self.cache.release_segment(seg)
        self.cache.release(res)

    PROMPT_LOGPROBS_ROWS = 256  # _prompt_logprobs' rows a forward pass ([rows, vocab] logits at once)

    @torch.inference_mode()
    def _prompt_logprobs(self, ids: list[int], k: int, namer) -> list:
        """SamplingParams.prompt_logprobs of one prompt (vLLM's): None, then for each token
        after the first its Logprob after the tokens before it and the top-k there. The prompt
        but its last token is fed into a segment of its own in passes of PROMPT_LOGPROBS_ROWS
        tokens, each pass's [rows, vocab] logits reduced before the next."""
        c, out = self.cache, [None]
        if len(ids) < 2:
            return out
        need = c.pages_for(len(ids) - 1)
        if not c.can_reserve(need):  # (generate checked that the request fits: only sessions hold pages)
            raise sessions_hold_pages(c, need, "prompt_logprobs' pass over the prompt")
        with self._scratch_segment(need) as seg:
            for a in range(0, len(ids) - 1, self.PROMPT_LOGPROBS_ROWS):
                b = min(a + self.PROMPT_LOGPROBS_ROWS, len(ids) - 1)
                logits = self.runner.run(StepBatch([StepItem(seg, ids[a:b], [(seg, 0)], all_logits=True)]))
                out += top_logprobs_rows(_log_softmax_(logits), list(range(b - a)), ids[a + 1:b + 1],
                                         [k] * (b - a), [namer] * (b - a))
        return out

    @contextlib.contextmanager
    def _scratch_segment(self, pages: int):
        """A segment at position 0 on a reservation of ``pages`` (the caller checked that
        they are free), for a pass outside any request (score, prompt_logprobs): its pages
        and the reservation back whatever fails, making the segment included."""
        c = self.cache
        res = c.reserve(pages)
        try:
            seg = c.new_segment(0, res)
            try:
                yield seg
            finally:
                c.release_segment(seg)
        finally:
            c.release(res)

    def _run(self, reqs: list[Request], use_tqdm: bool, streamer=None) -> list[RequestOutput]:
        sched = self.scheduler
        for r in reqs:
            sched.add(r)
        done: dict[int, RequestOutput] = {}
        try:
            while sched.has_work():
                for out in sched.step():
                    done[out.request_id] = out
                if streamer is not None:
                    streamer.step()
                if use_tqdm:
                    print(f"\rloom: {len(done)}/{len(reqs)} requests done", end="", file=sys.stderr)
        except BaseException as e:
            sched.abort_all()
            which = [i for i, r in enumerate(reqs) if r.id in getattr(e, "request_ids", ())]
            if isinstance(e, FloatingPointError) and which and e.args:
                many = len(which) > 1
                e.args = (f"{e.args[0]} They come from prompt{'s' * many} {', '.join(map(str, which))} of this "
                          "call (0-based); the call gives no outputs: run the other prompts without "
                          f"{'them' if many else 'it'}.", *e.args[1:])
            raise
        if use_tqdm:
            print(file=sys.stderr)
        return [done[r.id] for r in reqs]

    def chat(self, messages, sampling_params=None, use_tqdm: bool = False,
             add_generation_prompt: bool = True, protocol: Protocol | None = None,
             chat_template_kwargs: dict | None = None, stream=None, tools: list[dict] | None = None,
             documents: list[dict] | None = None, continue_final_message: bool = False,
             chat_template: str | None = None, lora_request=None,
             priority: list[int] | None = None) -> list[RequestOutput]:
        """Generate for a conversation (a list of ``{"role", "content"}`` dicts) or a list of
        conversations, each rendered by the model's chat template; ``protocol`` as in
        generate() (the rendered conversation is the prompt as it is: Hogwild's
        collaboration prompt, which it adds around a text prompt, is not added);
        ``chat_template_kwargs``: more variables for the template (e.g. Qwen3's
        ``{"enable_thinking": False}``); ``tools`` (JSON schemas) and ``documents``: the
        template's; ``continue_final_message=True`` (with ``add_generation_prompt=False``):
        the model continues the last message; ``chat_template``: a template's text or the name
        of one of the model's, instead of its default; ``stream``, ``lora_request`` and
        ``priority`` as in generate()."""
        _vllm_extras(lora_request, priority)
        if isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], dict):
            convs = [messages]
        elif isinstance(messages, (list, tuple)) and all(isinstance(c, (list, tuple)) for c in messages):
            convs = list(messages)  # (tuples too, as transformers' apply_chat_template takes them;
            #                          none: no outputs, as generate())
        else:
            raise ValueError("messages must be a conversation (a list of {'role', 'content'} dicts) "
                             "or a list of conversations.")
        texts = [self.tokenizer.apply_chat_template(
            c, add_generation_prompt, chat_template_kwargs, tools=tools, documents=documents,
            continue_final_message=continue_final_message, chat_template=chat_template) for c in convs]
        outs = self.generate([self.tokenizer.encode(t, add_special_tokens=False) for t in texts],
                             sampling_params, use_tqdm, protocol, stream)
        for out, text in zip(outs, texts):
            out.prompt = text  # (the rendered conversation)
        return outs

    # ---- scoring ---------------------------------------------------------------------------
    @torch.inference_mode()
    @serialized
    def score(self, token_ids) -> list[torch.Tensor]:
        """Teacher-forced log-probs: for each sequence a float32 [P, vocab] tensor whose row i
        is the next-token distribution after token i. Sequences in the forms generate() takes
        prompts (a text, token ids, or a list of them); no sequences (an empty list): no outputs."""
        if isinstance(token_ids, (list, tuple)) and not token_ids:
            return []
        empty = ("score() got an empty sequence: its result's row i is the distribution after token i, so a "
                 "sequence needs at least one token (no sequences: score([]) -> []).")
        token_ids = _as_list(token_ids)  # (a tensor or numpy array: an empty one is one empty sequence)
        if isinstance(token_ids, list) and not token_ids:
            raise ValueError(empty)
        seqs = self._normalize_prompts(token_ids, empty=empty)  # (the forms generate() takes)
        outs = []
        for _, ids in seqs:
            self._check_prompt_len(len(ids), room=0)
            c = self.cache
            need = c.pages_for(len(ids))
            if need > c.num_pages:
                raise ValueError(f"score() of {len(ids)} tokens needs {need} pages but the KV cache has "
                                 f"{c.num_pages} pages of {c.page_size} tokens; raise kv_cache_tokens (now "
                                 f"{c.num_pages * c.page_size}).")
            if not c.can_reserve(need):
                raise ValueError(f"score() of {len(ids)} tokens needs {need} free pages but open sessions "
                                 f"hold the cache ({c.pages_unreserved} free); close them, or raise "
                                 "kv_cache_tokens.")
            with self._scratch_segment(need) as seg:
                batch = StepBatch([StepItem(seg, ids, [(seg, 0)], all_logits=True)])
                outs.append(_log_softmax_(self.runner.run(batch)))
        return outs

    def get_tokenizer(self) -> Tokenizer:
        """The model's tokenizer, as vLLM's ``LLM.get_tokenizer()``: Loom's own (encode, decode,
        apply_chat_template as transformers' with tokenize=False / True), not a transformers one."""
        return self.tokenizer

    @serialized
    def session(self, prompt) -> "Session":
        """A programmable thread tree over ``prompt`` (str or token ids); see engine.session."""
        from .session import Session
        prompt = _as_list(prompt)
        if not isinstance(prompt, (str, list, tuple, Mapping)):
            raise ValueError(f"session() takes a prompt (a string, a list of token ids or a vLLM prompt dict), got "
                             f"{type(prompt).__name__}.")
        (text, ids), = self._normalize_prompts([prompt])
        self._check_prompt_len(len(ids))
        return Session(self, ids)

    @locked
    def cache_stats(self) -> dict:
        return self.cache.stats()
