"""Protocols: policies that drive threads through the engine verbs (fork, join,
inject, finish). Use as ``llm.generate(prompts, params, protocol=Multiverse())``."""
from .base import Protocol, ProtocolRun
from .hogwild import Hogwild
from .parathinker import ParaThinker
from .sampling import ParallelSampling, last_boxed
from .tagged import Multiverse, ParallelR1, Tags, ThreadWeaver
from .tree import TreeLimits

__all__ = ["Protocol", "ProtocolRun", "ParallelSampling", "Multiverse", "ThreadWeaver",
           "ParallelR1", "ParaThinker", "Hogwild", "Tags", "TreeLimits", "last_boxed"]
