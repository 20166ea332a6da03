"""Replicated Python objects: ``@replicated`` methods, ``Objects`` (their state machine) and
ready-made ones (``ReplCounter``, ``ReplDict``, ``ReplLock``). See ``replicated.py``."""

from raftfast.objects.batteries import ReplCounter, ReplDict, ReplLock
from raftfast.objects.replicated import Objects, readonly, replicated

__all__ = ["Objects", "ReplCounter", "ReplDict", "ReplLock", "readonly", "replicated"]
