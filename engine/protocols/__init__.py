"""Protocols: policies that drive threads through the engine verbs."""
from .base import Protocol, ProtocolRun
from .sampling import ParallelSampling, last_boxed

__all__ = ["Protocol", "ProtocolRun", "ParallelSampling", "last_boxed"]
