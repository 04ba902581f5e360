"""Tokenizer (``tokenizer.json`` via ``tokenizers``) and chat template (jinja2)."""
from __future__ import annotations

import json
import os
from datetime import datetime

from tokenizers import Tokenizer as _HFTokenizer


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    def __init__(self, model_dir: str):
        path = os.path.join(model_dir, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: Loom needs the fast tokenizer file "
                                    "tokenizer.json in the model directory.")
        self._tok = _HFTokenizer.from_file(path)
        cfg_path = os.path.join(model_dir, "tokenizer_config.json")
        self.config: dict = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                self.config = json.load(f)
        self.chat_template = self.config.get("chat_template")
        tmpl_path = os.path.join(model_dir, "chat_template.jinja")
        if self.chat_template is None and os.path.isfile(tmpl_path):
            with open(tmpl_path) as f:
                self.chat_template = f.read()
        if isinstance(self.chat_template, list):  # named templates: take "default"
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default", next(iter(named.values()), None))
        self.bos_token = _token_str(self.config.get("bos_token"))
        self.eos_token = _token_str(self.config.get("eos_token"))
        self.add_bos = bool(self.config.get("add_bos_token", False))
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # tokenizer.json post-processors usually add BOS themselves; add it only when
        # the config asks for it and the post-processor did not.
        if add_special_tokens and self.add_bos and self.bos_token is not None:
            bos = self._tok.token_to_id(self.bos_token)
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise ValueError("This model has no chat template (no 'chat_template' in "
                             "tokenizer_config.json or chat_template.jinja); use generate() "
                             "with a plain prompt instead.")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"Chat message {m!r} must be a dict with 'role' and 'content'.")
        if self._compiled is None:
            import jinja2
            import jinja2.ext
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise ValueError(f"chat template error: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent,
                                                                             ensure_ascii=False)
            self._compiled = env.from_string(self.chat_template)
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")
