"""``loom demo``: the shipped demo model solves fresh problems with fork/join threads.

All problems run in ONE ``llm.generate(..., protocol=Multiverse())`` call (one batched
forward pass per step over every thread of every problem); the view follows each
thread as it grows: redrawn in place with ANSI escapes on a terminal, one plain line
per finished thread otherwise. The same problems are then decoded sequentially
(plain ``llm.generate``, one thread per problem; the model was trained on that
serialization too) to compare forward steps and critical-path tokens.
"""
from __future__ import annotations

import os
import shutil
import sys
import time

from safetensors import safe_open

from .demo_task import EOS, Problem, check, make_problems, parse_answer

MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "demo_model")
MAX_TOKENS_PARALLEL = 400    # critical-path budget of one problem (it needs ~165)
MAX_TOKENS_SEQUENTIAL = 700  # the whole solution as one thread (~285)


def model_dir() -> str:
    if not os.path.isfile(os.path.join(MODEL_DIR, "model.safetensors")):
        raise FileNotFoundError(
            f"The demo model is missing from {MODEL_DIR}; reinstall Loom, or retrain it with "
            "`python -m engine.train_demo`.")
    return MODEL_DIR


class StepHook:
    """Inside ``with StepHook(llm, fn):`` every engine step of ``llm.generate`` is followed
    by ``fn(scheduler, finished_outputs)``. The engine has no step callback; this wraps
    this one scheduler's ``step`` and counts the steps and the seconds spent in ``fn``."""

    def __init__(self, llm, fn=None):
        self.sched, self.fn = llm.scheduler, fn
        self.steps, self.overhead = 0, 0.0

    def _step(self):
        outs = self._inner()
        self.steps += 1
        if self.fn is not None:
            t0 = time.perf_counter()
            self.fn(self.sched, outs)
            self.overhead += time.perf_counter() - t0
        return outs

    def __enter__(self):
        self._inner = self.sched.step
        self.sched.step = self._step
        return self

    def __exit__(self, *exc):
        del self.sched.step  # back to the class's method


def _oneline(text: str) -> str:
    return text.replace(EOS, "").replace("\n", " ⏎ ")


def tree_rows(tree: list[dict]) -> list[tuple[str, str, bool]]:
    """(label, text, finished) per generating thread of a request's thread tree (the
    ``.tree`` of a protocol output): outline (main thread), path 1..k, conclusion."""
    root = tree[0]["id"]  # the prompt
    rows, paths = [], 0
    for t in tree[1:]:
        if t["role"] == "path":
            paths += 1
            label = f"path {paths}"
        else:
            label = "outline" if t["parent"] == root else "conclusion"
        rows.append((label, t["text"], t["done"]))
    return rows


def running_tree(req, tok) -> list[dict]:
    """The same view of a request still running (its live threads)."""
    return [{"id": t.id, "parent": t.parent.id if t.parent else None,
             "role": t.tag.role if t.tag else "prompt", "done": t.finished,
             "text": tok.decode(t.tokens, skip_special_tokens=False)}
            for t in req.tree.threads if t.tag is not None or t.parent is None]


def finished_tree(out) -> list[dict]:
    return [dict(t, done=True) for t in out.outputs[0].tree]


class LiveView:
    """Redraws the first problems' threads in place after every step (TTY). A step of
    this tiny model takes about a millisecond, so frames are paced (``pace`` seconds
    each) for the eye to follow; that time is left out of the printed timings."""

    MIN_LINES = 12  # a terminal shorter than this gets the plain log

    def __init__(self, problems: list[Problem], first_id: int, tok, out, pace: float = 0.03):
        self.problems, self.first_id, self.tok, self.out = problems, first_id, tok, out
        self.pace = pace
        self.rows: dict[int, list[tuple[str, str, bool]]] = {}
        self.drawn, self.steps = 0, 0
        size = shutil.get_terminal_size((100, 40))
        self.width = max(40, size.columns - 1)
        self.shown = max(1, min(len(problems), (size.lines - 4) // 7))

    def __call__(self, sched, finished):
        self.steps += 1
        for req in sched.running:
            if req.id - self.first_id < self.shown:
                self.rows[req.id - self.first_id] = tree_rows(running_tree(req, self.tok))
        for o in finished:
            if o.request_id - self.first_id < self.shown:
                self.rows[o.request_id - self.first_id] = tree_rows(finished_tree(o))
        sampling = sum(1 for r in sched.running for t in r.run.active if not t.finished)
        self.draw(f"step {self.steps}: {sampling} threads sampling in one forward pass")
        time.sleep(self.pace)

    def draw(self, status: str):
        lines = [status]
        for i in range(self.shown):
            p = self.problems[i]
            lines.append(f"problem {i + 1}: {p.prompt.strip()}")
            for label, text, done in self.rows.get(i, []):
                mark = "✓" if done else "…"
                room = self.width - 16
                body = _oneline(text.strip())
                body = body if len(body) <= room else "…" + body[-room + 1:]
                lines.append(f"  {label:<11}{mark} {body}")
        if self.shown < len(self.problems):
            lines.append(f"(+{len(self.problems) - self.shown} more problems running in the same batch)")
        w = self.out.write
        if self.drawn:
            w(f"\x1b[{self.drawn}F")  # back to the first line of the previous frame
        for ln in lines:
            w("\x1b[2K" + ln[:self.width] + "\n")
        for _ in range(self.drawn - len(lines)):  # a shorter frame: blank the leftovers
            w("\x1b[2K\n")
        self.drawn = max(self.drawn, len(lines))
        self.out.flush()


class PlainLog:
    """One line per thread as it finishes (not a terminal)."""

    def __init__(self, problems: list[Problem], first_id: int, tok, out):
        self.problems, self.first_id, self.tok, self.out = problems, first_id, tok, out
        self.seen: set[tuple[int, str]] = set()
        self.steps = 0

    def __call__(self, sched, finished):
        self.steps += 1
        trees = [(r.id, running_tree(r, self.tok)) for r in sched.running]
        trees += [(o.request_id, finished_tree(o)) for o in finished]
        for rid, tree in trees:
            i = rid - self.first_id
            for label, text, done in tree_rows(tree):
                if done and (i, label) not in self.seen:
                    self.seen.add((i, label))
                    print(f"[step {self.steps:3d}] problem {i + 1} {label:<10} {_oneline(text.strip())}",
                          file=self.out, flush=True)


def _prod(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _timed_generate(llm, prompts, params, protocol=None, view=None):
    """(outputs, forward steps of the batch, seconds without the view's drawing)."""
    with StepHook(llm, view) as hook:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, protocol=protocol)
        wall = time.perf_counter() - t0 - hook.overhead
    return [r.outputs[0] for r in outs], hook.steps, wall


def _header(llm, path: str, n: int, seed: int, out):
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        n_params = sum(_prod(f.get_slice(k).get_shape()) for k in f.keys())
    cfg = llm.config
    print(f"loom demo: a {n_params / 1e6:.2f}M-parameter {cfg.architecture} ({cfg.num_layers} layers, "
          f"trained in-repo by engine/train_demo.py) adds eight 2-digit numbers: four pair sums in "
          f"parallel paths, then the final sum in the conclusion. Attention backend: "
          f"{llm.attention_backend}.", file=out)
    print(f"{n} held-out problems (seed {seed}), greedy, all in ONE generate call with "
          f"protocol=Multiverse().\n", file=out)


def _report(problems, par, seq, out) -> dict:
    """par / seq: (outputs, steps, wall) of the fork/join and the sequential runs."""
    (p_out, p_steps, p_wall), (s_out, s_steps, s_wall) = par, seq
    n = len(problems)
    p_ok = [check(p, o.text) for p, o in zip(problems, p_out)]
    s_ok = [check(p, o.text) for p, o in zip(problems, s_out)]
    p_tok = sum(o.metrics["total_tokens"] for o in p_out)
    crit = sum(o.metrics["critical_path_tokens"] for o in p_out)
    s_tok = sum(len(o.token_ids) for o in s_out)
    print("", file=out)
    for i, (p, o, ok) in enumerate(zip(problems, p_out, p_ok)):
        verdict = "correct" if ok else f"WRONG, expected {p.answer}"
        print(f"problem {i + 1}: {p.prompt.strip()} -> {parse_answer(o.text)} ({verdict})", file=out)
    print(f"accuracy: {sum(p_ok)}/{n}", file=out)
    rows = [("forward steps (whole batch)", p_steps, s_steps),
            ("critical-path tokens / problem", crit / n, s_tok / n),
            ("tokens sampled / problem", p_tok / n, s_tok / n),
            ("most threads of one problem at once",
             max(o.metrics["max_parallel_threads"] for o in p_out), 1),
            ("seconds (view drawing excluded)", p_wall, s_wall),
            ("tokens/s", p_tok / p_wall, s_tok / s_wall),
            ("accuracy", f"{sum(p_ok)}/{n}", f"{sum(s_ok)}/{n}")]
    print(f"\n{'':38}{'fork/join':>12}{'sequential':>12}", file=out)
    for name, a, b in rows:
        fa, fb = (f"{x:.2f}" if isinstance(x, float) and x < 10 else
                  f"{x:.1f}" if isinstance(x, float) else str(x) for x in (a, b))
        print(f"{name:38}{fa:>12}{fb:>12}", file=out)
    print(f"\nfork/join took {p_steps / s_steps:.2f}x the forward steps and {crit / s_tok:.2f}x the "
          f"critical-path tokens of decoding the same problems sequentially (measured above: plain "
          f"llm.generate, one thread per problem; the model was also trained on that serialization).",
          file=out)
    return {"accuracy": sum(p_ok), "sequential_accuracy": sum(s_ok), "steps": p_steps,
            "sequential_steps": s_steps, "critical_path_tokens": crit, "sequential_tokens": s_tok}


def run_demo(num_problems: int = 5, seed: int = 0, out=None, live: bool | None = None) -> dict:
    """Solve ``num_problems`` held-out problems drawn with ``seed``: fork/join with a view of
    the threads (live on a terminal), then sequentially; print the comparison. Returns the
    printed numbers."""
    from . import LLM, SamplingParams
    from .protocols import Multiverse
    out = out or sys.stdout
    if live is None:  # (a frame is ~9 lines: redrawn in place on a shorter terminal it would scroll
        live = out.isatty() and shutil.get_terminal_size((100, 40)).lines >= LiveView.MIN_LINES  # and smear)
    path = model_dir()
    problems = make_problems(num_problems, seed)
    # A problem's request reserves at most ~8.4k tokens (Multiverse's bound for it) and uses a
    # few hundred: all problems run together up to 2M tokens of cache (~4 GB for this model),
    # more wait for pages (the scheduler admits them as earlier ones finish).
    llm = LLM(path, seed=seed, kv_cache_tokens=min(max(1 << 18, 10_000 * num_problems), 1 << 21))
    _header(llm, path, num_problems, seed, out)
    prompts = [p.prompt for p in problems]
    view = (LiveView if live else PlainLog)(problems, llm._next_id, llm.tokenizer, out)
    par_params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS_PARALLEL)
    par = _timed_generate(llm, prompts, par_params, Multiverse(), view)
    if live:
        view.draw(f"done: {par[1]} forward steps")
        # Pacing the frames lets the CPU go idle between steps, which slows the steps
        # themselves: time the same (greedy, identical) run again without the view.
        par = _timed_generate(llm, prompts, par_params, Multiverse())
    seq = _timed_generate(llm, prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS_SEQUENTIAL))
    return _report(problems, par, seq, out)
