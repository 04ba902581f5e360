"""Loom: a parallel decoding engine over one shared paged KV cache."""
try:
    from .llm import LLM  # (imports torch, which engine._C needs loaded first: ~2 s)
    from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
    from .sampling_params import SamplingParams
except KeyboardInterrupt:
    import os as _os
    import sys as _sys
    if _os.path.basename(_sys.argv[0]) == "loom":  # the `loom` command, stopped before its handler runs
        _sys.stderr.write("\nloom: interrupted\n")
        raise SystemExit(130) from None
    raise

__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "RequestMetrics", "Logprob"]
__version__ = "0.1.0"
