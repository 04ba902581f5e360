"""Tokenizer (``tokenizer.json`` via ``tokenizers``) and chat template (jinja2)."""
from __future__ import annotations

import functools
import json
import os
import re
from datetime import datetime

from tokenizers import Tokenizer as _HFTokenizer

from .config import read_json_object


_TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def _without_prefix_space(tok: _HFTokenizer) -> _HFTokenizer:
    """``tok`` with its word-start space at the beginning of a text switched off: a
    ``Prepend`` normalizer dropped, ``Metaspace`` prepend_scheme "never", ``ByteLevel``
    add_prefix_space false (wherever they sit in a Sequence); ``tok`` itself when it has none."""
    spec = json.loads(tok.to_str())
    off = {"Metaspace": {"prepend_scheme": "never", "add_prefix_space": False},  # (older files: the latter)
           "ByteLevel": {"add_prefix_space": False}}

    def fix(node):
        if isinstance(node, list):
            return [n for n in map(fix, node) if n is not None]  # (a Prepend in a Sequence: dropped)
        if not isinstance(node, dict) or node.get("type") == "Prepend":
            return None if isinstance(node, dict) else node
        node = {k: fix(v) for k, v in node.items()}
        return {**node, **{k: v for k, v in off.get(node.get("type"), {}).items() if k in node}}

    fixed = {**spec, "normalizer": fix(spec.get("normalizer")), "pre_tokenizer": fix(spec.get("pre_tokenizer"))}
    return tok if fixed == spec else _HFTokenizer.from_str(json.dumps(fixed))


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: Loom needs the fast tokenizer file "
                                    "tokenizer.json in the model directory.")
        try:
            self._tok = _HFTokenizer.from_file(path)
        except Exception as e:  # (tokenizers raises a bare Exception)
            if os.path.exists(path) and not os.access(path, os.R_OK):
                raise PermissionError(f"{path} cannot be read by this user (permission denied); give it read "
                                      "access (chmod a+r), or run as its owner.") from None
            raise ValueError(f"{path} is not a readable tokenizer file ({e}); download it again with "
                             "the checkpoint.") from None
        # A file's own truncation / padding would cut prompts and headers to its max_length and pad
        # them with its pad id; transformers ignores both unless a call asks for them.
        self._tok.no_truncation()
        self._tok.no_padding()
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        self.config: dict = read_json_object(cfg_path) if os.path.isfile(cfg_path) else {}
        # chat_template.jinja and additional_chat_templates/NAME.jinja first, as transformers
        # (newer checkpoints keep them there, the former as the one named 'default', and an
        # older copy may linger in tokenizer_config.json)
        self.chat_template = self.config.get("chat_template")
        files = {}
        tmpl_path = os.path.join(model_dir, "chat_template.jinja")
        if os.path.isfile(tmpl_path):
            files["default"] = tmpl_path
        extra_dir = os.path.join(model_dir, "additional_chat_templates")
        if os.path.isdir(extra_dir):
            files.update({name[:-len(".jinja")]: os.path.join(extra_dir, name)
                          for name in sorted(os.listdir(extra_dir)) if name.endswith(".jinja")})
        for name, path in files.items():
            try:
                with open(path, encoding="utf-8") as f:
                    files[name] = f.read()
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); download it "
                                 "again, or save it as UTF-8.") from None
        self._templates_from = "tokenizer_config.json"  # (named in errors about them)
        if files:
            self.chat_template = files["default"] if list(files) == ["default"] else \
                [{"name": name, "template": text} for name, text in files.items()]
            self._templates_from = "additional_chat_templates/" if "default" not in files else \
                "chat_template.jinja and additional_chat_templates/"
            if "default" not in files and self.config.get("chat_template") is not None:
                self._templates_from += (" (tokenizer_config.json's chat_template is not used beside them, as "
                                         "transformers reads them)")
        # The named special tokens, as transformers reads them; chat templates see all of them:
        # tokenizer_config.json's seven standard ones, any other "*_token" key holding a token
        # (a string or an AddedToken object) and extra_special_tokens given as {name: token};
        # special_tokens_map.json only beside a config without added_tokens_decoder (older
        # files; transformers ignores it otherwise): its standard ones override the config's
        # (null removes one), its other "*_token" keys add names the config's do not hold.
        cfg = self.config
        named = {name: cfg.get(name) for name in _TEMPLATE_TOKENS}
        own = {k: v for k, v in cfg.items() if k.endswith("_token") and k not in named
               and (isinstance(v, str) or isinstance(v, dict) and v.get("__type") == "AddedToken")}
        if isinstance(cfg.get("extra_special_tokens"), dict):
            own.update(cfg["extra_special_tokens"])
        map_path = os.path.join(model_dir, "special_tokens_map.json")
        if "added_tokens_decoder" not in cfg and os.path.isfile(map_path):
            smap = read_json_object(map_path)
            named.update({k: v for k, v in smap.items() if k in named})
            if isinstance(smap.get("extra_special_tokens"), dict):
                own.update(smap["extra_special_tokens"])
            own = {**{k: v for k, v in smap.items() if k.endswith("_token") and k not in named
                      and isinstance(v, (str, dict))}, **own}
        named.update({k: v for k, v in own.items() if k not in named})
        self.special_tokens = {k: t for k, v in named.items() if isinstance(t := _token_str(v), str)}
        self.bos_token = self.special_tokens.get("bos_token")
        self.eos_token = self.special_tokens.get("eos_token")
        self.add_bos = self.config.get("add_bos_token") or False
        if not isinstance(self.add_bos, bool):  # (bool("false") is True)
            raise ValueError(f"{cfg_path}'s add_bos_token={self.add_bos!r} must be true or false (JSON booleans).")
        self._special_ids: frozenset[int] | None = None
        self._byte_values: dict[int, int] | None = None
        self._kinds: dict[str, bool] | None = None
        self._continuation: _HFTokenizer | None = None
        self._one: dict[tuple, str] = {}  # decode_one's and token_text's texts (_kept)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (those decode(skip_special_tokens=True) drops)."""
        if self._special_ids is None:
            self._special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items()
                                          if t.special)
        return self._special_ids

    @property
    def byte_values(self) -> dict[int, int]:
        """Byte-fallback token id ('<0x..>', SentencePiece's) -> the byte it stands for. A
        decoder's ByteFallback turns a whole run of byte tokens that is not valid UTF-8 into
        U+FFFD, an already complete character included: TextStream reads their bytes itself."""
        if self._byte_values is None:
            fallback = self._uses("byte_fallback")  # (else '<0x41>' is a token's plain text)
            self._byte_values = {} if not fallback else {
                i: int(t[3:5], 16) for t, i in self._tok.get_vocab(with_added_tokens=False).items()
                if len(t) == 6 and t.startswith("<0x") and t.endswith(">")
                and all(c in "0123456789abcdefABCDEF" for c in t[3:5])}
        return self._byte_values

    def _uses(self, kind: str) -> bool:
        """Whether the tokenizer spells text with byte-fallback tokens ('byte_fallback') or
        byte-level BPE's byte alphabet ('byte_level'), by its model and decoder (read once)."""
        if self._kinds is None:
            spec = json.loads(self._tok.to_str())
            decoder = json.dumps(spec.get("decoder"))
            self._kinds = {"byte_fallback": bool(spec.get("model", {}).get("byte_fallback")) or "ByteFallback" in decoder,
                           "byte_level": "ByteLevel" in decoder}
        return self._kinds[kind]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = _rust(lambda: self._tok.encode(text, add_special_tokens=add_special_tokens).ids, "this text")
        # tokenizer.json post-processors usually add BOS themselves; add it only when
        # the config asks for it and the post-processor did not (as transformers 4's
        # Llama tokenizers, which rebuild the post-processor from add_bos_token;
        # transformers 5 follows the post-processor alone).
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def encode_continuation(self, text: str) -> list[int]:
        """Ids of ``text`` written after other tokens (a header, a tag, injected text): no
        special tokens added, and none of the word-start space that SentencePiece-style
        tokenizers (Llama 2, Mistral: a ``Prepend`` normalizer or a ``Metaspace``
        pre-tokenizer) put before the text of a new sequence, so that "\n<Path>" after
        "Hello" reads "Hello\n<Path>", not "Hello \n<Path>" (transformers' legacy=False)."""
        if self._continuation is None:
            self._continuation = _without_prefix_space(self._tok)
        return _rust(lambda: self._continuation.encode(text, add_special_tokens=False).ids, "this text")

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        return _rust(lambda: self._tok.decode(ids, skip_special_tokens=skip_special_tokens), "these tokens")

    ONE_CACHE = 1 << 16  # decode_one's texts kept at most (then it starts over)

    def decode_one(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """``decode(ids)``, its text kept when ``ids`` is one token: a TextStream decodes
        each new token's context, most often the one token before it, at every token (a
        Rust call and its Python around it, ~2-4 us: a fifth of a tree protocol's step)."""
        if len(ids) != 1:
            return self.decode(ids, skip_special_tokens)
        return self._kept((ids[0], skip_special_tokens), lambda: self.decode(ids, skip_special_tokens))

    def token_text(self, i: int) -> str:
        """Token ``i``'s text alone, as vLLM's Logprob.decoded_token: its decode, special
        tokens spelled out, with the word-start spaces a SentencePiece vocabulary piece
        begins with ("\u2581Hello": " Hello"; decoding it alone drops the first). Kept."""
        def make():
            text = self.decode([i], skip_special_tokens=False)
            piece = self._tok.id_to_token(i) or ""
            missing = (len(piece) - len(piece.lstrip("\u2581"))) - (len(text) - len(text.lstrip(" ")))
            return " " * missing + text if missing > 0 else text
        return self._kept((i, None), make)

    def _kept(self, key: tuple, make) -> str:
        """decode_one's / token_text's text for ``key``, made once (ONE_CACHE texts at most)."""
        text = self._one.get(key)
        if text is None:
            text = make()
            if len(self._one) >= self.ONE_CACHE:
                self._one.clear()
            self._one[key] = text
        return text

    CONTEXT_TOKENS = 8  # tokens of context a continuation's text is decoded after (a character's
    #                     bytes may take 4 of them: see _context)

    def _context(self, context, skip_special_tokens: bool) -> tuple[list[int], int, str]:
        """The last few text-making tokens of ``context``, how many of them end on a whole
        character, and those ones' text. A context that ends inside a character (a token-id
        prompt, a call that stopped mid-character) leaves its last bytes to the continuation,
        which completes them: its text then starts with that character, as vLLM's."""
        skipped = self.special_ids if skip_special_tokens else frozenset()
        ctx = [i for i in context if i not in skipped][-self.CONTEXT_TOKENS:]
        whole = len(ctx)
        head = self.decode(ctx, skip_special_tokens) if ctx else ""
        if not head.endswith("\ufffd"):
            return ctx, whole, head
        cut = self._unfinished_tokens(ctx)
        if cut is not None:  # (the bytes are known: the boundary from them, not from the text)
            if cut:
                whole -= cut
                head = self.decode(ctx[:whole], skip_special_tokens)
            return ctx, whole, head  # (cut 0: a U+FFFD of the text itself)
        while whole and head.endswith("\ufffd") and len(ctx) - whole < 4:
            whole -= 1
            head = self.decode(ctx[:whole], skip_special_tokens)
        if head.endswith("\ufffd"):  # (no character boundary found: as if no context)
            return [], 0, ""
        return ctx, whole, head

    def _unfinished_tokens(self, ids: list[int]) -> int | None:
        """How many of ``ids``' last tokens hold the bytes of a character their bytes leave
        unfinished (0: none), where the bytes are known (byte-fallback '<0x..>' tokens,
        byte-level BPE's byte alphabet); else None."""
        import codecs
        parts = [self._token_bytes(i) for i in ids]
        if any(b is None for b in parts):
            return None
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        dec.decode(b"".join(parts), final=False)
        pending, cut = len(dec.getstate()[0]), 0
        while pending > 0 and cut < len(parts):
            cut += 1
            pending -= len(parts[-cut])
        return cut

    def _token_bytes(self, i: int) -> bytes | None:
        t = self._tok.id_to_token(i)
        if t is None:
            return None
        if i in self.byte_values:
            return bytes([self.byte_values[i]])
        if self._uses("byte_level"):
            table = _byte_level_table()
            if all(c in table for c in t):
                return bytes(table[c] for c in t)
        # (its text, as the decoders read it: a byte-level token its alphabet does not spell,
        # an added one; whole characters, a U+FFFD in it one of its own)
        return t.encode("utf-8")

    def completion_text(self, context, ids, skip_special_tokens: bool = True) -> str:
        """A completion's text: what ``ids`` add after ``context`` (as vLLM's detokenizer,
        primed with the prompt: a SentencePiece decoder strips the space of a sequence's first
        word, so a completion decoded alone lost the space it starts with: "The cat" +
        "▁erpo" read "The caterpo"). It is TextStream's text, token by token, so that streamed
        pieces add up to it: a character the last tokens leave unfinished is not in it, and
        byte-fallback bytes are read as UTF-8 (an invalid one as U+FFFD). The decoder's text
        of context and ids, less the context's, when it has none of those cases."""
        ctx, whole, head = self._context(context, skip_special_tokens)
        if whole == len(ctx):
            full = self.decode(ctx + list(ids), skip_special_tokens)
            if full.startswith(head) and "\ufffd" not in full[len(head):]:
                return full[len(head):]
        stream = TextStream(self, skip_special_tokens, context)
        for i in ids:
            stream.push(i)
        return stream.text

    def _template_text(self, tools=None, chat_template: str | None = None) -> str:
        """The template to render (as transformers picks it): ``chat_template`` (a template's
        text, or the name of one of the model's named templates), else the model's: of named
        templates 'tool_use' when there are tools and it exists, else 'default'."""
        t = self.chat_template
        named = None
        if isinstance(t, list):
            if not all(isinstance(x, dict) and isinstance(x.get("name"), str) and "template" in x for x in t):
                raise ValueError("tokenizer_config.json's chat_template list must hold objects with "
                                 "'name' (a string) and 'template'.")
            named = {x["name"]: x["template"] for x in t}
        if chat_template is not None:
            if not isinstance(chat_template, str) or not chat_template:
                raise ValueError(f"chat_template={chat_template!r} must be a template's text or the name of one "
                                 "of the model's chat templates.")
            return named[chat_template] if named and chat_template in named else chat_template
        if not t:
            raise ValueError("This model has no chat template (no 'chat_template' in "
                             "tokenizer_config.json or chat_template.jinja); use generate() "
                             "with a plain prompt instead (the command line: without --chat / --system), "
                             "or pass chat_template=.")
        if named is not None:  # named templates, as transformers
            if tools is not None and "tool_use" in named:
                return named["tool_use"]
            if "default" not in named:
                raise ValueError(f"{self._templates_from} has several chat templates ({', '.join(named)}) "
                                 "and none named 'default'; pick one with chat_template='name'.")
            t = named["default"]
        if not isinstance(t, str):
            raise ValueError("tokenizer_config.json's chat_template must be a string or a list of "
                             "named templates.")
        return t

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, continue_final_message: bool = False,
                            chat_template: str | None = None, tokenize: bool = False) -> str | list[int]:
        """The conversation rendered by the model's chat template (as transformers'
        ``apply_chat_template(..., tokenize=False)``; ``tokenize=True``: its token ids, encoded
        without special tokens added, as transformers encodes it). ``chat_template_kwargs`` are more
        variables for the template (e.g. Qwen3's ``{"enable_thinking": False}``); ``tools``
        (JSON-schema dicts) and ``documents`` (dicts) are the template's ``tools`` /
        ``documents``; ``continue_final_message`` ends the text inside the last message (the
        model continues it: needs add_generation_prompt=False); ``chat_template`` replaces the
        model's template (its text, or the name of one of the model's named templates)."""
        for name, value in (("add_generation_prompt", add_generation_prompt),
                            ("continue_final_message", continue_final_message), ("tokenize", tokenize)):
            if not isinstance(value, bool):  # (transformers 5 reads a string as a message field to continue)
                raise ValueError(f"{name}={value!r} must be True or False.")
        kwargs = {} if chat_template_kwargs is None else chat_template_kwargs
        kwargs = dict(kwargs) if isinstance(kwargs, dict) else kwargs
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise ValueError(f"chat_template_kwargs={chat_template_kwargs!r} must be a dict of template "
                             "variable names to values, e.g. {'enable_thinking': False}.")
        taken = {"messages", "add_generation_prompt"} & set(kwargs)
        if taken:
            raise ValueError(f"chat_template_kwargs sets {sorted(taken)}: pass the conversation and "
                             "add_generation_prompt as chat()'s own arguments.")
        lists = {"tools": tools, "documents": documents}
        for name, what in (("tools", "JSON schemas of the functions"), ("documents", "each with 'title' and 'text'")):
            if name in kwargs:  # (vLLM passes its chat_template_kwargs on as keywords)
                if lists[name] is not None:
                    raise ValueError(f"{name} given twice: as chat()'s argument and in chat_template_kwargs.")
                lists[name] = kwargs.pop(name)
            given = lists[name]
            if given is not None and (not isinstance(given, (list, tuple)) or
                                      not all(isinstance(x, dict) for x in given)):
                raise ValueError(f"{name}={given!r} must be a list of dicts ({what}).")
            lists[name] = None if given is None else list(given)
        tools, documents = lists["tools"], lists["documents"]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message=True continues the last message: pass "
                             "add_generation_prompt=False with it.")
        text = self._template_text(tools, chat_template)
        if not isinstance(messages, (list, tuple)):
            raise ValueError(f"messages={messages!r} must be a list of {{'role', 'content'}} dicts.")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") is None:
                raise ValueError(f"Chat message {m!r} must be a dict with a 'role' (and usually a "
                                 "'content').")
        # As transformers: keys whose value is None are dropped (APIs send content=None or
        # tool_calls=None; templates test for a key's presence, and many fail on None), and
        # a message's reasoning under any of its names is under all of them (templates read
        # 'reasoning_content', or 'thinking'; APIs send 'reasoning' too).
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        for i, m in enumerate(messages):
            r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            if r is not None:
                messages[i] = {"thinking": r, **m, "reasoning_content": r}
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        if continue_final_message:
            messages, final = self._tag_final_message(messages, tag)
        import jinja2
        try:
            compiled = _compile_template(text)
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: the template does not compile ({e}).") from None
        except (RecursionError, MemoryError) as e:  # (jinja2's parser and Python's compiler recurse per level)
            raise ValueError(f"chat template error: the template does not compile ({type(e).__name__}: it "
                             "nests too deeply); fix the template, or pass chat_template=.") from None
        try:
            out = compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                  tools=tools, documents=documents, **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"chat template error: {e}") from None
        except (TypeError, KeyError, AttributeError, IndexError) as e:  # (the template on these messages)
            raise ValueError(f"chat template error: the model's template fails on these messages "
                             f"({type(e).__name__}: {e}); check each message's keys and values.") from None
        except (ArithmeticError, RecursionError, MemoryError, ValueError) as e:  # (the sandbox's or Python's limits)
            if isinstance(e, ValueError) and str(e).startswith("chat template error"):
                raise  # (the template's own raise_exception)
            raise ValueError(f"chat template error: the template cannot be rendered ({type(e).__name__}"
                             f"{f': {e}' if str(e) else ''}), e.g. a range over 100,000 items, endless recursion or "
                             "a string larger than the memory; fix the template, or pass chat_template=.") from None
        if continue_final_message:  # the text ends where the last message's text does
            j = out.rfind(tag.strip())
            if j < 0 or final.strip() not in out:  # (as transformers: the text itself must be there)
                raise ValueError("continue_final_message=True but the chat template does not render the last "
                                 "message's content (or changes it); it cannot be continued with this template.")
            out = out[:j] if out[j:j + len(tag)] == tag else out[:j].rstrip()
        return self.encode(out, add_special_tokens=False) if tokenize else out

    @staticmethod
    def _tag_final_message(messages: list[dict], tag: str) -> tuple[list[dict], str]:
        """``messages`` with ``tag`` after the last message's text (its content, or the last
        text part of a list content), to find where that text ends once rendered; and that text."""
        if not messages:
            raise ValueError("continue_final_message=True needs a conversation with a last message to continue.")
        last = dict(messages[-1])
        content = last.get("content")
        if isinstance(content, str):
            final = content
            last["content"] = content + tag
        elif isinstance(content, (list, tuple)):
            parts = [dict(p) if isinstance(p, dict) else p for p in content]
            k = next((k for k in range(len(parts) - 1, -1, -1) if isinstance(parts[k], dict)
                      and isinstance(parts[k].get("text"), str)), None)
            if k is None:
                raise ValueError("continue_final_message=True but the last message has no text to continue.")
            final = parts[k]["text"]
            parts[k]["text"] += tag
            last["content"] = parts
        else:
            raise ValueError("continue_final_message=True but the last message has no 'content' to continue.")
        return messages[:-1] + [last], final


def _rust(call, what: str):
    """``call()`` into the tokenizers library, a Rust panic in it as one ValueError: pyo3 raises
    it as a PanicException, a BaseException that ``except Exception`` misses (e.g. a pattern of
    tokenizer.json's that backtracks past Oniguruma's limit on some text)."""
    try:
        return call()
    except BaseException as e:
        if type(e).__name__ != "PanicException":
            raise
        raise ValueError(f"The model's tokenizer (tokenizer.json) failed on {what} ({e}): a pattern of its "
                         "normalizer / pre-tokenizer / decoder cannot handle it; use the tokenizer.json that "
                         "came with the model.") from None


@functools.lru_cache(maxsize=None)
def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): each byte as the printable character that spells
    it in the vocabulary, mapped back to the byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


class TextStream:
    """Incremental detokenization: ``push(token)`` returns the text the token completes
    (possibly ""); the pieces make a completion's text (``Tokenizer.completion_text``). A
    character split across tokens is held until complete instead of showing as U+FFFD (a
    byte-level BPE token's by the decoder's text, a byte-fallback token's by its bytes,
    decoded here: the decoder would turn a run of them that a later byte makes invalid into
    U+FFFD, characters already shown included), and each piece is decoded after a few tokens
    of context (from ``context`` at first: the tokens the text follows), so that decoders that
    strip a leading space (SentencePiece's) keep it inside the text. As vLLM's detokenizer: a
    character still unfinished when the text ends is not in it; an invalid byte reads U+FFFD."""
    MAX_HELD = 32  # tokens held at most (text that never completes is let through)

    def __init__(self, tokenizer: "Tokenizer", skip_special_tokens: bool = True, context=()):
        import codecs
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.skipped = tokenizer.special_ids if skip_special_tokens else frozenset()
        self.byte_of = tokenizer.byte_values
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")  # (a run of byte tokens)
        self._char_start = 0  # (where the character the decoder holds bytes of began)
        # those that make text (a skipped special token does not), after a few of the
        # tokens the text follows (Tokenizer.completion_text)
        self.ids, self.read, _ = tokenizer._context(context, skip_special_tokens)
        self.prefix = 0  # ids[prefix:read]: context; ids[read:]: not yet shown
        tail = self.ids[self.read:]
        if tail and all(i in self.byte_of for i in tail):  # (the context's unfinished character)
            self._utf8.decode(bytes(self.byte_of[i] for i in tail))
            self._char_start, self.read = self.read, len(self.ids)
        self.text = ""

    def push(self, token: int) -> str:
        if token in self.skipped:
            return ""
        b = self.byte_of.get(token)
        if b is not None:
            piece = self._show() if self.read < len(self.ids) else ""  # (held tokens before the run)
            if not self._utf8.getstate()[0]:
                self._char_start = len(self.ids)
            new = self._utf8.decode(bytes((b,)))
            if not self.ids:  # (a sequence's first text: the decoder's, that may strip a space)
                new = self.tok.decode([token], skip_special_tokens=self.skip) if b < 0x80 else new
            self.ids.append(token)
            piece += new
            self.read = len(self.ids)
            if not self._utf8.getstate()[0]:  # (a whole character: the next piece's context)
                self.prefix = self._char_start
        else:
            piece = ""
            if self._utf8.getstate()[0]:  # (a character the run left unfinished: U+FFFD, as errors="replace")
                piece = self._utf8.decode(b"", final=True)
            self.ids.append(token)
            piece += self._show(held_ok=True)
        self.text += piece
        return piece

    def _show(self, held_ok: bool = False) -> str:
        """The text of ids[read:] after its context; "" while it may still be an unfinished
        character (``held_ok``; up to MAX_HELD tokens)."""
        before = self.tok.decode_one(self.ids[self.prefix:self.read], self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        done = len(after) > len(before) and not after.endswith("\ufffd")
        if held_ok and not done and len(self.ids) - self.read < self.MAX_HELD:
            return ""
        piece = after[len(before):]
        if piece:  # (an empty one keeps its context: a decoder may strip a first word's space)
            self.prefix = self.read
        self.read = len(self.ids)
        return piece


@functools.lru_cache(maxsize=16)
def _compile_template(text: str):
    return _template_env().from_string(text)


def _template_env():
    """A sandboxed jinja2 environment with what Hugging Face chat templates use."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    version = tuple(int(x) for x in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < (3, 1, 6):  # (a model's chat template is code from the model's download)
        raise ValueError(f"jinja2 {jinja2.__version__} is installed; chat templates need jinja2 >= 3.1.6 (in earlier "
                         "versions a template can escape the sandbox and read the process's memory, its environment "
                         "variables included: CVE-2025-27516, CVE-2024-56326): pip install -U 'jinja2>=3.1.6'.")

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (marks the assistant's tokens for
        training masks in transformers): renders its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(msg):
        raise ValueError(f"chat template error: {msg}")

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, GenerationBlocks])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env
