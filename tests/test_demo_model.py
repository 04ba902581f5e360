"""The shipped demo model (engine/assets/demo_model) and its task.

* it loads like any checkpoint, within the size budget, with the tags as single tokens;
* the task generator is seeded, the held-out split is disjoint from training, the
  checker is exact;
* the training examples are the engine's own thread trees (session verbs + pack);
* on 200 held-out problems, greedy ``Multiverse()`` solves >= 95% with a critical
  path <= 0.6x the tokens of decoding them sequentially;
* the training forward on ``pack(session)`` gives the engine's logprobs (1e-4, fp32);
* ``loom demo`` runs end to end.
"""
from __future__ import annotations

import io
import json
import os
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.demo_run import model_dir, run_demo
from engine.demo_task import (EOS, JOIN_HEADER, TAGS, Problem, check, draw, is_held_out,
                              make_problems, parse_answer, solve)
from engine.protocols import Multiverse
from engine.train_demo import forward, pack_example
from engine.trie import pack

HELD_OUT_SEED = 20240601  # training draws from the other split with its own seed


@pytest.fixture(scope="module")
def llm():
    return LLM(model_dir(), seed=0, kv_cache_tokens=1 << 21, page_size=16)


@pytest.fixture(scope="module")
def weights():
    from safetensors.torch import load_file
    p = load_file(os.path.join(model_dir(), "model.safetensors"))
    with open(os.path.join(model_dir(), "config.json")) as f:
        return p, json.load(f)


def enc(llm, text: str) -> list[int]:
    return llm.tokenizer.encode(text, add_special_tokens=False)


# ---- the shipped files -----------------------------------------------------------------------
def test_shipped_model_loads(llm):
    d = model_dir()
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json"):
        assert os.path.isfile(os.path.join(d, f)), f
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))
    assert size < 20 * 2**20
    assert llm.config.architecture == "Qwen3ForCausalLM"
    assert llm.eos_ids == [llm.tokenizer.token_to_id(EOS)]
    for tag in TAGS:
        assert len(enc(llm, tag)) == 1, tag
    text = "12+34=?\n<Path>\n1: 5+6=11</Path>"
    assert llm.tokenizer.decode(enc(llm, text), skip_special_tokens=False) == text


# ---- the task -----------------------------------------------------------------------------------
def test_task_generator_and_checker():
    a, b = make_problems(20, 3), make_problems(20, 3)
    assert a == b and make_problems(20, 4) != a
    assert all(is_held_out(p.numbers) for p in a)
    rng = random.Random(0)
    assert not any(is_held_out(draw(rng, held_out=False).numbers) for _ in range(500))
    p = Problem((38, 27, 91, 45, 62, 19, 73, 56))
    text = solve(p).sequential()
    assert "8+7=15\n3+2=5+1=6\nso 38+27=65</Path>" in text
    assert text.endswith("Answer: 411") and p.answer == 411
    assert check(p, text) and check(p, text + EOS)
    assert not check(p, text.replace("Answer: 411", "Answer: 412"))
    assert not check(p, text.replace("Answer: 411", "Answer: 4111"))
    assert not check(p, text[:-len("Answer: 411")])
    assert parse_answer("…</Parallel>\nAnswer: 7") == 7


def test_training_examples_are_engine_trees(llm):
    """pack_example (used by the trainer) == pack() of the same tree built through the
    Session verbs, and the loss covers exactly the sampled tokens."""
    p = make_problems(1, 5)[0]
    sol = solve(p)
    with llm.session(p.prompt) as s:
        (main,) = s.fork(s.root, [[]])
        s.inject(main, sol.main)
        kids = s.fork(main, sol.path_headers)
        for k, t in zip(kids, sol.paths):
            s.inject(k, t)
        c = s.join(kids, JOIN_HEADER, positions="max")
        s.inject(c, sol.conclusion + EOS)
        ref = pack(s)
        assert s.pages_held() == 0  # building a tree writes no K/V
    ids, pos, mask, tgt = pack_example(lambda x: enc(llm, x), p)
    for x, y in zip((ids, pos, mask), ref):
        assert torch.equal(x, y)
    n_headers = sum(len(enc(llm, h)) for h in sol.path_headers) + len(enc(llm, JOIN_HEADER))
    n_prompt = len(enc(llm, p.prompt))
    assert int((tgt >= 0).sum()) == len(ids) - n_prompt - n_headers
    # paths start together at the fork position; the conclusion after the longest path
    fork = n_prompt + len(enc(llm, sol.main))
    starts = [int(pos[i]) for i in range(1, len(ids)) if int(pos[i]) <= int(pos[i - 1])]
    assert starts == [fork] * 3
    sids, spos, smask, stgt = pack_example(lambda x: enc(llm, x), p, sequential=True)
    assert torch.equal(smask, torch.tril(torch.ones(len(sids), len(sids), dtype=torch.bool)))
    assert int((stgt >= 0).sum()) == len(sids) - n_prompt


# ---- the model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def held_out_runs(llm):
    problems = make_problems(200, HELD_OUT_SEED)
    prompts = [p.prompt for p in problems]
    par = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=400), protocol=Multiverse())
    seq = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=700))
    return problems, [r.outputs[0] for r in par], [r.outputs[0] for r in seq]


def test_held_out_accuracy_fork_join(held_out_runs):
    problems, par, _ = held_out_runs
    ok = sum(check(p, o.text) for p, o in zip(problems, par))
    assert ok >= 190, f"fork/join accuracy {ok}/200"
    forked = sum(any(e["event"] == "fork" for e in o.events) for o in par)
    assert forked == 200 and all(o.metrics["max_parallel_threads"] == 4 for o in par)


def test_held_out_critical_path_vs_sequential(held_out_runs):
    problems, par, seq = held_out_runs
    crit = sum(o.metrics["critical_path_tokens"] for o in par)
    seq_tokens = sum(len(o.token_ids) for o in seq)
    assert crit <= 0.6 * seq_tokens, (crit, seq_tokens)
    ok = sum(check(p, o.text) for p, o in zip(problems, seq))
    assert ok >= 190, f"sequential accuracy {ok}/200"


def test_training_view_matches_engine(llm, weights):
    """Greedy fork/join through the session API with logprobs; the training forward on
    pack(session) reproduces every sampled token's logprob (float32, 1e-4)."""
    params, cfg = weights
    p = make_problems(1, 77)[0]
    sol = solve(p)
    tid = llm.tokenizer.token_to_id

    def greedy(stop=None):
        # top-5 logprobs: the model is confident, so the chosen tokens' are all ~0; the
        # runners-up (down to ~-30) are what tests the numerics
        return SamplingParams(temperature=0, logprobs=5, max_tokens=200,
                              stop_token_ids=[tid(stop)] if stop else None)

    record = []
    with llm.session(p.prompt) as s:
        (main,) = s.fork(s.root, [[]])
        record.append((main, s.generate([main], greedy("</Goal>"))[0]))
        kids = s.fork(main, sol.path_headers)
        record += zip(kids, s.generate(kids, greedy("</Path>")))
        c = s.join(kids, JOIN_HEADER, positions="max")
        record.append((c, s.generate([c], greedy())[0]))
        ids, pos, mask = pack(s)
        start, off = {}, 0
        for t in s.tree.threads:
            if t.tokens:
                start[t.id], off = off, off + len(t.tokens)
        parent_last = start[s.root.id] + len(s.root.token_ids) - 1
        text = "".join(h.text for h, _ in record)
    with torch.no_grad():
        lp = forward(params, cfg, ids[None], pos[None], mask[None])[0].log_softmax(-1)
    n, worst = 0, 0.0
    for h, out in record:
        toks = h.token_ids
        first = len(toks) - len(out.token_ids)
        for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
            i = first + j
            row = start[h.id] + i - 1 if i > 0 else parent_last
            assert int(lp[row].argmax()) == tok
            for k, v in d.items():
                worst = max(worst, abs(float(lp[row, k]) - v))
            n += 1
    assert n > 200 and worst < 1e-4, (n, worst)
    print(f"{n} sampled tokens, max |logprob diff| over their top-5 {worst:.2e}")
    assert check(p, text)


def test_loom_demo_runs():
    buf = io.StringIO()
    r = run_demo(2, seed=3, out=buf, live=False)
    s = buf.getvalue()
    assert f"accuracy: {r['accuracy']}/2" in s and "problem 2 path 4" in s
    assert r["accuracy"] == 2 and r["sequential_accuracy"] == 2
    assert r["steps"] < r["sequential_steps"]


def test_training_forward_is_hugging_face_qwen3(weights):
    """The trainer's plain-torch forward is transformers' Qwen3ForCausalLM on the shipped
    checkpoint (packed tree, 4D mask, position ids)."""
    transformers = pytest.importorskip("transformers")
    params, cfg = weights
    d = model_dir()
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(d)
    ids, pos, mask, _ = pack_example(lambda s: tok(s, add_special_tokens=False).input_ids,
                                     make_problems(1, 5)[0])
    m = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    with torch.no_grad():
        ref = hf(ids[None], position_ids=pos[None], attention_mask=m[None, None]).logits[0]
        got = forward(params, cfg, ids[None], pos[None], mask[None])[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("lines, live", [(6, False), (40, True)])
def test_loom_demo_live_view_needs_a_tall_enough_terminal(monkeypatch, lines, live):
    """On a terminal the demo redraws its frame in place; one shorter than the frame gets
    the plain log instead (redrawing would scroll and smear the frames)."""
    import os
    import engine.demo_run as D

    class Terminal(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(D.shutil, "get_terminal_size", lambda fallback=None: os.terminal_size((100, lines)))
    monkeypatch.setattr(D.LiveView.__init__, "__defaults__", (0.0,))  # no pacing of frames
    buf = Terminal()
    run_demo(1, seed=3, out=buf)
    assert ("\x1b[" in buf.getvalue()) == live
    assert "accuracy: 1/1" in buf.getvalue()


def test_text_after_the_answer_line_is_not_an_answer():
    p = Problem((38, 27, 91, 45, 62, 19, 73, 56))
    text = solve(p).sequential()
    assert check(p, text)
    assert not check(p, text + "\nmore text")
    assert parse_answer("Answer: 411\nAnswer: 7") == 7


def test_the_split_is_pinned():
    """The shipped model was trained on one split: the hash must not change."""
    assert not is_held_out((38, 27, 91, 45, 62, 19, 73, 56))
    assert is_held_out((87, 10, 99, 67, 44, 39, 85, 23)) and is_held_out((88, 85, 84, 60, 92, 31, 31, 74))
    assert [p.numbers for p in make_problems(2, 0)] == [(82, 38, 40, 28, 79, 67, 21, 20),
                                                        (18, 21, 96, 26, 29, 14, 20, 99)]


def test_seeds_and_counts():
    assert make_problems(5, -3) != make_problems(5, 3)
    for bad in (0, -1, 2.0):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            make_problems(bad, 0)
