"""Ctrl-C during an engine call, delivered where the engine's state is whole.

Python raises KeyboardInterrupt between any two bytecodes of the main thread. Inside
the engine's bookkeeping (pages, segments, reservations, the busy flag) that leaves
half-made updates: pages held for good, or an LLM that refuses every later call. So,
during an engine call on the main thread (and only while Python's own SIGINT handler is
installed), a Ctrl-C is recorded and raised at the next safe point instead: between two
decoder layers or at the start of a forward step (``check``: as a forward that failed,
which the callers undo), or when the call ends, also when it ends with another error
(that error becomes the KeyboardInterrupt's context). A second Ctrl-C while one waits
is raised at once: a way out of anything that never reaches a safe point, without the
guarantees.
"""
from __future__ import annotations

import os
import signal
import threading


class DeferredInterrupt:
    def __init__(self):
        self._depth = 0        # engine calls open in the main thread (nested: another LLM's, close())
        self._prev = None      # the handler to restore; None when this one was not installed
        self.pending = False

    @staticmethod
    def _main() -> bool:
        return threading.current_thread() is threading.main_thread()

    def _on_sigint(self, signum, frame):
        if self._depth == 0 or self.pending:  # outside a call (a window at its edges), or a second Ctrl-C
            self.pending = False
            raise KeyboardInterrupt
        self.pending = True

    def __enter__(self):
        if not self._main():
            return self
        depth = self._depth + 1
        try:  # (a Ctrl-C before the handler is in place leaves the depth as it was)
            self._depth = depth
            if depth == 1:
                self.pending = False
                cur = signal.getsignal(signal.SIGINT)
                if cur is signal.default_int_handler:
                    self._prev = cur
                    signal.signal(signal.SIGINT, self._on_sigint)
                elif cur == self._on_sigint:  # left installed by an interrupted exit: acts as Python's
                    self._prev = signal.default_int_handler
        except BaseException:
            self._depth = depth - 1
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        if not self._main() or self._depth == 0:  # (0: a forked child that returns through here)
            return False
        self._depth -= 1
        if self._depth > 0:
            return False
        # From here a Ctrl-C raises where it lands (_on_sigint at depth 0, then Python's own).
        if self._prev is not None:
            prev, self._prev = self._prev, None
            signal.signal(signal.SIGINT, prev)
        if self.pending:
            self.pending = False
            if exc_type is None or not issubclass(exc_type, KeyboardInterrupt):
                raise KeyboardInterrupt  # (another error in flight becomes its __context__)
        return False

    def check(self) -> None:
        """A safe point: raise the Ctrl-C that waits, if any (main thread only)."""
        if self.pending and self._main():
            self.pending = False
            raise KeyboardInterrupt

    def _after_fork_in_child(self):
        """A process forked inside an engine call (a protocol's callback starting a worker)
        starts with Python's own handling of Ctrl-C, not a deferral nobody will end."""
        installed = self._prev is not None
        self._depth, self._prev, self.pending = 0, None, False
        try:
            if installed or signal.getsignal(signal.SIGINT) == self._on_sigint:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        except ValueError:  # (forked from another thread: signal.signal wants the main one)
            pass


DEFERRED = DeferredInterrupt()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=DEFERRED._after_fork_in_child)
