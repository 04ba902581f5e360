"""The Hogwild protocol: layouts, step commits, compaction, budgets, pages."""
from __future__ import annotations

import re

import pytest

from conftest import pages, random_ids
from engine import SamplingParams
from engine.protocols import Hogwild
from engine.protocols.hogwild import step_ended


def test_step_boundaries():
    assert step_ended("We add them. The sum is 7.\n\n")
    assert step_ended("Is it prime?\n\n")
    assert not step_ended("no sentence end\n\n")
    assert not step_ended("Done.\n")
    assert not step_ended("```python\nx = 1.\n\n")           # inside a code fence
    assert not step_ended("$$\na = b.\n\n")                   # inside display math
    assert step_ended("```python\nx = 1\n```\nThat runs.\n\n")


def test_step_boundaries_after_closing_marks_and_in_display_math():
    """A sentence end may be followed by closing quotes, brackets or markdown emphasis before
    the blank line; a blank line inside open \\[ display math is no step's end."""
    for text in ('He said "it is 7."\n\n', "(so it is 7.)\n\n", "It is **7.**\n\n", "It is 7?')\n\n"):
        assert step_ended(text), text
    assert not step_ended("\\[ x = 1.\n\n")
    assert step_ended("\\[ x = 1 \\] holds.\n\n")
    assert not step_ended('He said "it is 7"\n\n')


def test_a_closed_display_math_block_ends_a_step():
    """A paragraph break after closed $$ display math (two $$) is a step's end, as after a closed
    code fence; an odd count (one still open) is not. (A mutation counting $$ modulo 3 passed
    the suite: a step after "$$ ... $$" never ended.)"""
    assert step_ended("$$\na = b\n$$\nSo a is b.\n\n")
    assert step_ended("$$ a = b $$ holds. $$ c = d $$ too.\n\n")
    assert not step_ended("$$ a = b $$ holds. $$ c = d.\n\n")


def test_one_worker_contiguous_is_plain_greedy(make_llm):
    llm = make_llm("qwen3", attention_backend="cpu")
    prompt = random_ids(12, llm.config.vocab_size, 4)
    hw = Hogwild(workers=1, layout="contiguous", header="", finisher=False)
    p = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    out = llm.generate([prompt], p, protocol=hw)[0].outputs[0]
    ref = llm.generate([prompt], p)[0].outputs[0]
    assert out.token_ids == ref.token_ids
    assert llm.cache_stats()["pages_used"] == 0


def _per_worker(llm, names, next_token):
    """A token source: each thread's token is ``next_token(name)``, ``name`` the one of ``names``
    in its header (None: none is)."""
    def src(threads):
        return [next_token(next((n for n in names if n in llm.tokenizer.decode(t.tokens[:t.header_len])), None))
                for t in threads]
    return src


def _scripted(llm, scripts):
    """Each worker (by name in its header) types its script across steps, then '.' forever."""
    typed = {}

    def next_token(name):
        if name is None:
            return llm.tokenizer.encode("7", add_special_tokens=False)[0]
        toks = llm.tokenizer.encode(scripts[name], add_special_tokens=False)
        i = typed.get(name, 0)
        typed[name] = i + 1
        return toks[i] if i < len(toks) else toks[-2]
    return _per_worker(llm, scripts, next_token)


def _typed(typed: dict, scripts: dict, name: str) -> int:
    """Worker ``name``'s next token of its script (token ids), its last one repeated after."""
    typed[name] = typed.get(name, 0) + 1
    return scripts[name][min(typed[name], len(scripts[name])) - 1]


def _run_with(llm, src, params, protocol):
    """The one output of ``protocol`` on a fixed 9-token prompt, with ``src`` choosing the tokens."""
    llm.core.token_source = src
    try:
        return llm.generate([random_ids(9, llm.config.vocab_size, 5)], params, protocol=protocol)[0].outputs[0]
    finally:
        llm.core.token_source = None


SCRIPTS = {"Alice": "I take part one. It is 3.\n\nThen part three. It is 5.\n\nMore. Yes.\n\n" * 2,
           "Bob": "I take part two. It is 4.\n\nChecking Alice. Fine.\n\nGood. Go.\n\n" * 2,
           "Carol": "I verify. All good.\n\nStill checking. Ok.\n\n" * 3}


@pytest.mark.parametrize("workers", [1, 3])
def test_combined_layout_commits_and_compaction_are_exact(make_llm, workers):
    """Compaction rewrites the history's keys once; attention must not notice: every
    token's logprob is the same with and without it. With one worker the view is the
    plain transcript, so logprobs also equal teacher-forced scoring of it."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    names = ["Alice", "Bob", "Carol"][:workers]
    scripts = {n: SCRIPTS[n] for n in names}
    p = SamplingParams(temperature=0, max_tokens=60, logprobs=0, ignore_eos=True)
    prompt = random_ids(9, llm.config.vocab_size, 5)
    runs = {}
    for compact_after in (workers + 2, 1000):
        llm.core.token_source = _scripted(llm, scripts)
        try:
            hw = Hogwild(workers=workers, names=names, compact_after=compact_after, finisher=False,
                         stop_on_answer=False)
            runs[compact_after] = out = llm.generate([prompt], p, protocol=hw)[0].outputs[0]
        finally:
            llm.core.token_source = None
        assert llm.cache_stats()["pages_used"] == 0
        assert out.metrics["steps_committed"] >= 3 * workers
    small, big = runs[workers + 2], runs[1000]
    assert small.metrics["compactions"] > 0 and big.metrics["compactions"] == 0
    assert small.text == big.text
    for ws, wb in zip(small.workers, big.workers):
        assert ws["token_ids"] == wb["token_ids"]
        assert max(abs(a - b) for a, b in zip(ws["logprobs"], wb["logprobs"])) < 1e-4
    if workers == 1:
        lp = llm.score(prompt + small.token_ids)[0]
        w = small.workers[0]
        # the generated tokens, in transcript order, are the worker's non-header tokens
        gen_pos = []
        i = len(prompt)
        hdr = llm.tokenizer.encode("Alice: ", add_special_tokens=False)
        while i < len(prompt) + len(small.token_ids):
            ids = (prompt + small.token_ids)
            if ids[i:i + len(hdr)] == hdr:
                i += len(hdr)
                continue
            gen_pos.append(i)
            i += 1
        assert len(gen_pos) == len(w["logprobs"])
        for k, (pos, got) in enumerate(zip(gen_pos, w["logprobs"])):
            tok = (prompt + small.token_ids)[pos]
            assert abs(lp[pos - 1, tok].item() - got) < 1e-4, k


def test_requests_sharing_a_prompt_prefix_commit_and_compact_as_alone(make_llm):
    """Requests whose prompts begin alike read the shared beginning through their root's lead
    segments (LLM._share_prefixes): the workers' live views lay them out first, through steps,
    commits and compactions; the same text, tokens and log-probs as each writing its own."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    V = llm.config.vocab_size
    system = random_ids(40, V, 11)
    prompts = [system + random_ids(5, V, 12), system + random_ids(3, V, 13), random_ids(9, V, 5), system]
    p = SamplingParams(temperature=0, max_tokens=40, logprobs=0, ignore_eos=True)
    runs = {}
    for share in (False, True):
        llm.share_prompt_prefixes = share
        scripts = {n: llm.tokenizer.encode(SCRIPTS[n], add_special_tokens=False) for n in ("Alice", "Bob")}
        typed = {}  # (request's root, worker) -> tokens typed: each request's workers type their scripts

        def src(threads):
            names = [next(n for n in scripts if n in llm.tokenizer.decode(t.tokens[:t.header_len])) for t in threads]
            return [_typed(typed, {(id(t.live[0]), n): scripts[n]}, (id(t.live[0]), n)) for t, n in zip(threads, names)]
        llm.core.token_source = src
        try:
            runs[share] = llm.generate(prompts, p, protocol=Hogwild(workers=2, compact_after=4, finisher=False,
                                                                    stop_on_answer=False, collab_prompt=None))
        finally:
            llm.core.token_source, llm.share_prompt_prefixes = None, True
        assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
    assert [o.metrics.shared_prompt_tokens for o in runs[True]] == [39, 39, 0, 39]  # (the 40-token prompt keeps its last token)
    for a, b in zip(runs[False], runs[True]):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.text, x.token_ids, x.events, x.metrics) == (y.text, y.token_ids, y.events, y.metrics)
        for u, v in zip(x.workers, y.workers):
            assert (u["token_ids"], u["text"]) == (v["token_ids"], v["text"])
            assert max(abs(s - t) for s, t in zip(u["logprobs"], v["logprobs"])) < 1e-4
    assert all(o.outputs[0].metrics["compactions"] > 0 for o in runs[True])


def test_a_worker_that_ends_early_leaves_the_others_running(make_llm):
    """Alice ends (EOS) after one step while Bob goes on committing steps. Her last step
    joins the history once; it used to stay among the live threads too, so Bob's next view
    named it twice (and hers named itself): set_view refused, and the request failed."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    eos = llm.eos_ids[0]
    enc = lambda text: llm.tokenizer.encode(text, add_special_tokens=False)
    scripts = {"Alice": enc("I take one. Done.\n\n") + [eos],
               "Bob": enc("Step one. Ok.\n\nStep two. Ok.\n\n" * 4)}

    def src(threads):
        out = []
        for t in threads:
            head = llm.tokenizer.decode(t.tokens[:t.header_len])
            name = next(n for n in scripts if n in head)
            out.append(_typed(typed, scripts, name))
        return out

    p = SamplingParams(temperature=0, max_tokens=50, logprobs=0)
    prompt = random_ids(9, llm.config.vocab_size, 5)
    runs = {}
    for compact_after in (4, 1000):
        typed = {}
        llm.core.token_source = src
        try:
            hw = Hogwild(workers=2, names=["Alice", "Bob"], compact_after=compact_after, finisher=False,
                         stop_on_answer=False)
            runs[compact_after] = out = llm.generate([prompt], p, protocol=hw)[0].outputs[0]
        finally:
            llm.core.token_source = None
        assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
        alice, bob = out.workers
        assert alice["generated"] == len(scripts["Alice"]) and bob["generated"] == 50
        assert bob["text"].count("Step two. Ok.") >= 2 and bob["steps"] >= 4
    assert runs[4].metrics["compactions"] > 0
    assert runs[4].text == runs[1000].text
    for ws, wb in zip(runs[4].workers, runs[1000].workers):
        assert max(abs(a - b) for a, b in zip(ws["logprobs"], wb["logprobs"])) < 1e-4


def test_history_pages_are_shared_and_steps_scale(make_llm):
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    prompt = random_ids(30, llm.config.vocab_size, 6)
    p = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    steps = {}
    for workers in (1, 2, 4):
        names = ["Alice", "Bob", "Carol", "Dave"][:workers]
        llm.core.token_source = _scripted(llm, {n: SCRIPTS.get(n, SCRIPTS["Carol"]) for n in names})
        try:
            ro = llm.generate([prompt], p, protocol=Hogwild(workers=workers, names=names,
                                                           finisher=False, stop_on_answer=False))[0]
        finally:
            llm.core.token_source = None
        out = ro.outputs[0]
        steps[workers] = out.metrics["forward_steps"]
        assert out.metrics["total_tokens"] == 40 * workers
        # every worker's view holds the whole history, but each page exists once:
        hist_pages = sum(pages(len(t), 4) for t in
                         [w["token_ids"] for w in out.workers]) + out.metrics["steps_committed"]
        assert ro.metrics.kv_pages_peak <= pages(30, 4) + hist_pages + workers
        if workers > 1:
            assert workers * hist_pages > ro.metrics.kv_pages_peak
        assert llm.cache_stats()["pages_used"] == 0
    # workers advance together: forward steps do not grow with the number of workers
    assert steps[1] == steps[2] == steps[4]


def test_finisher_asks_for_the_answer(make_llm):
    llm = make_llm("qwen3", attention_backend="cpu")
    prompt = random_ids(10, llm.config.vocab_size, 8)
    llm.core.token_source = _scripted(llm, {"Alice": "Thinking. Hard.\n\n" * 9, "Bob": "Me too.\n\n" * 9})
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           protocol=Hogwild(workers=2, finisher_tokens=3))[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert "the final answer is \\boxed{" in out.text
    assert out.answer is not None
    assert llm.cache_stats()["pages_used"] == 0
    # the workers' min_tokens is not the finisher's (its 3 tokens: SamplingParams refused it mid-run)
    llm.core.token_source = _scripted(llm, {"Alice": "Thinking. Hard.\n\n" * 9, "Bob": "Me too.\n\n" * 9})
    try:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, min_tokens=5, ignore_eos=True),
                           protocol=Hogwild(workers=2, finisher_tokens=3))[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert "the final answer is \\boxed{" in out.text
    assert llm.cache_stats()["pages_used"] == 0


def test_a_workers_text_keeps_special_tokens_as_the_outputs_does(make_llm):
    """A worker's text is its tokens' text, special tokens included, as the output's text and a
    tree's threads' are (it was decoded with skip_special_tokens: a header's special token
    was in the output's text but not in the worker's)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       protocol=Hogwild(workers=2, header="<|im_start|>{name}: ", finisher=False))[0].outputs[0]
    for w in out.workers:
        assert w["text"].startswith(f"<|im_start|>{w['name']}: "), w["text"]
        assert w["text"] == llm.tokenizer.decode(w["token_ids"], skip_special_tokens=False)
        assert w["text"] in out.text


def _sentencepiece_llm(tmp_path, model_dir, byte_fallback: bool = False):
    """An LLM on the tiny model with a Llama-2-style (SentencePiece, Prepend) tokenizer (with
    its 256 byte-fallback tokens '<0x..>': ``byte_fallback``)."""
    import json
    import os
    from tokenizers import Tokenizer
    from conftest import read_json
    from engine import LLM
    from test_api import _copy_model, _sentencepiece_style_tokenizer
    d = _copy_model(tmp_path, model_dir, "sp_hogwild", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    spec = json.loads(_sentencepiece_style_tokenizer("legacy", V - 256 * byte_fallback).to_str())
    for b in range(256 * byte_fallback):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    Tokenizer.from_str(json.dumps(spec)).save(os.path.join(d, "tokenizer.json"))
    return LLM(d, kv_cache_tokens=8192)


def _scripted_ids(llm, scripts):
    """Each worker (by name in its header) writes its script (token ids), then EOS."""
    typed = {}
    return _per_worker(llm, scripts, lambda name: _typed(typed, scripts, name))


def test_a_workers_text_reads_after_the_prompt(tmp_path, model_dir):
    """A worker's text is read after the prompt, as the output's text: decoded alone, a
    SentencePiece decoder stripped its first space, so with header=" {name}:" a worker's text
    read "Alice: ..." while the output's text had " Alice: ..."."""
    llm = _sentencepiece_llm(tmp_path, model_dir)
    enc, eos = llm.tokenizer.encode_continuation, llm.eos_ids[0]
    scripts = {"Alice": enc(" I add. It is 5.\n\n") + [eos], "Bob": enc(" Fine.\n\n") + [eos]}
    out = _run_with(llm, _scripted_ids(llm, scripts), SamplingParams(max_tokens=30),
                    Hogwild(workers=2, header=" {name}:", collab_prompt=None, finisher=False))
    texts = {w["name"]: w["text"] for w in out.workers}
    assert texts == {"Alice": " Alice: I add. It is 5.\n\n Alice:", "Bob": " Bob: Fine.\n\n Bob:"}, texts
    assert " Alice: I add. It is 5.\n\n" in out.text and " Bob: Fine.\n\n" in out.text, out.text
    assert llm.cache_stats()["pages_used"] == 0


def test_the_finishers_answer_is_read_as_the_outputs_text(tmp_path, model_dir):
    """A finisher cut before its closing brace gives the answer it wrote so far, read as the
    output's text reads it: decoded alone, a character its last byte-fallback tokens left
    unfinished read U+FFFD in .answer ("5\ufffd") while the output's text left it out."""
    llm = _sentencepiece_llm(tmp_path, model_dir, byte_fallback=True)
    enc, eos, tid = llm.tokenizer.encode_continuation, llm.eos_ids[0], llm.tokenizer.token_to_id
    scripts = {"Alice": enc(" Done.\n\n") + [eos], "Bob": [eos], "final answer": enc("5") + [tid("<0xC3>")]}
    fin = len(scripts["final answer"])
    out = _run_with(llm, _scripted_ids(llm, scripts), SamplingParams(max_tokens=30),
                    Hogwild(workers=2, header=" {name}:", collab_prompt=None, finisher_tokens=fin))
    assert out.text.endswith("\\boxed{5") and out.answer == "5", (out.text, out.answer)
    assert llm.cache_stats()["pages_used"] == 0


def test_no_finisher_after_an_answer_the_outputs_text_has(tmp_path, model_dir):
    """The finisher runs only when the output's text has no answer, read as the output reads
    it: decoded alone, an invalid byte-fallback byte before a worker's closing brace turned
    the brace into U+FFFD too, so the answer that ended the collaboration (stop_on_answer) was
    not seen, the finisher ran and its answer replaced the worker's."""
    llm = _sentencepiece_llm(tmp_path, model_dir, byte_fallback=True)
    enc, eos, tid = llm.tokenizer.encode_continuation, llm.eos_ids[0], llm.tokenizer.token_to_id
    scripts = {"Alice": enc(" So \\boxed{5") + [tid("<0xC3>"), tid("<0x7D>"), eos], "Bob": enc(" Hm hm hm hm hm"),
               "final answer": enc("7}")}
    out = _run_with(llm, _scripted_ids(llm, scripts), SamplingParams(max_tokens=30),
                    Hogwild(workers=2, header=" {name}:", collab_prompt=None))
    assert "All workers have stopped" not in out.text and out.answer == "5\ufffd", (out.text, out.answer)
    assert llm.cache_stats()["pages_used"] == 0


def test_the_finisher_stops_at_a_closing_brace_the_outputs_text_has(tmp_path, model_dir):
    """The finisher stops at the "}" of its text read as the output's text reads it (after its
    header, whole characters): decoded alone, a byte-fallback "}" after an unfinished
    character's byte turned into U+FFFD with it, so the finisher wrote on to finisher_tokens,
    its text running on past the brace ("\\boxed{5\ufffd}}}}")."""
    llm = _sentencepiece_llm(tmp_path, model_dir, byte_fallback=True)
    enc, eos, tid = llm.tokenizer.encode_continuation, llm.eos_ids[0], llm.tokenizer.token_to_id
    scripts = {"Alice": enc(" Done.\n\n") + [eos], "Bob": [eos],
               "final answer": enc("5") + [tid("<0xC3>"), tid("<0x7D>")]}  # (then "}" again, and again)
    out = _run_with(llm, _scripted_ids(llm, scripts), SamplingParams(max_tokens=30),
                    Hogwild(workers=2, header=" {name}:", collab_prompt=None, finisher_tokens=8))
    assert out.text.endswith("\\boxed{5\ufffd}") and out.answer == "5\ufffd", (out.text, out.answer)
    assert out.metrics["total_tokens"] == sum(w["generated"] for w in out.workers) + 3
    assert llm.cache_stats()["pages_used"] == 0


def test_a_stop_string_ends_only_the_worker_that_writes_it(make_llm):
    """As README says: a stop string ends the worker that samples it, the others go on; the
    output's and the worker's texts keep it, and the output's stop_reason is None."""
    llm = make_llm("qwen3", attention_backend="cpu")
    src = _scripted(llm, {"Alice": "I add STOP then more.\n\n", "Bob": "Bob works on and on and on.\n\n"})
    out = _run_with(llm, src, SamplingParams(max_tokens=12, stop=["STOP"], ignore_eos=True),
                    Hogwild(workers=2, finisher=False, stop_on_answer=False))
    alice, bob = out.workers
    assert alice["text"].endswith("STOP") and alice["generated"] < 12 and bob["generated"] == 12
    assert alice["text"] in out.text and out.stop_reason is None
    assert llm.cache_stats()["pages_used"] == 0


def test_hogwild_arguments_are_validated():
    with pytest.raises(ValueError, match="workers"):
        Hogwild(workers=0)
    with pytest.raises(ValueError, match="layout"):
        Hogwild(layout="grid")
    with pytest.raises(ValueError, match="names"):
        Hogwild(workers=3, names=["A"])
    with pytest.raises(ValueError, match="checkin_every"):
        Hogwild(checkin_every=0)


def test_hogwild_argument_types_are_validated():
    """Each of Hogwild's settings of the wrong type is refused when the protocol is made, naming
    it: a string of names (not split into letters), a number of names, a flag not a bool, a
    header, collab_prompt or checkin not a string. (Mutations dropping the stop_on_answer check
    and the string-of-names check passed the suite.)"""
    for kw, msg in ((dict(stop_on_answer="yes"), "stop_on_answer='yes' must be True or False"),
                    (dict(workers=2, names="AB"), "names='AB' must be a list of the workers' names"),
                    (dict(names=2), "names=2 must be a list of the workers' names"),
                    (dict(header=None), "header=None must be a non-empty string"),
                    (dict(header=""), "header='' must be a non-empty string"),
                    (dict(collab_prompt=5), "collab_prompt=5 must be a string or None"),
                    (dict(checkin=None), "checkin=None must be a string")):
        with pytest.raises(ValueError, match=re.escape(msg)):
            Hogwild(**kw)
    assert Hogwild(workers=1, layout="contiguous", header="").header == ""  # (one contiguous worker: optional)


def test_header_and_collaboration_prompt_templates_are_validated():
    """header and collab_prompt are str.format templates: a stray brace (a prompt asking for
    \\boxed{answer}, a misspelt {nam}) is refused when the protocol is made, naming the argument
    (generate failed with a bare KeyError: 'answer')."""
    with pytest.raises(ValueError, match=r"collab_prompt=.* may use \{names\}, \{n\} only \(KeyError: 'answer'\)"):
        Hogwild(collab_prompt="You are {names}. Write \\boxed{answer}.")
    with pytest.raises(ValueError, match=r"header='\{nam\}: ' .* may use \{name\} only"):
        Hogwild(header="{nam}: ")
    for bad in ("{0}: ", "{name!x}", "{"):
        with pytest.raises(ValueError, match="header="):
            Hogwild(header=bad)
    with pytest.raises(ValueError, match=r"header='\{name\[2\]\}: ' .*IndexError"):  # (Alice's fits, Bo's does not)
        Hogwild(names=["Alice", "Bo"], header="{name[2]}: ")
    hw = Hogwild(collab_prompt="You are {names} ({n}): write \\boxed{{answer}}.")
    hw.header = "{who}: "  # (changed after construction: checked again by generate's check_config)
    with pytest.raises(ValueError, match="header="):
        hw.check_config()


def test_a_header_template_that_fits_every_workers_name_is_taken():
    """The header is checked with each worker's name: "{name[0]}" (an initial) fits every name
    and is taken. (A mutation checking it with an empty name only, which has no initial, passed
    the suite.)"""
    hw = Hogwild(workers=2, names=["Alice", "Bob"], header="{name[0]}: ")
    assert hw.header == "{name[0]}: " and hw.names == ["Alice", "Bob"]


def test_collaboration_prompt_uses_chat_template(make_llm):
    llm = make_llm("qwen3", attention_backend="cpu")
    hw = Hogwild(workers=3)
    ids = hw.prepare_prompt(llm.tokenizer, "What is 2+2?", [])
    text = llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert "Alice, Bob, Carol" in text and "What is 2+2?" in text and "<|im_start|>" in text



def test_collaboration_prompt_with_a_template_without_system_role(tmp_path, model_dir):
    """A chat template that refuses a system message (Mistral-Instruct v0.1 / v0.2, Gemma) gets
    the collaboration prompt in the user message, before the problem (generate(text,
    protocol=Hogwild()) failed with the template's 'Conversation roles must alternate')."""
    import shutil
    from conftest import read_json, write_json
    from engine.tokenizer import Tokenizer
    d = str(tmp_path / "no_system")
    shutil.copytree(model_dir("qwen3"), d)
    cfg = read_json(f"{d}/tokenizer_config.json")
    cfg["chat_template"] = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                            "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}{% endif %}"
                            "[INST] {{ m['content'] }} [/INST]{% endfor %}")
    write_json(f"{d}/tokenizer_config.json", cfg)
    tok = Tokenizer(d)
    hw = Hogwild(workers=2, names=["Alice", "Bob"])
    text = tok.decode(hw.prepare_prompt(tok, "What is 2+2?", []), skip_special_tokens=False)
    assert text.startswith("[INST] You are Alice, Bob: 2 assistants") and text.endswith("\n\nWhat is 2+2? [/INST]")
    cfg["chat_template"] = "{{ raise_exception('no chats') }}"  # (a template that refuses both: its error)
    write_json(f"{d}/tokenizer_config.json", cfg)
    with pytest.raises(ValueError, match="^chat template error: no chats$"):
        hw.prepare_prompt(Tokenizer(d), "What is 2+2?", [])


def test_a_rendered_collaboration_prompt_gets_no_bos_added(tmp_path, model_dir):
    """The chat template renders the whole prompt, special tokens included: its text is encoded
    without adding any (as LLM.chat does), also when tokenizer_config says add_bos_token; a
    prompt without a chat template is encoded as a plain prompt, BOS added. (A mutation adding
    special tokens to the rendered prompt passed the suite: no test tokenizer added a BOS.)"""
    import shutil
    from conftest import BOS_ID, read_json, write_json
    from engine.tokenizer import Tokenizer
    d = str(tmp_path / "add_bos")
    shutil.copytree(model_dir("qwen3"), d)
    cfg = read_json(f"{d}/tokenizer_config.json")
    write_json(f"{d}/tokenizer_config.json", {**cfg, "add_bos_token": True})
    tok = Tokenizer(d)
    hw = Hogwild(workers=2, names=["Alice", "Bob"])
    ids = hw.prepare_prompt(tok, "What is 2+2?", [])
    assert BOS_ID not in ids and tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>system\nYou are")
    write_json(f"{d}/tokenizer_config.json", {**cfg, "add_bos_token": True, "chat_template": None})
    ids = hw.prepare_prompt(Tokenizer(d), "What is 2+2?", [])
    assert ids[0] == BOS_ID and ids.count(BOS_ID) == 1


def test_compaction_keeps_its_tensors_on_the_pools_device():
    """Compaction built its index and angle tensors on the CPU and mixed them with the
    pools' (a CUDA run failed at its first compaction). 'meta' pools stand in for a GPU:
    the same device check, no data."""
    import torch
    from engine.cache import KVCache
    from engine.threads import ThreadTree
    cache = KVCache(num_layers=2, num_pages=8, page_size=4, num_kv_heads=2, head_dim=16,
                    dtype=torch.float32, device="meta")
    tree = ThreadTree(cache)
    root = tree.new_root([1, 2, 3])
    a, b = tree.fork(root, [[4, 5], [6]])
    for t in (root, a, b):          # as a step that wrote their pending tokens
        cache.append_slots(t.seg, len(t.pending))
        t.pending.clear()
    th = tree.compact([a, b], root.seg.base + root.seg.length, torch.rand(8, device="meta"))
    assert th.tokens == [4, 5, 6] and th.seg.length == 3


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    from engine.demo import make_random_model
    d = str(tmp_path_factory.mktemp("hog4k"))
    make_random_model(d, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, max_pos=4096)
    return d


def _dots(llm):
    """Every worker writes ".\n\n" forever: a step every 3 tokens (the most steps, headers and
    compactions per token)."""
    dot = llm.tokenizer.encode(".\n\n", add_special_tokens=False)
    return lambda threads: [dot[len(t.generated) % len(dot)] for t in threads]


@pytest.mark.parametrize("kw", [dict(checkin_every=1, compact_after=4), dict(checkin_every=3, compact_after=5),
                                dict(compact_after=4, header="{name} writes the next step of the solution now: ")])
def test_hogwild_stays_within_its_reservation(long_model, kw):
    """Alone in a cache of exactly the pages its admission reserves, a Hogwild request with
    3-token steps, check-ins or long headers and frequent compactions runs to the end (it used to
    run the cache dry: each compaction's copy counted against the reservation for good, steps were
    assumed 4 tokens and headers 64, and a written step held an old merged copy alive), and its
    kv_pages_peak (the old steps and their copy at a compaction included) stays within it."""
    from engine import LLM
    hw = Hogwild(workers=2, finisher=True, stop_on_answer=False, **kw)
    p = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    prompt = list(range(40, 90))
    probe = LLM(long_model, page_size=16, kv_cache_tokens=1 << 16)
    need = hw.pages_needed(probe.cache, len(prompt), p, 4096)
    if kw.get("checkin_every", 1) > 1:  # check-ins every k steps are priced as such, not every step
        every = Hogwild(workers=2, finisher=True, stop_on_answer=False, **{**kw, "checkin_every": 1})
        uncapped = lambda h: h.pages_needed(probe.cache, len(prompt), p, 1 << 20)  # noqa: E731
        assert uncapped(hw) < uncapped(every) / 2, (uncapped(hw), uncapped(every))
    llm = LLM(long_model, page_size=16, kv_cache_tokens=need * 16)
    llm.core.token_source = _dots(llm)
    seen = []
    take = llm.cache._take_page
    llm.cache._take_page = lambda res: (seen.append(llm.cache.pages_used + 1), take(res))[1]
    out = llm.generate([prompt], p, protocol=hw)[0]
    assert out.outputs[0].metrics["compactions"] >= 10
    assert out.metrics.kv_pages_peak == max(seen) <= need, (out.metrics.kv_pages_peak, max(seen), need)
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["pages_reserved"] == 0


def test_pages_a_compaction_frees_stay_with_its_request(long_model):
    """A running Hogwild request frees pages at every compaction and takes them again: they go
    back to its reservation, not to the pool, so a request queued behind it is not admitted into
    them (it was, and the first request then ran out of pages mid-call); both finish as alone."""
    from engine import LLM
    hw = Hogwild(workers=2, compact_after=4, finisher=False, stop_on_answer=False)
    prompt = list(range(40, 90))
    pa, pc = (SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (300, 200))
    probe = LLM(long_model, page_size=16, kv_cache_tokens=1 << 16)
    need_a = hw.pages_needed(probe.cache, len(prompt), pa, 4096)
    llm = LLM(long_model, page_size=16, kv_cache_tokens=need_a * 16)  # the second must wait
    llm.core.token_source = _dots(llm)
    past = []  # pages a request took past its reservation (from the pool's unreserved pages)
    take = llm.cache._take_page
    llm.cache._take_page = lambda res: (past.append(res is not None and res.pages == 0), take(res))[1]
    both = llm.generate([prompt, prompt], [pa, pc], protocol=hw)
    assert not any(past), f"{sum(past)} pages taken past a reservation"
    alone = [llm.generate([prompt], q, protocol=hw)[0] for q in (pa, pc)]
    assert [o.outputs[0].token_ids for o in both] == [o.outputs[0].token_ids for o in alone]
    assert both[0].outputs[0].metrics["compactions"] >= 10
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["pages_reserved"] == 0


def test_total_tokens_counts_the_finisher(make_llm):
    """The finisher samples on top of the workers' budget; the run's total_tokens counts its
    tokens too (it counted the workers' alone: 24 of 48 sampled)."""
    llm = make_llm("qwen3")
    ro = llm.generate([random_ids(12, llm.config.vocab_size, 3)],
                      SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                      protocol=Hogwild(workers=3, stop_on_answer=False))[0]
    out = ro.outputs[0]
    finisher = out.metrics["total_tokens"] - sum(w["generated"] for w in out.workers)
    assert sum(w["generated"] for w in out.workers) == 24 and 0 < finisher <= 24, out.metrics
    assert out.metrics["total_tokens"] == ro.metrics.generated_tokens, (out.metrics, ro.metrics)


def test_repetition_penalty_sees_the_whole_view(make_llm):
    """A penalized worker's repetition context is its view when it samples its step's first
    token: the prompt, the committed history (compacted or not) and the other workers (it
    was the prompt and its header alone: the context was taken before the step's view was
    set, and a compacted segment's token list was left empty). Finished steps drop their
    [vocab] state (they kept it until the history's compaction)."""
    llm = make_llm("qwen3")
    V, checked = llm.config.vocab_size, []

    script = _scripted(llm, SCRIPTS)

    every: dict[int, object] = {}

    def src(threads):  # checks every sampler's context, then the workers' scripts
        every.update((t.id, t) for t in threads)
        # (a thread that stopped sampling, by its own stop or the protocol's, drops its state)
        held = [t.finish_reason for t in every.values() if t.finished and t.penalties is not None]
        assert not held, held
        for t in threads:
            for seg, _ in t.view:
                assert len(seg.tokens) >= seg.length, (t.id, seg.id)  # (a stale, emptied list)
            if t.penalties is not None and not t.generated:  # (its first token: the context is taken)
                context = {tok for seg, _ in t.view for tok in seg.tokens[:seg.length]}
                seen = set(t.penalties.seen.nonzero()[:, 0].tolist())
                assert context <= seen, (t.id, sorted(context - seen)[:10])
                checked.append(len(context))
        return script(threads)
    llm.core.token_source = src
    try:
        ro = llm.generate([random_ids(10, V, 4)], SamplingParams(max_tokens=40, ignore_eos=True,
                                                                 repetition_penalty=1.3),
                          protocol=Hogwild(workers=2, names=["Alice", "Bob"], compact_after=4))[0]
    finally:
        llm.core.token_source = None
    assert ro.outputs[0].metrics["compactions"] > 0 and len(checked) >= 5, (ro.outputs[0].metrics, checked)
    assert max(checked) > 30  # (the history's tokens were in the checked contexts)
    assert all(t.penalties is None for t in every.values())  # (and all of them at the call's end)
    assert llm.cache_stats()["pages_used"] == 0


def test_a_token_sampled_by_a_worker_an_answer_ended_is_dropped(make_llm):
    """Alice closes her \\boxed{} in the step where Bob samples too: the answer ends Bob's
    step (committed once) before his token of that step is applied, so that token is
    dropped (applied to the ended step, it would commit his step a second time and count a
    token that is in no output)."""
    llm = make_llm("qwen3", attention_backend="cpu")
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    alice = enc("So x is \\boxed{7}")
    llm.core.token_source = _scripted(llm, {"Alice": "So x is \\boxed{7}", "Bob": "I think about it a lot more"})
    finish, held = llm.scheduler._finish, []

    def finished(req):  # (the dropped token's thread let go of its step's log-probs: they pinned them)
        held.extend(t.id for t in req.tree.threads if getattr(t, "_lp_row", None) is not None)
        return finish(req)
    llm.scheduler._finish = finished
    try:
        ro = llm.generate([random_ids(9, llm.config.vocab_size, 5)], SamplingParams(max_tokens=40, logprobs=1),
                          protocol=Hogwild(workers=2, names=["Alice", "Bob"], collab_prompt=None))[0]
    finally:
        llm.core.token_source = None
        del llm.scheduler._finish
    assert held == []
    out = ro.outputs[0]
    a, b = out.workers
    assert out.answer == "7" and out.finish_reason == "stop"
    assert (a["generated"], b["generated"]) == (len(alice), len(alice) - 1), out.workers
    assert [e["worker"] for e in out.events] == [0, 1], out.events
    assert out.metrics["steps_committed"] == 2
    assert out.metrics["total_tokens"] == ro.metrics.generated_tokens == 2 * len(alice) - 1, out.metrics
    assert len(out.token_ids) == sum(len(w["token_ids"]) for w in out.workers)
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("alice", ["I take one, and", "I take one. Done.\n\n"])
def test_a_worker_that_ended_is_seen_once_in_the_others_views(make_llm, alice):
    """Alice stops on EOS (mid-step, or right after a step's end, in a step of just its
    header) while Bob goes on committing steps. Her last step with text is in the shared
    history, and Bob's later views name it there only (named again as her step in progress,
    a view would name a thread twice and the request fail); a step of just its header is in
    no view (neither as history nor as her step in progress)."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    eos = llm.eos_ids[0]
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    scripts = {"Alice": enc(alice) + [eos], "Bob": enc("Step one. Ok.\n\nStep two. Ok.\n\n" * 3)}
    typed, views, fresh = {}, [], set()

    def src(threads):
        out = []
        names = [next(n for n in scripts if n in llm.tokenizer.decode(t.tokens[:t.header_len])) for t in threads]
        for t, name in zip(threads, names):
            if "Alice" not in names and not t.generated:  # (Bob's steps begun after she ended)
                fresh.add(t.id)
            if t.id in fresh:
                views.append([llm.tokenizer.decode(s.tokens[:s.length]) for s, _ in t.view[:-1]])
            out.append(_typed(typed, scripts, name))
        return out
    out = _run_with(llm, src, SamplingParams(max_tokens=40),
                    Hogwild(workers=2, names=["Alice", "Bob"], finisher=False, stop_on_answer=False))
    a, bob = out.workers
    assert a["generated"] == len(scripts["Alice"]) and bob["generated"] == 40 and bob["steps"] >= 4
    assert len(fresh) >= 2 and len(views) > 8 and all(alice in "".join(v) for v in views), views[-1]
    for v in views:
        assert "".join(v).count(alice) <= 1, v
        assert not any(s.strip() == "Alice:" for s in v), v  # (a step of just its header)
    assert out.text.count(alice) == 1
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0


@pytest.mark.parametrize("every,counts,seen", [
    (2, (0, 1), "\n\nBob: {CHECKIN}Goo"),     # steps 3, 5, ...: Bob's third step
    (1, (1, 2), "\n\nAlice: {CHECKIN}Then"),  # every step from the second (a mutation counting
])                                              # from the second, 'len(steps) > 1', passed with 2 only)
def test_checkins_start_after_a_workers_first_step(make_llm, every, counts, seen):
    """checkin_every=k: the check-in opens every k-th step after a worker's first; its first step
    starts with its plain header (the check-in asks about the others' work, of which there is
    none yet)."""
    from engine.protocols.hogwild import CHECKIN
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    llm.core.token_source = _scripted(llm, {n: SCRIPTS[n] for n in ("Alice", "Bob")})
    try:
        out = llm.generate([random_ids(9, llm.config.vocab_size, 5)], SamplingParams(max_tokens=40, ignore_eos=True),
                           protocol=Hogwild(workers=2, names=["Alice", "Bob"], checkin_every=every, finisher=False,
                                            stop_on_answer=False))[0].outputs[0]
    finally:
        llm.core.token_source = None
    alice, bob = out.workers
    assert alice["text"].startswith("Alice: I take part one.") and bob["text"].startswith("Bob: I take part two.")
    assert (alice["steps"], bob["steps"]) == (2, 3)
    assert (alice["text"].count(CHECKIN), bob["text"].count(CHECKIN)) == counts, (alice["text"], bob["text"])
    assert seen.format(CHECKIN=CHECKIN) in alice["text"] + bob["text"], (alice["text"], bob["text"])


def test_workers_see_each_other_from_their_first_token(make_llm):
    """Each worker's view holds the other workers' steps from the first step on (the views are
    laid out when the workers are made, not at the first commit). (A mutation dropping that
    first layout passed the suite.)"""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    a, first = llm.tokenizer.encode("a", add_special_tokens=False)[0], []

    def src(threads):
        if not first:
            first.append([(t.seg.id, sorted(s.id for s, _ in t.view)) for t in threads])
        return [a] * len(threads)
    out = _run_with(llm, src, SamplingParams(max_tokens=2), Hogwild(workers=3, finisher=False))
    assert len(first[0]) == 3 and out.metrics["total_tokens"] == 6
    for own, view in first[0]:
        assert {o for o, _ in first[0]} <= set(view), first[0]
    assert llm.cache_stats()["pages_used"] == 0


def test_the_finishers_eos_is_not_in_the_output(make_llm):
    """A finisher that ends on EOS: the EOS is not written, as a worker's is not: neither the
    output's token ids nor its text or answer hold it. (A mutation dropping the finisher's own
    EOS drop passed the suite.)"""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    a, seven = (llm.tokenizer.encode(x, add_special_tokens=False)[0] for x in ("a", "7"))
    eos = llm.eos_ids[0]

    def src(threads):
        out = []
        for t in threads:
            if "final answer" in llm.tokenizer.decode(t.tokens[:t.header_len]):
                out.append(seven if not t.generated else eos)
            else:
                out.append(a)
        return out
    out = _run_with(llm, src, SamplingParams(max_tokens=2), Hogwild(workers=2, collab_prompt=None))
    assert eos not in out.token_ids and out.token_ids[-1] == seven, out.token_ids
    assert out.text.endswith("the final answer is \\boxed{7") and out.answer == "7", out.text
    assert llm.cache_stats()["pages_used"] == 0


def test_compaction_starts_past_compact_after_segments(make_llm):
    """Views are compacted when they would hold more than compact_after segments: with
    compact_after=6 two workers' views grow to exactly 6 segments and are left alone; with 5,
    the history is compacted."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    prompt = random_ids(9, llm.config.vocab_size, 5)
    for compact_after, compactions in ((6, 0), (5, 1)):
        sizes, script = [], _scripted(llm, {n: SCRIPTS[n] for n in ("Alice", "Bob")})

        def src(threads):
            sizes.extend(len(t.view) for t in threads)
            return script(threads)
        llm.core.token_source = src
        try:
            out = llm.generate([prompt], SamplingParams(max_tokens=40, ignore_eos=True),
                               protocol=Hogwild(workers=2, names=["Alice", "Bob"], compact_after=compact_after,
                                                finisher=False, stop_on_answer=False))[0].outputs[0]
        finally:
            llm.core.token_source = None
        assert out.metrics["steps_committed"] == 5 and out.metrics["compactions"] == compactions, out.metrics
        assert max(sizes) == compact_after
    assert llm.cache_stats()["pages_used"] == 0


def test_finisher_needs_a_position_after_its_header(tmp_path):
    """The finisher starts only if its header leaves it a position to sample at before the
    model's context: one position short, there is no finisher (and no header of one in the
    text); with one position it writes one token."""
    from engine import LLM
    from engine.demo import make_random_model
    from engine.protocols.hogwild import FINISHER
    make_random_model(str(tmp_path), hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                      max_pos=160)
    llm = LLM(str(tmp_path), attention_backend="cpu", page_size=4, seed=0)
    M, eos = llm.config.max_position_embeddings, llm.eos_ids[0]
    hdr, fin = len(llm.core.encode_text("Alice: ")), len(llm.core.encode_text(FINISHER))
    ab = llm.tokenizer.encode("ab", add_special_tokens=False)
    # Alice writes "ab" then EOS; the finisher writes "a"s
    llm.core.token_source = lambda threads: [(ab + [eos])[len(t.generated)] if t.header_len == hdr else ab[0]
                                             for t in threads]
    hw = Hogwild(workers=1, layout="contiguous", collab_prompt=None, finisher_tokens=4)
    for room in (1, 0):  # positions left after the workers' text and the finisher's header
        P = M - hdr - len(ab) - fin - room
        out = llm.generate([[65] * P], SamplingParams(max_tokens=10), protocol=hw)[0].outputs[0]
        if room:
            assert out.text.endswith(FINISHER + "a") and out.metrics["total_tokens"] == len(ab) + 2, out.text
        else:
            assert out.text.endswith("Alice: ab") and out.metrics["total_tokens"] == len(ab) + 1, out.text
    llm.core.token_source = None
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("workers", [2, 3])
def test_a_worker_whose_view_grows_to_the_context_ends_before_sampling_there(tmp_path, workers):
    """A worker's next position grows with the other workers' tokens as well as its own: after
    a step's accepts it may sit exactly at the model's context, and is ended ("length") before
    the next step instead of sampling there. Prompts of every length modulo the workers meet it
    exactly. (A mutation of EngineCore.at_context_end to ">" passed the suite: the step raised
    "would sample at position 64, past the model's context (engine bug)".)"""
    from engine import LLM
    from engine.demo import make_random_model
    from engine.threads import effective_end
    make_random_model(str(tmp_path), hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64,
                      max_pos=64)
    llm = LLM(str(tmp_path), attention_backend="cpu", page_size=4, seed=0)
    a, seen = llm.tokenizer.encode("a", add_special_tokens=False)[0], []

    def src(threads):
        seen.extend(effective_end(t) for t in threads)
        return [a] * len(threads)
    llm.core.token_source = src
    hw = Hogwild(workers=workers, layout="contiguous", collab_prompt=None, finisher=False)
    for P in range(20, 20 + workers):
        seen.clear()
        out = llm.generate([[65] * P], SamplingParams(max_tokens=200), protocol=hw)[0].outputs[0]
        assert out.finish_reason == "length" and max(seen) < 64, (P, max(seen))
    llm.core.token_source = None
    assert llm.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("total", [5, 6])
def test_a_total_budget_the_workers_cannot_share_evenly(make_llm, total):
    """SamplingParams.max_total_tokens bounds the workers' tokens together: when it cannot give
    every worker one more token, the first ones take what is left and the others end there,
    "length"; exactly max_total_tokens are sampled. (No test ran Hogwild under a total budget:
    mutations of that cut-off passed the suite.)"""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    a = llm.tokenizer.encode("a", add_special_tokens=False)[0]
    out = _run_with(llm, lambda threads: [a] * len(threads), SamplingParams(max_tokens=10, max_total_tokens=total),
                    Hogwild(workers=2, names=["Alice", "Bob"], finisher=False))
    assert [w["generated"] for w in out.workers] == ([3, 2] if total == 5 else [3, 3]), out.workers
    assert out.metrics["total_tokens"] == total and out.finish_reason == "length"
    # (the steps in commit order: Bob's ended a step before Alice's when the budget was odd)
    assert out.text == ("Bob: aaAlice: aaa" if total == 5 else "Alice: aaaBob: aaa"), out.text
    assert llm.cache_stats()["pages_used"] == 0


def test_many_workers_with_the_default_compact_after(make_llm):
    """compact_after left unset fits the workers: 40 workers were refused with "compact_after=32
    must be an integer >= 42", a setting the caller never made (and `loom generate --protocol
    hogwild --workers 40` has no flag for it). Unset, views compact past max(32, workers + 2)
    segments, also when workers is raised after construction; a value given is checked as before."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    hw = Hogwild(workers=40, names=[f"W{i}" for i in range(40)], finisher=False)
    assert hw.compact_after is None and hw.compact_limit() == 42
    out = llm.generate([random_ids(5, llm.config.vocab_size, 1)], SamplingParams(max_tokens=2, seed=0),
                       protocol=hw)[0].outputs[0]
    assert len(out.workers) == 40 and out.metrics["total_tokens"] == 80, out.metrics
    assert Hogwild(workers=2).compact_limit() == 32
    hw = Hogwild(workers=2)
    hw.workers = 50
    hw.check_config()
    assert hw.compact_limit() == 52
    with pytest.raises(ValueError, match=r"compact_after=32 must be an integer >= 42"):
        Hogwild(workers=40, names=[f"W{i}" for i in range(40)], compact_after=32)
    assert llm.cache_stats()["pages_used"] == 0


def test_more_workers_than_64_with_the_default_names():
    """The default names cover any number of workers: 65 workers without names were refused
    with "65 workers need 65 names, got 64" (names the caller never gave; the CLI's --workers has
    no names flag). Given names are still checked."""
    hw = Hogwild(workers=65)
    assert len(hw.names) == 65 and len(set(hw.names)) == 65 and hw.names[:2] == ["Alice", "Bob"]
    assert hw.names[-1] == "Worker65"
    hw.workers = 300
    hw.check_config()
    assert len(hw.names) == 300 and len(set(hw.names)) == 300
    with pytest.raises(ValueError, match="65 workers need 65 names, got 64"):
        Hogwild(workers=65, names=[f"W{i}" for i in range(64)])


def test_a_collaboration_prompt_past_the_context_says_so(make_llm):
    """The collaboration prompt Hogwild puts around a text prompt lists every worker: with
    enough workers it alone passes the model's context. The error said "The prompt has 2,940
    tokens ... shorten the prompt" of a 1-token prompt; it says where the tokens come from and
    how to drop them, and collab_prompt=None runs."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    hw = Hogwild(workers=300, finisher=False)
    with pytest.raises(ValueError, match=r"The prompt has \d+ tokens, \d+ with the text Hogwild puts around it, "
                                         r"but the model's context is 2048 .*collab_prompt=None"):
        llm.generate(["hi"], SamplingParams(max_tokens=1), protocol=hw)
    hw.collab_prompt = None
    out = llm.generate(["hi"], SamplingParams(max_tokens=1, seed=0), protocol=hw)[0].outputs[0]
    assert len(out.workers) == 300
    with pytest.raises(ValueError, match=r"^The prompt has 2050 tokens but the model's context is 2048"):
        llm.generate([[5] * 2050], SamplingParams(max_tokens=1), protocol=hw)
    assert llm.cache_stats()["pages_used"] == 0


def test_a_worker_that_ended_is_laid_out_in_the_history_at_once(make_llm):
    """Bob stops on EOS mid-step while Alice and Carol write on without ending a step: his step
    is in the shared history now, and their next views lay it out there, before the steps in
    progress (prompt, history, others, own). It stayed in its old place among the steps in
    progress until some worker next ended a step (Carol read Alice's step before Bob's)."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    eos = llm.eos_ids[0]
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    names = ["Alice", "Bob", "Carol"]
    scripts = {"Alice": enc("I take one and more and more and more"), "Bob": enc("I take two,") + [eos],
               "Carol": enc("I check it all and more and more and more")}
    typed, views = {}, []

    def src(threads):
        out, ended = [], typed.get("Bob", 0) == len(scripts["Bob"])  # (in an earlier step)
        for t in threads:
            name = next(n for n in names if n in llm.tokenizer.decode(t.tokens[:t.header_len]))
            if ended:
                views.append((name, [llm.tokenizer.decode(u.tokens).split(":")[0] for u in t.live[1:]]))
            out.append(_typed(typed, scripts, name))
        return out
    out = _run_with(llm, src, SamplingParams(max_tokens=12),
                    Hogwild(workers=3, names=names, finisher=False, stop_on_answer=False))
    assert [w["steps"] for w in out.workers] == [1, 1, 1] and out.workers[1]["generated"] == len(scripts["Bob"])
    assert len(views) >= 8
    for name, v in views:
        assert v == ["Bob"] + [n for n in ("Alice", "Carol") if n != name], (name, v)
    assert llm.cache_stats()["pages_used"] == 0


def test_min_tokens_counts_over_a_workers_steps(make_llm, monkeypatch):
    """min_tokens forbids a worker's EOS until it has sampled that many tokens over all its
    steps (as max_tokens counts them); it forbade EOS at the start of every step (a step
    thread's count starts at 0): here the first 5 tokens of each of Alice's short steps."""
    import torch

    import engine.core
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    eos, dot = llm.eos_ids[0], llm.tokenizer.encode("A.\n\n", add_special_tokens=False)
    sample, masked = engine.core.sample, []

    def scripted(table, params, generators, raw=None):  # Alice writes "A.\n\n" forever
        tokens, logprobs = sample(table, params, generators, raw=raw)
        masked.append(bool(torch.isinf(table[0, eos])))
        return [dot[(len(masked) - 1) % len(dot)]], logprobs
    monkeypatch.setattr(engine.core, "sample", scripted)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, min_tokens=5, temperature=0),
                       protocol=Hogwild(workers=1, collab_prompt=None, finisher=False))[0].outputs[0]
    assert out.workers[0]["steps"] >= 3 and out.workers[0]["generated"] == 12, out.workers
    assert masked == [True] * 5 + [False] * 7, masked
    assert llm.cache_stats()["pages_used"] == 0


def test_presence_and_frequency_penalties_count_over_a_workers_steps(make_llm, monkeypatch):
    """A worker's presence / frequency penalties count the tokens it sampled in all its steps,
    as min_tokens and max_tokens do (each step thread started from zero counts: a worker
    could repeat its earlier steps' tokens unpenalized)."""
    import engine.core
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    dot = llm.tokenizer.encode("A.\n\n", add_special_tokens=False)
    sample, penalty = engine.core.sample, []

    def scripted(table, params, generators, raw=None):  # Alice writes "A.\n\n" forever
        tokens, logprobs = sample(table, params, generators, raw=raw)
        penalty.append([round(float(raw[0, t] - table[0, t]), 4) for t in dot])
        return [dot[(len(penalty) - 1) % len(dot)]], logprobs
    monkeypatch.setattr(engine.core, "sample", scripted)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=10, frequency_penalty=1.0, presence_penalty=0.5),
                       protocol=Hogwild(workers=1, collab_prompt=None, finisher=False))[0].outputs[0]
    assert out.workers[0]["steps"] >= 3 and out.workers[0]["generated"] == 10, out.workers
    for k, row in enumerate(penalty):  # before its k-th token: each of dot's tokens sampled so often
        sampled = [dot[i % len(dot)] for i in range(k)]
        want = [sampled.count(t) * 1.0 + 0.5 * (t in sampled) for t in dot]
        assert row == want, (k, row, want)


def test_the_finisher_writes_at_most_finisher_tokens(make_llm):
    """The finisher samples with its own budget, finisher_tokens, not the workers' max_tokens:
    a finisher that never closes its \\boxed{ stops after that many tokens."""
    llm = make_llm("qwen3", attention_backend="cpu")
    prompt = random_ids(10, llm.config.vocab_size, 8)
    llm.core.token_source = _scripted(llm, {"Alice": "Thinking. Hard.\n\n" * 9, "Bob": "Me too.\n\n" * 9})
    try:  # (the finisher, named by neither script, writes "7" forever)
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                           protocol=Hogwild(workers=2, finisher_tokens=3))[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert out.text.endswith("the final answer is \\boxed{777") and out.answer == "777"
    assert out.metrics["total_tokens"] == sum(w["generated"] for w in out.workers) + 3
    assert llm.cache_stats()["pages_used"] == 0


def test_an_empty_step_header_is_allowed_only_for_one_contiguous_worker():
    """A step's first token is sampled after its header: only one worker in the contiguous
    layout (its view stays the prompt) may have none."""
    assert Hogwild(workers=1, layout="contiguous", header="").header == ""
    for kw in (dict(workers=1, layout="combined"), dict(workers=2, layout="contiguous")):
        with pytest.raises(ValueError, match="header='' must be a non-empty string"):
            Hogwild(header="", **kw)


def test_check_ins_are_priced_only_when_they_are_made(long_model):
    """Without checkin_every no check-in is ever injected: the admission bound does not
    depend on the check-in text."""
    from engine import LLM
    cache = LLM(long_model, page_size=16, kv_cache_tokens=1 << 16).cache
    p = SamplingParams(max_tokens=120)
    need = [Hogwild(workers=2, checkin=c).pages_needed(cache, 50, p, 1 << 20) for c in ("", "x" * 400)]
    assert need[0] == need[1]


def test_workers_whose_last_budgeted_token_is_eos_stop(make_llm):
    """A worker whose max_tokens-th token is its EOS stopped on it, as a plain completion
    does: the collaboration's finish_reason is "stop", not "length" (nothing was cut)."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    eos = llm.eos_ids[0]
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    scripts = {"Alice": enc("I take one") + [eos], "Bob": enc("I take one") + [eos]}
    typed = {}

    def src(threads):
        return [_typed(typed, scripts, next(n for n in scripts if n in llm.tokenizer.decode(t.tokens[:t.header_len])))
                for t in threads]
    for budget, want in ((len(scripts["Alice"]), "stop"), (len(scripts["Alice"]) - 1, "length")):
        typed.clear()
        out = _run_with(llm, src, SamplingParams(max_tokens=budget),
                        Hogwild(workers=2, names=["Alice", "Bob"], finisher=False))
        assert [w["generated"] for w in out.workers] == [budget, budget]
        assert out.finish_reason == want, (budget, out.finish_reason)
    assert llm.cache_stats()["pages_used"] == 0


def test_the_finishers_answer_is_whole_and_the_collaboration_stops(make_llm):
    """Workers that ran out of budget without an answer, then the finisher's answer: the
    output stops ("stop": it has an answer, nothing is cut), and the finisher writes its
    answer whole, up to its closing brace, whatever the request's stop strings (they are the
    workers')."""
    llm = make_llm("qwen3", attention_backend="cpu")
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    answer = enc("42}")
    workers = _scripted(llm, {"Alice": "Thinking. Hard.\n\n" * 9, "Bob": "Me too.\n\n" * 9})

    def src(threads):
        fin = [t for t in threads if "All workers" in llm.tokenizer.decode(t.tokens[:t.header_len])]
        got = dict(zip(map(id, threads), workers(threads)))
        return [answer[len(t.generated)] if t in fin else got[id(t)] for t in threads]
    out = _run_with(llm, src, SamplingParams(max_tokens=12, ignore_eos=True, stop=["2"]),
                    Hogwild(workers=2, names=["Alice", "Bob"], finisher_tokens=5))
    assert all(w["generated"] == 12 for w in out.workers)
    assert out.text.endswith("the final answer is \\boxed{42}"), out.text
    assert (out.answer, out.finish_reason) == ("42", "stop")
    assert llm.cache_stats()["pages_used"] == 0


def test_the_contiguous_layout_has_no_steps(make_llm):
    """In the contiguous layout a worker writes one stream: a paragraph break after a sentence
    end opens no new step (steps, their headers and commits are the combined layout's)."""
    llm = make_llm("qwen3", page_size=4, attention_backend="cpu")
    src = _scripted(llm, {"Alice": SCRIPTS["Alice"], "Bob": SCRIPTS["Bob"]})
    out = _run_with(llm, src, SamplingParams(max_tokens=30, ignore_eos=True),
                    Hogwild(workers=2, names=["Alice", "Bob"], layout="contiguous", finisher=False,
                            stop_on_answer=False))
    assert [w["steps"] for w in out.workers] == [1, 1] and out.metrics["steps_committed"] == 2
    assert out.workers[0]["text"].count("Alice: ") == 1 and "It is 3.\n\nThen" in out.workers[0]["text"]
    assert llm.cache_stats()["pages_used"] == 0
