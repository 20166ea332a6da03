"""Replicated Python objects: ``@replicated`` methods, ``Objects`` (their state machine) and
ready-made ones (``ReplCounter``, ``ReplDict``, ``ReplList``, ``ReplSet``, ``ReplQueue``,
``ReplLock``). See ``replicated.py``."""

from raftfast.objects.batteries import (
    ReplCounter,
    ReplDict,
    ReplList,
    ReplLock,
    ReplQueue,
    ReplSet,
)
from raftfast.objects.replicated import Objects, readonly, replicated

__all__ = [
    "Objects",
    "ReplCounter",
    "ReplDict",
    "ReplList",
    "ReplLock",
    "ReplQueue",
    "ReplSet",
    "readonly",
    "replicated",
]
