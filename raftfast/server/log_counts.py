"""A warning that a flood may set off many times a second, logged as a count: at most one
line every ``every`` seconds, saying how many times it happened since the last one. What a
flood that stopped left unsaid is said ``every`` seconds after the last line (on the running
loop; with no loop running, with the next time it happens)."""

from __future__ import annotations

import asyncio
import logging
import time

__all__ = ["CountedWarning"]


class CountedWarning:
    """``message``'s first ``%d`` is the count; the rest are ``note``'s arguments, as of the
    latest ``note``."""

    def __init__(self, logger: logging.Logger, message: str, every: float) -> None:
        self.logger = logger
        self.message = message
        self.every = every
        self._unsaid = 0
        self._args: tuple[object, ...] = ()
        self._said_at = float("-inf")
        self._later: asyncio.TimerHandle | None = None

    def note(self, *args: object) -> None:
        """It happened once more."""
        self._unsaid += 1
        self._args = args
        now = time.monotonic()
        if now - self._said_at >= self.every:
            self._say(now)
        elif self._later is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._later = loop.call_later(self._said_at + self.every - now, self._flush)

    def _flush(self) -> None:
        self._later = None
        if self._unsaid:
            self._say(time.monotonic())

    def _say(self, now: float) -> None:
        self.logger.warning(self.message, self._unsaid, *self._args)
        self._unsaid, self._said_at = 0, now
