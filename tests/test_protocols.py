"""Protocol state machines driven by a scripted token source (no sampling), on a
real tiny model so that every fork/join also runs through the engine's step.

Scripts map a thread's header text to what that thread "generates"; EOS follows
the script unless it ends with ``...`` (then the filler repeats until a budget).
"""
from __future__ import annotations

import os

import pytest

from engine import LLM, SamplingParams
from engine.demo import make_random_model
from engine.protocols import (Hogwild, Multiverse, ParallelR1, ParallelSampling, ParaThinker, Tags,
                              ThreadWeaver, TreeLimits)
from engine.threads import effective_end

TAGS = ["<Parallel>", "</Parallel>", "<Goal>", "</Goal>", "<Outline>", "</Outline>", "<Path>",
        "</Path>", "<Conclusion>", "</Conclusion>"]


@pytest.fixture(scope="module", params=["plain", "special"])
def llm(request, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("protocols_model"))  # (pytest removes it: a mkdtemp one stayed in /tmp)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    if request.param == "special":  # the tags as special tokens of the tokenizer
        from engine.demo import write_byte_tokenizer
        write_byte_tokenizer(d, extra_special=TAGS)
        import json
        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg["vocab_size"] = 259 + len(TAGS) + 8
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
        from engine.demo import random_weights
        from safetensors.torch import save_file
        save_file(random_weights(cfg), os.path.join(d, "model.safetensors"))
    m = LLM(d, attention_backend="torch", page_size=4, seed=0)
    yield m
    m.core.token_source = None


class Script:
    def __init__(self, llm, scripts: dict[str, str]):
        self.llm, self.scripts = llm, scripts
        self.eos = llm.eos_ids[0]

    def enc(self, s):
        return self.llm.tokenizer.encode(s, add_special_tokens=False)

    def __call__(self, threads):
        out = []
        for t in threads:
            head = self.llm.tokenizer.decode(t.tokens[:t.header_len], skip_special_tokens=False)
            key = max((k for k in self.scripts if k in head), key=len)
            text = self.scripts[key]
            loop = text.endswith("...")
            toks = self.enc(text[:-3] if loop else text)
            i = len(t.generated)
            out.append(toks[i] if i < len(toks) else (toks[-1] if loop else self.eos))
        return out


def run(llm, scripts, protocol, prompt="Q: 1+2, 3*4?", **sp):
    llm.core.token_source = Script(llm, scripts)
    try:
        params = SamplingParams(max_tokens=sp.pop("max_tokens", 400), **sp)
        out = llm.generate(prompt, params, protocol=protocol)[0]
    finally:
        llm.core.token_source = None
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
    return out.outputs[0], out


def kinds(c):
    return [e["event"] for e in c.events]


MV = {"": "<Parallel><Goal><Outline>1: add</Outline><Outline>2: mul</Outline></Goal>",
      "1:": " 1+2=3</Path>", "2:": " 3*4=12, a longer path</Path>",
      "<Conclusion>": "3 and 12</Conclusion></Parallel> answer \\boxed{15}"}


def test_multiverse_forks_runs_side_by_side_and_joins(llm):
    c, out = run(llm, MV, Multiverse())
    assert c.answer == "15"  # (the last \\boxed{} of the joined text: the CLI prints it)
    assert c.text.startswith(MV[""] + "\n<Path>\n1: 1+2=3</Path>\n<Path>\n2: 3*4=12")
    assert c.text.endswith("<Conclusion>\n3 and 12</Conclusion></Parallel> answer \\boxed{15}")
    assert kinds(c) == ["fork", "join"]
    roles = [t["role"] for t in c.tree]
    assert roles == ["prompt", "main", "path", "path", "main"]
    cont = c.tree[4]
    assert {v[0] for v in cont["view"]} >= {c.tree[2]["view"][-1][0], c.tree[3]["view"][-1][0]}
    m = c.metrics
    assert m["max_parallel_threads"] == 2
    assert m["critical_path_tokens"] < m["total_tokens"]
    # the critical path: main + the longer path + conclusion, in forward steps too
    assert out.metrics.forward_steps < m["total_tokens"]
    assert c.finish_reason == "stop"


def test_a_trees_views_name_its_threads_whatever_runs_with_it(llm):
    """A thread's "view" in the output tree names the threads of that tree that wrote what it
    sees (its own last), the same alone and with another request in the call: it named the
    cache's segment ids, which another request's segments shift (and which are reused)."""
    alone, _ = run(llm, MV, Multiverse())
    llm.core.token_source = Script(llm, MV)
    try:
        outs = llm.generate(["Another question first", "Q: 1+2, 3*4?"], SamplingParams(max_tokens=400),
                            protocol=Multiverse())
    finally:
        llm.core.token_source = None
    assert outs[1].outputs[0].tree == alone.tree
    for t in alone.tree:
        assert t["view"][-1] == [t["id"], 0]
    assert [v[0] for v in alone.tree[4]["view"]] == [0, 1, 2, 3, 4]  # prompt, main, both paths, itself


def test_the_protocol_a_call_runs_is_the_one_it_checked(llm, monkeypatch):
    """generate() checks the protocol's settings, and runs a copy of it: the check is the copy's.
    (The caller's object was checked, then copied: a change made in between, by another Python
    thread, reached the call unchecked: here a ParaThinker given more paths than its limits.)"""
    from engine.protocols.base import Protocol
    proto = ParaThinker(paths=2)
    copy_of = Protocol.for_call

    def changed_then_copied(self):
        if self is proto:
            self.paths = 100  # (another thread's change, landing just before the copy)
        return copy_of(self)
    monkeypatch.setattr(Protocol, "for_call", changed_then_copied)
    with pytest.raises(ValueError, match="paths=100 exceeds limits.max_paths"):
        llm.generate("Q", SamplingParams(max_tokens=8), protocol=proto)
    assert llm.cache_stats()["pages_used"] == 0


def test_a_protocol_changed_while_its_call_runs_does_not_reach_the_call(llm):
    """A run read its protocol's settings at every step from the caller's object: a change made
    while the call ran (by a stream callback, or another Python thread setting up its next call
    with the same object) reached the running request."""
    proto = Multiverse()
    want, _ = run(llm, MV, proto)

    class Changing(Script):  # (the change made inside the call, at its second step)
        calls = 0

        def __call__(self, threads):
            self.calls += 1
            if self.calls == 2:
                proto.limits.max_paths = 1
                proto.tags.join_header = "\n<Other>\n"
            return super().__call__(threads)
    llm.core.token_source = Changing(llm, MV)
    try:
        got = llm.generate("Q: 1+2, 3*4?", SamplingParams(max_tokens=400), protocol=proto)[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert (got.text, kinds(got)) == (want.text, kinds(want))
    assert proto.limits.max_paths == 1  # (the caller's object as it was changed: the next call's)
    sampling = ParallelSampling()
    params = SamplingParams(n=3, max_tokens=6, temperature=1.0, seed=4, ignore_eos=True)
    want = llm.generate("Q: 1+2?", params, protocol=sampling)[0].outputs

    def change(i, j, piece):
        sampling.select = "first_finish"
    got = llm.generate("Q: 1+2?", params, protocol=sampling, stream=change)[0].outputs
    assert [c.token_ids for c in got] == [c.token_ids for c in want]


def test_a_trees_joined_threads_name_their_join(llm):
    """Each thread of the output tree names the continuation it was joined into (None: not joined)."""
    c, _ = run(llm, MV, Multiverse())
    assert [t["joined_into"] for t in c.tree] == [None, None, 4, 4, None], [(t["id"], t["role"]) for t in c.tree]


def test_a_protocols_list_changed_while_its_call_runs_does_not_reach_the_call(tmp_path):
    """Protocol.for_call copied a protocol's dataclass settings, not its lists: a Hogwild!'s
    names appended to while its call ran (by another Python thread setting up its next call)
    gave the call's requests admitted after that (a cache that holds one at a time) a worker
    more than they were checked with."""
    make_random_model(str(tmp_path), hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    hw = Hogwild(workers=2, collab_prompt=None, finisher=False)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    prompts = ["Q: 1+2?", "Q: 3+4?"]
    probe = LLM(str(tmp_path), attention_backend="torch", page_size=4, seed=0)
    need = probe._check_fits(probe.tokenizer.encode(prompts[0]), probe.core.call_params(params), hw)
    llm = LLM(str(tmp_path), attention_backend="torch", page_size=4, seed=0, kv_cache_tokens=4 * need + 4)
    steps = []

    def source(threads):  # (the change made inside the call, at its first step)
        steps.append(len(threads))
        if len(steps) == 1:
            hw.names.append("Zed")
        return [ord("a")] * len(threads)
    llm.core.token_source = lambda threads: [ord("a")] * len(threads)
    want = [o.outputs[0].text for o in llm.generate(prompts, params, protocol=hw)]
    llm.core.token_source = source
    got = [o.outputs[0].text for o in llm.generate(prompts, params, protocol=hw)]
    assert steps[0] == 2 and "Zed" not in want[1]  # (one request ran at first: the other waited)
    assert got == want, got
    assert hw.names == ["Alice", "Bob", "Zed"]  # (the caller's object as it was changed: the next call's)


def test_a_calls_copy_of_a_protocol_has_its_own_lists_dicts_and_sets():
    """Protocol.for_call copies a protocol's lists, dicts and sets, a custom protocol's too (whose
    check_config, unlike Hogwild's for its names, does not rebuild them), one copy of a container
    two settings share. (A mutation leaving the containers shared passed the suite: Hogwild's
    check_config made the call's names a new list anyway.)"""
    from engine.protocols.base import Protocol

    class Custom(Protocol):
        def __init__(self):
            self.words, self.weights, self.seen = ["a"], {"x": 1}, {1}
            self.same_words = self.words
    proto = Custom()
    c = proto.for_call()
    proto.words.append("b"), proto.weights.update(y=2), proto.seen.add(2)
    assert (c.words, c.weights, c.seen) == (["a"], {"x": 1}, {1})
    assert c.same_words is c.words and proto.same_words is proto.words


def test_multiverse_nested_and_depth_limit(llm):
    scripts = dict(MV)
    scripts["2:"] = " split<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    scripts["\n<Path>\n1:"] = " x</Path>"
    c, _ = run(llm, scripts, Multiverse(limits=TreeLimits(max_depth=2)))
    assert kinds(c).count("fork") == 2 and kinds(c).count("join") == 2
    assert max(t["role"] == "path" for t in c.tree)
    # the outer continuation (the answer) ends the text: it joins a path and a nested fork's
    # continuation, threads of different parents (it was dropped from .text / .token_ids)
    assert c.text.count("3 and 12") == 2 and c.text.endswith("answer \\boxed{15}"), c.text
    assert len(c.token_ids) == sum(len(t["token_ids"]) for t in c.tree[1:])
    assert all(t["parent"] is not None for t in c.tree[1:]), [(t["id"], t["parent"]) for t in c.tree]
    # a one-item fork whose path forks again: its continuation joins that path's continuation
    # alone (the thread tree makes it that thread's child); still placed once, after it
    one = {"": "<Goal><Outline>7: a</Outline></Goal>",
           "7:": " split<Goal><Outline>1: x</Outline><Outline>2: y</Outline></Goal>",
           "1:": " X</Path>", "2:": " Y</Path>", "<Conclusion>": " done</Path> ANSWER"}
    c, _ = run(llm, one, Multiverse())
    assert c.text.count("ANSWER") == 1 and c.text.endswith(" done</Path> ANSWER"), c.text
    assert len(c.token_ids) == sum(len(t["token_ids"]) for t in c.tree[1:])
    main = next(t for t in c.tree if t["role"] == "main")
    assert c.tree[-1]["parent"] == main["id"], [(t["id"], t["parent"]) for t in c.tree]
    c, _ = run(llm, scripts, Multiverse(limits=TreeLimits(max_depth=1)))
    assert "depth_limit" in kinds(c) and kinds(c).count("fork") == 1


def test_the_prompt_is_the_trees_prompt_thread_in_every_tree_protocol(llm):
    """ParaThinker forks its paths from the prompt itself, which it tags as the main role: its
    output tree called the prompt "main" (the tagged protocols call it "prompt"), so the main
    line read from the tree by role began with the prompt's text."""
    c, _ = run(llm, {"": "x", "<think": " t</think>", "<summary>": "s"}, ParaThinker(paths=2))
    assert [t["role"] for t in c.tree] == ["prompt", "path", "path", "main"]
    assert c.tree[0]["text"] == "Q: 1+2, 3*4?" and c.tree[0]["parent"] is None


def test_a_threads_events_in_the_tree_record_each_fork_once(llm):
    """A thread's "events" in the output tree held each of its forks twice (the thread tree's
    record and the protocol's), so counting them gave twice the forks the request made."""
    scripts = dict(MV)
    scripts["2:"] = " split<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    scripts["\n<Path>\n1:"] = " x</Path>"
    for proto in (Multiverse(), ParaThinker(paths=2)):
        c, _ = run(llm, {**scripts, "<think": " t</think>", "<summary>": "s"}, proto)
        forks = [e for e in c.events if e["event"] == "fork"]
        assert len({e["thread"] for e in forks}) == len(forks) == (2 if isinstance(proto, Multiverse) else 1)
        for e in forks:
            (mine,) = [x for x in c.tree[e["thread"]]["events"] if x["event"] == "fork"]
            assert mine["children"] == e["children"]


def test_a_trees_events_are_in_their_threads_events_too(llm):
    """Each event of a tree protocol's output (a stray close, an unclosed path, a join) is also
    in the "events" of its thread in the output tree, once. (A mutation recording them in the
    request's events only passed the suite.)"""
    scripts = {"": "a </Path> b<Goal><Outline>1: x</Outline><Outline>2: y</Outline></Goal>",
               "1:": " never closes", "2:": " done</Path>", "<Conclusion>": "ok"}
    c, _ = run(llm, scripts, Multiverse(), max_tokens=200)
    assert kinds(c) == ["stray_close", "fork", "unclosed_path", "join"], kinds(c)
    for e in c.events:
        if e["event"] != "fork":  # (a fork is in its thread's events as ThreadTree.fork records it)
            assert c.tree[e["thread"]]["events"].count(e) == 1, (e, c.tree[e["thread"]]["events"])
    assert [e["event"] for e in c.tree[1]["events"]] == ["stray_close", "fork", "join"]


@pytest.mark.parametrize("case,script,expect", [
    ("stray_close", {"": "text </Path> more"}, "stray_close"),
    ("empty_outline", {"": "<Goal>nothing</Goal> go on"}, "empty_outline"),
    ("unbalanced", {"": "</Goal> no open"}, "unbalanced"),
    ("unknown_tags", {"": "<Foo><Path></Bar> done"}, None),
    ("unclosed_path", {"": "<Goal><Outline>1: a</Outline></Goal>", "1:": " never closes",
                       "<Conclusion>": "ok"}, "unclosed_path"),
    ("endless_path", {"": "<Goal><Outline>1: a</Outline></Goal>", "1:": " loop...",
                      "<Conclusion>": "ok"}, "unclosed_path"),
])
def test_multiverse_malformed_output(llm, case, script, expect):
    c, _ = run(llm, script, Multiverse(), max_tokens=60)
    if expect is not None:
        assert expect in kinds(c)
    assert c.finish_reason in ("stop", "length")
    if case == "unclosed_path":
        assert "</Path>" in c.tree[2]["text"]  # closed by the engine before the join


def test_multiverse_too_many_items(llm):
    s = {"": "<Goal>" + "".join(f"<Outline>{i}: x</Outline>" for i in range(1, 6)) + "</Goal>",
         "1:": " a</Path>", "2:": " b</Path>", "3:": " c</Path>", "<Conclusion>": "done"}
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(max_paths=3)))
    assert "too_many_items" in kinds(c)
    assert sum(t["role"] == "path" for t in c.tree) == 3
    # exactly max_paths items are not too many
    s = {"": "<Goal>" + "".join(f"<Outline>{i}: x</Outline>" for i in range(1, 4)) + "</Goal>",
         "1:": " a</Path>", "2:": " b</Path>", "3:": " c</Path>", "<Conclusion>": "done"}
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(max_paths=3)))
    assert kinds(c) == ["fork", "join"] and sum(t["role"] == "path" for t in c.tree) == 3, c.events


def test_budgets_bound_critical_path_and_total(llm):
    s = {"": "<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>", "1:": " loop...",
         "2:": " loop...", "<Conclusion>": "end..."}
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(fork_margin=4)), max_tokens=70)
    assert c.metrics["critical_path_tokens"] <= 70
    assert c.finish_reason == "length"
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(fork_margin=4)), max_tokens=500,
               max_total_tokens=90)
    assert c.metrics["total_tokens"] <= 90


def test_no_fork_near_budget(llm):
    c, _ = run(llm, MV, Multiverse(limits=TreeLimits(fork_margin=1000)))
    assert "budget" in kinds(c) and "fork" not in kinds(c)


def test_threadweaver_closes_unterminated_threads(llm):
    s = {"": "<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>",
         "1:": " first</Thread>", "2:": " second, unterminated", "</Parallel>": "after"}
    for positions in ("sequential", "reprefill", "max"):
        c, _ = run(llm, s, ThreadWeaver(positions=positions))
        assert kinds(c).count("fork") == 1 and "unclosed_path" in kinds(c)
        assert "\n<Thread>\n2: second, unterminated</Thread>\n</Parallel>\nafter" in c.text
        assert c.text.count("first") == 1  # a reprefilled join is not shown twice


def test_parallel_r1(llm):
    s = {"": "think <Parallel>", "<Path>": " idea</Path>", "<Summary>": "sum"}
    c, _ = run(llm, s, ParallelR1(num_paths=3))
    assert sum(t["role"] == "path" for t in c.tree) == 3
    assert c.text.endswith("</Parallel>\n<Summary>\nsum")


def test_parathinker_first_finish_cutoff(llm):
    s = {"<think1>": " short</think>", "<think2>": " long...", "<think3>": " longer...",
         "<summary>": "final"}
    c, _ = run(llm, s, ParaThinker(paths=3, cutoff_ratio=2.0))
    paths = [t for t in c.tree if t["role"] == "path"]
    assert len(paths) == 3
    first = paths[0]["generated"]
    assert all(p["generated"] <= 2 * first for p in paths)
    assert "cutoff" in kinds(c) and c.text.endswith("<summary>\nfinal")
    summary = c.tree[-1]
    assert len(summary["view"]) == 1 + 3 + 1  # prompt, every path, itself


def test_a_path_that_ends_on_eos_before_the_others_is_joined_without_it(llm):
    """Path 1 ends on EOS while path 2 goes on: its EOS is not written (the conclusion must
    not read it); it used to be dropped only from the last path to end."""
    s = dict(MV, **{"1:": " 1+2=3", "2:": " 3*4=12, a much longer path than the first one</Path>"})
    c, _ = run(llm, s, Multiverse())
    eos = llm.eos_ids[0]
    paths = [t for t in c.tree if t["role"] == "path"]
    assert paths[0]["token_ids"][-len(llm.tokenizer.encode("</Path>", add_special_tokens=False)):] == \
        llm.tokenizer.encode("</Path>", add_special_tokens=False)  # closed by the protocol instead
    assert all(eos not in t["token_ids"] for t in paths)
    assert "unclosed_path" in kinds(c) and c.text.endswith("\\boxed{15}")


@pytest.fixture(scope="module")
def short_llm(tmp_path_factory):
    """A model whose context is 64 positions."""
    d = str(tmp_path_factory.mktemp("short_model"))
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, max_pos=64)
    return LLM(d, attention_backend="cpu", page_size=4, seed=0)


@pytest.mark.parametrize("make", [lambda: Multiverse(), lambda: ThreadWeaver(positions="reprefill"),
                                  lambda: ParaThinker(paths=2), lambda: ParallelSampling(3),
                                  lambda: Hogwild(workers=2, collab_prompt=None, finisher=False),
                                  lambda: Hogwild(workers=3, layout="contiguous", collab_prompt=None, finisher=False),
                                  lambda: Hogwild(workers=2, layout="contiguous", collab_prompt=None)])
def test_no_token_is_sampled_past_the_models_context(short_llm, make):
    """Every sampled token's position (a thread's end, after its view and header) is below
    the model's context: paths and joins that would start past it end ("length") or are
    not forked ("budget"). Before, a join's continuation or a fork's children sampled there.
    (Hogwild's finisher ending at the context in the scheduler's done() check: the request
    was dropped without its output.)"""
    llm, proto = short_llm, make()
    M = llm.config.max_position_embeddings
    tg = getattr(proto, "tags", None)
    if tg is not None:
        script = {"": f"{tg.block_open}{tg.item}1: a{tg.item}2: b{tg.fork}",
                  "1:": " aaaa bbbb cccc dddd...", "2:": " dd" + tg.path_close, "<think1>": " long...",
                  "<think2>": " ok" + tg.path_close, tg.join_header.strip(): "end..."}
    else:
        script = {"": "words and more words.\n\nsteps...", "Bob": "no...", "Carol": "yes.\n\nok..."}
    seen = []
    inner = Script(llm, script)

    def src(threads):
        seen.extend(effective_end(t) for t in threads)
        return inner(threads)
    llm.core.token_source = src
    try:
        out = llm.generate("Q", SamplingParams(max_tokens=200), protocol=proto)[0].outputs
    finally:
        llm.core.token_source = None
    assert seen and max(seen) < M, (max(seen), M)
    if not getattr(proto, "finisher", False):  # (a finisher's answer makes it "stop")
        assert any(o.finish_reason == "length" for o in out)
    if tg is not None:
        assert "fork" in kinds(out[0])
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0


@pytest.mark.parametrize("layout", ["combined", "contiguous"])
def test_hogwild_workers_that_start_at_the_context(short_llm, layout):
    """A prompt so long that the workers' views (the prompt, then each other's headers) reach
    the context before their first token: they end at once, and the finisher started then
    ends too (it used to be returned to sample, past the context: the core's check failed
    the request)."""
    llm, M = short_llm, short_llm.config.max_position_embeddings
    seen = []
    inner = Script(llm, {"": "a b c..."})

    def src(threads):
        seen.extend(effective_end(t) for t in threads)
        return inner(threads)
    llm.core.token_source = src
    try:
        hw = Hogwild(workers=2, layout=layout, collab_prompt=None, finisher_tokens=4)
        out = llm.generate("Q" * (M - 8), SamplingParams(max_tokens=20), protocol=hw)[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert all(x < M for x in seen) and out.finish_reason == "length"
    from engine.protocols.hogwild import FINISHER
    assert out.answer is None and FINISHER.strip() not in out.text  # (no finisher without room)
    assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0


@pytest.mark.parametrize("max_threads", [8, 12, 20])
def test_nested_forks_stay_within_max_threads(llm, max_threads):
    """A fork counts the continuations the forks still open will make (it counted only its
    own: nested forks ended with 14 threads for max_threads=12, 23 for 20)."""
    blk = "<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    lim = TreeLimits(max_paths=2, max_depth=3, max_threads=max_threads, fork_margin=0)
    c, _ = run(llm, {"": blk, "\n<Path>\n": blk + " p</Path>", "<Conclusion>": " c</Path>"},
               Multiverse(limits=lim), max_tokens=2000)
    assert kinds(c).count("fork") >= 2 and "budget" in kinds(c)
    assert len(c.tree) <= max_threads, (len(c.tree), kinds(c))


def test_item_protocols_refuse_tags_without_items():
    """Multiverse / ThreadWeaver fork one child per listed item: tags without block_open and
    item failed with an AttributeError when the model wrote the fork tag."""
    tags = Tags(fork="<F>", path_header="<P>", path_close="</P>", join_header="<J>")
    for proto in (Multiverse, ThreadWeaver):
        with pytest.raises(ValueError, match="its tags need block_open and item .*ParallelR1"):
            proto(tags=tags)
    assert ParallelR1(tags=tags).tags is tags


def test_hogwild_writes_no_eos_into_the_shared_history(llm):
    """A worker's step that ends on EOS: the EOS is not written (the other workers read the
    history live, and the joined text showed it), as a tree's path drops its EOS."""
    eos = llm.eos_ids[0]
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    scripts = {"Alice": enc("I take one. Done.\n\n") + [eos], "Bob": enc("Step one. Ok.\n\nStep two. Ok.\n\n" * 2)}
    typed, seen = {}, []

    def src(threads):
        out = []
        for t in threads:
            name = next(n for n in scripts if n in llm.tokenizer.decode(t.tokens[:t.header_len]))
            if name == "Bob":
                seen.append(any(eos in s.tokens for s, _ in t.view[:-1]))
            typed[name] = typed.get(name, 0) + 1
            sc = scripts[name]
            out.append(sc[typed[name] - 1] if typed[name] <= len(sc) else sc[-2])
        return out
    llm.core.token_source = src
    try:
        c = llm.generate("Q", SamplingParams(max_tokens=40),
                         protocol=Hogwild(workers=2, collab_prompt=None, finisher=False))[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert "I take one. Done." in c.text and eos not in c.token_ids, c.text
    assert len(seen) > 10 and not any(seen)
    assert llm.cache_stats()["pages_used"] == 0


def test_nested_reprefill_joins_stay_within_the_reservation(short_llm, tmp_path):
    """Each nesting level of reprefill joins writes the inner paths' text once more (the paths,
    the inner continuation, the outer one): the request's reservation counts 1 + max_depth
    copies (it counted 2, and a cache of just that size failed mid-request)."""
    d = str(tmp_path)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    K, lim = 500, TreeLimits(max_depth=2, max_paths=2, max_threads=11, fork_margin=0)
    proto = ParallelR1(num_paths=2, positions="reprefill", limits=lim)
    p = SamplingParams(temperature=0, max_tokens=2 * K + 60)
    probe = LLM(d, attention_backend="cpu", page_size=16, seed=0, kv_cache_tokens=16 * 4096)
    need = proto.pages_needed(probe.cache, 5, p, probe.config.max_position_embeddings)
    llm = LLM(d, attention_backend="cpu", page_size=16, seed=0, kv_cache_tokens=16 * need)  # just the bound
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731

    def depth(t):
        n = 0
        while t.parent is not None:
            t, n = t.parent, n + 1
        return n

    def src(threads):
        out = []
        for t in threads:
            head = llm.tokenizer.decode(t.tokens[:t.header_len])
            if "<Summary>" in head:
                text = "</Path>" if depth(t) >= 3 else "end"
            elif "<Path>" in head:
                text = "x" * K + "</Path>" if depth(t) >= 3 else "<Parallel>"
            else:
                text = "<Parallel>"
            toks = enc(text)
            out.append(toks[len(t.generated)] if len(t.generated) < len(toks) else llm.eos_ids[0])
        return out
    llm.core.token_source = src
    try:
        out = llm.generate([[65] * 5], p, protocol=proto)[0]
    finally:
        llm.core.token_source = None
    assert kinds(out.outputs[0]).count("join") == 3
    assert out.metrics.kv_pages_peak <= need
    assert llm.cache_stats()["pages_used"] == 0


def test_parallel_sampling_select(llm):
    """majority: every sample, those with the most common answer first (a sample without an
    answer casts no vote); first_finish: the first sample to stop (one cut off by max_tokens
    in the same step has not stopped), or the first sample when none stopped."""
    answers, table = iter(()), {}

    def src(threads):  # each new thread writes the next text (or token ids) of `answers`, then EOS
        out = []
        for t in threads:
            if t.id not in table:
                a = next(answers)
                table[t.id] = a if isinstance(a, list) else llm.tokenizer.encode(a, add_special_tokens=False)
            toks = table[t.id]
            out.append(toks[len(t.generated)] if len(t.generated) < len(toks) else llm.eos_ids[0])
        return out

    def run(texts, select, max_tokens=50):
        nonlocal answers
        answers = iter(texts)
        table.clear()
        return llm.generate("Q", SamplingParams(max_tokens=max_tokens),
                            protocol=ParallelSampling(len(texts), select))[0].outputs
    llm.core.token_source = src
    try:
        out = run(["\\boxed{7}", "\\boxed{8}", "\\boxed{7}", "no answer"], "majority")
        assert [o.answer for o in out] == ["7", "7", "8", None] and [o.index for o in out] == [0, 2, 1, 3]
        out = run(["no", "\\boxed{7}", "none", "nope"], "majority")  # (None is no answer, not a winner)
        assert [o.answer for o in out] == ["7", None, None, None]
        out = run(["\\boxed{1} long answer", "\\boxed{2}", "x" * 30, "y" * 40], "first_finish")
        assert len(out) == 1 and out[0].answer == "2" and out[0].index == 1
        # sample 0 reaches max_tokens=5 in the step where sample 1's fifth token is EOS
        out = run(["x " * 30, llm.tokenizer.encode("a b c d e f g h", add_special_tokens=False)[:4]],
                  "first_finish", max_tokens=5)
        assert len(out) == 1 and out[0].index == 1 and out[0].finish_reason == "stop"
        out = run(["x " * 30, "y " * 30, "z " * 30], "first_finish", max_tokens=5)  # (none stops)
        assert len(out) == 1 and out[0].index == 0 and out[0].finish_reason == "length"
    finally:
        llm.core.token_source = None
    assert llm.cache_stats()["pages_used"] == 0


def test_last_boxed():
    from engine.protocols.sampling import last_boxed
    assert last_boxed("so \\boxed{1}, then \\boxed{ \\frac{a}{b} } done") == "\\frac{a}{b}"  # (the last; nested)
    assert last_boxed("\\boxed{x^{2}} and \\boxed{unclosed") is None  # (the last never closes)
    assert last_boxed("\\boxed{}") == "" and last_boxed("no box {here}") is None


def test_protocol_arguments_are_validated():
    with pytest.raises(ValueError, match="positions"):
        Multiverse(positions="zigzag")
    with pytest.raises(ValueError, match="num_paths"):
        ParallelR1(num_paths=0)
    with pytest.raises(ValueError, match="cutoff_ratio"):
        ParaThinker(cutoff_ratio=0.5)
    with pytest.raises(ValueError, match="select"):
        ParallelSampling(2, select="best")
    with pytest.raises(ValueError, match="max_depth"):
        TreeLimits(max_depth=0)
    with pytest.raises(ValueError, match="block_open"):
        Tags(fork="x", path_header="y", path_close="z", join_header="w", block_open="a")
    # NaN compares false with every length (the cut-off never came); True is not a count;
    # a missing answer extractor failed after the whole generation
    import numpy as np
    for make, pattern in [(lambda: ParaThinker(cutoff_ratio=float("nan")), "cutoff_ratio=nan must be a number >= 1.0"),
                          (lambda: ParaThinker(paths=True), "paths=True must be an integer >= 1"),
                          (lambda: ParallelR1(num_paths=2.0), "num_paths=2.0 must be an integer >= 1"),
                          (lambda: ParallelSampling(True), "ParallelSampling n=True must be an integer >= 1"),
                          (lambda: ParallelSampling(2, extract_answer=None), "extract_answer=None must be a function"),
                          (lambda: TreeLimits(max_paths=False), "max_paths=False must be an integer >= 1"),
                          (lambda: TreeLimits(fork_margin=-1), "fork_margin=-1 must be an integer >= 0"),
                          (lambda: Hogwild(workers=True), "workers=True must be an integer >= 1"),
                          (lambda: Hogwild(finisher_tokens=0), "finisher_tokens=0 must be an integer >= 1"),
                          (lambda: Hogwild(finisher="yes"), "finisher='yes' must be True or False"),
                          (lambda: Hogwild(workers=2, compact_after=3), "compact_after=3 must be an integer >= 4")]:
        with pytest.raises(ValueError, match=pattern):
            make()
    assert ParaThinker(paths=np.int64(3), cutoff_ratio=float("inf")).paths == 3  # (inf: no cut-off)
    assert type(TreeLimits(max_paths=np.int32(4)).max_paths) is int


def test_sampling_params_a_protocol_cannot_honour_are_refused(llm):
    """A tree protocol or Hogwild gives one output per prompt: n > 1 would be silently
    ignored, so it is refused; ParallelSampling(n) refuses a different SamplingParams.n.
    logprobs: each thread of a tree reports its sampled tokens' log-probs in .tree (Hogwild:
    each worker's, in .workers). The engine stays usable."""
    for proto in (Multiverse(), ThreadWeaver(), ParallelR1(), ParaThinker(), Hogwild(workers=2)):
        name = type(proto).__name__
        with pytest.raises(ValueError, match=rf"{name} gives one output per prompt .*n=4\) asks for 4"):
            llm.generate(["1+1="], SamplingParams(n=4, max_tokens=4), protocol=proto)
    c, _ = run(llm, MV, Multiverse(), logprobs=0, temperature=0)
    assert len(c.tree) >= 4 and sum(t["generated"] for t in c.tree) == c.metrics["total_tokens"]
    for t in c.tree:
        assert len(t["logprobs"]) == t["generated"] and all(lp <= 0 for lp in t["logprobs"]), t
    c, _ = run(llm, MV, Multiverse(), temperature=0)
    assert all(t["logprobs"] == [] for t in c.tree)
    with pytest.raises(ValueError, match=r"ParallelSampling\(n=2\) and SamplingParams\(n=4\) disagree"):
        llm.generate(["1+1="], SamplingParams(n=4, max_tokens=4), protocol=ParallelSampling(2))
    out = llm.generate(["1+1="], SamplingParams(n=2, max_tokens=3, logprobs=1), protocol=ParallelSampling(2))[0]
    assert len(out.outputs) == 2 and all(len(c.logprobs) == len(c.token_ids) for c in out.outputs)
    assert llm.cache_stats()["pages_used"] == 0


def test_request_that_can_never_fit_names_the_protocols_bound(llm):
    """The error of a request whose worst case outgrows the cache says what that worst case
    is for its protocol and how to lower it; the engine stays usable."""
    llm = LLM(llm.model_dir, attention_backend="torch", page_size=4, kv_cache_tokens=64)
    cap = 64
    big = SamplingParams(max_tokens=cap, temperature=0)
    cases = [(ParallelSampling(3), r"n=3 x max_tokens=\d+\) .*lower max_tokens / n"),
             (Multiverse(), r"Multiverse: max_paths=8 x max_tokens=\d+ sampled tokens, plus headers for up to "
                            r"max_threads=64 threads\) .*limits=TreeLimits\(max_paths=\.\.\., max_threads=\.\.\.\) "
                            r"to Multiverse"),
             (ParallelR1(positions="reprefill"), r"3 times for reprefill joins"),
             ]
    for proto, pattern in cases:
        with pytest.raises(ValueError, match=r"can never fit the KV cache.*" + pattern):
            llm.generate(["1+1="], big, protocol=proto)
    with pytest.raises(ValueError, match=r"max_total_tokens=\d+, plus headers"):
        llm.generate(["1+1="], SamplingParams(max_tokens=8, max_total_tokens=cap), protocol=Multiverse())
    assert llm.cache_stats()["pages_used"] == 0
    assert len(llm.generate(["1+1="], SamplingParams(max_tokens=3, temperature=0))[0].outputs[0].token_ids) >= 1


class Tokens:
    """A token source: each thread (by id) takes its next token from ``lists[id]``, then EOS."""
    def __init__(self, llm, lists: dict):
        self.lists, self.eos = lists, llm.eos_ids[0]

    def __call__(self, threads):
        out = []
        for t in threads:
            seq = self.lists.get(t.id, self.lists.get("path", []) if getattr(t.tag, "role", None) == "path" else [])
            out.append(seq[len(t.generated)] if len(t.generated) < len(seq) else self.eos)
        return out


def _run_tokens(llm, lists, params, protocol=None):
    llm.core.token_source = Tokens(llm, lists)
    try:
        return llm.generate(["q"], params, protocol=protocol)[0].outputs[0]
    finally:
        llm.core.token_source = None
        assert llm.cache_stats()["pages_used"] == 0


def test_stop_strings_over_special_tokens_and_split_characters(llm):
    """Stop strings are matched on the text as it grows by whole characters: special tokens
    between a stop string's characters (skipped in the text) do not hide it however many there
    are, and a stop string holding U+FFFD does not match a character that is split over byte
    tokens (it used to crash: the tail, decoded from mid-character, showed a U+FFFD)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    eos = llm.eos_ids[0]
    for gap in (3, 20):
        seq = enc("xa") + [eos] * gap + enc("b yyy ab zzz")
        c = _run_tokens(llm, {1: seq}, SamplingParams(max_tokens=60, ignore_eos=True, stop=["ab"]))
        assert (c.finish_reason, c.stop_reason, c.text) == ("stop", "ab", "x"), (gap, c)
        assert c.token_ids == seq[:3 + gap], gap  # stopped at the first "ab"'s last token
    e = enc("é" * 10)
    assert len(e) == 20  # (two byte tokens per character)
    c = _run_tokens(llm, {1: e}, SamplingParams(max_tokens=20, stop=["\ufffdé"]))
    assert (c.finish_reason, c.text) == ("length", "é" * 10), c
    c = _run_tokens(llm, {1: e}, SamplingParams(max_tokens=20, stop=["éé"]))
    assert (c.finish_reason, c.text, len(c.token_ids)) == ("stop", "", 4), c


def test_tree_protocols_match_non_ascii_tags_and_cut_stop_strings(llm):
    """Tags are matched on whole characters (a non-ASCII tag split over byte tokens used to
    never match), and a stop string ends a tree's text as it ends plain sampling's."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    for fork in ("<Parallel>", "<Paralléle>"):
        tags = Tags(fork=fork, path_header="\n<Path>\n", path_close="</Path>", join_header="\n<Summary>\n")
        c = _run_tokens(llm, {1: enc("think " + fork), "path": enc("p</Path>")},
                        SamplingParams(max_tokens=40), ParallelR1(num_paths=2, tags=tags))
        assert kinds(c) == ["fork", "join"], (fork, c.events)
        assert c.text == f"think {fork}\n<Path>\np</Path>\n<Path>\np</Path>\n<Summary>\n", c.text
    params = SamplingParams(max_tokens=40, stop=["STOP"])
    plain = _run_tokens(llm, {1: enc("hello STOP more text")}, params)
    tree = _run_tokens(llm, {1: enc("hello STOP more text")}, params, Multiverse())
    assert plain.text == tree.text == "hello " and tree.stop_reason == "STOP", (plain.text, tree.text)
    params = SamplingParams(max_tokens=40, stop=["STOP"], include_stop_str_in_output=True)  # (vLLM's)
    plain = _run_tokens(llm, {1: enc("hello STOP more text")}, params)
    tree = _run_tokens(llm, {1: enc("hello STOP more text")}, params, Multiverse())
    assert plain.text == tree.text == "hello STOP", (plain.text, tree.text)
    # a match across special tokens (skipped in the stop text, spelled out in a tree's text)
    eos = llm.eos_ids[0]
    params = SamplingParams(max_tokens=40, stop=["ab"], ignore_eos=True)
    seq = enc("xa") + [eos] * 3 + enc("b yyy")
    plain = _run_tokens(llm, {1: seq}, params)
    tree = _run_tokens(llm, {1: seq}, params, Multiverse())
    assert plain.text == tree.text == "x", (plain.text, tree.text)
    # a stop string written before min_tokens does not stop it: the text is cut at the one that did
    for incl, want in ((False, "hello STOP x "), (True, "hello STOP x STOP")):
        params = SamplingParams(max_tokens=40, stop=["STOP"], min_tokens=10, include_stop_str_in_output=incl)
        plain = _run_tokens(llm, {1: enc("hello STOP x STOP more")}, params)
        tree = _run_tokens(llm, {1: enc("hello STOP x STOP more")}, params, Multiverse())
        assert plain.text == tree.text == want, (incl, plain.text, tree.text)
    # ParaThinker's headers take the path number as an int: a format spec for it works
    tags = Tags(fork="<think>", path_header="<think{num:02d}>", path_close="</think>", join_header="\n<summary>\n")
    c = _run_tokens(llm, {"path": enc("4</think>")}, SamplingParams(max_tokens=20), ParaThinker(paths=2, tags=tags))
    assert c.text.startswith("<think01>4</think><think02>4</think>"), c.text


def test_a_trees_text_is_cut_where_its_stop_string_is_not_in_a_special_tokens_text(llm):
    """A stop string is matched on the text as skip_special_tokens makes it (the default: without
    special tokens' text), a tree's text spells special tokens out: it is cut where the stop
    string that ended the request is, with the special tokens before it. It was cut where the
    stop string's letters first read in the spelled-out text: inside the EOS's "<|im_end|>",
    "a<|im_end|>b <|im" with stop "<|im" gave "a" ("a<|im" with include_stop_str_in_output)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    eos = llm.eos_ids[0]
    eos_text = llm.tokenizer.decode([eos], skip_special_tokens=False)
    assert eos_text == "<|im_end|>"
    seq = enc("a") + [eos] + enc("b <|im more")
    for incl, want in ((False, "b "), (True, "b <|im")):
        params = SamplingParams(max_tokens=40, stop=["<|im"], ignore_eos=True, include_stop_str_in_output=incl)
        plain = _run_tokens(llm, {1: seq}, params)
        tree = _run_tokens(llm, {1: seq}, params, Multiverse())
        assert (plain.text, plain.stop_reason) == ("a" + want, "<|im"), (incl, plain)
        assert (tree.text, tree.stop_reason) == ("a" + eos_text + want, "<|im"), (incl, tree.text)
        assert tree.token_ids == plain.token_ids == seq[:len(enc("ab <|im")) + 1]


def test_a_trees_text_is_cut_at_the_stop_string_that_stopped_it_from_its_first_character(llm):
    """A stop string let pass by min_tokens at the very start of the main thread's text, then a
    special token, then the one that stopped it: the text (special tokens spelled out) is cut
    before the second. (The first character was not searched, and the cut fell back to the
    engine's text, which leaves special tokens out.)"""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    params = SamplingParams(max_tokens=40, stop=["STOP"], min_tokens=5)
    c = _run_tokens(llm, {1: enc("STOP<Path>x STOP more")}, params, Multiverse())
    assert (c.text, c.stop_reason) == ("STOP<Path>x ", "STOP"), c.text
    params = SamplingParams(max_tokens=40, stop=["STOP"], min_tokens=5, include_stop_str_in_output=True)
    c = _run_tokens(llm, {1: enc("STOP<Path>x STOP more")}, params, Multiverse())
    assert (c.text, c.stop_reason) == ("STOP<Path>x STOP", "STOP"), c.text


def test_a_trees_text_cut_at_a_stop_string_keeps_the_special_tokens_before_it(llm):
    """A tree's text spells special tokens out up to the stop string that ended it: a special
    token right before the stop string (not in the text the stop was matched on) stays, and so
    do the joined paths' special tags before a conclusion's stop. (Mutations cutting at the
    first token that reaches the stop's offset, and reading the joined text before the
    conclusion without special tokens, passed the suite.)"""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    c = _run_tokens(llm, {1: enc("go x<Path>STOP more")}, SamplingParams(max_tokens=40, stop=["STOP"]), Multiverse())
    assert (c.text, c.stop_reason, c.index) == ("go x<Path>", "STOP", 0), c.text
    want, _ = run(llm, MV, Multiverse())
    c, _ = run(llm, {**MV, "<Conclusion>": "3 and 12 STOP more"}, Multiverse(), stop=["STOP"])
    assert (c.text, c.stop_reason) == (want.text[:want.text.index("3 and 12")] + "3 and 12 ", "STOP"), c.text


def test_min_tokens_counts_a_trees_critical_path(llm):
    """min_tokens, as max_tokens, counts the critical path: a summary whose path has min_tokens
    tokens already stops on its first EOS (it was counted per thread: the summary had to write
    min_tokens of its own, EOS masked, a scripted EOS written into the text)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    lists = {1: enc("go <Parallel>"), "path": enc(" p</Path>")}
    want = "go <Parallel>\n<Path>\n p</Path>\n<Path>\n p</Path>\n</Parallel>\n<Summary>\n"
    for min_tokens in (0, len(lists[1])):
        c = _run_tokens(llm, lists, SamplingParams(max_tokens=40, min_tokens=min_tokens), ParallelR1(num_paths=2))
        assert (c.text, c.finish_reason, kinds(c)) == (want, "stop", ["fork", "join"]), (min_tokens, c.text)


def test_a_stop_string_that_writes_a_paths_close_tag_closes_it_once(llm):
    """A stop string or a stop token that ends a path where the path wrote its close tag (the
    tag itself, or its end) closes the path as the tag does: the close tag was injected once
    more ('</Path></Path>') and the path reported as unclosed."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    lists = {1: enc("go <Parallel>"), "path": enc(" p</Path> more")}
    want = "go <Parallel>\n<Path>\n p</Path>\n<Path>\n p</Path>\n</Parallel>\n<Summary>\n"
    for stop in ("</Path>", "Path>", "th>"):
        c = _run_tokens(llm, lists, SamplingParams(max_tokens=40, stop=[stop]), ParallelR1(num_paths=2))
        assert (c.text, kinds(c)) == (want, ["fork", "join"]), (stop, c.text, c.events)
    # a stop token the path keeps (not an EOS: that is not written) that completes the tag
    tags = Tags(fork="<Parallel>", path_header="\n<Path>\n", path_close="END!", join_header="\n<Summary>\n")
    c = _run_tokens(llm, {1: enc("go <Parallel>"), "path": enc(" p END! more")},
                    SamplingParams(max_tokens=40, stop_token_ids=enc("!")), ParallelR1(num_paths=2, tags=tags))
    assert (c.text, kinds(c)) == ("go <Parallel>\n<Path>\n p END!\n<Path>\n p END!\n<Summary>\n", ["fork", "join"]), c
    c = _run_tokens(llm, {"path": enc(" p</think> more")}, SamplingParams(max_tokens=20, stop=["</think>"]),
                    ParaThinker(paths=2))
    assert c.text.startswith("<think1> p</think><think2> p</think>\n<summary>"), c.text
    assert "unclosed_path" not in kinds(c), c.events


def test_a_stop_token_is_cut_from_the_text_everywhere(llm):
    """A stop token (stop_token_ids) ends the text before it in plain sampling, a tree
    protocol and a session's generate alike, and is named by stop_reason; the token itself
    stays in token_ids (as vLLM)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    seq = enc("hello world. more")
    dot = next(t for t in seq if llm.tokenizer.decode([t]) == ".")
    params = SamplingParams(max_tokens=40, stop_token_ids=[dot])
    plain = _run_tokens(llm, {1: seq}, params)
    tree = _run_tokens(llm, {1: seq}, params, Multiverse())
    for c in (plain, tree):
        assert (c.text, c.finish_reason, c.stop_reason) == ("hello world", "stop", dot), c
    assert plain.token_ids == seq[:seq.index(dot) + 1]
    kept = SamplingParams(max_tokens=40, stop_token_ids=[dot], include_stop_str_in_output=True)  # (vLLM's)
    for c in (_run_tokens(llm, {1: seq}, kept), _run_tokens(llm, {1: seq}, kept, Multiverse())):
        assert (c.text, c.stop_reason) == ("hello world.", dot), c
    # the EOS kept: its text is a special token's, which skip_special_tokens leaves out in both
    eos = llm.eos_ids[0]
    for skip in (True, False):
        kept = SamplingParams(max_tokens=40, include_stop_str_in_output=True, skip_special_tokens=skip)
        plain, tree = _run_tokens(llm, {1: seq + [eos]}, kept), _run_tokens(llm, {1: seq + [eos]}, kept, Multiverse())
        want = "hello world. more" + ("" if skip else llm.tokenizer.decode([eos], skip_special_tokens=False))
        assert plain.text == tree.text == want, (skip, plain.text, tree.text)
    llm.core.token_source = lambda threads: [seq[len(t.generated)] for t in threads]
    try:
        with llm.session("q") as s:
            c = s.generate([s.root], params)[0]
    finally:
        llm.core.token_source = None
    assert (c.text, c.stop_reason) == ("hello world", dot), c


def test_a_model_written_item_number_cannot_outgrow_the_reservation(llm):
    """The item numbers the model writes are copied into its paths' headers: one longer than
    6 digits numbers the path by position (event long_item_number), so headers stay within
    what the request reserved (800-digit numbers took 90 pages more than reserved and ran the
    cache dry mid-call)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main = enc("<Goal><Outline>" + "9" * 300 + ": a</Outline><Outline>12: b</Outline></Goal>")
    c = _run_tokens(llm, {1: main, "path": enc(" done</Path>")}, SamplingParams(max_tokens=400),
                    Multiverse())
    assert kinds(c)[:2] == ["long_item_number", "fork"], c.events
    heads = [t["text"] for t in c.tree if t["role"] == "path"]
    assert heads[0].startswith("\n<Path>\n1:") and heads[1].startswith("\n<Path>\n12:"), heads


def test_a_close_tag_on_the_budgets_last_token_closes_the_path(llm):
    """A path whose last budgeted token completes its close tag is closed by it (a second close
    tag used to be injected: the budget had ended the thread before the scan); the same for
    ParaThinker. Dotted item numbers (1.1, 1.2) head their paths as written."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main, path = "<Goal><Outline>1: a</Outline></Goal>", " p</Path>"
    for extra in (0, 1):
        c, _ = run(llm, {"": main, "1:": path, "<Conclusion>": "c"}, Multiverse(limits=TreeLimits(fork_margin=0)),
                   max_tokens=len(enc(main)) + len(enc(path)) + extra)
        assert "</Path></Path>" not in c.text and "unclosed_path" not in kinds(c), (extra, c.text, kinds(c))
    c, _ = run(llm, {"<think1>": " p</think>", "<think2>": " p</think>", "<summary>": "s"}, ParaThinker(paths=2),
               max_tokens=len(enc(" p</think>")))
    assert c.text.startswith("<think1> p</think><think2> p</think>"), c.text
    c, _ = run(llm, {"": "<Goal><Outline>1.1: a</Outline><Outline>1.2: b</Outline></Goal>", "1.": " x</Path>",
                     "<Conclusion>": "c"}, Multiverse())
    heads = [t["text"] for t in c.tree if t["role"] == "path"]
    assert heads[0].startswith("\n<Path>\n1.1:") and heads[1].startswith("\n<Path>\n1.2:"), heads


def test_a_fork_tag_on_the_budgets_last_token_is_a_budget_event(llm):
    """A fork tag completed by the thread's last budgeted token (main or path) is refused as any
    fork without room ("budget"); it used to be dropped with no event, the one fork tag the
    events did not account for."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main = "<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    for margin in (0, 16):
        c, _ = run(llm, {"": main}, Multiverse(limits=TreeLimits(fork_margin=margin)), max_tokens=len(enc(main)))
        assert kinds(c) == ["budget"] and c.text == main and c.finish_reason == "length", (margin, kinds(c))
    path = " again<Goal><Outline>7: x</Outline></Goal>"
    c, _ = run(llm, {"": main, "1:": path, "2:": " y</Path>", "<Conclusion>": "c"},
               Multiverse(limits=TreeLimits(fork_margin=0)), max_tokens=len(enc(main)) + len(enc(path)))
    assert kinds(c) == ["fork", "budget", "unclosed_path", "join"], kinds(c)


def test_a_fork_tag_in_a_paths_stop_string_is_no_budget_event(llm):
    """A path that a stop string (or a kept stop token) ends on the token completing a fork tag
    has no fork, and no "budget" event either: nothing ran out (it was scanned for its close
    tag, and the fork tag taken as one on the budget's last token)."""
    main = "<Parallel><Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    path = " again<Goal><Outline>7: x</Outline></Goal> more</Path>"
    scripts = {"": main, "1:": path, "2:": " y</Path>", "<Conclusion>": "c"}
    # (skip_special_tokens=False: the stop string is matched on the tags' text when they are special)
    c, _ = run(llm, scripts, Multiverse(), stop=["x</Outline></Goal>"], skip_special_tokens=False)
    assert kinds(c) == ["fork", "unclosed_path", "join"], c.events
    assert "7: x</Outline></Goal></Path>\n<Path>\n2: y</Path>" in c.text, c.text


def test_a_main_threads_stop_string_is_not_scanned_for_tags(llm):
    """A stop string that ends the main thread ends the request there: its text is not scanned
    for tags (a close tag in it made a "stray_close" event; a path's stop is scanned, for its
    close tag)."""
    c, _ = run(llm, {"": "hello </Path> more"}, Multiverse(), stop=["</Path>"], skip_special_tokens=False)
    assert (c.text, c.stop_reason, kinds(c)) == ("hello ", "</Path>", []), (c.text, c.events)


def test_no_fork_within_fork_margin_of_the_total_budget(llm):
    """fork_margin holds for max_total_tokens too: a fork tag written with fewer total tokens
    left than the margin (max_tokens far off) is a "budget" event, and the main thread goes on
    to the total budget; with the margin left, it forks."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main = "<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    s = {"": main + " on and on...", "1:": " x</Path>", "2:": " y</Path>", "<Conclusion>": "c"}
    c, _ = run(llm, s, Multiverse(), max_tokens=400, max_total_tokens=len(enc(main)) + 15)
    assert kinds(c) == ["budget"] and c.finish_reason == "length", c.events
    assert c.metrics["total_tokens"] == len(enc(main)) + 15
    c, _ = run(llm, s, Multiverse(), max_tokens=400, max_total_tokens=len(enc(main)) + 16)
    assert kinds(c)[0] == "fork", c.events


def test_no_fork_within_fork_margin_of_the_threads_own_budget(llm):
    """fork_margin holds against max_tokens, counted from the tokens the thread's chain has
    sampled: a fork tag written with fewer of them left than the margin is a "budget" event and
    the main thread goes on to max_tokens; with the margin left, it forks. (A mutation adding
    the sampled tokens to max_tokens instead passed the suite.)"""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main = "<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    s = {"": main + " on and on...", "1:": " x</Path>", "2:": " y</Path>", "<Conclusion>": "c"}
    c, _ = run(llm, s, Multiverse(), max_tokens=len(enc(main)) + 15)
    assert kinds(c) == ["budget"] and c.finish_reason == "length", c.events
    assert c.metrics["total_tokens"] == len(enc(main)) + 15
    c, _ = run(llm, s, Multiverse(), max_tokens=len(enc(main)) + 16)
    assert kinds(c)[0] == "fork", c.events


def test_parathinker_joins_a_path_that_ended_on_eos_without_it(llm):
    """A ParaThinker path that ends on EOS while another goes on: its EOS is not written (the
    summary must not read it); its close tag is added instead, as a tagged protocol's path's."""
    eos = llm.eos_ids[0]
    s = {"<think1>": " short", "<think2>": " a much longer path than the first</think>", "<summary>": "s"}
    c, _ = run(llm, s, ParaThinker(paths=2, cutoff_ratio=10.0))
    paths = [t for t in c.tree if t["role"] == "path"]
    assert all(eos not in t["token_ids"] for t in paths), [t["text"] for t in paths]
    assert paths[0]["text"].endswith(" short</think>") and "unclosed_path" in kinds(c), (paths[0]["text"], c.events)


def test_samplers_looks_at_each_fork_once_however_many_of_its_paths_ended(llm, monkeypatch):
    """A tree run's samplers() asks once per fork whether it can join, not once per ended path
    (each ask looks at the fork's paths: paths^2 a step, twice a step, while paths end one by
    one, as ParaThinker's do with a cutoff_ratio past 1)."""
    from engine.protocols.tree import TreeRun
    calls, most = [0], [0]
    join, samplers = TreeRun.maybe_join, TreeRun.samplers

    def counted_join(self, g):
        calls[0] += 1
        return join(self, g)

    def counted_samplers(self):
        calls[0] = 0
        out = samplers(self)
        most[0] = max(most[0], calls[0])
        return out
    monkeypatch.setattr(TreeRun, "maybe_join", counted_join)
    monkeypatch.setattr(TreeRun, "samplers", counted_samplers)
    s = {f"<think{i}>": " a" * i + "</think>" for i in range(1, 7)}
    c, _ = run(llm, dict(s, **{"<think7>": " a" * 20 + "</think>", "<summary>": "final"}),
               ParaThinker(paths=7, cutoff_ratio=100.0))
    assert kinds(c).count("join") == 1 and c.text.endswith("<summary>\nfinal"), c.events
    assert most[0] == 1, most  # (one fork; it was 6: one ask per ended path, each step)


@pytest.mark.parametrize("field", ["i", "num"])
def test_a_path_header_numbers_its_paths_from_one(llm, field):
    """Tags.path_header's {i} is the path's 1-based position in its fork; ParallelR1's paths
    have no items, so its {num} is that number too."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    tags = Tags(fork="<Parallel>", path_header=f"\n<Path n={{{field}}}>\n", path_close="</Path>",
                join_header="\n<Summary>\n")
    c = _run_tokens(llm, {1: enc("go <Parallel>"), "path": enc("p</Path>")}, SamplingParams(max_tokens=40),
                    ParallelR1(num_paths=2, tags=tags))
    assert c.text == "go <Parallel>\n<Path n=1>\np</Path>\n<Path n=2>\np</Path>\n<Summary>\n", c.text


def test_a_join_continues_the_longest_paths_budget(llm):
    """max_tokens bounds every chain of sampled tokens root..leaf: a join's continuation
    starts from its longest path's count (the critical path), so after a short and a long
    path the conclusion gets what the long one left, and stops on "length" there (counted
    from the shortest path, the conclusion would run on past the bound)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main, short, long = ("<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>", " x</Path>",
                         " a much longer path, with many more words in it</Path>")
    budget = len(enc(main)) + len(enc(long)) + 6
    c, _ = run(llm, {"": main, "1:": short, "2:": long, "<Conclusion>": "end..."},
               Multiverse(limits=TreeLimits(fork_margin=0)), max_tokens=budget)
    assert kinds(c) == ["fork", "join"] and c.finish_reason == "length"
    m, p1, p2, conc = c.tree[1:]
    assert (p1["generated"], p2["generated"]) == (len(enc(short)), len(enc(long)))
    assert m["generated"] + p2["generated"] + conc["generated"] == budget, (m, p2, conc)
    assert c.metrics["critical_path_tokens"] == budget


def test_max_total_tokens_ends_the_threads_it_cannot_cover(llm):
    """When the total budget cannot give every sampling thread one more token, the first
    threads take what is left and every other one ends ("length") right there: all samples
    end, and exactly max_total_tokens are sampled (none left neither sampling nor ended)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    words = enc("a b c d e f g h i j k l")
    for total in (7, 8):
        llm.core.token_source = lambda threads: [words[len(t.generated)] for t in threads]
        try:
            outs = llm.generate(["q"], SamplingParams(max_tokens=10, max_total_tokens=total),
                                protocol=ParallelSampling(3))[0].outputs
        finally:
            llm.core.token_source = None
        assert [len(o.token_ids) for o in outs] == ([3, 2, 2] if total == 7 else [3, 3, 2]), (total, outs)
        assert all(o.finish_reason == "length" for o in outs)
    assert llm.cache_stats()["pages_used"] == 0


def test_parallel_sampling_under_a_total_budget_runs_in_a_cache_of_its_bound(tmp_path):
    """ParallelSampling's pages under max_total_tokens: the total's pages plus a part-filled
    page for each sample that has tokens; a cache of just that bound runs the request (without
    the per-sample pages the bound was too small, and the request failed mid-call)."""
    d = str(tmp_path)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    proto, p = ParallelSampling(4), SamplingParams(max_tokens=10, max_total_tokens=8)
    probe = LLM(d, attention_backend="cpu", page_size=4, seed=0)
    need = proto.pages_needed(probe.cache, 4, p, probe.config.max_position_embeddings)
    llm = LLM(d, attention_backend="cpu", page_size=4, seed=0, kv_cache_tokens=4 * need)  # just the bound
    words = llm.tokenizer.encode("a b c d e f g h", add_special_tokens=False)
    llm.core.token_source = lambda threads: [words[len(t.generated)] for t in threads]
    try:
        outs = llm.generate([[65] * 4], p, protocol=proto)[0].outputs
    finally:
        llm.core.token_source = None
    assert [len(o.token_ids) for o in outs] == [2, 2, 2, 2]
    assert llm.cache_stats()["pages_used"] == 0


def test_parallel_samplings_bound_is_exact_up_to_the_context(tmp_path):
    """ParallelSampling's bound: the prompt's pages plus, per sample, the pages of max_tokens - 1
    tokens (a sample's last token is never written), or of the context left after the prompt
    less one when that is shorter. A cache of just the bound runs the request, one page less
    is refused naming it (a bound off by a token either way went unnoticed)."""
    d = str(tmp_path)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, max_pos=32)
    # (prompt, max_tokens, the bound in pages of 4, each sample's tokens)
    for P, max_tokens, need, gen in [(4, 5, 1 + 3 * 1, 5), (4, 6, 1 + 3 * 2, 6),
                                      (4, 10**6, 1 + 3 * 7, 28), (31, 5, 8 + 3 * 0, 1)]:
        p = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        llm = LLM(d, attention_backend="cpu", page_size=4, seed=0, kv_cache_tokens=4 * need)
        outs = llm.generate([[65] * P], p, protocol=ParallelSampling(3))[0].outputs
        assert [len(o.token_ids) for o in outs] == [gen] * 3 and llm.cache_stats()["pages_used"] == 0
        if need - 1 >= -(-P // 4):  # (fewer pages than the prompt's own is another error)
            small = LLM(d, attention_backend="cpu", page_size=4, seed=0, kv_cache_tokens=4 * (need - 1))
            with pytest.raises(ValueError, match=rf"can never fit the KV cache: it needs up to {need} pages"):
                small.generate([[65] * P], p, protocol=ParallelSampling(3))


def test_a_tree_protocol_runs_in_a_cache_of_its_bound_with_large_pages(tmp_path):
    """A tree protocol's bound holds a part-filled page for each thread: with pages larger than
    a header's allowance, a cache of just the bound runs the request (without them the bound
    was too small, and the request failed mid-call)."""
    d = str(tmp_path)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64)
    proto = ParallelR1(num_paths=4, limits=TreeLimits(max_paths=4, max_threads=7, fork_margin=0))
    p = SamplingParams(max_tokens=40)
    probe = LLM(d, attention_backend="cpu", page_size=128, seed=0)
    need = proto.pages_needed(probe.cache, 4, p, probe.config.max_position_embeddings)
    llm = LLM(d, attention_backend="cpu", page_size=128, seed=0, kv_cache_tokens=128 * need)  # just the bound
    llm.core.token_source = Script(llm, {"": "go <Parallel>", "<Path>": " p</Path>", "<Summary>": "s"})
    try:
        c = llm.generate([[65] * 4], p, protocol=proto)[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert kinds(c) == ["fork", "join"] and c.text.endswith("<Summary>\ns"), c.text
    assert llm.cache_stats()["pages_used"] == 0


def test_no_fork_without_room_before_the_models_context(short_llm):
    """A fork needs fork_margin tokens of room on every budget, the model's context
    included: the fork tag written with exactly fork_margin positions left forks, with one
    fewer it is refused ("budget": continue sequentially), however much of max_tokens is
    left (paths forked with less room could not write)."""
    llm, M = short_llm, short_llm.config.max_position_embeddings
    main = "x" * 30 + "<Parallel>"
    left = M - len(llm.tokenizer.encode("Q")) - len(llm.tokenizer.encode(main, add_special_tokens=False))
    assert 4 < left < 200 - M  # (the context is the tightest budget)
    for margin, expect in ((left, ["fork", "join"]), (left + 1, ["budget"])):
        out, _ = run(llm, {"": main + " go on...", "<Path>": " p</Path>", "<Summary>": "s"},
                     ParallelR1(limits=TreeLimits(fork_margin=margin)), prompt="Q", max_tokens=200)
        assert kinds(out) == expect, (margin, left, out.events)
    assert llm.cache_stats()["pages_used"] == 0


def test_a_fork_whose_paths_have_no_room_for_their_headers_ends_on_length(short_llm):
    """A fork with fork_margin positions left whose paths' headers reach the model's context:
    the paths end without a token, are joined, and the continuation (at the context too) ends
    the request with finish_reason "length" (it ended with the continuation never sampled nor
    ended, reported as "stop")."""
    llm, M = short_llm, short_llm.config.max_position_embeddings
    left = 5  # (less than ParallelR1's "\n<Path>\n" header)
    main = "x" * (M - len(llm.tokenizer.encode("Q")) - len("<Parallel>") - left) + "<Parallel>"
    out, _ = run(llm, {"": main + " go on...", "<Path>": " p</Path>", "<Summary>": "s"},
                 ParallelR1(limits=TreeLimits(fork_margin=left)), prompt="Q", max_tokens=200)
    assert kinds(out) == ["fork", "unclosed_path", "unclosed_path", "join"], out.events
    assert [t["generated"] for t in out.tree if t["role"] == "path"] == [0, 0]
    assert out.finish_reason == "length"
    assert llm.cache_stats()["pages_used"] == 0


def test_a_refused_fork_closes_its_block(llm):
    """A fork tag ends the block it closes even when the fork is refused ("budget"): a
    later fork tag with no block open is "unbalanced" (ignored), not a second try at the
    old block's items."""
    s = {"": "<Goal><Outline>1: a</Outline></Goal> then </Goal> end"}
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(fork_margin=1000)))
    assert kinds(c) == ["budget", "unbalanced"], c.events
    assert c.text == s[""] and c.finish_reason == "stop"


def test_parathinker_cut_off_counts_from_the_first_path_to_finish(llm):
    """The cut-off is cutoff_ratio x the length of the first path to finish: a second path
    finishing later does not move it (nor is it a second "first_finish")."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    first, second = " a</think>", " a bit longer</think>"
    s = {"<think1>": first, "<think2>": second, "<think3>": " long...", "<summary>": "final"}
    c, _ = run(llm, s, ParaThinker(paths=3, cutoff_ratio=3.0))
    paths = [t for t in c.tree if t["role"] == "path"]
    assert [p["generated"] for p in paths] == [len(enc(first)), len(enc(second)), 3 * len(enc(first))]
    assert kinds(c).count("first_finish") == 1 and kinds(c).count("cutoff") == 1, c.events
    assert c.text.endswith("<summary>\nfinal")


def test_a_numpy_cutoff_ratio_cuts_off_as_the_float_it_equals(llm):
    """cutoff_ratio is taken as the Python float it equals (a numpy float16's own arithmetic
    would round ratio x the first path's length, here down to the whole number just below it,
    and cut the other paths a token early)."""
    import numpy as np
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    first = " a</think>"
    n = len(enc(first))
    # (a float16 ratio whose product with n rounds, in float16, down to a whole number)
    r = next(r for r in (np.float16(1 + i / 1024) for i in range(1, 1024))
             if float(r * n) == int(float(r * n)) < float(r) * n)
    s = {"<think1>": first, "<think2>": " long...", "<summary>": "final"}
    c, _ = run(llm, s, ParaThinker(paths=2, cutoff_ratio=r))
    paths = [t for t in c.tree if t["role"] == "path"]
    assert [p["generated"] for p in paths] == [n, int(float(r) * n) + 1], (float(r), n, paths)


def test_parathinker_paths_count_toward_the_total_budget_and_end_at_it(llm):
    """Every token of ParaThinker's paths counts toward max_total_tokens; when they reach it
    mid-way, every path ends there ("length", its close tag added) and the summary, joined,
    has nothing left: exactly max_total_tokens are sampled."""
    s = {"<think1>": " long...", "<think2>": " longer...", "<summary>": "final"}
    c, _ = run(llm, s, ParaThinker(paths=2), max_tokens=100, max_total_tokens=11)
    paths = [t for t in c.tree if t["role"] == "path"]
    assert sorted(p["generated"] for p in paths) == [5, 6], paths
    assert c.metrics["total_tokens"] == 11 and c.tree[-1]["generated"] == 0, c.metrics
    assert kinds(c).count("unclosed_path") == 2 and kinds(c)[-1] == "join", c.events
    assert c.text.endswith("</think>\n<summary>\n") and c.finish_reason == "length", c.text


def test_tags_must_not_be_empty():
    """An empty fork, close or join tag would match everywhere (or inject nothing): refused."""
    ok = dict(fork="<F>", path_header="<P>", path_close="</P>", join_header="<J>")
    for k in ("fork", "path_close", "join_header"):
        with pytest.raises(ValueError, match=f"Tags.{k} must be a non-empty string"):
            Tags(**{**ok, k: ""})
    assert Tags(**ok).fork == "<F>"


def test_tags_the_model_text_is_scanned_for_must_be_told_apart(llm):
    """A fork tag equal to the path close tag (or a block open tag equal to either) acts as
    only one of them: with fork == path_close every fork tag was taken for an ignored stray
    close, so the model never forked (block_open == fork: never; block_open == path_close: no
    path ever closed). Refused, naming both; ParaThinker, which scans for its close tag only,
    is not concerned."""
    mine = dict(path_header="\n{num}", join_header="J")
    bad = [(ParallelR1, dict(fork="<P>", path_close="<P>"), r"Tags.fork='<P>' equals Tags.path_close='<P>'"),
           (Multiverse, dict(fork="<B>", path_close="</P>", block_open="<B>", item="-"),
            r"Tags.fork='<B>' equals Tags.block_open='<B>'"),
           (ThreadWeaver, dict(fork="</B>", path_close="<X>", block_open="<X>", item="-"),
            r"Tags.path_close='<X>' equals Tags.block_open='<X>'")]
    for cls, kw, msg in bad:
        with pytest.raises(ValueError, match=f"{cls.__name__}: {msg}: the model's text is scanned for both"):
            cls(tags=Tags(**mine, **kw))
    p = ParallelR1(tags=Tags(**mine, fork="<F>", path_close="</P>"))
    p.tags.fork = "</P>"  # (changed after construction: refused at the call, before any work)
    with pytest.raises(ValueError, match="equals Tags.path_close"):
        llm.generate("Q", SamplingParams(max_tokens=4), protocol=p)
    assert llm.cache_stats()["pages_used"] == 0
    ParaThinker(paths=2, tags=Tags(**mine, fork="</P>", path_close="</P>"))  # (its fork tag is not scanned)
    for cls in (Multiverse, ThreadWeaver, ParallelR1):
        cls()  # (the defaults are fine)
    ParallelR1(tags=Tags(**mine, fork="\n\n", path_close="\n"))  # (one ending another: works, in a main thread)


def test_of_tags_ending_at_one_place_the_longest_is_the_one_written(llm):
    """fork 'Goal>' and path_close '</Goal>': the model's '</Goal>' in the main thread is a
    stray close tag, not also a fork (both matched and acted, in string order: it forked
    there); its later 'Goal>' forks, and the paths' '</Goal>' closes them."""
    tags = Tags(fork="Goal>", path_close="</Goal>", path_header="\n<P>{i}", join_header="\nJ\n")
    scripts = {"": "a</Goal> b Goal>", "<P>1": " x</Goal>", "<P>2": " yy</Goal>", "\nJ": " done"}
    c, _ = run(llm, scripts, ParallelR1(num_paths=2, tags=tags))
    assert kinds(c) == ["stray_close", "fork", "join"], c.events
    assert c.text.startswith("a</Goal> b Goal>\n<P>1 x</Goal>") and c.text.endswith("\nJ\n done"), c.text


def test_items_are_counted_before_the_fork_tag_only(llm):
    """A fork's items are the item tags between the block's open tag and its fork tag: a fork
    tag that holds the item word ('</Items>', items 'Item') adds none. (A mutation counting
    items up to past the fork tag passed the suite.)"""
    tags = Tags(fork="</Items>", block_open="<Items>", item="Item", path_header="\n<P>{num}:", path_close="</P>",
                join_header="\nJ\n")
    scripts = {"": "<Items>Item 1 a Item 2 b</Items>", "<P>1:": " x</P>", "<P>2:": " y</P>", "\nJ": " done"}
    c, _ = run(llm, scripts, Multiverse(tags=tags))
    assert kinds(c) == ["fork", "join"] and sum(t["role"] == "path" for t in c.tree) == 2, c.events
    assert c.text == scripts[""] + "\n<P>1: x</P>\n<P>2: y</P>\nJ\n done", c.text


def test_items_without_numbers_are_numbered_from_one(llm):
    """An item tag the model writes without a number gets its position in the block, from 1,
    in its path's header; a numbered one keeps its number. (A mutation numbering them from -1
    passed the suite.)"""
    main = "<Goal><Outline> add</Outline><Outline>7: mul</Outline><Outline> sub</Outline></Goal>"
    scripts = {"": main, "1:": " a</Path>", "7:": " m</Path>", "3:": " s</Path>", "<Conclusion>": "c"}
    c, _ = run(llm, scripts, Multiverse())
    assert c.text == main + "\n<Path>\n1: a</Path>\n<Path>\n7: m</Path>\n<Path>\n3: s</Path>\n<Conclusion>\nc", c.text


class _Hashed(str):
    """A tag string with a chosen hash: it fixes where a set of tags puts it, the scan order."""
    def __new__(cls, text, h):
        self = super().__new__(cls, text)
        self.h = h
        return self

    def __hash__(self):
        return self.h


def test_of_tags_ending_at_one_place_the_longest_is_written_whatever_the_scan_order(llm):
    """As above, with the two tags scanned in either order (a set's order, fixed by the strings'
    hashes: here chosen): where both end, '</Goal>' is the tag written. (A mutation comparing
    with the tag found at another index, the last one scanned winning, passed the suite under
    half the hash seeds.)"""
    scripts = {"": "a</Goal> b Goal>", "<P>1": " x</Goal>", "<P>2": " yy</Goal>", "\nJ": " done"}
    for fork_hash, close_hash in ((1, 2), (2, 1)):
        tags = Tags(fork=_Hashed("Goal>", fork_hash), path_close=_Hashed("</Goal>", close_hash),
                    path_header="\n<P>{i}", join_header="\nJ\n")
        assert list({tags.fork, tags.path_close}) == ([tags.fork, tags.path_close] if fork_hash == 1 else
                                                      [tags.path_close, tags.fork])
        c, _ = run(llm, scripts, ParallelR1(num_paths=2, tags=tags))
        assert kinds(c) == ["stray_close", "fork", "join"], (fork_hash, c.events)
        assert c.text == "a</Goal> b Goal>\n<P>1 x</Goal>\n<P>2 yy</Goal>\nJ\n done", (fork_hash, c.text)


@pytest.mark.parametrize("header", ["<P{nm}>", "<P{}>", "<P{0}>", "<P{num", "<P}"])
def test_a_path_header_that_is_not_a_template_of_num_and_i_is_refused(header):
    """Tags.path_header is a str.format template of {num} and {i}: a stray brace or another
    field failed mid-run with a bare KeyError / IndexError (ParaThinker at its fork, the tagged
    protocols when the model wrote the fork tag); now Tags refuses it, naming it."""
    ok = dict(fork="<F>", path_close="</P>", join_header="<J>")
    with pytest.raises(ValueError, match=r"Tags.path_header=.* is a str.format template that may use \{num\} "
                                         r"and \{i\} only \(.*\); write a literal brace doubled"):
        Tags(**ok, path_header=header)
    for fine in ("<P{num}>", "<P{i}:{num}>", "<P{num:>3}>", "{{{i}}}", "<P>"):
        assert Tags(**ok, path_header=fine).path_header == fine


def test_a_path_header_whose_format_does_not_fit_num_is_refused_by_the_protocol():
    """{num} is the item number as the model wrote it (text) in the tagged protocols, an int in
    ParaThinker: a format spec for the other type ('{num:02d}' with text) passed Tags' field check
    and failed mid-run with a bare 'Unknown format code' when the model wrote the fork tag."""
    ok = dict(fork="<F>", path_close="</P>", join_header="<J>")
    for cls, extra in ((Multiverse, dict(block_open="<B>", item="<I>")), (ParallelR1, {})):
        for header in ("<P{num:02d}>", "<P{num.real}>", "<P{i[0]}>"):
            with pytest.raises(ValueError, match=rf"^{cls.__name__}: Tags.path_header=.* does not format with "
                                                 r"\{num\} \(the item number as written, a string\)"):
                cls(tags=Tags(**ok, **extra, path_header=header))
        cls(tags=Tags(**ok, **extra, path_header="<P{num:>3}{i:02d}>"))
    ParaThinker(tags=Tags(**ok, path_header="<think{num:02d}>"))  # (an int there: fine)
    with pytest.raises(ValueError, match=r"^ParaThinker: .* \{num\} \(an int\)"):
        ParaThinker(tags=Tags(**ok, path_header="<P{i[0]}>"))


def test_default_tags_are_each_instances_own():
    """A protocol made with its default tags has its own copy: changing one instance's tags
    (``Multiverse().tags.join_header = ...``) used to change the class's DEFAULT_TAGS object, so
    every later default Multiverse() in the process (another endpoint's, the demo's) forked and
    joined on the changed tags."""
    for cls, kw in ((Multiverse, {}), (ThreadWeaver, {}), (ParallelR1, {}), (ParaThinker, dict(paths=2))):
        want = (cls.DEFAULT_TAGS.join_header, cls.DEFAULT_TAGS.path_close)
        one = cls(**kw)
        one.tags.join_header, one.tags.path_close = "\nX\n", "</X>"
        assert (cls(**kw).tags.join_header, cls(**kw).tags.path_close) == want, cls.__name__
        assert (cls.DEFAULT_TAGS.join_header, cls.DEFAULT_TAGS.path_close) == want, cls.__name__
        itemized = cls in (Multiverse, ThreadWeaver)
        mine = Tags(fork="<F>", path_header="<P{num}>", path_close="</P>", join_header="<J>",
                    block_open="<B>" if itemized else None, item="<I>" if itemized else None)
        assert cls(tags=mine, **kw).tags is mine  # (a caller's own Tags: kept as given)


def test_protocol_settings_changed_after_construction_are_checked_at_each_call(llm):
    """generate() checks a protocol's settings again, as it does SamplingParams': a run reads
    them as they are at the call. (Only the constructor checked them: a ParaThinker whose
    ``paths`` was raised past its limits ran 152 threads on pages reserved for 66; a Hogwild
    given more names than workers ran one worker per name on a reservation for ``workers``;
    ParallelSampling n=0 failed in fork(), 'needs at least one child header'; TreeLimits
    max_paths=0 ended the request at once with an empty text.)"""
    def bad(make, attr, value, match):
        proto = make()
        obj = proto.limits if attr.startswith("limits.") else proto
        setattr(obj, attr.split(".")[-1], value)
        with pytest.raises(ValueError, match=match):
            llm.generate("Q: 1+2?", SamplingParams(max_tokens=4), protocol=proto)
        assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
    bad(lambda: ParallelSampling(2), "n", 0, r"ParallelSampling n=0 must be an integer >= 1")
    bad(lambda: ParallelSampling(2), "n", "3", r"ParallelSampling n='3' must be an integer")
    bad(lambda: ParallelSampling(2), "select", "best", r"select='best' must be one of")
    bad(lambda: ParallelSampling(2, "majority"), "extract_answer", None, r"extract_answer=None must be a function")
    bad(Multiverse, "limits.max_paths", 0, r"max_paths=0 must be an integer >= 1")
    bad(Multiverse, "positions", "bogus", r"positions='bogus' must be one of")
    bad(Multiverse, "tags", Tags(fork="<F>", path_header="<P>", path_close="</P>", join_header="<J>"),
        r"Multiverse forks one child per item")
    bad(lambda: ParallelR1(num_paths=2), "num_paths", 100, r"num_paths=100 exceeds limits.max_paths=8")
    bad(lambda: ParaThinker(paths=2), "paths", 150, r"paths=150 exceeds limits.max_paths=8")
    bad(lambda: ParaThinker(paths=2), "paths", 0, r"paths=0 must be an integer >= 1")
    bad(lambda: ParaThinker(paths=2), "cutoff_ratio", 0.5, r"cutoff_ratio=0.5 must be a number >= 1.0")
    bad(lambda: Hogwild(workers=2, names=["A", "B"]), "workers", 5, r"5 workers need 5 names, got 2")
    bad(lambda: Hogwild(workers=2), "compact_after", 1, r"compact_after=1 must be an integer >= 4")
    bad(lambda: Hogwild(workers=2), "header", "", r"header='' must be a non-empty string")
    # a valid change takes effect, checked as the constructor checks it
    h = Hogwild(workers=2, finisher=False)
    h.names = ["Ann", "Ben", "Cy"]  # (more names than workers: the first `workers` of them)
    out, _ = run(llm, {"": "x. ..."}, h, prompt="Q", max_tokens=3)
    assert [w["name"] for w in out.workers] == ["Ann", "Ben"] and h.names == ["Ann", "Ben"]
    h = Hogwild(workers=2, finisher=False)  # (the default names: as many as workers asks for)
    h.workers = 3
    out, _ = run(llm, {"": "x. ..."}, h, prompt="Q", max_tokens=3)
    assert [w["name"] for w in out.workers] == ["Alice", "Bob", "Carol"]
    p = ParaThinker(paths=2)
    p.paths = 3
    c, _ = run(llm, {"": "a</think>"}, p, max_tokens=8)
    assert kinds(c).count("first_finish") == 1 and sum(t["role"] == "path" for t in c.tree) == 3
    p.paths = 1  # (one path is a ParaThinker too: its summary reads that path)
    c, _ = run(llm, {"": "a</think>"}, p, max_tokens=8)
    assert kinds(c).count("first_finish") == 1 and sum(t["role"] == "path" for t in c.tree) == 1


def test_a_sample_that_stops_gives_its_pages_back_at_once(llm):
    """ParallelSampling frees a sample's pages when it stops, not when the request ends: a
    short sample beside a long one leaves the request's peak at the long one's alone."""
    table = {}

    def src(threads):
        out = []
        for t in threads:
            if t.id not in table:
                table[t.id] = llm.tokenizer.encode(texts.pop(0), add_special_tokens=False)
            toks = table[t.id]
            out.append(toks[len(t.generated)] if len(t.generated) < len(toks) else llm.eos_ids[0])
        return out

    peaks = []
    for samples in (["short answer", "a long one " * 8], ["a long one " * 8]):
        texts = list(samples)
        table.clear()
        llm.core.token_source = src
        try:
            out = llm.generate("Q", SamplingParams(max_tokens=200), protocol=ParallelSampling(len(samples)))[0]
        finally:
            llm.core.token_source = None
        assert out.outputs[-1].text == "a long one " * 8
        peaks.append(out.metrics.kv_pages_peak)
    assert peaks[0] == peaks[1] > 0
    assert llm.cache_stats()["pages_used"] == 0


def test_a_path_that_stops_on_a_stop_token_keeps_it(llm):
    """A path ended by a stop token (stop_token_ids) keeps that token, written where the join
    sees it (as plain sampling keeps it in token_ids); only an EOS is left unwritten."""
    dot = next(t for t in llm.tokenizer.encode("3.", add_special_tokens=False)
               if llm.tokenizer.decode([t]) == ".")
    s = dict(MV, **{"1:": " 1+2=3. more</Path>"})
    c, _ = run(llm, s, Multiverse(), stop_token_ids=[dot])
    path = c.tree[2]
    assert path["role"] == "path" and "1: 1+2=3.</Path>" in path["text"], path["text"]
    assert "unclosed_path" in kinds(c) and "1: 1+2=3.</Path>" in c.text


def test_parathinker_limits_must_hold_its_paths_and_two_more_threads():
    """ParaThinker's threads are the prompt, its paths and the summary: paths + 2 of them,
    which limits.max_threads must allow."""
    with pytest.raises(ValueError, match=r"paths=3 exceeds .* needs more than limits.max_threads=4 threads \(paths \+ 2\)"):
        ParaThinker(paths=3, limits=TreeLimits(max_threads=4))
    assert ParaThinker(paths=3, limits=TreeLimits(max_threads=5)).limits.max_threads == 5


def test_threadweaver_and_parallel_r1_join_sequentially_by_default(llm):
    """ThreadWeaver and Parallel-R1 lay their threads out one after another unless told
    otherwise (positions="sequential"); Multiverse's paths all start at the fork ("max")."""
    tw = {"": "<Parallel><Outlines><Outline>1: a</Outline><Outline>2: b</Outline></Outlines>",
          "1:": " first</Thread>", "2:": " second</Thread>", "</Parallel>": "after"}
    r1 = {"": "think <Parallel>", "<Path>": " idea</Path>", "<Summary>": "sum"}
    for proto, script, want in ((ThreadWeaver(), tw, "sequential"), (ParallelR1(), r1, "sequential"),
                                (Multiverse(), MV, "max")):
        c, _ = run(llm, script, proto)
        joins = [e for e in c.events if e["event"] == "join"]
        assert [e["positions"] for e in joins] == [want], (type(proto).__name__, c.events)
        cont = c.tree[joins[0]["into"]]
        assert any(sh != 0 for _, sh in cont["view"]) == (want == "sequential"), cont["view"]


def test_a_reopened_block_counts_only_its_own_items(llm):
    """A block opened again before its fork tag (the model starts its outline over) forks one
    child per item of the last block, not of both."""
    s = {"": "<Goal><Outline>1: a</Outline> no, again <Goal><Outline>1: x</Outline><Outline>2: y</Outline></Goal>",
         "1:": " X</Path>", "2:": " Y</Path>", "<Conclusion>": "done"}
    c, _ = run(llm, s, Multiverse())
    paths = [t for t in c.tree if t["role"] == "path"]
    assert [p["text"].split(":")[0].split()[-1] for p in paths] == ["1", "2"], [p["text"] for p in paths]


@pytest.mark.parametrize("max_threads,forks", [(4, False), (5, True)])
def test_a_fork_counts_its_continuation_against_max_threads(llm, max_threads, forks):
    """A fork of k children makes k + 1 threads (its continuation too): with the prompt and
    the main thread, a two-item fork needs max_threads >= 5; below that it is refused
    ('budget': continue sequentially) and the tree never outgrows max_threads."""
    c, _ = run(llm, MV, Multiverse(limits=TreeLimits(max_threads=max_threads)))
    assert ("fork" in kinds(c)) == forks and ("budget" in kinds(c)) != forks, kinds(c)
    assert len(c.tree) <= max_threads


def test_parathinkers_default_limits_grow_with_its_paths():
    """Without limits, ParaThinker(paths=P) takes limits that hold its P paths and P + 2
    threads, however many that is (fixed defaults of 8 paths / 64 threads refused P > 8);
    ParaThinker() has 4 paths (as the README and --paths' help say) and those defaults."""
    for paths in (9, 70):
        p = ParaThinker(paths=paths)
        assert (p.limits.max_paths, p.limits.max_threads) == (max(paths, 8), max(64, paths + 2))
    p = ParaThinker()
    assert (p.paths, p.limits.max_paths, p.limits.max_threads) == (4, 8, 64)


def test_an_item_number_of_six_digits_is_kept_and_of_seven_is_not(llm):
    """The item-number cap is 6 digits: a 6-digit number is copied into its path's header, a
    7-digit one numbers the path by position (long_item_number)."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    for num, kept in (("123456", True), ("1234567", False)):
        main = enc(f"<Goal><Outline>{num}: a</Outline><Outline>12: b</Outline></Goal>")
        c = _run_tokens(llm, {1: main, "path": enc(" done</Path>")}, SamplingParams(max_tokens=400),
                        Multiverse())
        assert ("long_item_number" in kinds(c)) != kept, c.events
        head = next(t["text"] for t in c.tree if t["role"] == "path")
        assert head.startswith(f"\n<Path>\n{num if kept else 1}:"), head


def test_only_the_items_over_six_digits_are_numbered_by_position(llm):
    """Of a block's items, those over 6 digits are numbered by their position; a 6-digit one
    beside them keeps its number."""
    enc = lambda s: llm.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    main = enc("<Goal><Outline>123456: a</Outline><Outline>1234567: b</Outline></Goal>")
    c = _run_tokens(llm, {1: main, "path": enc(" done</Path>")}, SamplingParams(max_tokens=400), Multiverse())
    heads = [t["text"] for t in c.tree if t["role"] == "path"]
    assert heads[0].startswith("\n<Path>\n123456:") and heads[1].startswith("\n<Path>\n2:"), heads


def test_a_max_tokens_past_the_context_is_bounded_by_the_context(llm):
    """Parallel samples stop at the model's context, so their admission bound is the
    context, not max_tokens: a max_tokens far past it is admitted (bounded by max_tokens,
    it would be refused as a request that can never fit the KV cache)."""
    llm.core.token_source = lambda threads: [llm.eos_ids[0] for _ in threads]
    try:
        out = llm.generate("Q", SamplingParams(max_tokens=10**7), protocol=ParallelSampling(2))[0]
    finally:
        llm.core.token_source = None
    assert [o.finish_reason for o in out.outputs] == ["stop", "stop"]
    assert llm.cache_stats()["pages_used"] == 0


def test_a_space_led_tag_at_a_threads_start_is_found(tmp_path):
    """A thread's text is scanned for tags as read after the text before it (a main thread's
    after the prompt, a path's after its header): decoded alone, a SentencePiece decoder
    stripped its first space, so a tag that begins with one (Tags(fork=" <Parallel>"),
    path_close=" </Path>" or ParaThinker's " </think>") written first by a thread was never found
    (no fork; a path closed only by EOS, its close tag injected)."""
    from test_api import _sentencepiece_style_tokenizer
    d = str(tmp_path)
    make_random_model(d, hidden=32, layers=1, heads=2, kv_heads=1, head_dim=16, intermediate=64, vocab_size=384)
    _sentencepiece_style_tokenizer("legacy", 384).save(os.path.join(d, "tokenizer.json"))
    sp = LLM(d, attention_backend="torch", kv_cache_tokens=8192)
    enc = sp.tokenizer.encode_continuation
    tags = Tags(fork=" <Parallel>", path_header="\n<Path>\n", path_close=" </Path>", join_header="\n<Summary>\n")
    main, path = enc(" <Parallel>"), enc(" </Path>")
    assert sp.tokenizer.decode(main) == "<Parallel>"  # (alone: the space stripped)
    c = _run_tokens(sp, {1: main, "path": path, 4: enc(" ok")}, SamplingParams(max_tokens=30),
                    ParallelR1(num_paths=2, tags=tags))
    assert [e["event"] for e in c.events] == ["fork", "join"], c.events
    assert c.text == " <Parallel>\n<Path>\n </Path>\n<Path>\n </Path>\n<Summary>\n ok", c.text
    think = Tags(fork="<think>", path_header="<think{i}>", path_close=" </think>", join_header="\n<summary>\n")
    c = _run_tokens(sp, {"path": enc(" </think>")}, SamplingParams(max_tokens=30), ParaThinker(paths=2, tags=think))
    assert "unclosed_path" not in kinds(c), c.events  # (each path closed by its tag, not by EOS)
    assert sp.cache_stats()["pages_used"] == 0


def test_a_fork_joins_on_the_token_its_last_path_ends(llm, monkeypatch):
    """A tree run looks at the thread that got the token, not at every active thread (that
    was O(paths) a token, paths^2 a step): after each token, and each samplers(), no fork
    whose paths have all ended (none of them forked) is left unjoined; paths ending by close
    tag, EOS, budget, a nested fork's continuation, the total budget, ParaThinker's cut-off."""
    from engine.protocols.parathinker import ParaThinkerRun
    from engine.protocols.tree import TreeRun
    checked = []

    def check(run):
        for gs in run.forks_of.values():
            for g in gs:
                ended = all(c.finished and c.finish_reason != "fork" for c in g.children)
                assert g.cont is not None or not ended, [(c.id, c.finish_reason) for c in g.children]
        checked.append(1)
    for cls in (TreeRun, ParaThinkerRun):
        for name in ("on_token", "samplers"):
            def wrapped(self, *a, _f=getattr(cls, name)):
                out = _f(self, *a)
                check(self)
                return out
            monkeypatch.setattr(cls, name, wrapped)
    outline = "<Goal>" + "".join(f"<Outline>{i}: x</Outline>" for i in range(1, 6)) + "</Goal>"
    nested = " n<Goal><Outline>1: a</Outline><Outline>2: b</Outline></Goal>"
    s = {"": "<Parallel>" + outline, "1:": " a</Path>", "2:": " bb bb bb</Path>", "3:": " ccc",  # (EOS)
         "4:": nested, "5:": " e" * 60 + "</Path>", "\n<Path>\n1:": " x" * 20 + "</Path>",
         "\n<Path>\n2:": " y" * 25 + "</Path>", "<Conclusion>": "done"}
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(max_paths=5, fork_margin=4)), max_tokens=300)
    assert kinds(c).count("fork") == 2 and kinds(c).count("join") == 2, c.events
    assert c.text.endswith("<Conclusion>\ndone"), c.text
    total = c.metrics["total_tokens"] - 80  # (ends both forks' paths mid-way)
    c, _ = run(llm, s, Multiverse(limits=TreeLimits(max_paths=5, fork_margin=4)), max_tokens=300,
               max_total_tokens=total)
    assert c.metrics["total_tokens"] == total and kinds(c)[-1] == "join", (c.metrics, c.events)
    # ParaThinker: path 3 ends first; paths 1 and 2, as long when it does, are cut at once
    p = {"<think1>": " long...", "<think2>": " longer...", "<think3>": " a</think>", "<think4>": " b...",
         "<summary>": "final"}
    c, _ = run(llm, p, ParaThinker(paths=4, cutoff_ratio=1.0))
    paths = [t for t in c.tree if t["role"] == "path"]
    assert len({t["generated"] for t in paths}) == 1 and kinds(c).count("cutoff") == 3, (paths, c.events)
    assert c.text.endswith("<summary>\nfinal") and len(checked) > 100


TW = {"": "<Outlines><Outline>1: add</Outline><Outline>2: mul</Outline></Outlines>", "1:": " 1+2=3</Thread>",
      "2:": " 3*4=12</Thread>", "</Parallel>": " answer \\boxed{15}"}


@pytest.mark.parametrize("make,scripts", [
    (Multiverse, MV), (lambda: Multiverse(positions="reprefill"), MV),
    (lambda: ParaThinker(paths=2), {"": "x", "<think": " t</think>", "<summary>": "s \\boxed{15}"}), (ThreadWeaver, TW)],
    ids=["multiverse", "reprefill", "parathinker", "threadweaver"])
def test_tree_protocols_share_prompt_prefixes_with_the_same_outputs(llm, make, scripts):
    """The requests of one call whose prompts begin alike read the shared beginning from
    segments written once (as plain sampling's): the same text, tokens, output tree (the
    prompt thread's whole prompt, views naming the threads of the request), events and
    metrics as when each writes its whole prompt; fewer prompt tokens fed."""
    system = "You add and multiply small numbers, step by step. "  # (a byte per character)
    prompts = [system + "Q: 1+2, 3*4?", system + "Q: 5+6, 7*8?", "Q: 9+1?", system + "Q: 1+2, 3*4? Twice."]
    fed = []
    real = llm.runner.run

    def spy(batch):
        fed.append(sum(len(it.token_ids) for it in batch.items))
        return real(batch)

    def call(share):
        llm.share_prompt_prefixes, fed[:] = share, []
        llm.core.token_source, llm.runner.run = Script(llm, scripts), spy
        try:
            outs = llm.generate(prompts, SamplingParams(max_tokens=400), protocol=make())
        finally:
            llm.core.token_source, llm.share_prompt_prefixes = None, True
            del llm.runner.run
        assert llm.cache_stats()["pages_used"] == 0 and llm.cache_stats()["segments"] == 0
        return outs, sum(fed)
    alone, fed_alone = call(False)
    shared, fed_shared = call(True)
    P = len(llm.tokenizer.encode(system))
    assert [o.metrics.shared_prompt_tokens for o in shared] == [P + 3, P + 3, 0, P + 3]  # (system + "Q: ")
    assert fed_alone - fed_shared == 2 * (P + 3)  # (written once, not three times)
    for a, b in zip(alone, shared):
        x, y = a.outputs[0], b.outputs[0]
        assert (x.text, x.token_ids, x.tree, x.events, x.metrics) == (y.text, y.token_ids, y.tree, y.events, y.metrics)
        assert x.tree[0]["token_ids"] == a.prompt_token_ids and x.tree[0]["text"] == a.prompt
        assert len(x.tree) > 3 and x.tree[-1]["view"][0] == [0, 0]
