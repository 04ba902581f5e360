"""Loom: a parallel decoding engine over one shared paged KV cache."""
from __future__ import annotations

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics"]
__version__ = "0.1.0"

# The public names load on first use (PEP 562): `import engine` (the `loom` command's entry
# point) does not import torch, so a Ctrl-C or an error while it loads lands inside the
# command's own handling, and `loom --help` answers at once.
_WHERE = {"LLM": ".llm", "SamplingParams": ".sampling_params", "RequestOutput": ".outputs",
          "CompletionOutput": ".outputs", "RequestMetrics": ".outputs"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        value = getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'engine' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_WHERE))
