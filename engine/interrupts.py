"""Ctrl-C during an engine call, delivered where the engine's state is whole.

Python raises KeyboardInterrupt between any two bytecodes of the main thread. Inside
the engine's bookkeeping (pages, segments, reservations, the busy flag) that leaves
half-made updates: pages held for good, or an LLM that refuses every later call. So,
during an engine call on the main thread (and only while Python's own SIGINT handler is
installed), a Ctrl-C is recorded and raised at the next safe point instead: the start
of a forward step (``check``, in ``Runner.run``: as a forward that failed at once, which
the callers undo) or the end of the call. A second Ctrl-C while one waits is raised at
once: a way out of anything that never reaches a safe point, without the guarantees.
"""
from __future__ import annotations

import signal
import threading


class DeferredInterrupt:
    def __init__(self):
        self._depth = 0        # nested engine calls in the main thread (another LLM's, or close())
        self._prev = None      # the handler to restore; None when this one is not installed
        self.pending = False

    def _on_sigint(self, signum, frame):
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt
        self.pending = True

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._depth == 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._prev = signal.signal(signal.SIGINT, self._on_sigint)
        self._depth += 1
        return self

    def __exit__(self, exc_type, exc, tb):
        if threading.current_thread() is not threading.main_thread():
            return False
        self._depth -= 1
        if self._depth == 0 and self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
            self._prev = None
            if self.pending:
                self.pending = False
                if exc_type is None:
                    raise KeyboardInterrupt
        return False

    def check(self) -> None:
        """A safe point: raise the Ctrl-C that waits, if any (main thread only)."""
        if self.pending and threading.current_thread() is threading.main_thread():
            self.pending = False
            raise KeyboardInterrupt


DEFERRED = DeferredInterrupt()
