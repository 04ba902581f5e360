"""The public API: SamplingParams validation, sampling semantics (checked statistically against
the model's own distribution), stop conditions, page accounting, chat, errors and waiting.

The model is a random tiny Llama (GQA 2, tied embeddings, llama3 RoPE) from ``conftest``.
"""
from __future__ import annotations

import functools
import math
import os
import re
import shutil

import pytest
import torch

from conftest import (EOS_ID, VARIANTS, engine_held, hf_logprobs, pages, random_ids, read_json, wait_in_line,
                      write_json)

NAME = "llama3_rope"
VOCAB = VARIANTS[NAME]["vocab"]
PS = 16
TEXT = "the loom weaves many threads over one cache"


def SP(**kw):
    from engine import SamplingParams
    return SamplingParams(**kw)


def greedy(max_tokens=32, **kw):
    return SP(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, **kw)


@pytest.fixture(scope="module")
def llm(make_llm):
    return make_llm(NAME, kv_cache_tokens=4096)


@pytest.fixture(scope="module")
def baseline(llm):
    """A greedy result to compare with after errors: the LLM must still give exactly this."""
    prompt = random_ids(19, VOCAB, seed=5)
    return prompt, list(llm.generate([prompt], greedy(12))[0].outputs[0].token_ids)


def assert_still_works(llm, baseline):
    prompt, want = baseline
    got = list(llm.generate([prompt], greedy(12))[0].outputs[0].token_ids)
    assert got == want, f"after the error the LLM generates {got}, fresh result {want}"
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0 and stats["pages_free"] == stats["pages_total"], stats


def assert_no_leak(llm):
    stats = llm.cache_stats()
    assert stats["pages_used"] == 0, f"pages leaked after generate: {stats}"
    assert stats["pages_free"] == stats["pages_total"], stats


# ---------------------------------------------------------------------------------------------
# SamplingParams
# ---------------------------------------------------------------------------------------------

BAD_PARAMS = [
    ("n", 0), ("n", -2), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.1),
    ("top_k", -2), ("min_p", -0.1), ("min_p", 1.5), ("max_tokens", 0), ("max_tokens", -3),
    ("logprobs", -1), ("logprobs", 101), ("stop_token_ids", [-1]), ("stop", 5), ("stop", [""]), ("stop", ["x", 3]),
    ("stop_token_ids", "7"), ("stop_token_ids", 2.5), ("temperature", 100.5), ("max_total_tokens", 0),
    ("skip_special_tokens", "no"), ("ignore_eos", 1), ("include_stop_str_in_output", None),
    ("stop", {"x": 1}), ("stop", {"x", "y"}), ("stop_token_ids", {3: "a"}), ("seed", 1.5), ("seed", "3"),
    ("logit_bias", [1]), ("logit_bias", {"3": 1.0}), ("logit_bias", {-1: 1.0}), ("logit_bias", {2.0: 1.0}),
    ("logit_bias", {3: float("nan")}), ("logit_bias", {3: float("inf")}), ("logit_bias", {3: 1e31}),
    ("logit_bias", {3: "1"}), ("logit_bias", {3: True}), ("logit_bias", {VOCAB: 1.0}),
    ("allowed_token_ids", []), ("allowed_token_ids", [-1]), ("allowed_token_ids", [1.5]), ("allowed_token_ids", "7"),
    ("allowed_token_ids", {1: 2}), ("allowed_token_ids", [3, VOCAB]),
    ("prompt_logprobs", -1), ("prompt_logprobs", 101), ("prompt_logprobs", 1.5),
    ("truncate_prompt_tokens", 0), ("truncate_prompt_tokens", -2), ("truncate_prompt_tokens", 2.0),
    ("bad_words", [""]), ("bad_words", [" \n"]), ("bad_words", ["x", 3]), ("bad_words", 5), ("bad_words", {"x": 1}),
]


@pytest.mark.parametrize("param,value", BAD_PARAMS, ids=[f"{p}={v}" for p, v in BAD_PARAMS])
def test_sampling_params_invalid(param, value, llm, baseline):
    with pytest.raises(ValueError) as e:
        sp = SP(**{param: value})
        llm.generate([baseline[0]], sp)
    assert param in str(e.value), f"error for {param}={value!r} does not name the parameter: {e.value}"


def test_sampling_params_valid_edges():
    for kw in [dict(temperature=0.0), dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=-1), dict(top_k=1),
               dict(min_p=0.0), dict(min_p=1.0), dict(max_tokens=1), dict(n=1), dict(logprobs=0),
               dict(stop="x"), dict(stop=["x", "y"]), dict(stop_token_ids=[3]), dict(seed=0), dict(max_total_tokens=1),
               dict(max_total_tokens=4), dict(temperature=100.0)]:
        SP(**kw)
    d = SP()  # (the documented defaults, as vLLM's)
    assert (d.n, d.max_tokens, d.min_tokens, d.temperature, d.skip_special_tokens) == (1, 256, 0, 1.0, True)
    with pytest.raises(ValueError, match=r"SamplingParams\.n=0 is invalid"):
        SP(n=0)  # (at construction, not at the first call)
    assert SP(stop_token_ids=3).stop_token_ids == [3]  # one id, as one string is one stop
    assert SP(temperature=1e-6).greedy and SP(temperature=0).greedy and not SP(temperature=1e-4).greedy
    assert SP(stop=("x", "y")).stop == ["x", "y"] and SP(stop=iter(["x"])).stop == ["x"]
    assert sorted(SP(stop_token_ids={4, 3}).stop_token_ids) == [3, 4]  # (ids have no order to keep)
    with pytest.raises(ValueError, match=r"a set has no order, .* give a list"):
        SP(stop={"x", "y"})
    # vLLM's spellings: top_k=0 (its default) disables top-k as -1 does; seed=-1 is no seed
    assert SP(top_k=0).top_k == -1 and SP(seed=-1).seed is None
    import numpy as np
    sp = SP(temperature=np.float32(0.5), n=np.int64(2), seed=np.int64(3), stop_token_ids=[np.int64(4)])
    assert (type(sp.temperature), type(sp.n), type(sp.seed), type(sp.stop_token_ids[0])) == (float, int, int, int)


def test_vllm_prompt_dicts(llm, baseline):
    """vLLM's TextPrompt {"prompt": text} and TokensPrompt {"prompt_token_ids": ids} (its text,
    if given, the output's prompt), alone or in a list with other forms, in generate, score and
    session; keys for inputs Loom lacks refused by name (a None value ignored). They were
    refused as 'neither a string nor a list of token ids'."""
    ids = baseline[0]
    text = llm.tokenizer.decode(ids)
    assert llm.tokenizer.encode(text) == ids
    want = llm.generate([ids], greedy(5))[0].outputs[0].token_ids
    outs = llm.generate([{"prompt": text}, {"prompt_token_ids": ids}, {"prompt_token_ids": tuple(ids), "prompt": "named"},
                         text, {"prompt": text, "multi_modal_data": None}], greedy(5))
    assert [o.outputs[0].token_ids for o in outs] == [want] * 5
    assert [o.prompt for o in outs] == [text, None, "named", text, text]
    assert all(o.prompt_token_ids == ids for o in outs)
    assert llm.generate({"prompt_token_ids": ids}, greedy(5))[0].outputs[0].token_ids == want
    ref = llm.score(ids)[0]
    assert all(torch.equal(g, ref) for g in llm.score([{"prompt_token_ids": ids}, {"prompt": text}]))
    with llm.session({"prompt_token_ids": ids}) as s:
        assert s.root.token_ids == ids
    for bad, msg in (({"prompt": text, "multi_modal_data": {"image": 1}}, r"prompt dict's multi_modal_data is not supported"),
                     ({"prompt_embeds": [1.0], "cache_salt": "x"}, r"prompt dict's cache_salt, prompt_embeds are not"),
                     ({"text": text}, r"prompt dict's text is not supported"),
                     ({}, r"prompt dict needs 'prompt' \(a string\) or 'prompt_token_ids'"),
                     ({"prompt": ids}, r"prompt dict needs 'prompt' \(a string\)"),
                     ({"prompt_token_ids": ids, "prompt": 3}, r"'prompt' must be its text, got int"),
                     ({"prompt_token_ids": [1.5]}, r"neither a string nor a list of token ids")):
        with pytest.raises(ValueError, match=msg):
            llm.generate([bad], greedy(2))
    assert_still_works(llm, baseline)


def test_vllm_llm_extras(llm, baseline):
    """vLLM's LLM.get_tokenizer(), generate / chat's lora_request and priority at their no-op
    values (a TypeError before), refused otherwise; the tokenizer's apply_chat_template takes
    transformers' tokenize=False / True (a TypeError before)."""
    ids = baseline[0]
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer and tok.decode(tok.encode("hi there", add_special_tokens=False)) == "hi there"
    want = llm.generate([ids], greedy(3))[0].outputs[0].token_ids
    assert llm.generate([ids], greedy(3), lora_request=None, priority=[0])[0].outputs[0].token_ids == want
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == tok.apply_chat_template(msgs)
    assert tok.apply_chat_template(msgs, tokenize=True) == tok.encode(text, add_special_tokens=False)
    assert llm.chat(msgs, greedy(2), lora_request=None)[0].prompt == text
    with pytest.raises(ValueError, match="tokenize='yes' must be True"):
        tok.apply_chat_template(msgs, tokenize="yes")
    with pytest.raises(ValueError, match="lora_request: Loom does not load LoRA adapters"):
        llm.generate([ids], greedy(2), lora_request=object())
    with pytest.raises(ValueError, match=r"priority=\[1\]: Loom schedules first come, first served"):
        llm.chat(msgs, greedy(2), priority=[1])
    assert_still_works(llm, baseline)


def test_vllm_fields_loom_lacks():
    """vLLM's fields that Loom does not have: accepted at the value that is Loom's behaviour
    (code spelling vLLM's defaults runs unchanged), else one ValueError saying what to do
    instead; an unknown name lists the fields (both were a bare 'unexpected keyword')."""
    import dataclasses
    sp = SP(n=2, detokenize=True, best_of=2, prompt_logprobs=None, bad_words=None, extra_args=None)
    assert sp == SP(n=2) and dataclasses.replace(sp, n=3).n == 3
    # (empty lists / dicts are no-ops, as in vLLM)
    assert SP(bad_words=[], logits_processors=[], extra_args={}) == SP() == SP(logit_bias={})
    for kw, instead in ((dict(use_beam_search=True), r"n samples with a protocol"),
                        (dict(best_of=3), "ParallelSampling"),
                        (dict(logits_processors=[abs]), "not supported"), (dict(extra_args={"k": 1}), "not supported")):
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"Loom does not support vLLM's {name} \(.*{instead}"):
            SP(**kw)
    with pytest.raises(TypeError, match="SamplingParams has no field tempreature; its fields: n, temperature"):
        SP(tempreature=0.5)


def test_detokenize_false_as_vllm(llm, baseline):
    """SamplingParams(detokenize=False), as vLLM: the same tokens and log-probs, no text (empty
    outputs' text, decoded_token None, nothing streamed); refused with stop strings (found in
    the text) and by the tree protocols (their tags are text). It was refused outright."""
    from engine.protocols import Multiverse
    ids = baseline[0]
    kw = dict(n=2, temperature=1.0, max_tokens=6, seed=4, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    want, got = (llm.generate([ids], SP(**kw, detokenize=d))[0] for d in (True, False))
    assert want.outputs[0].text and all(o.text == "" for o in got.outputs)
    for a, b in zip(want.outputs, got.outputs):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert [{i: float(e) for i, e in d.items()} for d in a.logprobs] == \
            [{i: float(e) for i, e in d.items()} for d in b.logprobs]
        assert all(e.decoded_token is None for d in b.logprobs for e in d.values())
        assert all(e.decoded_token is not None for d in a.logprobs for e in d.values())
    assert all(e.decoded_token is None for d in got.prompt_logprobs[1:] for e in d.values())
    sent = []
    out = llm.generate([ids], SP(max_tokens=4, detokenize=False), stream=lambda *a: sent.append(a))
    assert sent == [] and out[0].outputs[0].text == "" and len(out[0].outputs[0].token_ids) >= 1
    with llm.session(ids) as s:
        assert s.generate([s.root], SP(temperature=0.0, max_tokens=3, detokenize=False))[0].text == ""
    with pytest.raises(ValueError, match=r"SamplingParams\.detokenize=False .*stop strings are found in the text"):
        SP(detokenize=False, stop=["x"])
    assert SP(detokenize=False, stop_token_ids=[3]).stop_token_ids == [3]
    with pytest.raises(ValueError, match=r"Multiverse reads its threads' text .*detokenize=False"):
        llm.generate([ids], SP(max_tokens=4, detokenize=False), protocol=Multiverse())
    with pytest.raises(ValueError, match=r"SamplingParams\.detokenize="):
        SP(detokenize="no")
    assert_still_works(llm, baseline)


def test_sampling_params_range_ends_and_vllm_defaults():
    """Each range's ends (the documented bounds are inclusive), min_tokens' range, a bool or
    a string for a number (one ValueError, not a TypeError), the derived flags, and vLLM's
    fields Loom lacks at their defaults (else refused): checked by construction alone."""
    for kw in [dict(presence_penalty=-2.0, frequency_penalty=2.0), dict(presence_penalty=2, frequency_penalty=-2),
               dict(repetition_penalty=0.01), dict(repetition_penalty=100.0), dict(stop_token_ids=[0]),
               dict(logprobs=100), dict(max_tokens=5, min_tokens=5), dict(min_tokens=0)]:
        SP(**kw)
    for kw in [dict(min_tokens=-1), dict(max_tokens=4, min_tokens=5), dict(min_tokens=1.5),
               dict(repetition_penalty=100.5), dict(presence_penalty=-2.5), dict(temperature=True),
               dict(top_p="1"), dict(repetition_penalty=True), dict(min_p="0")]:
        with pytest.raises(ValueError, match=rf"SamplingParams\.{next(iter(kw.keys() - {'max_tokens'}))}="):
            SP(**kw)
    assert SP(temperature=0).greedy and not SP(temperature=1e-5).greedy  # ("below 1e-5: greedy")
    assert not SP().penalized and not SP(temperature=0).penalized
    for kw in [dict(presence_penalty=0.5), dict(frequency_penalty=-0.5), dict(repetition_penalty=1.2)]:
        assert SP(**kw).penalized, kw
    sp = SP(use_beam_search=False, spaces_between_special_tokens=True, best_of=1, truncate_prompt_tokens=None)
    assert sp == SP()
    for kw in [dict(use_beam_search=True), dict(best_of=2), dict(best_of=0), dict(n=2, best_of=3)]:
        with pytest.raises(ValueError, match=rf"SamplingParams\({next(iter(kw.keys() - {'n'}))}=.*Loom does not support"):
            SP(**kw)
    # best_of below n: vLLM refuses it (it was taken as a no-op)
    with pytest.raises(ValueError, match=r"^SamplingParams\(best_of=1\) is below n=2: best_of must be >= n"):
        SP(n=2, best_of=1)
    assert SP(n=3, best_of=3) == SP(n=3)


def test_sampling_params_changed_after_construction(llm, baseline):
    """generate() checks the fields again: one stop string set later is one stop (it used to
    be taken character by character), a bad type a ValueError."""
    ids = baseline[0]
    full = llm.generate([ids], greedy(12))[0].outputs[0]
    sp = greedy(12)
    sp.stop = full.text[-3:] + "\x00"  # never in the text
    out = llm.generate([ids], sp)[0].outputs[0]
    assert out.text == full.text and out.finish_reason == "length"
    sp.stop_token_ids = 5.5
    with pytest.raises(ValueError, match="stop_token_ids"):
        llm.generate([ids], sp)
    assert_still_works(llm, baseline)


def test_params_changed_while_a_call_runs_do_not_reach_it(llm, baseline):
    """A call runs on its own copy of its SamplingParams: the caller's object changed while the
    call runs (from a stream callback here; a server's other Python thread setting up its next
    call with a shared object likewise) leaves the running call as it began. (The engine read
    the caller's object at every token: a stop string set then raised AttributeError,
    max_tokens=None a TypeError, a larger max_tokens ran the request past its reserved pages:
    "engine bug: a thread wrote past its reservation".)"""
    ids = baseline[0]
    want = llm.generate([ids], greedy(12))[0].outputs[0]
    for change in (dict(stop="ab"), dict(max_tokens=None), dict(max_tokens=3), dict(max_tokens=1500),
                   dict(stop_token_ids=list(range(VOCAB))), dict(logprobs=3)):
        sp = greedy(12)

        def fn(i, j, piece):
            for k, v in change.items():
                setattr(sp, k, v)
        got = llm.generate([ids], sp, stream=fn)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.logprobs) == \
            (want.token_ids, want.text, want.finish_reason, None), change
        assert_no_leak(llm)
    # Session.generate too (its threads keep the params of the call that ran them)
    s = llm.session(ids)
    try:
        sp = greedy(6)
        a, b = s.fork(s.root, ["", ""])
        real = llm.core.token_source

        def source(threads):
            sp.max_tokens, sp.stop = 500, "ab"
            return [7] * len(threads)
        llm.core.token_source = source
        try:
            outs = s.generate([a, b], sp)
        finally:
            llm.core.token_source = real
        assert [o.token_ids for o in outs] == [[7] * 6] * 2 and sp.max_tokens == 500
    finally:
        s.close()
    assert_still_works(llm, baseline)


def test_prompt_and_score_input_forms(llm, baseline):
    """A tuple of token ids is one prompt, as a list is; score() takes a tensor or tuples."""
    ids = baseline[0]
    want = llm.generate([ids], greedy(5))[0].outputs[0].token_ids
    assert llm.generate(tuple(ids), greedy(5))[0].outputs[0].token_ids == want
    ref = llm.score(ids)[0]
    assert torch.equal(llm.score(torch.tensor(ids))[0], ref)
    a, b = llm.score([tuple(ids), tuple(ids)])
    assert torch.equal(a, ref) and torch.equal(b, ref)
    # numpy integers and arrays (and tensors) of ids, as Python ints; bools are not ids
    import numpy as np
    for form in (np.array(ids), [np.int64(t) for t in ids], [np.array(ids)], torch.tensor(ids),
                 list(torch.tensor(ids)), [list(torch.tensor(ids))], list(np.array(ids))):  # (0-d tensors: ids too)
        out = llm.generate(form, greedy(5))[0]
        assert out.outputs[0].token_ids == want and all(type(t) is int for t in out.prompt_token_ids)
        assert torch.equal(llm.score(form)[0], ref)  # (score took only a tensor or lists)
    for two in (np.array([ids, ids]), [np.array(ids), np.array(ids)], torch.tensor([ids, ids])):
        assert len(got := llm.score(two)) == 2 and all(torch.equal(g, ref) for g in got)
    # the forms generate() takes, no others (texts in a list were refused, a bare id scored as [id])
    text = llm.tokenizer.decode(ids)
    assert llm.tokenizer.encode(text) == ids
    got = llm.score([text, ids, text])
    assert len(got) == 3 and all(torch.equal(g, ref) for g in got)
    for one in (3, torch.tensor(3), np.int64(3)):
        for call in (llm.score, lambda x: llm.generate(x, greedy(1))):
            with pytest.raises(ValueError, match="prompts must be a string, a list of strings, or a list of token-id"):
                call(one)
    s = llm.session(list(torch.tensor(ids)))
    assert s.root.token_ids == ids and all(type(t) is int for t in s.root.token_ids)
    s.close()
    s = llm.session(np.array(ids))
    try:
        assert s.root.token_ids == ids and all(type(t) is int for t in s.root.token_ids)
        kid, = s.fork(s.root, [[np.int32(3), 4]])
        assert kid.token_ids[-2:] == [3, 4] and all(type(t) is int for t in kid.token_ids)
        # a header or injected ids as an array or tensor, as a prompt (they were refused, the
        # injection with a fork's hint); copied: changing the array later changes nothing
        arr = np.array([5, 6])
        k2, = s.fork(s.root, [arr])
        s.inject(k2, torch.tensor([7]))
        arr[0] = 9
        assert k2.token_ids == [5, 6, 7] and all(type(t) is int for t in k2.token_ids)
        with pytest.raises(ValueError, match=r"injected text 7 must be a string or a list of token ids\.$"):
            s.inject(k2, 7)
        for bad in ([True, False], [1.0]):
            with pytest.raises(ValueError, match="must be a string or token ids"):
                s.fork(s.root, [bad])
            with pytest.raises(ValueError, match="must be a string or token ids"):
                s.inject(kid, bad)
        for bad in ({"max_tokens": 3}, 3):
            with pytest.raises(ValueError, match="sampling_params must be SamplingParams, got"):
                s.generate([kid], bad)
        assert s.generate([kid], greedy(2))[0].finish_reason == "length"
    finally:
        s.close()
    for bad in (123, None, 1.5):
        with pytest.raises(ValueError, match="session\\(\\) takes a prompt"):
            llm.session(bad)
    with pytest.raises(ValueError, match="neither a string nor a list of token ids"):
        llm.generate([[True, False]], greedy(2))
    # ids just outside [0, vocab): every entry point refuses them (the embedding would read past its table)
    for bad in ([1, VOCAB], [-1, 2]):
        for call in (lambda: llm.generate([bad], greedy(2)), lambda: llm.score(bad), lambda: llm.session(bad)):
            with pytest.raises(ValueError, match=rf"Token id {bad[bad[0] >= 0]} is outside the vocabulary \[0, {VOCAB}\)"):
                call()
        s = llm.session(ids)
        try:
            with pytest.raises(ValueError, match=rf"header .* must be a string or token ids in \[0, {VOCAB}\)"):
                s.fork(s.root, [bad])
            kid, = s.fork(s.root, [[3]])
            with pytest.raises(ValueError, match=rf"injected text .* must be a string or token ids in \[0, {VOCAB}\)"):
                s.inject(kid, bad)
        finally:
            s.close()
    assert_still_works(llm, baseline)


# ---------------------------------------------------------------------------------------------
# prompts and outputs
# ---------------------------------------------------------------------------------------------

def _byte_level_tokenizer(path, post_bos: bool = False, add_prefix_space: bool = False, add_bos=None, vocab=400):
    """engine.tokenizer.Tokenizer of a byte-level BPE that spells every byte (the tests'
    models' tokenizer has only the bytes of its ASCII corpus: it drops other characters);
    ``post_bos``: its post-processor adds BOS; ``add_bos``: tokenizer_config's add_bos_token."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
    from conftest import _corpus
    from engine.tokenizer import Tokenizer
    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    if post_bos:
        t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    os.makedirs(path, exist_ok=True)
    t.save(os.path.join(path, "tokenizer.json"))
    cfg = {"eos_token": "</s>", "bos_token": "<s>", **({} if add_bos is None else {"add_bos_token": add_bos})}
    write_json(os.path.join(path, "tokenizer_config.json"), cfg)
    return Tokenizer(path)


def test_bos_once_and_continuations_without_a_word_start_space(tmp_path):
    """add_bos_token adds BOS once: not again when the post-processor already did, and not
    without special tokens; a continuation (a header, a tag, injected text) of a ByteLevel
    tokenizer with add_prefix_space gets no leading space, as it does follow other text."""
    for post_bos, add_bos in ((True, True), (True, None), (False, True), (False, False)):
        tok = _byte_level_tokenizer(str(tmp_path / f"{post_bos}{add_bos}"), post_bos=post_bos, add_bos=add_bos)
        bos = tok.token_to_id("<s>")
        body = tok.encode("hello world", add_special_tokens=False)
        assert bos not in body and tok.decode(body) == "hello world"
        want = [bos] + body if post_bos or add_bos else body
        assert tok.encode("hello world") == want, (post_bos, add_bos)
    tok = _byte_level_tokenizer(str(tmp_path / "prefix"), add_prefix_space=True)
    assert tok.decode(tok.encode("hello", add_special_tokens=False)) == " hello"  # (a sequence's start)
    assert tok.decode(tok.encode_continuation("hello")) == "hello"


def test_text_stream_pieces_add_up_to_the_decoded_text(llm, tmp_path):
    """engine.tokenizer.TextStream (stop strings, tree protocols' tags): its pieces, token by
    token, add up to decode() of the whole sequence, special tokens skipped or spelled out;
    characters split over byte tokens are held until whole (a tokenizer that spells them)."""
    from engine.tokenizer import TextStream
    byte_tok = _byte_level_tokenizer(str(tmp_path / "bytes"))
    for text in ["naïve café — 東京 🙂 done", "é" * 20]:
        ids = byte_tok.encode(text, add_special_tokens=False)
        assert byte_tok.decode(ids) == text and len(ids) > len(text)  # (it spells them, some in several tokens)
        stream = TextStream(byte_tok)
        assert "".join(stream.push(t) for t in ids) == text
    for tok, eos, V in ((llm.tokenizer, EOS_ID, VOCAB), (byte_tok, byte_tok.token_to_id("</s>"), 400)):
        for i, text in enumerate([TEXT, "naïve café — 東京 🙂 done", "a" * 40]):
            ids = tok.encode(text, add_special_tokens=False)
            ids = ids[:5] + [eos] + ids[5:] + random_ids(7, V, seed=i)  # a special, then random ids
            for skip in (True, False):
                stream = TextStream(tok, skip_special_tokens=skip)
                pieces = [stream.push(t) for t in ids]
                full = tok.decode(ids, skip_special_tokens=skip)
                assert "".join(pieces) == stream.text and full.startswith(stream.text), (text, skip)
                assert len(full) - len(stream.text) <= 1  # (only an unfinished last character is held)
                assert "\ufffd" not in "".join(pieces[:len(ids) - 7]), pieces  # (split characters held)


def test_decode_one_is_decode(llm, tmp_path, monkeypatch):
    """Tokenizer.decode_one (a TextStream's per-token context decode, kept per token) gives
    decode()'s text for one token and for longer lists, skip flag apart, also after its
    store fills and starts over."""
    byte_tok = _byte_level_tokenizer(str(tmp_path / "bytes"))
    for tok in (llm.tokenizer, byte_tok):
        monkeypatch.setattr(tok, "ONE_CACHE", 5)
        ids = list(range(min(tok.vocab_size, 300)))
        for _ in range(2):  # (the second time from the store)
            for i in ids:
                for skip in (True, False):
                    assert tok.decode_one([i], skip) == tok.decode([i], skip_special_tokens=skip)
            assert len(tok._one) <= 5
        assert tok.decode_one(ids[:3], False) == tok.decode(ids[:3], skip_special_tokens=False)
        assert tok.decode_one([], True) == tok.decode([])


def test_decoding_skips_special_tokens_by_default(llm):
    """Tokenizer.decode / decode_one / completion_text and TextStream drop special tokens'
    text unless asked (skip_special_tokens=True, as transformers' decode and vLLM)."""
    from engine.tokenizer import TextStream
    t = llm.tokenizer
    ids = t.encode(TEXT, add_special_tokens=False)[:4]
    eos_text = t.decode([EOS_ID], skip_special_tokens=False)
    assert eos_text and t.decode([EOS_ID]) == t.decode_one([EOS_ID]) == ""
    assert t.decode(ids + [EOS_ID]) == t.decode(ids) != t.decode(ids + [EOS_ID], skip_special_tokens=False)
    stream = TextStream(t, context=ids[:1])
    assert "".join(stream.push(i) for i in ids[1:] + [EOS_ID]) == t.completion_text(ids[:1], ids[1:] + [EOS_ID]) \
        == t.decode(ids)[len(t.decode(ids[:1])):]


def test_text_stream_keeps_spaces_of_decoders_that_strip_them(tmp_path):
    """With a SentencePiece-style tokenizer (Llama-2's decoder strips the first space of a
    decode), pieces are decoded after their context: "Hello" + many special tokens + " world"
    streams as "Hello world", however many special tokens sit between (a stream that moved its
    context onto skipped tokens lost the space after 32 of them)."""
    import json
    from tokenizers import Tokenizer as HFTok, decoders, models, normalizers, trainers
    from engine.tokenizer import TextStream, Tokenizer
    t = HFTok(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    t.train_from_iterator(["Hello world, this is a test. " * 3, "caf\u00e9 \u6771\u4eac done"] * 20,
                          trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]
                                              + [f"<0x{i:02X}>" for i in range(256)]))
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = Tokenizer(str(tmp_path))
    eos = tok.token_to_id("</s>")
    assert eos in tok.special_ids
    for gap in (0, 31, 32, 40):
        ids = tok.encode("Hello", add_special_tokens=False) + [eos] * gap + \
            tok.encode(" world caf\u00e9", add_special_tokens=False)[1:]  # (the ids of " world ...")
        stream = TextStream(tok)
        assert "".join(stream.push(i) for i in ids) == tok.decode(ids) == "Hello world caf\u00e9", gap


def test_prompts_that_are_neither_text_nor_ids_are_refused_and_ids_span_the_vocabulary(llm):
    """generate() of a number, a set or None is refused (a dict's keys were prompts; a dict is
    now vLLM's prompt dict: test_vllm_prompt_dicts); token ids 0 and vocab_size - 1 are ids, -1
    and vocab_size are not."""
    for bad in (5, {"hi"}, None):
        with pytest.raises(ValueError, match="prompts must be a string, a list of strings"):
            llm.generate(bad, greedy(2))
    outs = llm.generate([[0, 5], [VOCAB - 1, 3]], greedy(2))
    assert [o.prompt_token_ids for o in outs] == [[0, 5], [VOCAB - 1, 3]]
    assert llm.score([0, VOCAB - 1])[0].shape == (2, VOCAB)
    for bad in (-1, VOCAB):
        with pytest.raises(ValueError, match=rf"Token id {bad} is outside the vocabulary \[0, {VOCAB}\)\.$"):
            llm.generate([[5, bad]], greedy(2))
    assert_no_leak(llm)


def test_a_prompt_the_protocols_text_takes_past_the_context_says_so(llm):
    """A protocol's prepare_prompt (Hogwild's collaboration prompt) may make a prompt longer:
    up to the context less one position it runs; past it the error names the text the protocol
    adds, unless the prompt alone is too long (then the plain prompt-length error)."""
    from engine.protocols import ParallelSampling
    M = llm.config.max_position_embeddings

    class Padded(ParallelSampling):
        pad = 0

        def prepare_prompt(self, tokenizer, text, ids):
            return list(ids) + [7] * self.pad

    def run(ids, pad):
        proto = Padded()
        proto.pad = pad
        return llm.generate([ids], greedy(2), protocol=proto)[0]
    short = random_ids(5, VOCAB, seed=1)
    out = run(short, M - 1 - len(short))
    assert len(out.prompt_token_ids) == M - 1 and len(out.outputs[0].token_ids) == 1
    for ids in (short, random_ids(M - 1, VOCAB, seed=2)):
        with pytest.raises(ValueError, match=rf"^The prompt has {len(ids)} tokens, {M} with the text Padded puts "
                                             rf"around it, but the model's context is {M} "):
            run(ids, M - len(ids))
    with pytest.raises(ValueError, match=rf"^The prompt has {M + 1} tokens but the model's context is {M} "):
        run(random_ids(M, VOCAB, seed=3), 1)
    assert_no_leak(llm)


def test_progress_goes_to_stderr_only_when_asked(llm, capsys):
    """use_tqdm=True: a line of requests done on stderr; by default (generate, chat) nothing."""
    llm.generate(["a", "b"], greedy(2))
    llm.chat([{"role": "user", "content": "hi"}], greedy(2))
    assert capsys.readouterr() == ("", "")
    llm.generate(["a", "b"], greedy(2), use_tqdm=True)
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\rloom: 2/2 requests done\n"), err


def test_prompt_forms_agree(llm):
    ids = llm.tokenizer.encode(TEXT)
    assert ids and all(isinstance(t, int) for t in ids)
    assert llm.tokenizer.decode(ids) == TEXT
    a = llm.generate(TEXT, greedy(10), use_tqdm=False)
    b = llm.generate([TEXT], greedy(10))
    c = llm.generate([ids], greedy(10))
    assert len(a) == len(b) == len(c) == 1
    assert a[0].prompt == TEXT
    assert list(a[0].prompt_token_ids) == ids == list(c[0].prompt_token_ids)
    toks = [list(r[0].outputs[0].token_ids) for r in (a, b, c)]
    assert toks[0] == toks[1] == toks[2], toks
    out = a[0].outputs[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)
    m = a[0].metrics
    assert m.generated_tokens == 10 and m.wall_s >= 0 and m.forward_steps >= 10 and m.prompt_tokens == len(ids)
    assert llm.generate([], greedy(10)) == [] == llm.generate((), greedy(10))  # no prompts: no outputs
    assert_no_leak(llm)


def test_tiny_temperatures_are_greedy(llm, baseline):
    """Logits divided by a temperature of 1e-40 overflow float32: such temperatures (below
    1e-5) pick the top token, with or without top-p, instead of failing."""
    prompt, want = baseline
    for t in (1e-6, 1e-30, 1e-40, 5e-45):
        for top_p in (1.0, 0.9):
            got = llm.generate([prompt], SP(temperature=t, top_p=top_p, max_tokens=12, ignore_eos=True, seed=1))
            assert list(got[0].outputs[0].token_ids) == want, (t, top_p)


def test_default_sampling_params(llm):
    res = llm.generate(TEXT)
    out = res[0].outputs[0]
    assert out.finish_reason in ("stop", "length")
    assert 1 <= len(out.token_ids) <= 256
    if out.finish_reason == "length":
        assert len(out.token_ids) == 256
    assert_no_leak(llm)


def test_a_deleted_llm_is_freed_at_once(model_dir):
    """`del llm` frees the LLM and its KV cache by reference counting, after generate (plain,
    streamed, a protocol), a session and score: the scheduler held a bound method of the LLM
    and each request's run a closure over the request (reference cycles: a deleted LLM's
    cache stayed until Python's cycle collector ran, several of them at once in a loop)."""
    import gc
    import weakref
    from engine import LLM
    from engine.protocols import Hogwild, ParallelSampling
    gc.collect()
    gc.disable()
    try:
        for kind in ("generate", "stream", "protocols", "session", "score"):
            eng = LLM(model_dir(NAME), kv_cache_tokens=2048)
            if kind == "generate":
                eng.generate(["a", "b"], SP(n=2, max_tokens=3, seed=0, stop=["zz"], logprobs=1))
            elif kind == "stream":
                eng.generate(["a"], SP(max_tokens=3), stream=lambda i, j, p: None)
            elif kind == "protocols":
                for proto in (ParallelSampling(2), Hogwild(workers=2)):
                    eng.generate(["a"], SP(max_tokens=4, seed=1), protocol=proto)
            elif kind == "session":
                with eng.session("x") as s:
                    a, b = s.fork(s.root, ["a", "b"])
                    s.generate([a, b], SP(max_tokens=2))
                    s.generate([s.join([a, b], header="J")], SP(max_tokens=2))
                del s, a, b
            else:
                eng.score([1, 2, 3])
            alive = weakref.ref(eng), weakref.ref(eng.cache.k[0])
            del eng
            assert [r() is None for r in alive] == [True, True], kind
    finally:
        gc.enable()



def test_a_thread_handle_kept_does_not_keep_its_llm(model_dir):
    """A session's thread handle kept after its session was closed and its LLM deleted reads
    its text still, and holds neither the LLM's KV cache nor its weights (it held the LLM's
    EngineCore, for its text: `del llm` freed nothing while a handle was kept)."""
    import gc
    import weakref
    from engine import LLM
    eng = LLM(model_dir(NAME), kv_cache_tokens=2048)
    with eng.session("x") as s:
        a, = s.fork(s.root, [" a"])
        s.generate([a], SP(max_tokens=2, seed=0))
        text = a.text
    del s
    alive = weakref.ref(eng), weakref.ref(eng.cache.k[0]), weakref.ref(eng.core)
    del eng
    gc.collect()
    assert [r() is None for r in alive] == [True, True, True]
    assert a.text == text and text.startswith(" a")

def test_cache_stats_shape(llm):
    s = llm.cache_stats()
    for k in ("pages_total", "pages_free", "pages_used", "page_size"):
        assert k in s, f"cache_stats() lacks {k!r}: {s}"
    assert s["page_size"] == PS
    assert s["pages_free"] + s["pages_used"] == s["pages_total"]
    assert s["pages_total"] >= 4096 // PS


def test_cache_bytes_per_token_is_what_the_cache_holds(llm):
    # The memory check and the default cache size (2 GiB of K/V) divide by bytes_per_token:
    # it must be the bytes the K and V tensors hold for one token, over all layers.
    c = llm.cache
    held = sum(t.numel() * t.element_size() for t in c.k + c.v)
    assert held == c.bytes_per_token * c.num_pages * c.page_size
    assert len(c.k) == len(c.v) == llm.config.num_layers


# ---------------------------------------------------------------------------------------------
# seeds and parallel sampling
# ---------------------------------------------------------------------------------------------

def test_seed_reproducibility(llm, make_llm):
    prompt = random_ids(9, VOCAB, seed=3)

    def run(seed, n=1, engine=llm):
        res = engine.generate([prompt], SP(temperature=1.0, max_tokens=16, ignore_eos=True, seed=seed, n=n))
        return [list(o.token_ids) for o in res[0].outputs]

    assert run(7) == run(7)
    assert run(7) != run(8), "different seeds gave the same 16 sampled tokens"
    four = run(7, n=4)
    assert four == run(7, n=4)
    assert len({tuple(t) for t in four}) > 1, f"n=4 threads with temperature 1 are all identical: {four}"
    # the LLM-level seed makes unseeded requests reproducible across instances
    a = make_llm(NAME, kv_cache_tokens=1024, seed=123)
    b = make_llm(NAME, kv_cache_tokens=1024 + PS, seed=123)  # another instance (the cache key differs)
    assert a is not b
    assert run(None, engine=a) == run(None, engine=b)


def test_seeds_of_any_size_give_each_thread_its_own_generator(make_llm):
    """A seeded request's threads each draw from their own generator, for any integer seed
    (negative, past 64 bits, differing by a multiple of 2**32, which torch's generator drops,
    or by one where the thread index differs by the old multiplier); the LLM's seed too."""
    from engine.llm import ThreadGenerators
    gen = ThreadGenerators(torch.Generator().manual_seed(0))
    seeds = [gen(SP(seed=s), i).initial_seed()
             for s in (0, 1, 2, -7, 2**32, 2**32 + 2, 2**63, 2**64 + 1, 2**70 + 5, 2**100 + 9) for i in range(64)]
    seeds += [gen(SP(seed=0), 1_000_003).initial_seed()]
    # (torch's CPU generator reads a seed's low 32 bits: those must differ)
    assert len({s & 0xFFFFFFFF for s in seeds}) == len(seeds)
    prompt = random_ids(9, VOCAB, seed=3)
    drawn = [list(make_llm(NAME, kv_cache_tokens=256, seed=s).generate(
        [prompt], SP(temperature=1.0, max_tokens=16, ignore_eos=True))[0].outputs[0].token_ids)
        for s in (2, 3, -3, 2**100, 2 + 2**32, 2 + 2**63)]
    assert len({tuple(t) for t in drawn}) == len(drawn), drawn


def test_a_seeded_session_thread_draws_anew_on_each_call(llm, monkeypatch):
    """A seed reused over Session.generate calls on one thread gives the same tokens for the
    same thread state, and new draws for a new state (each call used to restart the same random
    stream: token by token, every draw the same uniform number)."""
    from engine import sampler
    prompt = random_ids(9, VOCAB, seed=3)
    uniforms = []
    real_draws = sampler.uniform_draws

    def draws(generators):  # (every row's uniform number: one call a step)
        out = real_draws(generators)
        uniforms.extend(out.tolist())
        return out
    monkeypatch.setattr(sampler, "uniform_draws", draws)

    def one_by_one(calls):
        s = llm.session(prompt)
        try:
            return [s.generate([s.root], SP(temperature=3.0, max_tokens=1, seed=0))[0].token_ids[0]
                    for _ in range(calls)]
        finally:
            s.close()
    first = one_by_one(8)
    assert len(set(uniforms)) == 8, uniforms
    assert one_by_one(8) == first and uniforms[8:] == uniforms[:8]


def test_a_seeded_requests_later_threads_draw_from_its_own_seed(llm):
    """Threads a protocol starts after admission (Hogwild's finisher here; a tree's forks and
    joins) draw from their own request's seed whatever is admitted in the same step: each
    request's generator factory bound the loop variable of the admission loop, so they all
    drew from the params of the last request admitted with it (an unseeded one: fresh draws)."""
    from engine.protocols import Hogwild
    target, proto = random_ids(9, VOCAB, seed=3), Hogwild(workers=2, collab_prompt=None)
    p = SP(temperature=1.5, max_tokens=4, ignore_eos=True, seed=11)
    alone = llm.generate([target], p, protocol=proto)[0].outputs[0]
    assert alone.metrics["total_tokens"] > 8  # (the finisher, started when both workers end, sampled)
    for other in (SP(temperature=1.5, max_tokens=4, ignore_eos=True, seed=12), SP(temperature=1.5, max_tokens=4)):
        both = llm.generate([target, random_ids(5, VOCAB, seed=4)], [p, other], protocol=proto)
        assert (both[0].outputs[0].text, both[0].outputs[0].token_ids) == (alone.text, alone.token_ids), other
    assert_no_leak(llm)


PAGE_CASES = [  # (prompt tokens, n, max_tokens, page_size)
    (21, 8, 20, 16),   # 2 + 8 * 2
    (16, 3, 17, 16),   # 1 + 3 * 1
    (17, 2, 1, 16),    # 2 + 0: the only token is never written
    (32, 4, 2, 16),    # 2 + 4 * 1
    (5, 4, 10, 4),     # 2 + 4 * 3
    (5, 2, 3, 1),      # 5 + 2 * 2
    (12, 8, 6, 5),     # 3 + 8 * 1
]


@pytest.mark.parametrize("P,n,max_tokens,page_size", PAGE_CASES)
def test_parallel_sampling_page_accounting(P, n, max_tokens, page_size, llm, make_llm):
    eng = llm if page_size == PS else make_llm(NAME, kv_cache_tokens=2048, page_size=page_size)
    prompt = random_ids(P, VOCAB, seed=P)
    res = eng.generate([prompt], SP(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=1))
    assert len(res) == 1
    outs = res[0].outputs
    assert len(outs) == n
    for o in outs:
        assert len(o.token_ids) == max_tokens and o.finish_reason == "length"
    want = pages(P, page_size) + n * pages(max_tokens - 1, page_size)
    m = res[0].metrics
    assert m.kv_pages_peak == want, (f"kv_pages_peak {m.kv_pages_peak}, want {want} = "
                                     f"ceil({P}/{page_size}) + {n} * ceil({max_tokens - 1}/{page_size})")
    assert m.generated_tokens == n * max_tokens
    # the n threads advance together: one forward step per generated position, not per thread
    assert max_tokens <= m.forward_steps <= max_tokens + 1, f"forward_steps {m.forward_steps}"
    if n >= 8 and max_tokens >= 6:
        assert len({tuple(o.token_ids) for o in outs}) > 1, "all threads sampled the same tokens"
    assert_no_leak(eng)


def test_max_total_tokens_bounds_plain_samplings_pages(make_llm):
    """Plain sampling's admission counts SamplingParams(max_total_tokens=...): n=3 x
    max_tokens=60 over a 16-token prompt needs 1 + 3 x 4 pages, but with max_total_tokens=5 its
    threads hold at most 5 tokens' pages; a 10-page cache runs it (it was refused, 'can never fit')."""
    eng = make_llm(NAME, kv_cache_tokens=160, page_size=PS)
    prompt = random_ids(16, VOCAB, seed=2)
    with pytest.raises(ValueError, match="can never fit"):
        eng.generate([prompt], SP(n=3, max_tokens=60, ignore_eos=True))
    res = eng.generate([prompt], SP(n=3, max_tokens=60, max_total_tokens=5, ignore_eos=True, seed=0))[0]
    assert sum(len(o.token_ids) for o in res.outputs) == 5 and res.metrics.kv_pages_peak <= 10
    assert_no_leak(eng)


def test_stream_adds_up_to_the_outputs(llm):
    """generate(stream=fn): the pieces of each completion add up to its text, arrive while
    it is generated, and never include text a stop string then cuts (held back while it may
    start one); stop strings, stop token ids and lengths, n > 1, several prompts."""
    from engine.protocols import Multiverse, ParallelSampling
    prompts = [random_ids(7, VOCAB, seed=s) for s in range(3)]
    free = [llm.generate([p], SP(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))[0].outputs[0]
            for p in prompts]
    # stop strings of one to four characters taken from the middle of the free runs' texts
    stops = [c.text[len(c.text) // 2:len(c.text) // 2 + 1 + i] for i, c in enumerate(free)]
    params = [SP(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, stop=[stops[0]], n=2),
              SP(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, stop=[stops[1], "zz"]),
              SP(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True, stop_token_ids=[free[2].token_ids[5]])]
    got, calls = {}, []

    def fn(i, j, piece):
        assert piece
        got[i, j] = got.get((i, j), "") + piece
        calls.append((i, j, llm.core.forward_steps))
    outs = llm.generate(prompts, params, stream=fn)
    for i, o in enumerate(outs):
        for j, c in enumerate(o.outputs):
            assert got.get((i, j), "") == c.text, (i, j, got.get((i, j)), c.text)
    assert outs[0].outputs[0].finish_reason == "stop" and outs[2].outputs[0].finish_reason == "stop"
    assert len({step for _, _, step in calls}) > 3  # (pieces came step by step, not at the end)
    for bad, msg in ((dict(stream=3), "stream=3 must be a function"),
                     (dict(stream=fn, protocol=Multiverse()), "stream applies to plain sampling"),
                     (dict(stream=fn, protocol=ParallelSampling(2, "majority")), "stream applies to plain sampling"),
                     (dict(stream=fn, protocol=ParallelSampling(2, "first_finish")), "stream applies to plain sampling")):
        with pytest.raises(ValueError, match=msg):
            llm.generate(prompts[:1], SP(max_tokens=2), **bad)
    two = llm.generate(prompts[:1], SP(n=2, max_tokens=3, seed=1), stream=fn, protocol=ParallelSampling(2))
    assert len(two[0].outputs) == 2  # (select="all" is plain sampling)

    def boom(i, j, piece):
        raise RuntimeError("the reader went away")
    with pytest.raises(RuntimeError, match="went away"):
        llm.generate(prompts[:1], SP(max_tokens=4), stream=boom)
    assert_no_leak(llm)


def test_a_stream_callback_may_read_the_cache_and_close_a_session(llm):
    """Reads and frees (cache_stats, Session.close) are not engine calls that step it: a stream
    callback may make them (the lock is re-entrant)."""
    s = llm.session([5, 6, 7])
    seen = []

    def fn(i, j, piece):
        s.close()
        seen.append(llm.cache_stats()["pages_total"])
    outs = llm.generate([[5, 6]], greedy(3), stream=fn)
    assert seen and len(outs[0].outputs[0].token_ids) == 3
    assert_no_leak(llm)


def test_stream_holds_back_only_what_may_start_a_stop_string(llm):
    """After each step the streamed text is the completion's text so far, less the last
    len(longest stop string) - 1 characters (all of it without stop strings: a one-thread
    completion and one of n=2, which make their own text streams)."""
    prompt = random_ids(7, VOCAB, seed=11)
    T = 8
    upto = [""] + [llm.generate([prompt], greedy(t))[0].outputs[0].text for t in range(1, T + 1)]
    assert len(set(upto)) > 4, upto
    for stop, n in (([], 1), ([], 2), (["zzq", "q"], 1)):  # ("zzq": never written, 2 held back)
        hold = max((len(s) for s in stop), default=1) - 1
        want, sent = [], ""
        for t in range(1, T):
            end = max(len(upto[t]) - hold, len(sent))
            if end > len(sent):
                sent = upto[t][:end]
                want.append(sent)
        want.append(upto[T])
        got: dict[int, list[str]] = {}

        def fn(i, j, piece):
            got.setdefault(j, []).append((got[j][-1] if got.get(j) else "") + piece)
        llm.generate([prompt], greedy(T, n=n, stop=stop or None), stream=fn)
        assert [got[j] for j in range(n)] == [want] * n, (stop, n)


def test_prompts_longer_than_a_steps_prefill_budget_share_steps(llm):
    """The scheduler admits at most max_batched_tokens of new prompt per step, but a longer
    prompt is admitted alone (one per step), not after every running request has ended:
    three such prompts used to run one after another (and all queued behind them too)."""
    sched = llm.scheduler
    old = sched.max_batched_tokens
    prompts = [random_ids(50, VOCAB, seed=s) for s in range(3)]
    alone = [llm.generate([p], greedy(5))[0].outputs[0].token_ids for p in prompts]
    try:
        sched.max_batched_tokens = 40
        for order in (prompts, [random_ids(8, VOCAB, seed=9)] + prompts):
            before = llm.core.forward_steps
            outs = llm.generate(order, greedy(5))
            steps = llm.core.forward_steps - before
            assert [o.outputs[0].token_ids for o in outs[-3:]] == alone
            assert steps <= 5 + len(order) - 1, steps  # (serially: 15 and 20)
    finally:
        sched.max_batched_tokens = old
    assert_no_leak(llm)


def test_a_steps_new_prompt_tokens_stay_within_max_batched_tokens(llm):
    """Each admitted prompt uses up its share of the step's prefill budget: with 40 tokens
    of budget, 15-token prompts are admitted two per step, not all in the first step."""
    sched, real = llm.scheduler, llm.core.step
    prompts = [random_ids(15, VOCAB, seed=20 + s) for s in range(5)]
    alone = [llm.generate([p], greedy(3))[0].outputs[0].token_ids for p in prompts]
    prefill = []

    def step(feed, samplers):  # the prompt tokens each step feeds (decode steps feed one per thread)
        prefill.append(sum(len(t.pending) for t in feed if len(t.pending) > 1))
        return real(feed, samplers)
    old, sched.max_batched_tokens, llm.core.step = sched.max_batched_tokens, 40, step
    try:
        outs = llm.generate(prompts, greedy(3))
    finally:
        sched.max_batched_tokens = old
        del llm.core.step
    assert [o.outputs[0].token_ids for o in outs] == alone
    assert prefill[:3] == [30, 30, 15], prefill
    assert_no_leak(llm)


def test_a_requests_wall_time_is_within_its_call(llm):
    """metrics.wall_s runs from the request's admission to its end: more than nothing, and
    no more than the whole call took."""
    import time
    t0 = time.perf_counter()
    m = llm.generate([TEXT], greedy(2))[0].metrics
    assert 0 < m.wall_s <= time.perf_counter() - t0


def test_a_prompt_that_fills_the_steps_prefill_budget_exactly_is_admitted(llm):
    """A prompt of exactly the prefill budget left is admitted in that step: 20-token prompts
    with 40 tokens of budget are admitted two per step (the first step's 40, not 20)."""
    sched, real = llm.scheduler, llm.core.step
    prompts = [random_ids(20, VOCAB, seed=40 + s) for s in range(3)]
    prefill = []

    def step(feed, samplers):
        prefill.append(sum(len(t.pending) for t in feed if len(t.pending) > 1))
        return real(feed, samplers)
    old, sched.max_batched_tokens, llm.core.step = sched.max_batched_tokens, 40, step
    try:
        llm.generate(prompts, greedy(2))
    finally:
        sched.max_batched_tokens = old
        del llm.core.step
    assert prefill[:2] == [40, 20], prefill
    assert_no_leak(llm)


def test_kv_pages_peak_is_the_requests_most_pages(llm):
    """kv_pages_peak is the most pages the request held at once: two samples that grow
    together until one stops (its pages go back at once) keep the peak of when both were
    held, not the fewer pages of the last step."""
    long, short = random_ids(40, VOCAB, seed=31), random_ids(36, VOCAB, seed=32)

    def src(threads):  # the first sample stops on EOS after 36 tokens, the other goes on to 40
        return [(short + [EOS_ID] if t.id == 1 else long)[len(t.generated)] for t in threads]
    llm.core.token_source = src
    try:
        res = llm.generate([random_ids(16, VOCAB, seed=30)], SP(n=2, max_tokens=40))[0]
    finally:
        llm.core.token_source = None
    a, b = res.outputs
    assert (len(a.token_ids), a.finish_reason, len(b.token_ids), b.finish_reason) == (37, "stop", 40, "length")
    # when the first sampled its EOS: the prompt and 36 written tokens each; at the end, 39
    want = pages(16, PS) + 2 * pages(36, PS)
    assert want > pages(16, PS) + pages(39, PS)
    assert res.metrics.kv_pages_peak == want, res.metrics
    assert_no_leak(llm)


# ---------------------------------------------------------------------------------------------
# stopping
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def full(llm):
    """Greedy 32 tokens from TEXT, ignoring EOS: (token_ids, text)."""
    out = llm.generate([TEXT], greedy(32))[0].outputs[0]
    return list(out.token_ids), out.text


def _pick_stop(llm, toks: list[int], text: str) -> str:
    """Three characters straddling a token boundary past the first few tokens, so the stop
    string is completed by a token that also carries text before it."""
    for i in range(3, len(toks)):
        b = len(llm.tokenizer.decode(toks[:i]))
        s = text[b - 1:b + 2]
        if len(s) == 3 and s.strip() and "\ufffd" not in s and text.find(s) >= 8:
            return s
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_string(llm, full):
    toks, text = full
    stop = _pick_stop(llm, toks, text)
    cut = text.find(stop)
    # the first k tokens whose text contains the stop string: the engine stops right there
    k = next(i for i in range(1, len(toks) + 1) if stop in llm.tokenizer.decode(toks[:i]))
    for stops in ([stop], ["@@never@@", stop]):
        out = llm.generate([TEXT], greedy(32, stop=stops))[0].outputs[0]
        assert out.finish_reason == "stop", (stops, out.finish_reason)
        assert out.text == text[:cut], f"stop={stops!r}: text {out.text!r}, want {text[:cut]!r}"
        assert list(out.token_ids) == toks[:k], (f"stop={stops!r}: tokens {list(out.token_ids)}, want the "
                                                 f"{k} tokens up to the one completing the stop string")
    out = llm.generate([TEXT], greedy(32, stop="@@never@@"))[0].outputs[0]
    assert out.finish_reason == "length" and list(out.token_ids) == toks and out.text == text
    assert_no_leak(llm)


def test_stop_string_with_parallel_threads(llm, full):
    toks, text = full
    stop = _pick_stop(llm, toks, text)
    res = llm.generate([TEXT], SP(n=3, temperature=1.0, max_tokens=24, ignore_eos=True, seed=9, stop=[stop]))
    for o in res[0].outputs:
        assert stop not in o.text
        if o.finish_reason == "stop":
            assert stop in llm.tokenizer.decode(o.token_ids)
        else:
            assert len(o.token_ids) == 24
    assert_no_leak(llm)


def _scripted(llm, tokens, **kw):
    """The completion of a call whose sampled tokens are ``tokens`` (core.token_source)."""
    seq = iter(tokens)
    llm.core.token_source = lambda ths: [next(seq) for _ in ths]
    try:
        return llm.generate([TEXT], SP(max_tokens=len(tokens), **kw))[0].outputs[0]
    finally:
        llm.core.token_source = None


def test_min_tokens_as_vllm(llm, baseline):
    """min_tokens, as vLLM's: EOS and stop tokens cannot be drawn before it (masked: the
    greedy path goes around them) and end the completion from it on; stop strings end it only
    after it; the log-probs stay the model's."""
    prompt, want = baseline
    # greedy: stop_token_ids=[the 2nd token] ends at it; with min_tokens=3 the first three tokens avoid it
    got = llm.generate([prompt], greedy(12, stop_token_ids=[want[1]], logprobs=1))[0].outputs[0]
    assert list(got.token_ids) == want[:2] and got.stop_reason == want[1]
    got = llm.generate([prompt], greedy(12, stop_token_ids=[want[1]], min_tokens=3, logprobs=1))[0].outputs[0]
    assert len(got.token_ids) >= 3 and want[1] not in got.token_ids[:3] and got.token_ids[0] == want[0]
    row = llm.score(prompt + [want[0]])[0][len(prompt)]
    assert abs(got.logprobs[1][got.token_ids[1]] - row[got.token_ids[1]].item()) < 1e-4  # (the model's)
    assert got.logprobs[1][got.token_ids[1]].rank == 2  # (the top token, masked, was skipped)
    # scripted tokens: EOS / a stop token at index < min_tokens does not stop; at min_tokens it does
    c = _scripted(llm, [5, EOS_ID, 6, EOS_ID, 7], min_tokens=3)
    assert (list(c.token_ids), c.finish_reason, c.stop_reason) == ([5, EOS_ID, 6, EOS_ID], "stop", None)
    c = _scripted(llm, [5, 9, 6, 9, 7], min_tokens=4, stop_token_ids=[9])
    assert (list(c.token_ids), c.finish_reason, c.stop_reason) == ([5, 9, 6, 9], "stop", 9)
    c = _scripted(llm, [5, 9, 6, 9, 7], min_tokens=5, stop_token_ids=[9])
    assert (list(c.token_ids), c.finish_reason) == ([5, 9, 6, 9, 7], "length")
    # stop strings: only found after min_tokens tokens (vLLM's detokenizer: more than min_tokens)
    t = llm.tokenizer
    ids = t.encode(" one two three four five", add_special_tokens=False)
    two = t.decode(ids[:2])
    c = _scripted(llm, ids, stop=[two.split()[-1]])
    assert c.finish_reason == "stop" and len(c.token_ids) <= 2
    c = _scripted(llm, ids, stop=[two.split()[-1]], min_tokens=len(ids) - 1)
    assert c.finish_reason == "length" and list(c.token_ids) == ids
    with pytest.raises(ValueError, match=r"min_tokens=13 is invalid: must be an integer in \[0, max_tokens=12\]"):
        SP(max_tokens=12, min_tokens=13)
    assert_no_leak(llm)


def test_min_tokens_over_stop_ids_is_refused_only_when_they_cover_the_vocabulary(llm, baseline):
    """The refusal's edges: min_tokens=1 over the whole vocabulary is refused; min_tokens=0
    is not (the first token stops the call); as many stop ids as the vocabulary has tokens,
    one of them past it, leave one token, which is drawn until min_tokens, then any token,
    which stops it."""
    prompt, _ = baseline
    V = llm.config.vocab_size
    with pytest.raises(ValueError, match=r"SamplingParams\(min_tokens=1\) forbids the stop tokens"):
        llm.generate([prompt], SP(max_tokens=3, min_tokens=1, ignore_eos=True, stop_token_ids=list(range(V))))
    got = llm.generate([prompt], SP(max_tokens=3, temperature=0, stop_token_ids=list(range(V))))[0].outputs[0]
    assert (len(got.token_ids), got.finish_reason) == (1, "stop")
    x = 7
    p = SP(max_tokens=3, min_tokens=2, temperature=0, stop_token_ids=[i for i in range(V) if i != x] + [V])
    got = llm.generate([prompt], p)[0].outputs[0]
    assert list(got.token_ids[:2]) == [x, x] and got.token_ids[2] != x
    assert (len(got.token_ids), got.finish_reason, got.stop_reason) == (3, "stop", got.token_ids[2])
    assert_no_leak(llm)


def test_stop_strings_where_they_start_and_end_against_the_new_text(llm):
    """A stop string at the very start of the text, one that ends on the first character of
    a token's text, and one written by the min_tokens-th token (not found then: vLLM looks
    from the next token on, and then only in the text each token adds, with the stop
    string's length before it)."""
    t = llm.tokenizer
    ids = t.encode(" one two three four five", add_special_tokens=False)
    text = [t.decode(ids[:i + 1]) for i in range(len(ids))]  # the text after each token
    assert len(ids) >= 4 and all(len(a) < len(b) for a, b in zip(text, text[1:]))
    c = _scripted(llm, ids, stop=[text[0][:2]])
    assert (list(c.token_ids), c.finish_reason, c.text) == (ids[:1], "stop", "")
    stop = text[0][-2:] + text[1][len(text[0])]  # (its last character the second token's first)
    c = _scripted(llm, ids, stop=[stop])
    assert (list(c.token_ids), c.finish_reason, c.text) == (ids[:2], "stop", text[0][:-2])
    assert text[-1].count(text[1]) == 1  # (the first two tokens' text, found once)
    c = _scripted(llm, ids, stop=[text[1]], min_tokens=2)
    assert (list(c.token_ids), c.finish_reason, c.text) == (ids, "length", text[-1])
    c = _scripted(llm, ids, stop=[text[1]], min_tokens=1)
    assert (list(c.token_ids), c.finish_reason, c.text) == (ids[:2], "stop", "")
    assert_no_leak(llm)


def test_scripted_tokens_get_the_models_log_probs(llm, baseline):
    """With the tokens scripted (core.token_source), the log-probs are still the model's
    (a log-softmax over each row's vocabulary)."""
    prompt, want = baseline
    ref = llm.generate([prompt], greedy(4, logprobs=0))[0].outputs[0]
    seq = iter(want[:4])
    llm.core.token_source = lambda ths: [next(seq) for _ in ths]
    try:
        got = llm.generate([prompt], SP(max_tokens=4, ignore_eos=True, logprobs=0))[0].outputs[0]
    finally:
        llm.core.token_source = None
    assert list(got.token_ids) == list(ref.token_ids) == want[:4]
    for a, b, tok in zip(got.logprobs, ref.logprobs, want):
        assert abs(a[tok].logprob - b[tok].logprob) < 1e-4 and b[tok].logprob < -1e-3


def test_min_tokens_over_a_vocabulary_of_stop_tokens_is_refused_first(llm, baseline):
    """min_tokens masks the stop tokens until then; when they (with the EOS ids, unless
    ignore_eos) are the whole vocabulary (a tiny model's), no token can be sampled: refused
    before any work, saying so (it ran the prefill, then raised FloatingPointError blaming
    NaN / inf in the weights). Plain generate, a session's, greedy or sampled."""
    prompt, _ = baseline
    V = llm.config.vocab_size
    steps = llm.core.forward_steps
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=2, seed=0)):
        for stops, ignore in ((list(range(V)), True), ([i for i in range(V) if i != EOS_ID], False)):
            p = SP(max_tokens=4, min_tokens=2, stop_token_ids=stops, ignore_eos=ignore, **kw)
            with pytest.raises(ValueError, match=rf"min_tokens=2\) forbids the stop tokens until then, but "
                                                 rf"stop_token_ids.* cover the model's whole vocabulary of {V}"):
                llm.generate([prompt], p)
            s = llm.session(prompt)
            with pytest.raises(ValueError, match="cover the model's whole vocabulary"):
                s.generate([s.root], p)
            s.close()
    assert llm.core.forward_steps == steps
    # one token left out: it is what is sampled until min_tokens
    p = SP(max_tokens=3, min_tokens=2, stop_token_ids=[i for i in range(V) if i != 7], ignore_eos=True,
           temperature=0)
    assert list(llm.generate([prompt], p)[0].outputs[0].token_ids[:2]) == [7, 7]
    assert_still_works(llm, baseline)
    assert_no_leak(llm)


def test_include_stop_str_in_output(llm):
    """include_stop_str_in_output, as vLLM's: the text ends after the stop string (streamed
    pieces too), and a stop token's text is kept (the tokenizer's EOS, a special token, reads
    nothing); a tree protocol's main thread does the same."""
    t = llm.tokenizer
    ids = t.encode(" one two three four five", add_special_tokens=False)
    full = t.decode(ids)
    for include in (False, True):
        pieces = []
        seq = iter(ids)
        llm.core.token_source = lambda ths: [next(seq) for _ in ths]
        try:
            c = llm.generate([TEXT], SP(max_tokens=len(ids), stop=["three"], include_stop_str_in_output=include),
                             stream=lambda i, j, p: pieces.append(p))[0].outputs[0]
        finally:
            llm.core.token_source = None
        cut = full.index("three") + (len("three") if include else 0)
        assert (c.text, c.stop_reason, "".join(pieces)) == (full[:cut], "three", full[:cut]), (include, c, pieces)
        c = _scripted(llm, ids[:2] + [ids[3]], stop_token_ids=[ids[3]], include_stop_str_in_output=include)
        assert c.text == t.decode(ids[:2] + ([ids[3]] if include else [])) and c.stop_reason == ids[3]
        c = _scripted(llm, ids[:2] + [EOS_ID], include_stop_str_in_output=include)
        assert c.text == t.decode(ids[:2]) and c.finish_reason == "stop"
    with pytest.raises(ValueError, match="include_stop_str_in_output=1 is invalid: must be True or False"):
        SP(include_stop_str_in_output=1)


def test_skip_special_tokens_false_keeps_their_text(llm):
    """skip_special_tokens=False, as vLLM's: the special tokens' text is in the output's text
    (streamed pieces too), and stop strings see it; the stopping EOS's text is not."""
    t = llm.tokenizer
    eos_text = t.decode([EOS_ID], skip_special_tokens=False)
    assert eos_text and t.decode([EOS_ID]) == ""
    ids = t.encode(" ab", add_special_tokens=False) + [EOS_ID] + t.encode(" cd", add_special_tokens=False)
    for skip in (True, False):
        want = t.decode(ids, skip_special_tokens=skip)
        for stop in (None, ["zz"]):
            pieces = []
            seq = iter(ids)
            llm.core.token_source = lambda ths: [next(seq) for _ in ths]
            try:
                c = llm.generate([TEXT], SP(max_tokens=len(ids), ignore_eos=True, stop=stop, skip_special_tokens=skip),
                                 stream=lambda i, j, p: pieces.append(p))[0].outputs[0]
            finally:
                llm.core.token_source = None
            assert c.text == "".join(pieces) == want and (eos_text in c.text) == (not skip), (skip, stop, c.text)
    n = ids.index(EOS_ID)
    c = _scripted(llm, ids, ignore_eos=True, stop=[eos_text + " c"], skip_special_tokens=False)
    assert (c.text, c.stop_reason) == (t.decode(ids[:n]), eos_text + " c")
    c = _scripted(llm, ids[:n + 1], skip_special_tokens=False)
    assert c.text == t.decode(ids[:n]) and c.finish_reason == "stop"  # (the stopping EOS: not in the text)


def test_stop_reason_and_stop_string_order_as_vllm(llm):
    """The tokenizer's EOS stops with stop_reason None; when one token completes several
    stop strings, the first of the list wins (vLLM's stop checker), not the earliest in
    the text."""
    t = llm.tokenizer
    c = _scripted(llm, [5, 6, EOS_ID, 7])
    assert (c.finish_reason, c.stop_reason, list(c.token_ids)) == ("stop", None, [5, 6, EOS_ID])
    two = next(i for i in range(VOCAB) if len(t.decode([i])) >= 2 and t.decode([i]).isalpha()
               and t.decode([i])[0] != t.decode([i])[1])
    a, b = t.decode([two])[:2]
    c = _scripted(llm, [two], stop=[b, a])
    assert (c.stop_reason, c.text) == (b, a), (t.decode([two]), c)
    c = _scripted(llm, [two], stop=[a, b])
    assert (c.stop_reason, c.text) == (a, ""), c
    assert_no_leak(llm)


def test_stop_token_ids(llm, full):
    toks, _ = full
    j = next(i for i in range(3, len(toks)) if toks.index(toks[i]) == i and toks[i] != EOS_ID)
    out = llm.generate([TEXT], greedy(32, stop_token_ids=[toks[j]]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == toks[j]
    assert list(out.token_ids) == toks[:j + 1], (
        f"stop_token_ids=[{toks[j]}] (first generated at step {j}): got {list(out.token_ids)}, full {toks}")
    # as vLLM: the stop token is in token_ids, its text is not in the text
    assert out.text == llm.tokenizer.decode(toks[:j]) != llm.tokenizer.decode(toks[:j + 1]), out.text
    assert_no_leak(llm)


def test_max_tokens_length(llm, full):
    out = llm.generate([TEXT], greedy(5))[0].outputs[0]
    assert out.finish_reason == "length" and list(out.token_ids) == full[0][:5]


@pytest.fixture(scope="module")
def eos_dirs(model_dir, full, tmp_path_factory):
    """Copies of the model whose EOS is a token greedy decoding emits at step j."""
    toks, _ = full
    # the first token that is new at its step, with the real EOS nowhere up to it
    j = next(i for i in range(4, len(toks)) if toks.index(toks[i]) == i and EOS_ID not in toks[:i + 1])
    e = toks[j]
    dirs = {}
    for style in ("int", "list"):
        d = str(tmp_path_factory.mktemp(f"eos_{style}"))
        shutil.copytree(model_dir(NAME), d, dirs_exist_ok=True)
        if style == "int":  # config.json and generation_config.json both name it
            cfg = read_json(os.path.join(d, "config.json"))
            cfg["eos_token_id"] = e
            write_json(os.path.join(d, "config.json"), cfg)
            gen = {"bos_token_id": 0, "eos_token_id": e}
        else:  # Llama-3.1 style: generation_config.json lists several EOS ids
            gen = {"bos_token_id": 0, "eos_token_id": [EOS_ID, e]}
        write_json(os.path.join(d, "generation_config.json"), gen)
        dirs[style] = d
    return dirs, j


@pytest.mark.parametrize("style", ["int", "list"])
def test_eos_stops_unless_ignored(style, eos_dirs, full):
    from engine import LLM
    dirs, j = eos_dirs
    toks, _ = full
    eng = LLM(dirs[style], kv_cache_tokens=1024)
    out = eng.generate([TEXT], SP(temperature=0.0, max_tokens=32))[0].outputs[0]
    assert out.finish_reason == "stop", f"EOS {toks[j]} emitted at step {j} did not stop: {list(out.token_ids)}"
    assert list(out.token_ids) == toks[:j + 1], f"got {list(out.token_ids)}, full {toks}"
    # an EOS of the configs that is not the tokenizer's: its text is cut, and stop_reason names
    # it (as vLLM, which adds a generation config's EOS ids to the stop token ids; only the
    # tokenizer's EOS gives None)
    assert out.stop_reason == toks[j] and out.text == eng.tokenizer.decode(toks[:j]), out
    out = eng.generate([TEXT], greedy(32))[0].outputs[0]
    assert out.finish_reason == "length" and list(out.token_ids) == toks
    assert_no_leak(eng)


# ---------------------------------------------------------------------------------------------
# sampling semantics against the model's distribution
# ---------------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_and_min_p_1_are_greedy(llm, full):
    toks, _ = full
    for kw in (dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)):
        out = llm.generate([TEXT], SP(temperature=1.0, max_tokens=32, ignore_eos=True, seed=4, **kw))
        assert list(out[0].outputs[0].token_ids) == toks, f"{kw} with temperature 1 is not greedy"


def _chi2(counts: torch.Tensor, p: torch.Tensor, n: int) -> tuple[float, int]:
    """Pearson statistic over bins with expected count >= 5, the rest pooled into one bin."""
    e = p * n
    big = e >= 5
    stat = (((counts[big] - e[big]) ** 2) / e[big]).sum().item()
    k = int(big.sum())
    eo, co = e[~big].sum().item(), counts[~big].sum().item()
    if eo > 0:
        stat += (co - eo) ** 2 / eo
        k += 1
    return stat, k - 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_token_frequencies_match_softmax(temperature, llm):
    prompt = random_ids(13, VOCAB, seed=77)
    lp = llm.score(prompt)[0][-1].double()  # log_softmax of the next-token logits
    p = torch.softmax(lp / temperature, dim=0)
    n = 400
    res = llm.generate([prompt], SP(n=n, temperature=temperature, max_tokens=1, seed=1234))
    firsts = [o.token_ids[0] for o in res[0].outputs]
    assert len(firsts) == n
    counts = torch.bincount(torch.tensor(firsts), minlength=VOCAB).double()
    stat, dof = _chi2(counts, p, n)
    # mean dof, sd sqrt(2 dof): 4 sd above is never reached by a correct sampler at this seed,
    # while a temperature off by 20% lands far above (checked by simulation)
    limit = dof + 4 * math.sqrt(2 * dof) + 4
    top = p.topk(5)
    assert stat < limit, (f"T={temperature}: chi2 {stat:.1f} >= {limit:.1f} (dof {dof}); top-5 tokens "
                          f"{top.indices.tolist()} expected {[round(n * v, 1) for v in top.values.tolist()]} "
                          f"observed {[int(counts[i]) for i in top.indices]}")
    assert_no_leak(llm)


def _check_allowed(llm, prompt, outs, allowed, what):
    """Every sampled token must lie in ``allowed(probs)`` of the distribution at its position."""
    seqs = [prompt + list(o.token_ids) for o in outs]
    scores = llm.score(seqs)
    off_argmax = 0
    for o, lp in zip(outs, scores):
        for i, t in enumerate(o.token_ids):
            probs = lp[len(prompt) - 1 + i].double().exp()
            assert allowed(probs, t), (f"{what}: token {t} at step {i} has p={probs[t]:.4f}, rank "
                                       f"{int((probs > probs[t]).sum())}, top-5 p "
                                       f"{[round(v, 4) for v in probs.topk(5).values.tolist()]}")
            off_argmax += int(t != int(probs.argmax()))
    assert off_argmax > 0, f"{what}: every sampled token was the argmax; nothing was sampled"


def test_top_k_top_p_min_p_stay_in_allowed_set(llm):
    prompt = random_ids(11, VOCAB, seed=8)
    base = dict(n=40, temperature=1.0, max_tokens=6, ignore_eos=True, seed=21)

    def top_k_ok(probs, t, k=5):
        return probs[t] >= probs.topk(k).values[-1] - 1e-6

    def top_p_ok(probs, t, top_p=0.5):
        return probs[probs > probs[t] + 1e-9].sum() < top_p + 1e-4  # mass strictly before t

    def min_p_ok(probs, t, min_p=0.3):
        return probs[t] >= min_p * probs.max() - 1e-6

    for kw, ok in ((dict(top_k=5), top_k_ok), (dict(top_p=0.5), top_p_ok), (dict(min_p=0.3), min_p_ok)):
        res = llm.generate([prompt], SP(**base, **kw))
        _check_allowed(llm, prompt, res[0].outputs, ok, str(kw))
    assert_no_leak(llm)


def test_min_p_before_top_p_as_vllm():
    """vLLM filters by min_p (after temperature), then top-k / top-p on what is left: with
    probabilities [.5, .2, .15, .15], min_p=0.35 leaves [.5, .2], whose top 60% is token 0
    alone (top-p first kept tokens 0 and 1)."""
    import torch
    from engine.sampler import _filtered_logprobs
    logits = torch.tensor([0.5, 0.2, 0.15, 0.15]).log()
    kept = _filtered_logprobs(logits, SP(top_p=0.6, min_p=0.35)).isfinite().nonzero().flatten().tolist()
    assert kept == [0], kept
    assert _filtered_logprobs(logits, SP(top_p=0.8, min_p=0.35)).isfinite().nonzero().flatten().tolist() == [0, 1]


def test_logprobs_as_vllm_gives_them(llm):
    """Each entry a float with vLLM's .logprob and .rank (1: the most likely token)."""
    prompt = random_ids(11, VOCAB, seed=9)
    c = llm.generate([prompt], SP(temperature=1.0, max_tokens=3, ignore_eos=True, seed=5, logprobs=100))[0].outputs[0]
    want = llm.score(prompt + list(c.token_ids))[0]
    for i, (tok, d) in enumerate(zip(c.token_ids, c.logprobs)):
        assert 100 <= len(d) <= 101
        row = want[len(prompt) - 1 + i]
        e = d[tok]
        assert e == e.logprob and abs(e.logprob - float(row[tok])) < 1e-4
        assert e.rank == int((row > row[tok]).sum()) + 1
        assert sorted(v.rank for v in d.values())[:3] == [1, 2, 3]
    # cumulative_logprob: the sum of the sampled tokens' (vLLM's; None without logprobs)
    assert abs(c.cumulative_logprob - sum(float(want[len(prompt) - 1 + i][t]) for i, t in enumerate(c.token_ids))) < 1e-4
    c = llm.generate([prompt], SP(temperature=1.0, max_tokens=3, ignore_eos=True, seed=5, logprobs=0))[0].outputs[0]
    assert all(list(d) == [tok] and d[tok].rank >= 1 for tok, d in zip(c.token_ids, c.logprobs))
    assert llm.generate([prompt], SP(max_tokens=2))[0].outputs[0].cumulative_logprob is None
    assert c.finished()  # (vLLM's CompletionOutput.finished())
    import copy
    import pickle  # (outputs cross processes: a Logprob keeps its rank)
    for e in (pickle.loads(pickle.dumps(c.logprobs)), copy.deepcopy(c.logprobs)):
        assert [[(t, v.logprob, v.rank) for t, v in d.items()] for d in e] == \
            [[(t, v.logprob, v.rank) for t, v in d.items()] for d in c.logprobs]


def test_sampled_logprobs_include_chosen_token(llm):
    prompt = random_ids(11, VOCAB, seed=9)
    res = llm.generate([prompt], SP(n=4, temperature=1.0, max_tokens=8, ignore_eos=True, seed=5, logprobs=2))
    outs = res[0].outputs
    scores = llm.score([prompt + list(o.token_ids) for o in outs])
    not_top = 0
    for o, lp in zip(outs, scores):
        assert len(o.logprobs) == len(o.token_ids)
        for i, (t, d) in enumerate(zip(o.token_ids, o.logprobs)):
            row = lp[len(prompt) - 1 + i]
            top2 = set(row.topk(2).indices.tolist())
            assert t in d and top2 <= set(d) and len(d) <= 3, f"step {i}: token {t}, top-2 {top2}, got {d}"
            not_top += t not in top2
            for tok, v in d.items():
                assert abs(v - row[tok].item()) <= 1e-4, f"step {i} token {tok}: {v} vs score {row[tok].item()}"
    assert not_top > 0, "no sampled token outside the top-2: the 'chosen is included' rule was not exercised"


# ---------------------------------------------------------------------------------------------
# chat
# ---------------------------------------------------------------------------------------------

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello loom"}]
CONV2 = [{"role": "user", "content": "fork and join"}]


def test_chat_renders_template_and_generates(llm, model_dir):
    from transformers import AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(model_dir(NAME))
    rendered = hf_tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nbe brief<|im_end|>\n")
    want_ids = hf_tok(rendered, add_special_tokens=True).input_ids
    assert llm.tokenizer.encode(rendered) == want_ids
    assert want_ids[0] == 2  # <|im_start|> is one special token
    res = llm.chat(CONV, greedy(8))
    assert len(res) == 1
    assert list(res[0].prompt_token_ids) == want_ids
    plain = llm.generate([want_ids], greedy(8))[0].outputs[0].token_ids
    assert list(res[0].outputs[0].token_ids) == list(plain)
    both = llm.chat([CONV, CONV2], greedy(8))
    assert len(both) == 2
    assert list(both[0].outputs[0].token_ids) == list(plain)
    r2 = hf_tok.apply_chat_template(CONV2, tokenize=False, add_generation_prompt=True)
    assert list(both[1].prompt_token_ids) == hf_tok(r2).input_ids
    assert (res[0].prompt, both[1].prompt) == (rendered, r2)  # the rendered conversation
    assert llm.chat([], greedy(8)) == []  # (no conversations: no outputs, as generate([]))
    assert_no_leak(llm)



def test_chat_takes_tuples(llm):
    """A conversation, or a batch of them, given as a tuple is taken as the list is, as
    transformers' apply_chat_template takes it (it was refused: 'messages must be a
    conversation (a list of ...)')."""
    want = llm.chat(CONV, greedy(3))[0]
    for given in (tuple(CONV), [tuple(CONV)], (CONV, CONV2)):
        out = llm.chat(given, greedy(3))[0]
        assert (out.prompt, list(out.outputs[0].token_ids)) == (want.prompt, list(want.outputs[0].token_ids)), given
    assert len(llm.chat((CONV, tuple(CONV2)), greedy(3))) == 2
    for bad in ("hi", ["hi"], [CONV, CONV2[0]], CONV[0]):  # (neither a conversation nor a list of them)
        with pytest.raises(ValueError, match=r"^messages must be a conversation \(a list of"):
            llm.chat(bad, greedy(3))
    assert_no_leak(llm)

def test_chat_without_template_raises(make_llm):
    eng = make_llm("mistral", kv_cache_tokens=1024)
    with pytest.raises(ValueError):
        eng.chat(CONV, greedy(4))
    prompt = random_ids(7, VARIANTS["mistral"]["vocab"], seed=1)
    a = eng.generate([prompt], greedy(6))[0].outputs[0].token_ids
    assert len(a) == 6
    assert_no_leak(eng)


# ---------------------------------------------------------------------------------------------
# errors: each one names the problem and leaves the LLM usable
# ---------------------------------------------------------------------------------------------

def test_missing_model_dir(tmp_path, llm, baseline):
    from engine import LLM
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(FileNotFoundError) as e:
        LLM(missing)
    assert missing in str(e.value), str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        LLM(str(empty))
    assert str(empty) in str(e.value), str(e.value)
    assert_still_works(llm, baseline)


def test_calls_from_several_python_threads(llm):
    """generate / score / session calls from several Python threads take turns on the one
    engine (they share its cache and step state): each gets the result it would get alone."""
    import threading
    prompts = [random_ids(5 + i, VOCAB, seed=70 + i) for i in range(4)]
    want = [list(llm.generate([p], greedy(12))[0].outputs[0].token_ids) for p in prompts]
    want_score = llm.score(prompts[0])[0]
    got, errors = {}, []

    def work(i):
        try:
            for r in range(3):
                if i == 3 and r == 1:
                    assert torch.equal(llm.score(prompts[0])[0], want_score)
                    with llm.session(prompts[i]) as s:
                        (a,) = s.fork(s.root, [[]])
                        got[(i, "session")] = list(s.generate([a], greedy(12))[0].token_ids)
                got[(i, r)] = list(llm.generate([prompts[i]], greedy(12))[0].outputs[0].token_ids)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for i in range(4):
        for r in range(3):
            assert got[(i, r)] == want[i], (i, r)
    assert got[(3, "session")] == want[3]
    assert_no_leak(llm)


def test_a_session_dropped_while_another_thread_runs_a_call(llm, baseline):
    """A session dropped (its last reference gone) while another Python thread runs an engine
    call does not wait for that call: its close waited in whatever thread dropped it (a
    server's thread stalled for a whole generate; in the main thread a Ctrl-C meanwhile was
    lost, and a second one left the session's pages held for good). Its pages are back
    before any later call sees the cache; a session dropped in the thread that runs the
    call (a stream callback) still closes at once."""
    import gc
    import threading

    s = llm.session(random_ids(40, VOCAB, seed=3))
    (a,) = s.fork(s.root, [[5]])
    s.generate([a], greedy(4))
    assert llm.cache_stats()["pages_used"] > 0
    dropped = []

    def drop():
        nonlocal s, a
        del s, a
        gc.collect()
        dropped.append(True)
    dropper = threading.Thread(target=drop)
    try:
        with engine_held(llm):  # (another thread's engine call, as long as the test needs)
            dropper.start()
            dropper.join(10)
            assert dropped, "dropping a session waited for another thread's engine call"
    finally:
        dropper.join()
    assert_no_leak(llm)  # (cache_stats is an engine call: it closes the dropped session first)
    assert llm.cache_stats()["segments"] == 0
    # dropped inside a call in the same thread: closed at once
    s2 = llm.session(random_ids(40, VOCAB, seed=4))
    (b,) = s2.fork(s2.root, [[5]])
    s2.generate([b], greedy(2))
    sessions, handed_over = [s2], []
    del s2, b

    def cb(i, j, text):
        if sessions:
            sessions.clear()  # (its last reference: closed here, inside generate's call)
            handed_over.append(list(llm._dropped))
    llm.generate([baseline[0]], greedy(3), stream=cb)
    assert handed_over == [[]]
    assert_still_works(llm, baseline)


def test_a_handed_over_session_whose_close_fails_is_closed_by_the_next_call(llm, baseline):
    """A session dropped while another thread's call ran is closed first thing in the next
    call; if that close fails (here a RuntimeError, as a Ctrl-C there would), the call raises
    it and the session stays handed over: the call after closes it, and its pages are back
    (they were held for good)."""
    s = llm.session(random_ids(40, VOCAB, seed=6))
    s.generate([s.root], greedy(3))
    tree = s.tree
    with engine_held(llm):
        del s  # (closed by the next call: the lock is held)
        assert llm._dropped == [tree]
    close, tries = tree.close, []

    def close_once_failing():
        tries.append(1)
        if len(tries) == 1:
            raise RuntimeError("close failed")
        close()
    tree.close = close_once_failing
    with pytest.raises(RuntimeError, match="close failed"):
        llm.cache_stats()
    assert llm._dropped == [tree] and llm.cache.pages_used > 0  # (still held)
    assert_no_leak(llm)  # (cache_stats: the retried close ran first)
    assert len(tries) == 2 and llm._dropped == []
    assert_still_works(llm, baseline)


def test_a_session_the_garbage_collector_frees_inside_the_engine_locks_bookkeeping(make_llm):
    """The collector runs a dropped session's __del__ wherever it runs, also while the thread
    is inside the engine lock's own bookkeeping (holding its condition: at an allocation there,
    or on Python 3.12+ at any call there, a trace function's or a signal handler's too). The
    session's close tried that lock again and waited for it forever: every engine call of
    every thread hung. It is handed over instead, and the next call closes it."""
    import gc
    import threading

    llm = make_llm(NAME, kv_cache_tokens=4096, seed=11)  # (its own: a hang would leave it held)
    s = llm.session(random_ids(20, VOCAB, seed=3))
    s.generate([s.root], greedy(2))
    s.cycle = s  # (a reference cycle: only the collector frees it)
    del s
    cv, notify_all = llm._lock._cv, llm._lock._cv.notify_all
    ran = []

    def collect_then_notify():  # (the collector lands here, as the call lets go of the lock)
        if not ran:
            ran.append(gc.collect())
        notify_all()
    cv.notify_all = collect_then_notify
    gc_was = gc.isenabled()
    gc.disable()  # (so that it runs there and not before)
    try:
        t = threading.Thread(target=llm.cache_stats, daemon=True)
        t.start()
        t.join(60)
        assert not t.is_alive(), "the session's close waited for the engine lock's condition it held"
    finally:
        del cv.notify_all
        if gc_was:
            gc.enable()
    assert ran and ran[0] > 0
    assert llm.cache_stats()["segments"] == 0  # (handed over, then closed by this call)
    assert_no_leak(llm)


def test_threads_take_turns_in_the_order_they_came(llm, baseline):
    """Python threads get the engine first come, first served: a thread that ends a call and
    asks at once for the next waits behind the threads already waiting (with a plain RLock
    it took the lock back first: a thread calling in a loop kept another waiting for 1,370
    of its calls). A waiting thread that gives up (Ctrl-C; here an error raised while it
    waits) leaves the line, and the lock's re-entry and try-lock work as before."""
    import threading
    lock, order = llm._lock, []
    in_line = functools.partial(wait_in_line, lock)

    def call(name):
        llm.cache_stats()  # (an engine call)
        order.append(name)
    lock.acquire()  # this thread's call runs ...
    b = threading.Thread(target=call, args=("b",))
    b.start()
    assert in_line(1)
    c = threading.Thread(target=call, args=("c",))
    c.start()
    assert in_line(2)
    lock.release()  # ... ends, and this thread asks again at once: behind b and c
    call("a")
    b.join(30)
    c.join(30)
    assert order == ["b", "c", "a"]
    # re-entry, try-lock, and a waiter that gives up
    assert lock.acquire() and lock.acquire(blocking=False)
    lock.release()
    got = []
    t = threading.Thread(target=lambda: got.append(lock.acquire(blocking=False)))
    t.start()
    t.join()
    assert got == [False]
    errs = []

    def gives_up():
        try:
            lock.acquire()
        except RuntimeError as e:
            errs.append(str(e))
    from engine import llm as llm_mod
    real_check = llm_mod.DEFERRED.check
    giving_up = threading.Event()

    def check():  # (stands in for a Ctrl-C, which only the main thread receives)
        if giving_up.is_set() and threading.current_thread() is not threading.main_thread():
            raise RuntimeError("gave up")
        real_check()
    llm_mod.DEFERRED.check = check
    try:
        t = threading.Thread(target=gives_up)
        t.start()
        assert in_line(1)
        giving_up.set()
        t.join(30)
        assert errs == ["gave up"] and len(lock._line) == 0
    finally:
        llm_mod.DEFERRED.check = real_check
    lock.release()
    assert lock._owner is None and lock._depth == 0
    order.clear()
    call("d")
    assert order == ["d"]
    assert_still_works(llm, baseline)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_while_another_thread_calls_raises_instead_of_waiting(llm, baseline):
    """A process forked while another Python thread ran a call (a server thread) has no such
    thread: its LLM's lock was never let go, and every call of the child waited for good.
    They raise, saying what to do; a fork while no call runs, or from inside the forking
    thread's own call, is as before."""
    import signal
    lock = llm._lock

    def child_exit_code(check) -> int:
        pid = os.fork()
        if pid == 0:
            signal.alarm(20)  # (a hang ends the child with SIGALRM)
            try:
                code = 0 if check() else 1
            except BaseException:
                code = 2
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)

    def refused():
        try:
            llm.cache_stats()
        except RuntimeError as e:
            return "forked" in str(e) and "new LLM" in str(e) and lock.acquire(blocking=False) is False
        return False

    with engine_held(llm):  # (an engine call running in another thread)
        assert child_exit_code(refused) == 0
    assert child_exit_code(lambda: isinstance(llm.cache_stats(), dict)) == 0  # (no call running)
    with lock:  # this thread's own call: the child holds the lock as its forking thread did
        assert child_exit_code(lambda: isinstance(llm.cache_stats(), dict) and lock._depth == 1) == 0
    # a thread waiting in line, or inside the lock's bookkeeping, at the fork: the child has
    # neither; its calls do not wait for them
    import threading

    def let_go_and_call():
        lock.release()
        return isinstance(llm.cache_stats(), dict) and lock.acquire(blocking=False)
    with lock:
        waiter = threading.Thread(target=llm.cache_stats)
        waiter.start()
        assert wait_in_line(lock, 1)
        assert child_exit_code(let_go_and_call) == 0
    waiter.join(10)
    inside, leave = threading.Event(), threading.Event()

    def in_bookkeeping():
        with lock._cv:
            inside.set()
            leave.wait(10)
    t = threading.Thread(target=in_bookkeeping)
    t.start()
    try:
        assert inside.wait(10)
        assert child_exit_code(lambda: isinstance(llm.cache_stats(), dict)) == 0
    finally:
        leave.set()
        t.join(10)
    assert_still_works(llm, baseline)


def test_calls_from_inside_a_running_call(llm, baseline):
    """A protocol's callback that calls the engine again (here extract_answer) is refused
    with one clear error instead of running a step inside a step; a protocol that raises
    (in start, or a callback in its outputs) leaves no pages or reservations behind, and
    the engine goes on."""
    from engine.protocols import ParallelSampling

    def judge(text):
        return llm.generate([baseline[0]], greedy(2))[0].outputs[0].text

    def broken(text):
        raise KeyError("no answer")

    class NoStart(ParallelSampling):
        def start(self, *args, **kwargs):
            raise LookupError("cannot start")

    sp = SP(n=2, temperature=1.0, max_tokens=4, seed=0)
    with pytest.raises(LookupError, match="cannot start"):  # after its pages were reserved
        llm.generate([baseline[0], baseline[0]], sp, protocol=NoStart())
    assert_no_leak(llm)
    assert llm.cache_stats()["pages_reserved"] == 0
    with pytest.raises(RuntimeError, match=r"LLM.generate\(\) was called while this LLM runs LLM.generate\(\)"):
        llm.generate([baseline[0]], sp, protocol=ParallelSampling(select="majority", extract_answer=judge))
    assert_no_leak(llm)
    with pytest.raises(KeyError, match="no answer"):
        llm.generate([baseline[0]], sp, protocol=ParallelSampling(select="majority", extract_answer=broken))
    assert_no_leak(llm)
    with llm.session(baseline[0]) as s:
        (a,) = s.fork(s.root, [[]])
        s.generate([a], greedy(2))
        assert llm.cache_stats()["pages_used"] > 0  # (the session holds its pages until closed)
    assert_still_works(llm, baseline)


def test_step_interrupted_in_the_forward(llm, baseline, monkeypatch):
    """Ctrl-C (or any error) in the middle of a step's forward: the segments go back to
    their lengths and pages to their owners, so a session goes on exactly as if the step
    had not run (its pending tokens are written once, not twice)."""
    prompt = random_ids(21, VOCAB, seed=9)

    def session_run(interrupt: bool):
        with llm.session(prompt) as s:
            a, b = s.fork(s.root, [[3, 4], [5]])
            if interrupt:
                real = llm.model.forward
                calls = []

                def failing(*args, **kwargs):
                    calls.append(1)
                    if len(calls) == 1:  # the step that writes the prompt and both headers
                        raise KeyboardInterrupt
                    return real(*args, **kwargs)
                monkeypatch.setattr(llm.model, "forward", failing)
                with pytest.raises(KeyboardInterrupt):
                    s.generate([a, b], greedy(6))
                assert s.root._t.seg.length == 0 and not s.root._t.seg.pages  # nothing was written
                monkeypatch.setattr(llm.model, "forward", real)
            out = [o.token_ids for o in s.generate([a, b], greedy(6))]
            used = llm.cache_stats()["pages_used"]
        return out, used

    assert session_run(True) == session_run(False)
    assert_still_works(llm, baseline)


def test_non_finite_logits(tmp_path, model_dir, llm, baseline):
    """A model whose logits come out NaN (here: a NaN weight) gets one clear error for greedy
    and sampled rows alike (greedy used to return token 0 silently), and leaks nothing."""
    from engine import LLM
    from safetensors.torch import load_file, save_file
    d = tmp_path / "nan_model"
    shutil.copytree(model_dir(NAME), d)
    w = load_file(str(d / "model.safetensors"))
    name = next(k for k in w if k.endswith("mlp.down_proj.weight"))
    w[name] = torch.full_like(w[name], float("nan"))
    save_file(w, str(d / "model.safetensors"))
    bad = LLM(str(d), kv_cache_tokens=1024)
    for sp in (greedy(3), SP(temperature=1.0, max_tokens=3, seed=0), SP(temperature=0.7, top_p=0.9, max_tokens=3)):
        with pytest.raises(FloatingPointError, match="logits are not finite"):
            bad.generate([baseline[0]], sp)
        assert_no_leak(bad)
    assert_still_works(llm, baseline)


def test_non_finite_logits_name_the_prompts_they_come_from(tmp_path, model_dir):
    """NaN logits from some prompts only (a NaN embedding row: the prompts with that token)
    fail the call, as any: the error said 'batch rows [...]', an index the caller never saw;
    it names the prompts of the call they come from. The engine is whole after it."""
    from engine import LLM
    from safetensors.torch import load_file, save_file
    d = tmp_path / "nan_row"
    shutil.copytree(model_dir("llama"), d)  # (untied: the NaN row is not also the lm_head's)
    w = load_file(str(d / "model.safetensors"))
    w["model.embed_tokens.weight"][7] = float("nan")
    save_file(w, str(d / "model.safetensors"))
    bad = LLM(str(d), kv_cache_tokens=1024)
    good = [[5, 6, 8], [9, 10]]
    want = [o.outputs[0].token_ids for o in bad.generate(good, greedy(3))]
    with pytest.raises(FloatingPointError, match=r"not finite .* They come from prompt 1 of this call \(0-based\); "
                                                 r"the call gives no outputs: run the other prompts without it\.$"):
        bad.generate([good[0], [5, 7, 8], good[1]], greedy(3))
    with pytest.raises(FloatingPointError, match=r"They come from prompts 0, 2 of this call .* without them\.$"):
        bad.generate([[7], good[0], [7, 5]], SP(n=2, temperature=1.0, max_tokens=3, seed=0))
    assert_no_leak(bad)
    assert [o.outputs[0].token_ids for o in bad.generate(good, greedy(3))] == want
    # a FloatingPointError of the caller's own code (an answer extractor's) is raised as it was
    from engine.protocols import ParallelSampling

    def extract(text):
        raise FloatingPointError("overflow in the extractor", 2)
    with pytest.raises(FloatingPointError) as e:
        bad.generate(good, SP(n=2, max_tokens=2, seed=0), protocol=ParallelSampling(select="majority",
                                                                                      extract_answer=extract))
    assert e.value.args == ("overflow in the extractor", 2)
    assert_no_leak(bad)


def test_non_finite_logits_in_a_session_name_the_threads_of_the_call(tmp_path, model_dir):
    """A session's generate whose threads give NaN logits names them by their place in the
    call's list (and their ids): the error said only 'batch rows [1]', an index into the threads
    still sampling at that step, here not the caller's (its first thread ended at once)."""
    from engine import LLM
    from safetensors.torch import load_file, save_file
    d = tmp_path / "nan_row_short"
    shutil.copytree(model_dir("llama"), d)
    w = load_file(str(d / "model.safetensors"))
    w["model.embed_tokens.weight"][7] = float("nan")
    save_file(w, str(d / "model.safetensors"))
    cfg = read_json(str(d / "config.json"))
    write_json(str(d / "config.json"), {**cfg, "max_position_embeddings": 32})
    bad = LLM(str(d), kv_cache_tokens=1024)
    with bad.session([5, 6, 8]) as s:
        full, good, nan = s.fork(s.root, [[9] * 29, [10], [7]])  # (full: no room for a token)
        with pytest.raises(FloatingPointError, match=r"not finite .* They come from the thread at position 2 of "
                                                     rf"this call's list \(0-based; thread id {nan.id}\)\.$"):
            s.generate([full, good, nan], greedy(3))
        # (the threads are left stopped where they are: those the failed step left unfinished
        # end "abort", the one that had ended keeps its reason)
        assert [h._t.finish_reason for h in (full, good, nan)] == ["length", "abort", "abort"]
        nan1, good, nan2 = s.fork(s.root, [[7], [10], [7, 5]])
        with pytest.raises(FloatingPointError, match=r"not finite .* They come from the threads at positions 0, 2 "
                                                     rf"of this call's list \(0-based; thread ids {nan1.id}, "
                                                     rf"{nan2.id}\)\.$"):
            s.generate([nan1, good, nan2], greedy(3))
    assert_no_leak(bad)


def test_unsupported_device(model_dir, llm, baseline):
    from engine import LLM
    for dev in ("tpu", "mps", "meta", 3.5):
        with pytest.raises(ValueError, match=f"device={dev!r} is not supported; Loom runs on 'cpu' or 'cuda'"):
            LLM(model_dir(NAME), device=dev)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            LLM(model_dir(NAME), device="cuda:0")
    # a CPU device with an index is the CPU (not checked against the CUDA devices)
    assert_still_works(LLM(model_dir(NAME), device="cpu:0", kv_cache_tokens=1024), baseline)
    assert_still_works(llm, baseline)


def test_cuda_device_index_past_the_visible_gpus(model_dir, monkeypatch):
    """device='cuda:1' on a machine where torch sees one GPU: one clear error before the
    checkpoint is opened (was CUDA's 'invalid device ordinal', with its CUDA_LAUNCH_BLOCKING
    advice, from the first tensor moved there). One GPU is faked: only the refusal runs."""
    from engine import LLM
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"device='cuda:1' but torch sees 1 CUDA device \(cuda:0\); pick one"):
        LLM(model_dir(NAME), device="cuda:1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"device='cuda:5' but torch sees 2 CUDA devices \(cuda:0 \.\. cuda:1\)"):
        LLM(model_dir(NAME), device="cuda:5")


def test_kv_cache_tokens_between_pages_rounded_up(model_dir):
    """kv_cache_tokens between two whole pages: the cache holds at least that many tokens (it
    held the pages below it: 100 tokens asked, 96 made, a 100-token score refused), and says
    what it made."""
    from engine import LLM
    small = LLM(model_dir(NAME), kv_cache_tokens=100, page_size=PS)
    assert (small.cache.num_pages, small.kv_cache_tokens) == (7, 112)
    assert small.score(random_ids(100, VOCAB, seed=1))[0].shape == (100, VOCAB)
    assert LLM(model_dir(NAME), kv_cache_tokens=96, page_size=PS).kv_cache_tokens == 96
    one = LLM(model_dir(NAME), kv_cache_tokens=PS, page_size=PS)  # (the least: one page)
    assert one.kv_cache_tokens == PS and one.score(random_ids(PS, VOCAB, seed=1))[0].shape == (PS, VOCAB)


def test_cache_too_large_to_allocate(model_dir, llm, baseline, monkeypatch):
    import engine.llm as L
    from engine import LLM
    # more than the machine's available memory: refused up front (on the CPU the pages are
    # taken as they are written: the process was killed when the cache filled)
    per_tok = llm.cache.bytes_per_token
    monkeypatch.setattr(L, "available_memory", lambda: 1000 * per_tok)
    with pytest.raises(ValueError, match=r"kv_cache_tokens=1,001 \(1,008 in whole pages of 16\) .* is more than this "
                                         r"machine's available memory .*lower kv_cache_tokens \(at most 992\)"):
        LLM(model_dir(NAME), kv_cache_tokens=1001)
    with pytest.raises(ValueError, match=r"kv_cache_tokens=1,008 \(\d"):  # (whole pages already: said once)
        LLM(model_dir(NAME), kv_cache_tokens=1008)
    assert LLM(model_dir(NAME), kv_cache_tokens=992).cache.num_pages == 62
    assert LLM(model_dir(NAME)).cache.num_pages * PS <= 500  # (the default: at most half of it)
    # the default cache is at least one page: a page larger than the available memory was made
    # anyway (1,024 tokens here: the process would be killed when it filled), now refused
    with pytest.raises(ValueError, match=r"page_size=1,024 .* is more than this machine's available memory .*"
                                         r"lower page_size \(at most 1,000\)"):
        LLM(model_dir(NAME), page_size=1024)
    assert LLM(model_dir(NAME), page_size=1000).cache.num_pages == 1  # (one page: all of it, as asked)
    monkeypatch.setattr(L, "available_memory", lambda: 992 * per_tok)
    assert LLM(model_dir(NAME), kv_cache_tokens=992).cache.num_pages == 62  # (exactly all of it: taken)
    # where the available memory is unknown: petabytes, past the address space of a process
    monkeypatch.setattr(L, "available_memory", lambda: None)
    with pytest.raises(ValueError, match=r"KV cache of [0-9,]+ tokens .* could not be allocated on "
                                         r"cpu .*lower kv_cache_tokens"):
        LLM(model_dir(NAME), kv_cache_tokens=10**14, page_size=2**20)
    with pytest.raises(ValueError, match="page ids are int32"):
        LLM(model_dir(NAME), kv_cache_tokens=10**14)
    assert_still_works(llm, baseline)


def test_default_cache_size_is_as_documented(model_dir, monkeypatch):
    """kv_cache_tokens=None: 2 GiB of K/V or 262,144 tokens, whichever is fewer, and on the CPU at
    most half the available memory, in whole pages; available_memory() is MemAvailable in bytes."""
    import engine.llm as L
    from engine import LLM
    import io
    meminfo = "MemTotal:       16337724 kB\nMemFree:         1048576 kB\nMemAvailable:    7654321 kB\n"
    monkeypatch.setattr(L, "open", lambda path: io.StringIO(meminfo if path == "/proc/meminfo" else ""),
                        raising=False)
    assert L.available_memory() == 7654321 * 1024
    monkeypatch.delattr(L, "open")
    assert L.available_memory() > 0  # (this machine's)
    monkeypatch.setattr(L, "available_memory", lambda: None)
    tiny = LLM(model_dir(NAME))  # (512 bytes a token: 2 GiB would be 4M tokens)
    assert tiny.cache.bytes_per_token * 262_144 < 2 << 30 and tiny.kv_cache_tokens == 262_144
    monkeypatch.setattr(L, "kv_token_bytes", lambda *a: 3 << 13)  # (2 GiB: 87,381.3 tokens)
    assert LLM(model_dir(NAME)).kv_cache_tokens == 87_381 // PS * PS
    monkeypatch.setattr(L, "available_memory", lambda: 1000 * (3 << 13))  # (half: 500 tokens)
    assert LLM(model_dir(NAME)).kv_cache_tokens == 500 // PS * PS
    # a page larger than the default cache, where the free memory is not known (a GPU): the
    # page size named, not a kv_cache_tokens the caller did not give
    monkeypatch.setattr(L, "available_memory", lambda: None)
    with pytest.raises(ValueError, match=r"^page_size=131,072 is more than the default KV cache holds \(87,381 "
                                         r"tokens: 2 GiB at 24,576 bytes a token, at most 262,144\); lower "
                                         r"page_size, or give kv_cache_tokens \(at least one page\)\.$"):
        LLM(model_dir(NAME), page_size=1 << 17)
    assert LLM(model_dir(NAME), page_size=1 << 17, kv_cache_tokens=1 << 17).cache.num_pages == 1


def test_unsupported_architecture(tmp_path, model_dir, llm, baseline):
    from engine import LLM
    d = str(tmp_path / "gpt2")
    shutil.copytree(model_dir(NAME), d)
    cfg = read_json(os.path.join(d, "config.json"))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    cfg["model_type"] = "gpt2"
    write_json(os.path.join(d, "config.json"), cfg)
    with pytest.raises(ValueError) as e:
        LLM(d)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg, msg
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        assert arch in msg, f"supported architecture {arch} not listed: {msg}"
    assert_still_works(llm, baseline)


def test_damaged_checkpoint_files(tmp_path, model_dir, llm, baseline):
    """A truncated or corrupt weights file, and an index without its weight map: one error
    that names the file and says to fetch it again (not the safetensors library's own)."""
    from engine import LLM
    src = model_dir(NAME)
    data = open(os.path.join(src, "model.safetensors"), "rb").read()
    for name, content in [("truncated", data[: len(data) // 2]), ("corrupt", b"not a safetensors file" * 4)]:
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "model.safetensors").write_bytes(content)
        with pytest.raises(ValueError, match="not a readable safetensors file.*download it again") as e:
            LLM(str(d))
        assert str(d / "model.safetensors") in str(e.value), str(e.value)
    d = tmp_path / "bad_index"
    shutil.copytree(src, d)
    os.rename(d / "model.safetensors", d / "model-00001-of-00001.safetensors")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="index.json is not a valid safetensors index.*weight_map"):
        LLM(str(d))
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": 1}}')
    with pytest.raises(ValueError, match="not a valid safetensors index.*weight_map names 1, not a shard"):
        LLM(str(d))
    assert_still_works(llm, baseline)


def test_tensors_in_two_files(tmp_path, model_dir, llm, baseline):
    """Without an index, a tensor in two .safetensors files is refused, naming both (one
    of them silently won: a stray file of some tensors changed the model); with an index
    each tensor comes from the shard it names, as in transformers."""
    from safetensors.torch import load_file, save_file
    from engine import LLM
    prompt = random_ids(9, VOCAB, seed=5)
    want = llm.score(prompt)[0]
    d = _copy_model(tmp_path, model_dir, "stray")
    w = load_file(os.path.join(d, "model.safetensors"))
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "model-00001-of-00001.safetensors"))
    save_file({"model.norm.weight": torch.zeros_like(w["model.norm.weight"])}, os.path.join(d, "old-norm.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' is in both .*model-00001-of-00001.safetensors and "
                                         ".*old-norm.safetensors; remove the file"):
        LLM(d, kv_cache_tokens=256)
    write_json(os.path.join(d, "model.safetensors.index.json"),
               {"metadata": {}, "weight_map": {k: "model-00001-of-00001.safetensors" for k in w}})
    assert torch.equal(LLM(d, kv_cache_tokens=256).score(prompt)[0], want)
    assert_still_works(llm, baseline)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc/self/maps")
@pytest.mark.parametrize("dtype,kw", [("float32", {}), ("float16", {}), ("float32", {"attention_backend": "torch"})])
def test_a_loaded_model_holds_no_map_of_its_checkpoint(tmp_path, model_dir, dtype, kw):
    """safetensors hands out tensors over a map of the whole file: a weight kept as loaded
    (a norm, the embedding, a float16 model's unpacked linears) kept every page of the file
    resident for the life of the engine (1.6 GB beside a 0.6B model's 2.4 GB of float32)."""
    import gc
    from engine import LLM
    d = tmp_path / "copy"
    shutil.copytree(model_dir("qwen2"), d)  # (biases: kept ones and concatenated ones)
    path = str(d / "model.safetensors")
    llm = LLM(str(d), dtype=dtype, **kw)
    gc.collect()
    with open("/proc/self/maps") as f:
        maps = [line for line in f if line.rstrip().endswith(path)]
    assert not maps, maps
    assert llm.generate([[3, 4, 5]], greedy(2))[0].outputs[0].token_ids


def test_pickled_weights_only(tmp_path, model_dir, llm, baseline):
    from engine import LLM
    from safetensors.torch import load_file
    src = model_dir(NAME)
    d = tmp_path / "bin_only"
    d.mkdir()
    for f in os.listdir(src):
        if not f.endswith(".safetensors"):
            shutil.copy(os.path.join(src, f), d / f)
    torch.save(load_file(os.path.join(src, "model.safetensors")), d / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        LLM(str(d))
    assert "safetensors" in str(e.value), str(e.value)
    assert_still_works(llm, baseline)


def _copy_model(tmp_path, model_dir, name: str, variant: str = NAME) -> str:
    d = str(tmp_path / name)
    shutil.copytree(model_dir(variant), d)
    return d


def test_weights_that_disagree_with_the_config(tmp_path, model_dir, llm, baseline):
    """Every tensor's shape is checked against config.json at load: one ValueError naming the
    tensor, its shape and the config fields (a wrong v_proj / down_proj / norm / lm_head used
    to load and fail in the first forward, or silently give logits of the wrong width)."""
    from engine import LLM
    from safetensors.torch import load_file, save_file
    cases = [("model.layers.0.self_attn.v_proj.weight", lambda t: t[: t.shape[0] // 2]),
             ("model.layers.0.mlp.down_proj.weight", lambda t: t[:, :-3]),
             ("model.layers.1.input_layernorm.weight", lambda t: torch.cat([t, t[:1]])),
             ("lm_head.weight", lambda t: t[:-1])]
    for i, (name, cut) in enumerate(cases):
        d = _copy_model(tmp_path, model_dir, f"shape{i}", "llama")  # (untied: has lm_head)
        f = os.path.join(d, "model.safetensors")
        w = load_file(f)
        w[name] = cut(w[name]).contiguous()
        save_file(w, f, metadata={"format": "pt"})
        with pytest.raises(ValueError, match="config and the weights disagree") as e:
            LLM(d, kv_cache_tokens=256)
        assert name in str(e.value) and str(tuple(w[name].shape)) in str(e.value), str(e.value)
    d = _copy_model(tmp_path, model_dir, "intermediate")
    cfg = read_json(os.path.join(d, "config.json"))
    cfg["intermediate_size"] += 4
    write_json(os.path.join(d, "config.json"), cfg)
    with pytest.raises(ValueError, match="intermediate_size"):
        LLM(d, kv_cache_tokens=256)
    assert_still_works(llm, baseline)


def test_biases_and_norms_the_config_does_not_declare(tmp_path, model_dir, llm, baseline):
    """A bias or q/k norm in the weights that the config does not declare (transformers drops
    it and computes another model) is refused, not silently added to the computation; one the
    config declares but the file lacks is named as missing."""
    from engine import LLM
    from safetensors.torch import load_file, save_file
    cases = [("llama", "model.layers.0.self_attn.q_proj.bias", 64),      # attention_bias false
             ("llama", "model.layers.1.self_attn.k_norm.weight", 16),    # a Llama has no q/k norms
             ("llama", "model.layers.0.mlp.down_proj.bias", 64),         # mlp_bias false
             ("qwen2", "model.layers.0.self_attn.o_proj.bias", 96),      # Qwen2: q/k/v biases only
             ("mistral", "model.layers.0.self_attn.v_proj.bias", 16)]    # Mistral: no biases
    for i, (variant, name, n) in enumerate(cases):
        d = _copy_model(tmp_path, model_dir, f"extra{i}", variant)
        f = os.path.join(d, "model.safetensors")
        w = load_file(f)
        w[name] = torch.randn(n)
        save_file(w, f, metadata={"format": "pt"})
        with pytest.raises(ValueError, match="does not use.*config and weights disagree") as e:
            LLM(d, kv_cache_tokens=256)
        assert name in str(e.value), str(e.value)
    d = _copy_model(tmp_path, model_dir, "missing_bias", "llama_bias")
    f = os.path.join(d, "model.safetensors")
    w = load_file(f)
    del w["model.layers.1.mlp.up_proj.bias"]
    save_file(w, f, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing tensor 'model.layers.1.mlp.up_proj.bias'"):
        LLM(d, kv_cache_tokens=256)
    assert_still_works(llm, baseline)


@pytest.mark.parametrize("arch,fields", [
    ("MistralForCausalLM", dict(sliding_window=8)),
    ("MistralForCausalLM", dict(sliding_window=8, use_sliding_window=False)),  # (not Mistral's field)
    ("MistralForCausalLM", dict(sliding_window=None)),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)),
    ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=3)),
    ("Qwen2ForCausalLM", dict(use_sliding_window=False, sliding_window=8, max_window_layers=0)),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=8,
                              layer_types=["full_attention", "sliding_attention", "full_attention"])),
    ("Qwen3ForCausalLM", dict(use_sliding_window=True, sliding_window=8, max_window_layers=5)),
    ("LlamaForCausalLM", dict(sliding_window=8, use_sliding_window=True)),
])
def test_sliding_window_as_transformers_applies_it(arch, fields):
    """Loom attends the whole context, so a model whose transformers modules use a sliding
    window on some layer has its context capped at the window (exact inside it); one whose
    layers all attend the whole context (Qwen2 / Qwen3 with the window off, or on no layer)
    keeps its full context. Compared with the window transformers' own config gives each
    layer."""
    from engine.config import ModelConfig
    from conftest import _hf_classes
    config_cls, _ = _hf_classes(arch)
    raw = dict(architectures=[arch], vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
               max_position_embeddings=128, **fields)
    hf = config_cls(**{k: v for k, v in raw.items() if k != "architectures"})
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    sliding = getattr(hf, "sliding_window", None)
    windowed = sliding is not None and "sliding_attention" in types and arch != "LlamaForCausalLM"
    # (LlamaAttention has no window, whatever the config says)
    want = min(128, sliding) if windowed else 128
    assert ModelConfig.from_dict(raw).max_position_embeddings == want, (hf.sliding_window, types)


def test_sliding_window_absent_or_malformed():
    """A Mistral config without sliding_window has transformers' default window, 4096 (an
    explicit null: none); a window that is not a positive integer is refused."""
    from transformers import MistralConfig
    from engine.config import ModelConfig
    raw = dict(architectures=["MistralForCausalLM"], vocab_size=64, hidden_size=32, intermediate_size=64,
               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32768)
    assert MistralConfig(**{k: v for k, v in raw.items() if k != "architectures"}).sliding_window == 4096
    assert ModelConfig.from_dict(raw).max_position_embeddings == 4096
    assert ModelConfig.from_dict({**raw, "sliding_window": None}).max_position_embeddings == 32768
    for bad in (True, -1, 2.5, "4096"):
        with pytest.raises(ValueError, match="sliding_window=.* must be a positive integer or null"):
            ModelConfig.from_dict({**raw, "sliding_window": bad})


def _tokenizer_with_eos_beyond(d: str, vocab: int):
    """tokenizer.json with one more special token, id ``vocab`` (past the model's rows), named
    eos_token by tokenizer_config.json."""
    from tokenizers import AddedToken, Tokenizer
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    tok.add_special_tokens([AddedToken("<|far_eos|>", special=True)])
    assert tok.token_to_id("<|far_eos|>") == vocab
    tok.save(os.path.join(d, "tokenizer.json"))
    tc = read_json(os.path.join(d, "tokenizer_config.json"))
    write_json(os.path.join(d, "tokenizer_config.json"), {**tc, "eos_token": "<|far_eos|>"})


def test_damaged_config_and_tokenizer_files(tmp_path, model_dir, llm, baseline):
    """Each damaged or unsupported file gets one ValueError (or FileNotFoundError) that names
    it; none escapes as a library's KeyError / AttributeError / bare Exception."""
    from engine import LLM

    def damaged(name, edit):
        d = _copy_model(tmp_path, model_dir, name)
        edit(d)
        return d

    def set_cfg(key, value):
        def edit(d):
            cfg = read_json(os.path.join(d, "config.json"))
            cfg[key] = value
            write_json(os.path.join(d, "config.json"), cfg)
        return edit

    def write(file, text):
        return lambda d: open(os.path.join(d, file), "w").write(text)

    rope = {k: v for k, v in VARIANTS[NAME]["rope"].items() if k != "low_freq_factor"}
    cases = [
        ("cfg_list", write("config.json", "[1, 2]"), "must hold a JSON object"),
        ("tok_corrupt", write("tokenizer.json", '{"version": 1, 2}'), "tokenizer.json is not a readable"),
        ("tokcfg_json", write("tokenizer_config.json", "{oops"), "tokenizer_config.json is not valid JSON"),
        ("gencfg_json", write("generation_config.json", "{oops"), "generation_config.json is not valid JSON"),
        ("rope_field", set_cfg("rope_parameters", rope), "needs 'low_freq_factor'"),
        ("partial_rotary", set_cfg("partial_rotary_factor", 0.5), "partial_rotary_factor=0.5: Loom rotates whole"),
        ("partial_rotary_rope", set_cfg("rope_parameters", {"rope_type": "default", "rope_theta": 1e4,
                                                           "partial_rotary_factor": 0.25}), "partial_rotary_factor=0.25"),
        ("quantized", set_cfg("quantization_config", {"quant_method": "gptq", "bits": 4}), "quantized"),
        ("float64", set_cfg("dtype", "float64"), "torch_dtype 'float64'.*pass dtype="),
        ("heads_zero", set_cfg("num_attention_heads", 0), "num_attention_heads=0 must be a positive integer"),
        ("kv_heads_zero", set_cfg("num_key_value_heads", 0), "num_key_value_heads=0 must be a positive integer"),
        ("hidden_str", set_cfg("hidden_size", "64"), "hidden_size='64' must be a positive integer"),
        ("layers_missing", set_cfg("num_hidden_layers", None), "lacks the required field 'num_hidden_layers'"),
        ("eps_negative", set_cfg("rms_norm_eps", -1e-6), "rms_norm_eps=-1e-06 must be a number >= 0"),
        ("theta_null", set_cfg("rope_parameters", {**VARIANTS[NAME]["rope"], "rope_theta": None}),
         "rope_theta=None must be a number > 1"),
        ("theta_str", set_cfg("rope_parameters", {**VARIANTS[NAME]["rope"], "rope_theta": "abc"}),
         "rope_theta='abc' must be a number > 1"),
        ("theta_negative", set_cfg("rope_parameters", {**VARIANTS[NAME]["rope"], "rope_theta": -1e4}),
         "rope_theta=-10000.0 must be a number > 1"),
        ("factor_zero", set_cfg("rope_parameters", {**VARIANTS[NAME]["rope"], "factor": 0}),
         "'llama3': factor=0 must be a number > 0"),
        ("yarn_mscale", set_cfg("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "mscale": "x", "rope_theta": 1e4}),
         "'yarn': mscale='x' must be a number > 0"),
        ("rope_list", set_cfg("rope_scaling", [1, 2]), r"rope_scaling=\[1, 2\] must be an object"),
        ("rope_str", set_cfg("rope_scaling", "linear"), "rope_scaling='linear' must be an object"),
        ("rope_nested", set_cfg("rope_parameters", {"full_attention": {"rope_type": "default"}}),
         "RoPE parameters per layer type"),
        ("rope_type_int", set_cfg("rope_parameters", {"rope_type": 3}), "rope_type=3 must be a string"),
        ("theta_ambiguous", lambda d: (set_cfg("rope_parameters", {"rope_type": "default", "rope_theta": 5e5})(d),
                                       set_cfg("rope_scaling", {"rope_type": "linear", "factor": 2.0})(d)),
         "transformers reads rope_scaling alone, whose rope_theta is missing"),
        ("eos_null_item", set_cfg("eos_token_id", [1, None]), r"eos_token_id=\[1, None\] must be a token id"),
        ("eos_str", set_cfg("eos_token_id", "abc"), "eos_token_id='abc' must be a token id"),
        ("archs_str", set_cfg("architectures", "LlamaForCausalLM"), "architectures='LlamaForCausalLM' must be a list"),
        ("cfg_utf16", lambda d: open(os.path.join(d, "config.json"), "wb").write(
            open(os.path.join(model_dir(NAME), "config.json")).read().encode("utf-16")),
         "config.json is not UTF-8 text .* save it as UTF-8"),
        ("tmpl_latin1", lambda d: open(os.path.join(d, "chat_template.jinja"), "wb").write("é{{ x }}".encode("latin-1")),
         "chat_template.jinja is not UTF-8 text"),
        ("add_bos_str", lambda d: write_json(os.path.join(d, "tokenizer_config.json"), {
            **read_json(os.path.join(d, "tokenizer_config.json")), "add_bos_token": "false"}),
         "add_bos_token='false' must be true or false"),
        ("gencfg_list", write("generation_config.json", "[1]"), "generation_config.json must hold a JSON object"),
        ("gencfg_eos_float", write("generation_config.json", '{"eos_token_id": 1.7}'),
         "generation_config.json's eos_token_id=1.7 must be a token id"),
        ("gencfg_eos_bool", write("generation_config.json", '{"eos_token_id": true}'),
         "eos_token_id=True must be a token id"),
        ("gencfg_eos_range", write("generation_config.json", f'{{"eos_token_id": [{VOCAB}, 100000]}}'),
         rf"generation_config.json's eos_token_id \[{VOCAB}, 100000\] is outside the model's vocabulary"),
        ("tok_eos_range", lambda d: (
            os.remove(os.path.join(d, "generation_config.json")) if os.path.exists(os.path.join(d, "generation_config.json"))
            else None, set_cfg("eos_token_id", None)(d), _tokenizer_with_eos_beyond(d, VOCAB)),
         rf"the tokenizer's eos_token '<\|far_eos\|>' \(tokenizer_config.json\), id {VOCAB} is outside"),
    ]
    for name, edit, pattern in cases:
        d = damaged(name, edit)
        with pytest.raises(ValueError, match=pattern):
            LLM(d, kv_cache_tokens=256)
    # the float64 config loads when the caller names a dtype
    f64 = LLM(os.path.join(tmp_path, "float64"), dtype="float32", kv_cache_tokens=256)
    assert f64.dtype == torch.float32
    # a file given instead of the directory
    f = os.path.join(model_dir(NAME), "config.json")
    with pytest.raises(FileNotFoundError, match="is a file; pass the model directory"):
        LLM(f)
    # constructor arguments are checked before the weights are read
    for kw, pattern in [(dict(page_size=True), "page_size"), (dict(seed=1.5), "seed"),
                        (dict(kv_cache_tokens=8, page_size=16), "kv_cache_tokens")]:
        with pytest.raises(ValueError, match=pattern):
            LLM(model_dir(NAME), **kw)
    assert_still_works(llm, baseline)


def test_config_spellings_transformers_accepts(tmp_path, model_dir, llm, baseline):
    """A config with model_type and no architectures, and a directory holding model.safetensors
    next to a stale sharded index (a sharded save_pretrained, then a single-file one into the
    same directory): transformers loads both, and so does Loom, with the same logits."""
    from engine import LLM
    prompt = random_ids(9, VOCAB, seed=5)
    want = llm.score(prompt)[0]
    d = _copy_model(tmp_path, model_dir, "model_type_only")
    cfg = read_json(os.path.join(d, "config.json"))
    del cfg["architectures"]
    write_json(os.path.join(d, "config.json"), cfg)
    assert torch.equal(LLM(d, kv_cache_tokens=256).score(prompt)[0], want)
    d = _copy_model(tmp_path, model_dir, "stale_index")
    write_json(os.path.join(d, "model.safetensors.index.json"),
               {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})
    assert torch.equal(LLM(d, kv_cache_tokens=256).score(prompt)[0], want)
    # EOS ids of which only some are in the vocabulary (the others are never sampled): loads
    d = _copy_model(tmp_path, model_dir, "eos_some_in_range")
    write_json(os.path.join(d, "generation_config.json"), {"eos_token_id": [EOS_ID, VOCAB + 7]})
    assert LLM(d, kv_cache_tokens=256).eos_ids == [EOS_ID, VOCAB + 7]
    assert_still_works(llm, baseline)


def test_chat_prompt_has_the_templates_bos_only(tmp_path, model_dir):
    """A template that writes BOS itself (Llama 3's) on a tokenizer that adds BOS: the chat
    prompt holds it once, as transformers' apply_chat_template(tokenize=True) (the rendered
    text is not encoded with special tokens)."""
    from transformers import AutoTokenizer
    from engine import LLM
    d = _copy_model(tmp_path, model_dir, "chat_bos")
    _byte_level_tokenizer(d, post_bos=True, add_bos=True, vocab=VOCAB)
    cfg = read_json(os.path.join(d, "tokenizer_config.json"))
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    write_json(os.path.join(d, "tokenizer_config.json"), cfg)
    conv = [{"role": "user", "content": "hello world"}]
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(conv, tokenize=True, add_generation_prompt=False,
                                                                return_dict=False)
    bos = AutoTokenizer.from_pretrained(d).bos_token_id
    assert want[0] == bos and want.count(bos) == 1
    eng = LLM(d, kv_cache_tokens=256)
    out = eng.chat(conv, SP(max_tokens=1, temperature=0), add_generation_prompt=False)[0]
    assert list(out.prompt_token_ids) == want


def test_special_tokens_as_added_token_objects_and_from_special_tokens_map(tmp_path):
    """tokenizer_config.json may spell a special token as an AddedToken object ({"content":
    "<s>", ...}, Llama 2 / Mistral files) and special_tokens_map.json overrides its tokens: bos /
    eos, BOS added by add_bos_token and the tokens a chat template sees are the ones
    transformers reads from these files (its AutoTokenizer: "<s>|</s>|</s>|</s>|hi")."""
    from engine.tokenizer import Tokenizer
    d = str(tmp_path / "special")
    _byte_level_tokenizer(d)
    added = lambda s: {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False}
    write_json(os.path.join(d, "tokenizer_config.json"), {
        "bos_token": added("<s>"), "eos_token": added("<s>"), "unk_token": "</s>", "add_bos_token": True,
        "chat_template": "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ pad_token }}|{{ messages[0]['content'] }}"})
    write_json(os.path.join(d, "special_tokens_map.json"), {"eos_token": added("</s>"), "pad_token": "</s>"})
    tok = Tokenizer(d)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "</s>", "pad_token": "</s>"}
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>|</s>|</s>|</s>|hi"
    assert tok.encode("hi") == [tok.token_to_id("<s>")] + tok.encode("hi", add_special_tokens=False)

NAMED_TOKENS_TEMPLATE = ("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ my_token }}|"
                         "{{ img_token }}|{{ messages[0]['content'] }}")
_ADDED = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
          "single_word": False}
_DECODER = {"added_tokens_decoder": {"1": {**{k: v for k, v in _ADDED.items() if k != "__type"}, "special": True}}}


@pytest.mark.parametrize("cfg,smap", [
    ({}, {"bos_token": None}),                                   # null removes the config's BOS
    (_DECODER, {"bos_token": "</s>"}),                           # a config with added_tokens_decoder:
    (_DECODER, {"bos_token": None, "my_token": "<m>"}),          # transformers ignores the map
    ({}, {"my_token": "<m>", "img_token": {"content": "<i>"}}),  # other *_token names, as text or object
    ({"my_token": "<c>", "img_token": _ADDED}, None),
    ({"my_token": "<c>"}, {"my_token": "<m>"}),                  # the config's name wins over the map's
    ({"my_token": 5, "mytoken": "<x>", "img_token": {"content": "<i>"}}, None),  # not tokens: undefined
    ({"extra_special_tokens": {"img_token": "<i>"}}, {"extra_special_tokens": {"my_token": "<m>"}}),
    ({"extra_special_tokens": ["<i>"]}, {"additional_special_tokens": ["<m>"], "unk_token": "<u>"}),
])
def test_named_special_tokens_read_as_transformers_reads_them(tmp_path, cfg, smap):
    """The tokens a chat template sees, and BOS / EOS, come from tokenizer_config.json and
    special_tokens_map.json as transformers reads them: the map only beside a config without
    added_tokens_decoder, a null there removing the config's token (it was ignored, and the map
    was read beside any config); other "*_token" names and extra_special_tokens {name: token}
    are seen too (a template naming one failed: 'my_token' is undefined)."""
    from transformers import AutoTokenizer
    from engine.tokenizer import Tokenizer
    d = str(tmp_path / "named")
    _byte_level_tokenizer(d)
    write_json(os.path.join(d, "tokenizer_config.json"), {
        "bos_token": "<s>", "eos_token": "</s>", "chat_template": NAMED_TOKENS_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast", **cfg})
    if smap is not None:
        write_json(os.path.join(d, "special_tokens_map.json"), smap)
    msgs = [{"role": "user", "content": "hi"}]
    hf, tok = AutoTokenizer.from_pretrained(d), Tokenizer(d)
    assert tok.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (tok.bos_token, tok.eos_token) == (hf.bos_token, hf.eos_token)


def test_chat_template_sources_and_tags(tmp_path, model_dir):
    """As transformers: chat_template.jinja before tokenizer_config.json's template; named
    templates need a 'default'; {% generation %} blocks render their body; tojson takes
    separators; templates see tools=None."""
    from engine.tokenizer import Tokenizer
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    d = _copy_model(tmp_path, model_dir, "tmpl")
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("NEW{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}")
    assert Tokenizer(d).apply_chat_template(msgs, add_generation_prompt=False) == "NEW[user]hi[assistant]yo"
    os.remove(os.path.join(d, "chat_template.jinja"))
    tc = read_json(os.path.join(d, "tokenizer_config.json"))
    tc["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}"
                           "A:{{ m['content'] }}{% endgeneration %}{% else %}U:{{ m['content'] }}{% endif %}"
                           "{% endfor %}{{ tools | tojson(separators=(',', ':')) }}{{ [1, 2] | tojson(separators=(',', ':')) }}")
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    assert Tokenizer(d).apply_chat_template(msgs) == "U:hiA:yonull[1,2]"
    tc["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    with pytest.raises(ValueError, match="tool_use, rag.*none named 'default'"):
        Tokenizer(d).apply_chat_template(msgs)
    for bad in ([{"name": 5, "template": "T"}], [{"template": "T"}], ["T"]):  # (a name 5: a TypeError from join)
        tc["chat_template"] = bad
        write_json(os.path.join(d, "tokenizer_config.json"), tc)
        with pytest.raises(ValueError, match="chat_template list must hold objects with 'name' \\(a string\\)"):
            Tokenizer(d).apply_chat_template(msgs)
    tc["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "rag", "template": "R"}]
    tc["chat_template"].append({"name": "default", "template": "D"})
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    assert Tokenizer(d).apply_chat_template(msgs) == "D"
    tc["chat_template"] = "{% if %}"
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    with pytest.raises(ValueError, match="chat template error"):
        Tokenizer(d).apply_chat_template(msgs)
    # keys whose value is None are dropped before rendering, and a message needs only a role
    # (as transformers 5: an API's content=None / tool_calls=None; a tool-call message)
    tc["chat_template"] = ("{% for m in messages %}[{{ m['role'] }}]{% if 'tool_calls' in m %}"
                           "{{ m['tool_calls'] | length }} calls{% endif %}{% if 'content' in m %}"
                           "{{ m['content'] }}{% endif %}{% endfor %}")
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    calls = [{"type": "function", "function": {"name": "f", "arguments": {}}}]
    got = Tokenizer(d).apply_chat_template(
        [{"role": "user", "content": "hi", "tool_calls": None},
         {"role": "assistant", "tool_calls": calls}, {"role": "tool", "content": "1"}],
        add_generation_prompt=False)
    assert got == "[user]hi[assistant]1 calls[tool]1", got
    for bad in ([{"content": "no role"}], ["not a dict"], [{"role": None, "content": "x"}]):
        with pytest.raises(ValueError, match="must be a dict with a 'role'"):
            Tokenizer(d).apply_chat_template(bad)
    # a template that fails on the messages' values: the template error, not a bare TypeError
    tc["chat_template"] = "{% for m in messages %}{{ m['content'] | length }}{% endfor %}"
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    with pytest.raises(ValueError, match="chat template error.*TypeError"):
        Tokenizer(d).apply_chat_template([{"role": "user", "content": 3}])
    # the sandbox's and Python's limits (a huge range, endless recursion, ...): one ValueError
    # naming the template (the command line printed a traceback: not a ValueError)
    for t, err in (("{% for i in range(10**6) %}x{% endfor %}", "OverflowError: Range too big"),
                   ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
                   ("{{ 1 // 0 }}", "ZeroDivisionError"), ("{{ 'a' * 10**15 }}", "MemoryError\\)"), ("{{ '{'.format() }}", r"ValueError: Single '\{'")):
        with pytest.raises(ValueError, match=f"chat template error: the template cannot be rendered \\({err}"):
            Tokenizer(d).apply_chat_template(msgs, chat_template=t)
    for t in ("{{" + "(" * 3000 + "1" + ")" * 3000 + "}}", "{% if 1 %}" * 1500 + "x" + "{% endif %}" * 1500):
        with pytest.raises(ValueError, match="chat template error: the template does not compile \\(RecursionError"):
            Tokenizer(d).apply_chat_template(msgs, chat_template=t)  # (compiling it: a bare RecursionError)
    with pytest.raises(ValueError, match="^chat template error: no$"):  # (the template's own error as it is)
        Tokenizer(d).apply_chat_template(msgs, chat_template="{{ raise_exception('no') }}")
    # every special token of the config, as transformers passes them (pad/unk rendered empty)
    from transformers import AutoTokenizer
    tc.update(pad_token=tc["eos_token"], unk_token=tc["bos_token"], sep_token=tc["bos_token"],
              chat_template="{{ bos_token }}#{{ pad_token }}#{{ unk_token }}#{{ sep_token }}#{{ cls_token }}#"
                            "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    got = Tokenizer(d).apply_chat_template(msgs)
    assert got == want and got.split("#")[1:5] == [tc["eos_token"], tc["bos_token"], tc["bos_token"], ""], got
    # special_tokens_map.json's tokens override tokenizer_config.json's, as in transformers
    write_json(os.path.join(d, "special_tokens_map.json"),
               {"pad_token": tc["bos_token"], "cls_token": {"content": tc["eos_token"], "single_word": False}})
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    got = Tokenizer(d).apply_chat_template(msgs)
    assert got == want and got.split("#")[1:5] == [tc["bos_token"], tc["bos_token"], tc["bos_token"], tc["eos_token"]]


def test_chat_templates_saved_as_files_by_transformers(tmp_path, model_dir):
    """Several templates, as transformers saves them: chat_template.jinja ('default') and
    additional_chat_templates/NAME.jinja; 'tool_use' when tools are given, and chat_template=
    picks one by name, as transformers. (The folder was ignored: tools got the default
    template, and chat_template='tool_use' rendered the text 'tool_use'.)"""
    from transformers import AutoTokenizer
    from engine.tokenizer import Tokenizer
    d = _copy_model(tmp_path, model_dir, "tmpl_files")
    hf = AutoTokenizer.from_pretrained(d)
    hf.chat_template = {"default": "D{% for m in messages %}{{ m['content'] }}{% endfor %}",
                        "tool_use": "T{{ tools | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    hf.save_pretrained(d)
    assert os.path.isfile(os.path.join(d, "additional_chat_templates", "tool_use.jinja"))
    hf, tok = AutoTokenizer.from_pretrained(d), Tokenizer(d)
    conv, tools = [{"role": "user", "content": "hi"}], [{"type": "function", "function": {"name": "f"}}]
    for kw in ({}, {"tools": tools}, {"chat_template": "tool_use", "tools": []}, {"chat_template": "default"}):
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kw)
        assert tok.apply_chat_template(conv, **kw) == want, kw
    os.remove(os.path.join(d, "chat_template.jinja"))  # (named templates only: none is the default)
    with pytest.raises(ValueError, match="^additional_chat_templates/ has several chat templates \\(tool_use\\) and "
                       "none named 'default'"):  # (it named tokenizer_config.json, which held none)
        Tokenizer(d).apply_chat_template(conv)
    # a template in tokenizer_config.json is not read beside them (as transformers): said so
    tc = read_json(os.path.join(d, "tokenizer_config.json"))
    write_json(os.path.join(d, "tokenizer_config.json"), {**tc, "chat_template": "C{{ messages[0]['content'] }}"})
    with pytest.raises(ValueError, match="tokenizer_config.json's chat_template is not used beside them"):
        Tokenizer(d).apply_chat_template(conv)
    with pytest.raises(ValueError, match="no default specified"):
        AutoTokenizer.from_pretrained(d).apply_chat_template(conv, tokenize=False)


def test_chat_template_kwargs(tmp_path, model_dir):
    """chat_template_kwargs are more variables for the template, as transformers' keyword
    arguments (Qwen3's enable_thinking); LLM.chat passes them; bad ones are refused."""
    from transformers import AutoTokenizer
    from engine import LLM
    from engine.tokenizer import Tokenizer
    d = _copy_model(tmp_path, model_dir, "kw")
    tc = read_json(os.path.join(d, "tokenizer_config.json"))
    tc["chat_template"] = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                           "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                           "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
                           "{% endif %}{% endif %}")
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    msgs = [{"role": "user", "content": "hi"}]
    hf = AutoTokenizer.from_pretrained(d)
    for kw in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        assert Tokenizer(d).apply_chat_template(msgs, chat_template_kwargs=kw) == want
    assert "</think>" in Tokenizer(d).apply_chat_template(msgs, chat_template_kwargs={"enable_thinking": False})
    llm = LLM(d, kv_cache_tokens=256)
    out = llm.chat(msgs, greedy(3), chat_template_kwargs={"enable_thinking": False})[0]
    assert out.prompt.endswith("<think>\n\n</think>\n\n") and "</think>" not in llm.chat(msgs, greedy(3))[0].prompt
    for bad, msg in (("x", "must be a dict"), ({1: 2}, "must be a dict"),
                     ({"add_generation_prompt": False}, "chat\\(\\)'s own arguments")):
        with pytest.raises(ValueError, match=msg):
            llm.chat(msgs, greedy(3), chat_template_kwargs=bad)
    assert_no_leak(llm)


_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are helpful.{% endif %}\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{% endif %}"
    "{%- if documents %}<docs>{% for d in documents %}[{{ d.title }}: {{ d.text }}]{% endfor %}</docs>\n{% endif %}"
    "{%- for m in messages %}{% if m.role != 'system' %}<|im_start|>{{ m.role }}\n"
    "{%- if m.role == 'assistant' and m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{%- if m.content is string %}{{ m.content }}{% elif m.content is defined %}"
    "{% for p in m.content %}{{ p.text }}{% endfor %}{% endif %}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{%- if bos_token is defined %}[bos]{% endif %}")


def test_chat_tools_documents_and_continuing_the_last_message(tmp_path, model_dir):
    """As transformers' apply_chat_template: tools and documents reach the template, named
    templates give 'tool_use' when there are tools, a message's reasoning under any of its
    names ('reasoning', 'thinking') is its reasoning_content, continue_final_message ends the
    text inside the last message, a missing bos_token is undefined; LLM.chat takes them.
    (tools were refused: chat_template_kwargs={'tools': ...} failed inside the render.)"""
    from transformers import AutoTokenizer
    from engine import LLM
    from engine.tokenizer import Tokenizer
    d = _copy_model(tmp_path, model_dir, "tools")
    tc = read_json(os.path.join(d, "tokenizer_config.json"))
    tc.pop("bos_token", None)
    tc["chat_template"] = _TOOLS_TEMPLATE
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    hf, tok = AutoTokenizer.from_pretrained(d), Tokenizer(d)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    docs = [{"title": "Paris", "text": "sunny"}]
    convs = [[{"role": "user", "content": "weather in Paris?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "yo", "reasoning": "greet back"},
              {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok", "thinking": "t"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Let me think"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Trailing space \n"}],
             [{"role": "user", "content": "hi"},
              {"role": "assistant", "content": [{"type": "text", "text": "Part one, "}, {"type": "text", "text": "two"}]}]]
    n = 0
    for conv in convs:
        for kw in ({}, {"tools": tools}, {"documents": docs}, {"tools": tools, "documents": docs}):
            for gen, cont in ((True, False), (False, False), (False, True)):
                want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen,
                                              continue_final_message=cont, **kw)
                got = tok.apply_chat_template(conv, gen, continue_final_message=cont, **kw)
                assert got == want, (conv, kw, gen, cont, got, want)
                assert tok.apply_chat_template(conv, gen, dict(kw), continue_final_message=cont) == want
                n += 1
    assert n == 60 and "[bos]" not in got and "<think>greet back</think>" in \
        tok.apply_chat_template(convs[1], False) and got.endswith("Part one, two")
    # named templates: 'tool_use' when tools are given, else 'default'; chat_template= picks one
    tc["chat_template"] = [{"name": "default", "template": "D{{ messages[0].content }}"},
                           {"name": "tool_use", "template": "T{{ tools | length }}"}]
    write_json(os.path.join(d, "tokenizer_config.json"), tc)
    hf, tok = AutoTokenizer.from_pretrained(d), Tokenizer(d)
    conv = convs[0]
    for kw in ({}, {"tools": tools}, {"chat_template": "tool_use", "tools": []}, {"chat_template": "X{{ 1 + 1 }}"}):
        want = hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True, **kw)
        assert tok.apply_chat_template(conv, **kw) == want, kw
    llm = LLM(d, kv_cache_tokens=256)
    assert llm.chat(conv, greedy(2), tools=tools)[0].prompt == "T1"
    assert llm.chat(conv, greedy(2), chat_template="default")[0].prompt == "Dweather in Paris?"
    for kw, msg in (({"tools": {"name": "f"}}, "tools=.* must be a list of dicts"),
                    ({"documents": ["text"]}, "documents=.* must be a list of dicts"),
                    ({"continue_final_message": True}, "pass add_generation_prompt=False with it"),
                    # (transformers 5 reads a string as the field to continue; it was taken as True)
                    ({"continue_final_message": "content", "add_generation_prompt": False},
                     "continue_final_message='content' must be True or False"),
                    ({"add_generation_prompt": None}, "add_generation_prompt=None must be True or False"),
                    ({"chat_template": ""}, "must be a template's text or the name"),
                    ({"tools": tools, "chat_template_kwargs": {"tools": tools}}, "tools given twice")):
        with pytest.raises(ValueError, match=msg):
            llm.chat(conv, greedy(2), **kw)
    with pytest.raises(ValueError, match="does not render the last message's content"):
        llm.chat(conv, greedy(2), add_generation_prompt=False, continue_final_message=True, chat_template="fixed")
    # a template that changes the last message's text: refused, as transformers refuses it
    cut = "{% for m in messages %}{{ m.content.split('|')[-1] }}{% endfor %}"
    last = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a|b"}]
    with pytest.raises(ValueError, match="final message does not appear"):
        hf.apply_chat_template(last, tokenize=False, continue_final_message=True, chat_template=cut)
    with pytest.raises(ValueError, match="does not render the last message's content"):
        tok.apply_chat_template(last, False, continue_final_message=True, chat_template=cut)
    # a template that trims the content: the text ends at the trimmed content, not before the
    # whitespace after it (the template's own)
    trim = "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>\n{% endfor %}"
    spaced = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Let me think \n"}]
    want = hf.apply_chat_template(spaced, tokenize=False, continue_final_message=True, chat_template=trim)
    assert want.endswith("<assistant>Let me think")
    assert tok.apply_chat_template(spaced, False, continue_final_message=True, chat_template=trim) == want
    assert_no_leak(llm)


def test_continuing_a_last_message_whose_text_part_is_not_last_or_is_empty(tmp_path, model_dir):
    """continue_final_message over a list content continues its last text part, as transformers
    does, wherever that part is: the only part, or before a part without text (an image); an
    empty last message the template renders first continues from the start (the text is '')."""
    from transformers import AutoTokenizer
    from engine.tokenizer import Tokenizer
    d = _copy_model(tmp_path, model_dir, "parts")
    hf, tok = AutoTokenizer.from_pretrained(d), Tokenizer(d)
    parts = ("{% for m in messages %}<{{ m.role }}>{% if m.content is string %}{{ m.content }}{% else %}"
             "{% for p in m.content %}{% if p.type == 'text' %}{{ p.text }}{% else %}[image]{% endif %}"
             "{% endfor %}{% endif %}</{{ m.role }}>{% endfor %}")
    user = {"role": "user", "content": "hi"}
    for content in ([{"type": "text", "text": "Look: "}], [{"type": "text", "text": "Look: "}, {"type": "image"}]):
        conv = [user, {"role": "assistant", "content": content}]
        want = hf.apply_chat_template(conv, tokenize=False, continue_final_message=True, chat_template=parts)
        assert want == "<user>hi</user><assistant>Look: "
        assert tok.apply_chat_template(conv, False, continue_final_message=True, chat_template=parts) == want
    bare = "{% for m in messages %}{{ m.content }}{% endfor %}"
    conv = [{"role": "assistant", "content": ""}]
    want = hf.apply_chat_template(conv, tokenize=False, continue_final_message=True, chat_template=bare)
    assert want == "" == tok.apply_chat_template(conv, False, continue_final_message=True, chat_template=bare)


@pytest.fixture(scope="module")
def small(make_llm):
    """An LLM with a deliberately small cache."""
    return make_llm(NAME, kv_cache_tokens=4 * PS)


def test_prompt_longer_than_cache(small, llm, baseline):
    total = small.cache_stats()["pages_total"]
    cap = total * PS
    # exactly the whole cache: fits (one generated token is never written)
    out = small.generate([random_ids(cap, VOCAB, seed=2)], greedy(1))[0]
    assert out.metrics.kv_pages_peak == total
    ok = random_ids(10, VOCAB, seed=3)
    want = list(llm.generate([ok], greedy(12))[0].outputs[0].token_ids)  # fresh result, big cache
    too_long = random_ids(cap + 1, VOCAB, seed=4)
    with pytest.raises(ValueError, match=rf"The {cap + 1}-token prompt alone needs {total + 1} pages but the KV "
                                         rf"cache has {total} pages .*raise kv_cache_tokens \(now {cap}\) to at "
                                         rf"least {cap + 1} plus"):
        small.generate([too_long], greedy(1))
    with pytest.raises(ValueError):  # mixed with a good request: rejected before any work
        small.generate([ok, too_long], greedy(12))
    assert_no_leak(small)
    assert list(small.generate([ok], greedy(12))[0].outputs[0].token_ids) == want
    # score(): a sequence longer than the whole cache, and one that only the open sessions
    # keep from fitting, get errors that say which
    with pytest.raises(ValueError, match=rf"score\(\) of {cap + 1} tokens needs {total + 1} pages but the KV "
                                         rf"cache has {total} pages .*raise kv_cache_tokens"):
        small.score(too_long)
    with small.session(random_ids(2 * PS, VOCAB, seed=5)) as s:
        s.generate([s.fork(s.root, [[]])[0]], greedy(1))
        with pytest.raises(ValueError, match="open sessions hold the cache"):
            small.score(random_ids(cap, VOCAB, seed=6))
        # generate(): the same error (it used to wait forever for pages only a close frees)
        with pytest.raises(ValueError, match="open sessions hold all but"):
            small.generate([random_ids(cap, VOCAB, seed=6)], greedy(1))
        assert small.cache_stats()["pages_reserved"] == 0
    assert small.score(random_ids(cap, VOCAB, seed=6))[0].shape[0] == cap
    assert_no_leak(small)
    assert_still_works(llm, baseline)


def test_score_takes_the_whole_context(make_llm):
    """score() of exactly max_position_embeddings tokens works (positions 0 .. M-1; only
    generation needs one position more); one token more is refused. A prompt of M - 1 tokens
    generates one token."""
    eng = make_llm("qwen3", attention_backend="cpu")
    M, V = eng.config.max_position_embeddings, eng.config.vocab_size
    ids = random_ids(M, V, seed=3)
    lp = eng.score(ids)[0]
    assert lp.shape[0] == M and lp.logsumexp(-1).abs().max() < 1e-4  # (every row a distribution)
    assert torch.allclose(lp[:-1], eng.score(ids[:-1])[0], atol=1e-5)
    with pytest.raises(ValueError, match=f"The sequence has {M + 1} tokens but the model's context is {M}"):
        eng.score(ids + [1])
    with pytest.raises(ValueError, match=f"The prompt has {M} tokens"):
        eng.generate([ids], greedy(1))
    with pytest.raises(ValueError, match=f"The prompt has {M} tokens"):
        eng.session(ids)
    out = eng.generate([ids[:-1]], greedy(3))[0].outputs[0]  # (room for one token)
    assert len(out.token_ids) == 1 and out.finish_reason == "length"


def test_a_score_whose_forward_fails_gives_its_pages_back(llm, baseline, monkeypatch):
    """score() reserves its sequence's pages and makes a segment: a forward pass that raises
    (here after writing the K/V) leaves neither behind."""
    real = llm.runner.run

    def fails(batch):
        real(batch)
        raise RuntimeError("the forward failed")
    monkeypatch.setattr(llm.runner, "run", fails)
    with pytest.raises(RuntimeError, match="the forward failed"):
        llm.score(random_ids(40, VOCAB, seed=1))
    monkeypatch.undo()
    stats = llm.cache_stats()
    assert stats["pages_reserved"] == 0 and stats["segments"] == 0, stats
    assert_still_works(llm, baseline)


def test_score_of_no_sequences_and_of_an_empty_one(llm, baseline):
    """score([]) is no sequences: no outputs, as generate([]) (it was taken as one empty
    sequence and refused as 'a prompt'); an empty sequence, alone or in a list, is refused
    with what to give instead."""
    assert llm.score([]) == [] and llm.score(()) == []
    for empty in ([[]], [random_ids(3, VOCAB, seed=1), []], torch.tensor([], dtype=torch.long)):
        with pytest.raises(ValueError, match=r"score\(\) got an empty sequence: .* at least one token"):
            llm.score(empty)
    assert_still_works(llm, baseline)


def test_request_that_can_never_fit(small, llm):
    total = small.cache_stats()["pages_total"]
    assert total >= 3
    prompt = random_ids((total - 2) * PS, VOCAB, seed=6)  # total - 2 pages
    # 2 threads x ceil(PS / PS) = 1 page each: exactly the whole cache
    res = small.generate([prompt], SP(n=2, temperature=1.0, max_tokens=PS + 1, ignore_eos=True, seed=0))
    assert res[0].metrics.kv_pages_peak == total
    # one more token per thread: 2 pages each, total + 2 pages
    with pytest.raises(ValueError):
        small.generate([prompt], SP(n=2, temperature=1.0, max_tokens=PS + 2, ignore_eos=True, seed=0))
    assert_no_leak(small)
    want = list(llm.generate([prompt], greedy(PS + 1))[0].outputs[0].token_ids)
    got = list(small.generate([prompt], greedy(PS + 1))[0].outputs[0].token_ids)
    assert got == want
    assert_no_leak(small)


def test_fifo_waiting_when_requests_do_not_fit_together(make_llm, llm):
    eng = make_llm(NAME, kv_cache_tokens=6 * PS)
    total = eng.cache_stats()["pages_total"]
    need = total // 2 + 1  # each request alone fits, no two together
    prompt_pages = max(1, need - 2)
    thread_pages = need - prompt_pages
    max_tokens = (thread_pages - 1) * PS + 2  # ceil((max_tokens - 1) / PS) == thread_pages
    prompts = [random_ids(prompt_pages * PS - k, VOCAB, seed=40 + k) for k in range(4)]
    sp = greedy(max_tokens)
    res = eng.generate(prompts, sp)
    assert len(res) == len(prompts)
    for p, r in zip(prompts, res):
        assert list(r.prompt_token_ids) == p, "outputs are not in the order of the prompts"
        want = list(llm.generate([p], sp)[0].outputs[0].token_ids)
        assert list(r.outputs[0].token_ids) == want, f"prompt of {len(p)} tokens: {list(r.outputs[0].token_ids)} != alone {want}"
        assert r.outputs[0].finish_reason == "length"
        assert r.metrics.kv_pages_peak <= total
    assert_no_leak(eng)


# ---------------------------------------------------------------------------------------------
# text written after other tokens: headers, tags, injected text
# ---------------------------------------------------------------------------------------------

def _sentencepiece_style_tokenizer(style: str, vocab_size: int):
    """A byte-fallback BPE spelling spaces as '▁', as Llama 2 / Mistral: ``legacy`` with a
    Prepend('▁') normalizer (Llama 2's tokenizer.json), ``metaspace`` with a Metaspace
    pre-tokenizer (prepend_scheme 'first', newer conversions)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from conftest import _corpus
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.train_from_iterator(_corpus(), trainer)  # (every ASCII character in its alphabet)
    if style == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


@pytest.mark.parametrize("style", ["legacy", "metaspace"])
def test_headers_and_injected_text_get_no_word_start_space(tmp_path, model_dir, style):
    """A SentencePiece-style tokenizer puts a '▁' (a space) before the text of a new
    sequence; text written after other tokens (inject, fork / join headers, the tree
    protocols' tags and headers) must not get one: "Hello" + "\\n<Path>" reads
    "Hello\\n<Path>" (it read "Hello \\n<Path>", a token sequence no model was trained on)."""
    from engine import LLM
    d = _copy_model(tmp_path, model_dir, f"sp_{style}", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    tok = _sentencepiece_style_tokenizer(style, V)
    assert tok.get_vocab_size() <= V
    tok.save(os.path.join(d, "tokenizer.json"))
    eng = LLM(d, kv_cache_tokens=512)
    t = eng.tokenizer
    hello = t.encode("Hello", add_special_tokens=False)
    assert t.decode(hello) == "Hello"
    assert t.decode(hello + t.encode("\nworld", add_special_tokens=False)) == "Hello \nworld"  # a start's space
    for piece in ("\n<Path>\n", "world", " world", "!?"):
        assert t.decode(hello + t.encode_continuation(piece)) == "Hello" + piece, piece
    with eng.session("Hello") as s:
        s.inject(s.root, "\nworld")
        a, = s.fork(s.root, ["\n<Path>"])
        assert s.root.text == "Hello\nworld" and a.text == "\n<Path>", (s.root.text, a.text)
    assert eng.cache_stats()["pages_used"] == 0


@pytest.mark.parametrize("style", ["byte_level", "legacy", "metaspace"])
def test_logprobs_name_their_tokens_as_vllm(tmp_path, model_dir, style):
    """Each Logprob's .decoded_token is vLLM's: the token decoded alone, special tokens
    spelled out, a SentencePiece piece's word-start space kept (decoding alone drops it),
    in completions' and prompt log-probs, pickled too (it had no decoded_token)."""
    import pickle
    from transformers import AutoTokenizer
    from engine import LLM
    d = _copy_model(tmp_path, model_dir, f"lp_{style}", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    if style != "byte_level":
        _sentencepiece_style_tokenizer(style, V).save(os.path.join(d, "tokenizer.json"))
    eng = LLM(d, kv_cache_tokens=512)
    hf = AutoTokenizer.from_pretrained(d)
    out = eng.generate(["Hello world, say more"], SP(temperature=1.0, max_tokens=6, seed=2, logprobs=40,
                                                    prompt_logprobs=40, ignore_eos=True))[0]
    entries = [(i, lp) for d_ in out.outputs[0].logprobs + out.prompt_logprobs[1:] for i, lp in d_.items()]
    assert len(entries) > 200
    spaced = 0
    for i, lp in entries:
        want = hf.decode([i])
        piece = hf.convert_ids_to_tokens(i)
        if style != "byte_level" and piece.startswith("\u2581") and not want.startswith(" "):
            want, spaced = " " + want, spaced + 1
        assert lp.decoded_token == want, (i, piece, lp.decoded_token, want)
    assert spaced > 0 or style == "byte_level"
    eos = eng.eos_ids[0]
    assert eng.tokenizer.token_text(eos) == hf.decode([eos]) != ""
    back = pickle.loads(pickle.dumps(out.outputs[0].logprobs))
    assert [{i: (e.logprob, e.rank, e.decoded_token) for i, e in d_.items()} for d_ in back] == \
        [{i: (e.logprob, e.rank, e.decoded_token) for i, e in d_.items()} for d_ in out.outputs[0].logprobs]


def test_context_tail_takes_the_last_tokens_of_the_view_in_order():
    """context_tail: the last k tokens of a thread's view, its own segment's last (own=False:
    the segments before it only), across segments, in order, no more than k."""
    from types import SimpleNamespace as NS
    from engine.core import context_tail
    a, b, own = NS(tokens=[1, 2, 3]), NS(tokens=None), NS(tokens=None)
    c = NS(tokens=[4, 5])
    t = NS(seg=own, tokens=[6, 7], view=[(a, 0), (b, 0), (c, 0), (own, 0)])
    assert [context_tail(t, k) for k in (1, 2, 3, 4, 5, 6, 9)] == [
        [7], [6, 7], [5, 6, 7], [4, 5, 6, 7], [3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]]
    assert [context_tail(t, k, own=False) for k in (1, 2, 3, 9)] == [[5], [4, 5], [3, 4, 5], [1, 2, 3, 4, 5]]


def test_a_step_refuses_a_sampler_whose_next_token_is_past_the_context(llm):
    """EngineCore.step refuses (an engine bug: callers end such threads first) a thread whose
    next token would sit at the model's context, before any work."""
    from types import SimpleNamespace as NS
    M = llm.core.max_positions
    t = NS(id=3, seg=NS(base=M - 2), tokens=[1, 2], live=None, end=M)
    steps = llm.core.forward_steps
    with pytest.raises(RuntimeError, match=rf"thread 3 would sample at position {M}, past the model's context of {M}"):
        llm.core.step([], [t])
    assert llm.core.forward_steps == steps


def test_a_step_refuses_a_sampler_with_no_logits_to_sample_from(llm):
    """EngineCore.step refuses (a caller's bug) a thread with no tokens whose nearest ancestor
    with tokens has no logits and is not fed in the step (a session's prompt not written
    yet), naming it, before any work. (A mutation of the check to "itself and no logits"
    passed the suite: an AssertionError from the sampler's table followed.)"""
    with llm.session([1, 2, 3]) as s:
        (c,) = s.fork(s.root, [[]])
        steps = llm.core.forward_steps
        with pytest.raises(ValueError, match=rf"^thread {c._t.id} has no tokens and no ancestor logits"):
            llm.core.step([], [c._t])
        assert llm.core.forward_steps == steps and s.root._t.pending == [1, 2, 3]


def test_a_threads_text_reads_after_the_text_before_it(tmp_path, model_dir):
    """A thread's text (ThreadHandle.text, a tree protocol's .tree entries) is read after the
    text before it in its view, as a completion's: decoded alone, a SentencePiece decoder
    stripped its first space, so a fork's header " world" read "world" and a Multiverse main
    thread that sampled " world" read "world" in .tree while the output's text had " world"."""
    from engine import LLM
    from engine.protocols import Multiverse
    d = _copy_model(tmp_path, model_dir, "sp_thread_text", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    _sentencepiece_style_tokenizer("legacy", V).save(os.path.join(d, "tokenizer.json"))
    eng = LLM(d, kv_cache_tokens=8192)
    world = eng.tokenizer.encode_continuation(" world")
    assert eng.tokenizer.decode(world) == "world"  # (alone: the space stripped)
    with eng.session("Hello") as s:
        a, b = s.fork(s.root, [" world", "!"])
        assert (s.root.text, a.text, b.text) == ("Hello", " world", "!")
        s.inject(b, " world")
        assert b.text == "! world"
    seq = iter(world)
    eng.core.token_source = lambda threads: [next(seq, eng.eos_ids[0]) for _ in threads]
    try:
        c = eng.generate("Hello", SP(max_tokens=len(world)), protocol=Multiverse())[0].outputs[0]
    finally:
        eng.core.token_source = None
    main = next(t for t in c.tree if t["role"] == "main")
    assert c.text == main["text"] == " world", (c.text, main["text"])
    assert eng.cache_stats()["pages_used"] == 0


def test_completion_text_reads_after_its_prompt(tmp_path, model_dir):
    """A SentencePiece decoder strips the space of a sequence's first word: a completion
    whose first token is '▁erpo' read 'erpo', so prompt + text was 'The caterpo' and a stop
    string starting with that space never matched. Its text is now what it adds after the
    prompt, as vLLM's (plain sampling, sessions, stop strings, tree protocols' joined text)."""
    from engine import LLM
    from engine.protocols import Multiverse
    d = _copy_model(tmp_path, model_dir, "sp_text", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    _sentencepiece_style_tokenizer("legacy", V).save(os.path.join(d, "tokenizer.json"))
    eng = LLM(d, kv_cache_tokens=8192)
    t = eng.tokenizer
    prompt = "The cat"
    P = t.encode(prompt)
    after = lambda ids: t.decode(P + ids)[len(t.decode(P)):]  # noqa: E731
    spaced = 0
    for seed in range(40):
        if spaced == 3:
            break
        sp = SP(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True)
        c = eng.generate(prompt, sp)[0].outputs[0]
        assert c.text == after(c.token_ids), (c.text, after(c.token_ids))
        if not c.text.startswith(" "):
            continue
        spaced += 1
        stop = c.text[:3]
        s = eng.generate(prompt, SP(temperature=1.0, seed=seed, max_tokens=6, ignore_eos=True, stop=[stop]))[0]
        assert (s.outputs[0].finish_reason, s.outputs[0].text) == ("stop", ""), (stop, s.outputs[0])
        with eng.session(prompt) as ses:
            o = ses.generate([ses.root], sp)[0]
            assert o.text == after(o.token_ids)
        m = eng.generate(prompt, sp, protocol=Multiverse())[0].outputs[0]
        assert m.text == after(m.token_ids)
    assert spaced >= 3
    assert eng.cache_stats()["pages_used"] == 0


def test_completion_text_of_a_prompt_ending_inside_a_character(tmp_path, model_dir):
    """A token-id prompt that ends inside a character (the first byte of 'é'): the completion
    that completes it starts with the character, as vLLM's (it read U+FFFD), and a stop
    string holding it matches; streamed, the same text."""
    from engine import LLM
    d = _copy_model(tmp_path, model_dir, "bytes", "qwen3")
    _byte_level_tokenizer(d, vocab=read_json(os.path.join(d, "config.json"))["vocab_size"])
    eng = LLM(d, kv_cache_tokens=512)
    t = eng.tokenizer
    ids = t.encode("The café", add_special_tokens=False)
    assert t.decode(ids[:-1]).endswith("\ufffd")  # ('é' is two byte tokens)
    cont = ids[-1:] + t.encode(" ok", add_special_tokens=False)
    for stop, want in ((None, ("length", "é ok")), (["é"], ("stop", "")), (["ok"], ("stop", "é "))):
        seq = iter(cont)
        eng.core.token_source = lambda ths: [next(seq) for _ in ths]
        pieces = []
        try:
            c = eng.generate([ids[:-1]], SP(max_tokens=len(cont), ignore_eos=True, stop=stop),
                             stream=lambda i, j, p: pieces.append(p))[0].outputs[0]
        finally:
            eng.core.token_source = None
        assert (c.finish_reason, c.text) == want and "".join(pieces) == c.text, (stop, c, pieces)
    # a prompt whose text itself ends with U+FFFD (its bytes complete): nothing carried over
    lit = t.encode("The caf\ufffd", add_special_tokens=False)
    assert t.decode(lit).endswith("\ufffd")
    seq = iter(t.encode(" ok", add_special_tokens=False))
    eng.core.token_source = lambda ths: [next(seq) for _ in ths]
    try:
        c = eng.generate([lit], SP(max_tokens=len(t.encode(" ok", add_special_tokens=False)), ignore_eos=True))
    finally:
        eng.core.token_source = None
    assert c[0].outputs[0].text == " ok", c[0].outputs[0].text
    assert eng.cache_stats()["pages_used"] == 0


def test_completion_text_after_a_context_ending_with_its_own_u_fffd(tmp_path):
    """A context whose text ends with a U+FFFD of its own (a token that spells it) hands no
    character on: the completion reads " ok", not "\ufffd ok" (the fallback that guesses an
    unfinished character's tokens from the text took it for one). Tokens of known bytes only: a
    SentencePiece-style tokenizer's '\ufffd' piece (byte fallback or not) is its text, and so
    is a byte-level tokenizer's added token that the byte alphabet does not spell ('<｜x｜>', as
    DeepSeek's); a context that ends inside a character after one still hands it on."""
    import json
    from tokenizers import AddedToken, Tokenizer as HFTok, decoders, models, normalizers, trainers
    from engine.tokenizer import TextStream, Tokenizer
    cases = []
    for fallback in (False, True):
        d = tmp_path / f"sp{fallback}"
        d.mkdir()
        t = HFTok(models.BPE(byte_fallback=fallback, unk_token="<unk>", fuse_unk=True))
        t.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        t.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                       decoders.Strip(" ", 1, 0)])
        t.train_from_iterator(["Hello world caf\ufffd ok. " * 3] * 20, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256) if fallback]))
        t.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
        tok = Tokenizer(str(d))
        lit = tok.encode("Hello caf\ufffd", add_special_tokens=False)
        assert tok.token_to_id("\ufffd") == lit[-1]
        ok = tok.encode("Hello ok", add_special_tokens=False)[1:]
        cases.append((tok, lit, ok, tok.decode(lit + ok)[len("Hello caf\ufffd"):]))
    d = str(tmp_path / "added")
    _byte_level_tokenizer(d)
    hf = HFTok.from_file(os.path.join(d, "tokenizer.json"))
    hf.add_tokens([AddedToken("<｜x｜>", special=False)])
    hf.save(os.path.join(d, "tokenizer.json"))
    tok = Tokenizer(d)
    ok = tok.encode(" ok", add_special_tokens=False)
    lit = tok.encode("<｜x｜>caf\ufffd", add_special_tokens=False)
    cafe = tok.encode("<｜x｜>café", add_special_tokens=False)
    assert tok.token_to_id("<｜x｜>") in lit and tok.decode(cafe[:-1]).endswith("\ufffd")  # ('é': two tokens)
    cases += [(tok, lit, ok, " ok"), (tok, cafe[:-1], cafe[-1:] + ok, "é ok")]
    for tok, ctx, ids, want in cases:
        assert tok.decode(ctx).endswith("\ufffd") and want.endswith("ok") and "\ufffd" not in want
        for skip in (True, False):
            stream = TextStream(tok, skip, ctx)
            assert tok.completion_text(ctx, ids, skip) == "".join(stream.push(i) for i in ids) == want, (ctx, skip)

def test_completion_text_after_a_context_ending_with_an_id_the_tokenizer_lacks(tmp_path):
    """A context that ends with an id past the tokenizer's vocabulary (a model's padded rows;
    the decoder drops it) after part of a character: its bytes are not all known, so the
    character's tokens are found from the text (up to 4 tokens back: the 3 tokens of '🙂''s
    first bytes and the unknown id) and the completion starts with the whole character, as
    after the context without the id."""
    from engine.tokenizer import TextStream
    tok = _byte_level_tokenizer(str(tmp_path / "bytes"))
    unknown = tok.vocab_size + 5
    assert tok.decode([unknown]) == ""
    inside = 0
    for text in ("The café ok", "The 東京 ok", "The 🙂 ok"):
        ids = tok.encode(text, add_special_tokens=False)
        for cut in range(1, len(ids)):
            ctx = ids[:cut] + [unknown]
            head = tok.decode(ids[:cut])
            inside += head.endswith("\ufffd")
            want = text[len(head.rstrip("\ufffd")):]
            stream = TextStream(tok, True, ctx)
            assert tok.completion_text(ctx, ids[cut:]) == "".join(stream.push(i) for i in ids[cut:]) == want, (text, cut)
    assert inside >= 6
    # no character boundary within 4 tokens back ('é''s first byte, 4 unknown ids): as if no context
    ids = tok.encode("The café ok", add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("\ufffd"))
    ctx = ids[:cut] + [unknown] * 4
    stream = TextStream(tok, True, ctx)
    assert tok.completion_text(ctx, ids[cut:]) == "".join(stream.push(i) for i in ids[cut:]) == "\ufffd ok"


def _byte_fallback_llm(tmp_path, model_dir):
    """An LLM on the tiny model with a SentencePiece-style tokenizer that has all 256
    byte-fallback tokens ('<0x0A>', as Llama 2 / Mistral spell a newline)."""
    import json
    from tokenizers import Tokenizer
    from engine import LLM
    d = _copy_model(tmp_path, model_dir, "bytefallback", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    spec = json.loads(_sentencepiece_style_tokenizer("legacy", V - 256).to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    assert len(vocab) <= V
    Tokenizer.from_str(json.dumps(spec)).save(os.path.join(d, "tokenizer.json"))
    return LLM(d, kv_cache_tokens=512)


def _scripted_stream(eng, toks, params, prompt="ba"):
    """generate() with the sampled tokens given (``toks``, in order); the completion and its
    streamed pieces."""
    seq, pieces = iter(toks), []
    eng.core.token_source = lambda ths: [next(seq) for _ in ths]
    try:
        c = eng.generate([prompt], params, stream=lambda i, j, p: pieces.append(p))[0].outputs[0]
    finally:
        eng.core.token_source = None
    return c, pieces


def test_streamed_byte_fallback_runs_add_up(tmp_path, model_dir):
    """With byte-fallback tokens (Llama 2 / Mistral: '<0xC3>'), a later invalid byte turns a
    whole run of byte tokens into U+FFFD in the tokenizer's decoder, an already complete 'é'
    included: the stream reads the bytes itself (they streamed 'é', then the text read '���');
    an invalid byte reads one U+FFFD, as Python's UTF-8 decoder with errors="replace"."""
    eng = _byte_fallback_llm(tmp_path, model_dir)
    tid = eng.tokenizer.token_to_id
    ok = eng.tokenizer.encode_continuation("ok")
    for toks, want in (([tid("<0x05>"), tid("<0x9D>")], "\x05\ufffd"),
                       (ok + [tid("<0xC3>"), tid("<0xA9>"), tid("<0xA9>")] + ok, "oké\ufffdok"),
                       (ok + [tid("<0xC3>"), tid("<0xA9>")] + ok, "okéok"),
                       (ok + [tid("<0xC3>")] + ok, "ok\ufffdok")):  # (an unfinished character, then a whole token)
        c, pieces = _scripted_stream(eng, toks, SP(max_tokens=len(toks), ignore_eos=True))
        assert "".join(pieces) == c.text == want, (toks, pieces, c.text)
    assert eng.cache_stats()["pages_used"] == 0


def test_stop_string_on_a_byte_fallback_token(tmp_path, model_dir):
    """Llama 2 / Mistral spell a newline (and '!' here) as a byte-fallback token ('<0x0A>'):
    a stop string ending in one stops the completion at that token (it was held until a
    whole token came: one token late, or missed when the completion ended on it)."""
    eng = _byte_fallback_llm(tmp_path, model_dir)
    t = eng.tokenizer
    nl, ex = t.token_to_id("<0x0A>"), t.token_to_id("<0x21>")
    world = t.encode_continuation(" world")
    more = t.encode_continuation(" more text")
    eos = t.token_to_id("</s>")
    for stop, tok in (("\n", nl), ("!", ex), ("world!", ex)):
        for tail, max_tokens in ((more, None), ([], None), ([eos], None)):
            toks = world + [tok] + tail
            c, pieces = _scripted_stream(eng, toks, SP(max_tokens=max_tokens or len(world) + 1 + len(tail), stop=[stop]))
            want = " world" if stop != "world!" else " "
            assert (c.text, c.finish_reason, c.stop_reason) == (want, "stop", stop), (stop, tail, c)
            assert len(c.token_ids) == len(world) + 1, (stop, tail, c.token_ids)  # (stopped at it)
            assert "".join(pieces) == c.text
    assert eng.cache_stats()["pages_used"] == 0


def test_a_completion_ending_inside_a_character(tmp_path, model_dir, llm):
    """A completion cut inside a multi-byte character (max_tokens) leaves that character out
    of its text, as vLLM's detokenizer, instead of U+FFFD; with byte-fallback tokens the
    tokenizer's decoder turned the whole run into U+FFFD, characters already complete
    included ('こんにちは세' read 'こんにち' and seven U+FFFD)."""
    eng = _byte_fallback_llm(tmp_path, model_dir)
    t = eng.tokenizer
    head = t.encode_continuation("ok")
    run = [t.token_to_id(f"<0x{b:02X}>") for b in "は세계".encode()]
    for k in range(len(run) + 1):
        toks = head + run[:k]
        c, pieces = _scripted_stream(eng, toks, SP(max_tokens=len(toks), ignore_eos=True))
        assert c.text == "ok" + "は세계"[:k // 3] == "".join(pieces), (k, c.text)
    # byte-level BPE (the tiny model's own tokenizer): a character split across tokens
    bl = llm.tokenizer
    ids = bl.encode("ok 東京", add_special_tokens=False)
    for k in range(1, len(ids) + 1):
        full = bl.decode(ids[:k])
        c, pieces = _scripted_stream(llm, ids[:k], SP(max_tokens=k, ignore_eos=True), prompt="x")
        assert "\ufffd" not in c.text and full.startswith(c.text) and len(full) - len(c.text) <= 1, (k, c.text)
        assert "".join(pieces) == c.text


def test_completion_text_is_the_streams_text(tmp_path, model_dir, llm):
    """Tokenizer.completion_text (a completion's final text) equals TextStream's pieces on
    random token sequences after random contexts, byte-fallback and byte-level tokenizers
    alike (its fast path, the decoder's text when it has no U+FFFD, included)."""
    import random
    from engine.tokenizer import TextStream
    eng = _byte_fallback_llm(tmp_path, model_dir)
    rng = random.Random(0)
    for tok in (eng.tokenizer, llm.tokenizer):
        pool = sorted(tok.byte_values) or list(range(tok.vocab_size))
        words = tok.encode("Hello world, naïve café 東京 🙂", add_special_tokens=False)
        for _ in range(300):
            def draw(n):
                return [rng.choice(pool) if rng.random() < 0.4 else
                        rng.choice(words) if rng.random() < 0.7 else rng.randrange(tok.vocab_size) for _ in range(n)]
            ctx, ids = draw(rng.randrange(0, 6)), draw(rng.randrange(0, 12))
            for skip in (True, False):
                s = TextStream(tok, skip, ctx)
                pieces = [s.push(i) for i in ids]
                assert "".join(pieces) == s.text == tok.completion_text(ctx, ids, skip), (ctx, ids, skip)
    # a context whose last byte run holds an invalid byte, then ends inside a character: the
    # unfinished character reads U+FFFD and the completion keeps its word-start space (the
    # decoder turned the whole run into U+FFFD, no boundary was found, the context dropped)
    t = eng.tokenizer
    b = [t.token_to_id(f"<0x{x:02X}>") for x in (0xFF, 0x0A, 0x0A, 0x0A, 0xC3)]
    ctx = t.encode("The cat", add_special_tokens=False) + b
    assert t.completion_text(ctx, t.encode_continuation(" sat")) == "\ufffd sat"
    # a byte-level vocabulary's token spelled '<0x41>' is its text, not a byte (no byte fallback)
    import json
    d = tmp_path / "hex"
    d.mkdir()
    spec = json.loads(llm.tokenizer._tok.to_str())
    assert not spec["model"].get("byte_fallback")
    spec["model"]["vocab"]["<0x41>"] = max(spec["model"]["vocab"].values()) + 1
    (d / "tokenizer.json").write_text(json.dumps(spec))
    from engine.tokenizer import Tokenizer
    t = Tokenizer(str(d))
    ids = [t.token_to_id("<0x41>")] + t.encode(" ok", add_special_tokens=False)
    s = TextStream(t, context=t.encode("x", add_special_tokens=False))
    assert "".join(s.push(i) for i in ids) == t.completion_text(t.encode("x", add_special_tokens=False), ids) \
        == "<0x41> ok" and not t.byte_values


def test_injected_text_outside_the_model_vocabulary_is_refused(tmp_path, model_dir):
    """A tokenizer with more tokens than the model has rows: text that encodes to one of
    them is refused where it is written (it was accepted, and every later step failed with
    an IndexError), and the session stays usable."""
    from engine import LLM
    from tokenizers import AddedToken, Tokenizer
    d = _copy_model(tmp_path, model_dir, "extra_token", "qwen3")
    V = read_json(os.path.join(d, "config.json"))["vocab_size"]
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.get_vocab_size() == V
    tok.add_special_tokens([AddedToken("<|extra|>", special=True)])
    tok.save(os.path.join(d, "tokenizer.json"))
    eng = LLM(d, kv_cache_tokens=512)
    with eng.session("Hello") as s:
        with pytest.raises(ValueError, match=r"'<\|extra\|>' encodes to token id \d+, outside the model's vocabulary"):
            s.inject(s.root, "<|extra|>")
        with pytest.raises(ValueError, match="outside the model's vocabulary"):
            s.fork(s.root, ["a<|extra|>"])
        with pytest.raises(ValueError, match=r"bad_words: '<\|extra\|>' encodes to token id \d+, outside the model's "
                                             r"vocabulary \[0, \d+\); leave that word out"):
            s.generate([s.root], SP(max_tokens=2, bad_words=["no", "<|extra|>"]))
        out = s.generate([s.root], SP(temperature=0.0, max_tokens=3, ignore_eos=True))[0]
        assert len(out.token_ids) == 3
    assert eng.cache_stats()["pages_used"] == 0


# ---------------------------------------------------------------------------------------------
# penalties (presence, frequency, repetition), as vLLM
# ---------------------------------------------------------------------------------------------

def _hf_greedy_penalized(hf, prompt: list[int], new: int, presence=0.0, frequency=0.0, repetition=1.0,
                         bias=None, allowed=None, bad=None):
    """Greedy decoding by transformers' forward with the penalties applied by hand: vLLM's
    definitions (repetition over prompt + output, presence / frequency over the output),
    after vLLM's allowed token ids and logit bias."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new):
            x = hf(torch.tensor([ids])).logits[0, -1].float()
            if allowed is not None:
                x = torch.full_like(x, float("-inf")).index_copy(0, torch.tensor(allowed), x[torch.tensor(allowed)])
            for word in bad or ():  # (vLLM's rule: over the tokens sampled so far)
                k = len(word) - 1
                if k == 0 or (k <= len(out) and out[len(out) - k:] == word[:-1]):
                    x[word[-1]] = float("-inf")
            for t, b in (bias or {}).items():
                x[t] += b
            seen = torch.zeros_like(x, dtype=torch.bool)
            seen[torch.tensor(ids)] = True
            x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=x.numel()).float() if out \
                else torch.zeros_like(x)
            x = x - frequency * counts - presence * (counts > 0).float()
            tok = int(x.argmax())
            ids.append(tok)
            out.append(tok)
    return out


def _greedy_as_hf(llm, hf_ref, prompt: list[int], new: int, sp, **kw):
    """llm's greedy output under ``sp`` is _hf_greedy_penalized's under ``kw`` and differs
    from plain greedy decoding; its log-probs are the model's (before the penalties and
    logit_bias: vLLM's raw log-probs). Returns the output."""
    want = _hf_greedy_penalized(hf_ref(NAME), prompt, new, **kw)
    out = llm.generate([prompt], sp)[0].outputs[0]
    assert out.token_ids == want, (kw, out.token_ids, want)
    assert out.token_ids != llm.generate([prompt], greedy(new))[0].outputs[0].token_ids  # (they change it)
    ref = hf_logprobs(hf_ref(NAME), prompt + out.token_ids)[len(prompt) - 1:-1]
    got = torch.tensor([lp[t] for lp, t in zip(out.logprobs, out.token_ids)])
    torch.testing.assert_close(got, ref.gather(1, torch.tensor(out.token_ids)[:, None])[:, 0], atol=2e-4, rtol=0)
    assert_no_leak(llm)
    return out


@pytest.mark.parametrize("kw", [dict(repetition=1.3), dict(repetition=0.8), dict(presence=1.5),
                                dict(frequency=0.7), dict(presence=-0.5, frequency=0.4, repetition=1.2)])
def test_penalties_match_their_definition(llm, hf_ref, kw):
    sp = greedy(24, presence_penalty=kw.get("presence", 0.0), frequency_penalty=kw.get("frequency", 0.0),
                repetition_penalty=kw.get("repetition", 1.0), logprobs=0)
    _greedy_as_hf(llm, hf_ref, random_ids(11, VOCAB, seed=7), 24, sp, **kw)


def test_penalties_are_per_thread_and_see_the_thread_context(llm, hf_ref):
    """n threads count their own tokens; a forked thread's repetition context is its
    parent's tokens and its header too (its whole view)."""
    prompt = random_ids(9, VOCAB, seed=8)
    sp = SP(n=3, temperature=0.0, max_tokens=16, ignore_eos=True, frequency_penalty=0.9)
    outs = llm.generate([prompt], sp)[0].outputs
    want = _hf_greedy_penalized(hf_ref(NAME), prompt, 16, frequency=0.9)
    assert [o.token_ids for o in outs] == [want] * 3
    header = random_ids(5, VOCAB, seed=9)
    with llm.session(prompt) as s:
        a, = s.fork(s.root, [header])
        got = s.generate([a], greedy(16, repetition_penalty=1.4))[0].token_ids
        assert a._t.penalties is None  # (its [vocab] state is dropped when it finishes)
    assert got == _hf_greedy_penalized(hf_ref(NAME), prompt + header, 16, repetition=1.4)
    assert_no_leak(llm)


@pytest.mark.parametrize("name,value,message", [
    ("presence_penalty", 2.5, "must be in [-2, 2]"), ("frequency_penalty", -3, "must be in [-2, 2]"),
    ("repetition_penalty", 0, "must be in [0.01, 100]"), ("repetition_penalty", float("nan"), "must be in [0.01, 100]"),
    ("repetition_penalty", 1e-40, "must be in [0.01, 100]"),
])
def test_penalty_values_are_checked(name, value, message):
    with pytest.raises(ValueError, match=re.escape(f"SamplingParams.{name}={value!r} is invalid: {message}")):
        SP(**{name: value})


def test_auto_on_cpu_is_the_cpp_backend(make_llm):
    from engine.attention import get_backend, ops_available
    from engine import _ops
    assert ops_available()
    name, fn = get_backend("auto", torch.device("cpu"))
    assert name == "cpu" and fn is _ops.segment_attention_cpu
    assert make_llm("qwen3").attention_backend == "cpu"


def test_an_extension_that_fails_to_load_is_named_with_how_to_rebuild(monkeypatch):
    # engine._C built against another torch fails to load (undefined symbol): the fallback's
    # warning and the 'cpu' backend's error gave "not built" and `pip install -e .`, not the cause.
    import sys
    import engine
    from engine.attention import get_backend
    for name in ("_ops", "_C"):
        monkeypatch.delattr(engine, name, raising=False)
    monkeypatch.delitem(sys.modules, "engine._ops", raising=False)
    monkeypatch.setitem(sys.modules, "engine._C", None)  # its import raises ImportError
    why = f"engine._C could not be loaded .*this is torch {re.escape(torch.__version__)}.*rebuild it"
    with pytest.warns(UserWarning, match="slow 'torch' attention backend: Loom's C\\+\\+ extension " + why):
        assert get_backend("auto", torch.device("cpu"))[0] == "torch"
    with pytest.raises(ValueError, match="attention_backend='cpu' needs .*" + why):
        get_backend("cpu", torch.device("cpu"))


def test_cpu_backend_refuses_other_devices():
    from engine.attention import get_backend
    with pytest.raises(ValueError, match="attention_backend='cpu' runs on CPU tensors"):
        get_backend("cpu", torch.device("meta"))


def test_triton_backend_needs_the_interpreter_on_the_cpu(monkeypatch):
    """attention_backend='triton' on CPU tensors runs only under the Triton interpreter
    (TRITON_INTERPRET spelled 1 / true / on / yes, any case); without it, and on a device
    neither CPU nor CUDA, one ValueError saying what to do."""
    from engine.attention import get_backend, triton_available
    if not triton_available():
        pytest.skip("needs the triton package")
    for off in ("0", "false", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        with pytest.raises(ValueError, match="needs the Triton interpreter: set TRITON_INTERPRET=1"):
            get_backend("triton", torch.device("cpu"))
    for on in ("1", "true", "ON", "yes"):
        monkeypatch.setenv("TRITON_INTERPRET", on)
        assert get_backend("triton", torch.device("cpu"))[0] == "triton", on
    with pytest.raises(ValueError, match=r"supports CUDA devices \(and CPU under TRITON_INTERPRET=1\), not "
                                         r"device=meta"):
        get_backend("triton", torch.device("meta"))


def test_chat_templates_refuse_a_jinja2_whose_sandbox_leaks(model_dir, monkeypatch):
    """A chat template comes with the model's download: with jinja2 3.1.5 (which pyproject's
    jinja2>=3.1 allowed) '{{ ("{0.__globals__[os].environ}"|attr("format"))(raise_exception) }}'
    rendered the process's environment into the prompt (CVE-2025-27516). Versions before 3.1.6 are
    refused with what to do; on this one the same template is stopped by the sandbox."""
    import jinja2
    from engine.tokenizer import Tokenizer
    tok = Tokenizer(model_dir(NAME))
    msgs = [{"role": "user", "content": "hi"}]
    leak = '{{ ("{0.__globals__[os].environ}"|attr("format"))(raise_exception) }}'
    with pytest.raises(ValueError, match="chat template error: access to attribute '__globals__' .* is unsafe"):
        tok.apply_chat_template(msgs, chat_template=leak)
    monkeypatch.setattr(jinja2, "__version__", "3.1.5")
    with pytest.raises(ValueError, match=r"jinja2 3\.1\.5 is installed; chat templates need jinja2 >= 3\.1\.6 .*"
                                         r"pip install -U 'jinja2>=3\.1\.6'"):
        tok.apply_chat_template(msgs, chat_template=leak + " ")  # (a template not compiled before)


def test_pybind11_is_a_build_requirement_only():
    """pybind11 was a run-time dependency of the package, installed with every `pip install`,
    though nothing imports it (engine._C is compiled with the copy of its headers that torch
    ships): it is a build requirement."""
    tomllib = pytest.importorskip("tomllib")  # (Python 3.11+)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml")
    if not os.path.isfile(path):
        pytest.skip("no pyproject.toml beside the tests")
    with open(path, "rb") as f:
        cfg = tomllib.load(f)

    def names(reqs):
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}
    assert "pybind11" not in names(cfg["project"]["dependencies"])
    assert "pybind11" in names(cfg["build-system"]["requires"])


# ---------------------------------------------------------------------------------------------
# logit_bias and allowed_token_ids, as vLLM
# ---------------------------------------------------------------------------------------------

def test_logit_bias_and_allowed_token_ids_forms():
    import numpy as np
    sp = SP(logit_bias={np.int64(3): np.float32(1.5), 4: -2, 5: float("-inf"), 6: 1e30}, allowed_token_ids=np.int64(4))
    assert sp.logit_bias == {3: 1.5, 4: -2.0, 5: float("-inf"), 6: 1e30} and sp.allowed_token_ids == [4]
    assert [type(k) for k in sp.logit_bias] == [int] * 4 and [type(v) for v in sp.logit_bias.values()] == [float] * 4
    assert type(sp.allowed_token_ids[0]) is int and SP(allowed_token_ids=(7, 2)).allowed_token_ids == [7, 2]
    assert SP(logit_bias={}).logit_bias is None and SP().allowed_token_ids is None
    assert SP(bad_words="x y").bad_words == ["x y"] and SP(bad_words=("a", "b")).bad_words == ["a", "b"]
    assert SP(bad_words=[]).bad_words is None


def test_logit_processed_matches_its_definition():
    from engine.sampler import logit_processed
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 37, generator=g)
    ps = [SP(logit_bias={3: 2.5, 36: -1.0}), SP(allowed_token_ids=[0, 9, 9, 36]),
          SP(allowed_token_ids=[9, 4], logit_bias={4: 0.5, 7: 3.0, 9: float("-inf")})]
    rows = [0, 2, 4]
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        got = logit_processed(x.to(dtype), rows, ps)
        want = x.to(dtype).to(torch.float64 if dtype == torch.float64 else torch.float32).clone()
        for r, p in zip(rows, ps):
            if p.allowed_token_ids is not None:
                keep = torch.zeros(37, dtype=torch.bool)
                keep[p.allowed_token_ids] = True
                want[r] = want[r].masked_fill(~keep, float("-inf"))
            for t, b in (p.logit_bias or {}).items():
                want[r, t] += b
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert torch.equal(x, torch.randn(5, 37, generator=torch.Generator().manual_seed(0)))  # (not changed in place)


@pytest.mark.parametrize("kw", [dict(bias={0: 4.0, 1: 2.5, 2: -3.0}), dict(allowed=list(range(40, 80, 3))),
                                dict(bias={41: 2.0, 44: float("-inf")}, allowed=list(range(40, 80, 3)), repetition=1.6)])
def test_logit_bias_and_allowed_token_ids_match_their_definition(llm, hf_ref, kw):
    """Greedy tokens are the argmax of the model's logits with tokens outside
    allowed_token_ids forbidden and logit_bias added, before the penalties (vLLM's order);
    the log-probs stay the model's."""
    sp = greedy(12, logit_bias=kw.get("bias"), allowed_token_ids=kw.get("allowed"),
                repetition_penalty=kw.get("repetition", 1.0), logprobs=0)
    _greedy_as_hf(llm, hf_ref, random_ids(11, VOCAB, seed=7), 12, sp, **kw)


def test_allowed_token_ids_and_a_forbidden_token_when_sampling(llm, baseline):
    """Sampled threads (plain and filtered, mixed in one step with threads without them)
    draw only allowed tokens, never a -inf one, whatever their model probability."""
    prompt, top = baseline[0], baseline[1][0]  # (the greedy first token: the likeliest)
    allowed = [top, 5, 17, 200]
    for kw in (dict(), dict(top_p=0.9), dict(top_k=2), dict(min_p=0.05)):
        outs = llm.generate([prompt, prompt], [SP(n=4, seed=1, max_tokens=6, ignore_eos=True, temperature=1.5, **kw,
                                                   allowed_token_ids=allowed, logit_bias={top: float("-inf")}),
                                                SP(n=2, seed=2, max_tokens=6, ignore_eos=True)])
        toks = [t for o in outs[0].outputs for t in o.token_ids]
        assert set(toks) <= {5, 17, 200}, (kw, toks)
        assert all(len(o.token_ids) == 6 for o in outs[1].outputs)
    assert_no_leak(llm)


def test_logit_bias_and_allowed_token_ids_that_leave_no_token_are_refused(llm, baseline):
    prompt = baseline[0]
    ninf = float("-inf")
    for kw, msg in ((dict(logit_bias={i: ninf for i in range(VOCAB)}), r"logit_bias \(-inf\) leave no token of "
                     rf"the model's vocabulary of {VOCAB} to sample"),
                    (dict(allowed_token_ids=[3, 4], logit_bias={3: ninf, 4: ninf}),
                     r"logit_bias \(-inf\) leave no token of allowed_token_ids to sample"),
                    (dict(allowed_token_ids=[3, EOS_ID], stop_token_ids=[3], min_tokens=2),
                     r"min_tokens=2\) forbids the stop tokens .* cover every token allowed_token_ids leave"),
                    (dict(allowed_token_ids=[3, 4], logit_bias={4: ninf}, stop_token_ids=[3], min_tokens=1),
                     r"cover every token logit_bias and allowed_token_ids leave")):
        with pytest.raises(ValueError, match=msg):
            llm.generate([prompt], SP(max_tokens=4, **kw))
        assert_still_works(llm, baseline)
    # the same without min_tokens, or with an allowed token that is not a stop: taken
    out = llm.generate([prompt], SP(max_tokens=2, allowed_token_ids=[3, EOS_ID], stop_token_ids=[3]))[0].outputs[0]
    assert len(out.token_ids) == 1 and out.finish_reason == "stop"
    out = llm.generate([prompt], SP(max_tokens=3, allowed_token_ids=[3, 4], stop_token_ids=[3], min_tokens=3))
    assert out[0].outputs[0].token_ids == [4, 4, 4]


def test_logit_bias_in_a_session_and_a_protocol(llm, baseline):
    """Session.generate and a protocol's threads take them too."""
    from engine.protocols import ParallelSampling
    prompt, top = baseline[0], baseline[1][0]
    with llm.session(prompt) as s:
        got = s.generate([s.root], greedy(3, logit_bias={top: -1e4}))[0].token_ids
    assert got[0] != top and len(got) == 3
    out = llm.generate([prompt], greedy(3, allowed_token_ids=[7, 8]), protocol=ParallelSampling(3))[0]
    assert {t for o in out.outputs for t in o.token_ids} <= {7, 8}
    assert_no_leak(llm)


def test_logit_bias_comes_before_the_repetition_penalty(llm, hf_ref):
    """vLLM's order: a seen token's biased logit is divided by repetition_penalty (the
    bias is divided too). The bias is chosen where the two orders pick different tokens."""
    prompt = random_ids(11, VOCAB, seed=7)
    with torch.no_grad():
        x = hf_ref(NAME)(torch.tensor([prompt])).logits[0, -1].double()
    r, t = 1.6, prompt[0]
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[torch.tensor(prompt)] = True
    pen = lambda v: torch.where(seen, torch.where(v > 0, v / r, v * r), v)  # noqa: E731
    for b in (k * 0.05 for k in range(1, 400)):
        bias = torch.zeros_like(x)
        bias[t] = b
        first, other = int(pen(x + bias).argmax()), int((pen(x) + bias).argmax())
        if first != other:
            break
    assert first != other, "no bias tells the two orders apart"
    out = llm.generate([prompt], greedy(1, logit_bias={t: b}, repetition_penalty=r))[0].outputs[0]
    assert out.token_ids == [first], (b, first, other)


def _word_forms(llm, word: str) -> list[list[int]]:
    """vLLM's forms of a bad word: as written after other text, and as a new word."""
    forms = []
    for text in (word.lstrip(), " " + word.lstrip()):
        ids = llm.tokenizer.encode_continuation(text)
        if ids not in forms:
            forms.append(ids)
    return forms


def test_bad_words_match_their_definition(llm, hf_ref):
    """A bad word's last token is forbidden where the thread's sampled tokens end with the
    rest of it (one-token words: always), in both its forms; greedy tokens against
    transformers' logits with that rule applied by hand; the log-probs stay the model's."""
    prompt = random_ids(11, VOCAB, seed=7)
    base = llm.generate([prompt], greedy(16))[0].outputs[0].token_ids
    tok = llm.tokenizer
    one = next(tok.decode([t]) for t in base if len(_word_forms(llm, tok.decode([t]))[0]) == 1)
    # a two-token word whose last token, forbidden always, would change more than the rule does
    hf = hf_ref(NAME)
    two = next(text for text in (tok.decode(base[i:i + 2]) for i in range(1, 15))
               if len(_word_forms(llm, text)[-1]) == 2
               and _hf_greedy_penalized(hf, prompt, 16, bad=_word_forms(llm, text))
               != _hf_greedy_penalized(hf, prompt, 16, bad=[f[-1:] for f in _word_forms(llm, text)]))
    for words in ([one], [two], [one, two]):
        forms = [f for w in words for f in _word_forms(llm, w)]
        _greedy_as_hf(llm, hf_ref, prompt, 16, greedy(16, bad_words=words, logprobs=0), bad=forms)


def test_bad_words_that_leave_no_token_are_refused(llm, baseline):
    tok = llm.tokenizer
    singles = [t for t in range(2, VOCAB) if _word_forms(llm, tok.decode([t]))[0] == [t]][:2]
    assert len(singles) == 2
    with pytest.raises(ValueError, match=r"SamplingParams' bad_words leave no token of allowed_token_ids to sample"):
        llm.generate([baseline[0]], SP(max_tokens=2, allowed_token_ids=singles,
                                       bad_words=[tok.decode([t]) for t in singles]))
    assert_still_works(llm, baseline)
    out = llm.generate([baseline[0]], SP(max_tokens=4, ignore_eos=True, allowed_token_ids=singles,
                                         bad_words=[tok.decode([singles[0]])]))[0].outputs[0]
    assert out.token_ids == [singles[1]] * 4


# ---------------------------------------------------------------------------------------------
# prompt_logprobs, as vLLM
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_are_the_models(llm, hf_ref, monkeypatch, k):
    """None for the first prompt token, then each token's log-prob and rank after the
    tokens before it, and the top-k there: transformers' log-probs, over passes of a few
    rows (7: odd, the prompt not a multiple of it); the completion as without them; no
    pages kept."""
    from engine import LLM
    monkeypatch.setattr(LLM, "PROMPT_LOGPROBS_ROWS", 7)
    prompt = random_ids(31, VOCAB, seed=12)
    ref = hf_logprobs(hf_ref(NAME), prompt)[:-1]  # [30, V]: after tokens 0..29
    out = llm.generate([prompt], greedy(4, prompt_logprobs=k))[0]
    assert out.outputs[0].token_ids == llm.generate([prompt], greedy(4))[0].outputs[0].token_ids
    pl = out.prompt_logprobs
    assert len(pl) == len(prompt) and pl[0] is None
    for i in range(1, len(prompt)):
        row, tok, entry = ref[i - 1], prompt[i], pl[i]
        v = float(row[tok])
        assert abs(entry[tok].logprob - v) < 2e-4
        assert int((row > v + 1e-4).sum()) + 1 <= entry[tok].rank <= int((row >= v - 1e-4).sum())
        top = sorted(entry.values(), key=lambda e: e.rank)[:k]  # (the prompt token's, if not among them, last)
        assert [e.rank for e in top] == list(range(1, k + 1)) and len(entry) == k + (tok not in row.topk(k).indices)
        torch.testing.assert_close(torch.tensor([e.logprob for e in top]), row.topk(k).values, atol=2e-4, rtol=0)
    assert_no_leak(llm)


def test_prompt_logprobs_per_request(llm):
    """Only the requests that ask get them (None otherwise); a one-token prompt gets [None];
    n > 1 and a protocol's request get one list."""
    from engine.protocols import ParallelSampling
    a, b = random_ids(9, VOCAB, seed=1), [5]
    outs = llm.generate([a, b, a], [greedy(2, prompt_logprobs=1), greedy(2, prompt_logprobs=2), greedy(2)])
    assert len(outs[0].prompt_logprobs) == 9 and outs[1].prompt_logprobs == [None] and outs[2].prompt_logprobs is None
    out = llm.generate([a], SP(n=3, max_tokens=2, prompt_logprobs=0), protocol=ParallelSampling())[0]
    assert len(out.outputs) == 3 and [list(e) for e in out.prompt_logprobs[1:]] == [[t] for t in a[1:]]
    assert [e[t].logprob for e, t in zip(out.prompt_logprobs[1:], a[1:])] == \
        [e[t].logprob for e, t in zip(outs[0].prompt_logprobs[1:], a[1:])]
    with llm.session(a) as s:
        with pytest.raises(ValueError, match=r"prompt_logprobs applies to LLM\.generate's prompts; .* LLM\.score"):
            s.generate([s.root], greedy(2, prompt_logprobs=0))
        with pytest.raises(ValueError, match=r"truncate_prompt_tokens applies to LLM\.generate's prompts"):
            s.generate([s.root], greedy(2, truncate_prompt_tokens=3))
        assert len(s.generate([s.root], greedy(2))[0].token_ids) == 2
    assert_no_leak(llm)


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm, make_llm):
    """As vLLM: the prompt's last k token ids (the output's prompt_token_ids; a text prompt's
    text as given), per request; -1: as many as the context holds with room for one token."""
    a = random_ids(40, VOCAB, seed=3)
    outs = llm.generate([a, a, a], [greedy(3, truncate_prompt_tokens=9), greedy(3, truncate_prompt_tokens=40),
                                    greedy(3, truncate_prompt_tokens=1000)])
    assert [o.prompt_token_ids for o in outs] == [a[-9:], a, a]
    assert outs[0].outputs[0].token_ids == llm.generate([a[-9:]], greedy(3))[0].outputs[0].token_ids
    assert outs[0].metrics.prompt_tokens == 9
    out = llm.generate(TEXT, greedy(2, truncate_prompt_tokens=2))[0]
    assert out.prompt == TEXT and out.prompt_token_ids == llm.tokenizer.encode(TEXT)[-2:]
    maxpos = read_json(os.path.join(llm.model_dir, "config.json"))["max_position_embeddings"]
    long = random_ids(maxpos + 5, VOCAB, seed=4)
    with pytest.raises(ValueError, match="shorten the prompt"):
        llm.generate([long], greedy(1))
    out = llm.generate([long], greedy(1, truncate_prompt_tokens=-1, prompt_logprobs=0))[0]
    assert out.prompt_token_ids == long[-(maxpos - 1):] and len(out.prompt_logprobs) == maxpos - 1
    assert len(out.outputs[0].token_ids) == 1
    assert_no_leak(llm)
