"""Exceptions that decide what happens to a message. The docstring is the default message."""

from __future__ import annotations


class TickwireError(Exception):
    """tickwire failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class TransientError(TickwireError):
    """A dependency is unavailable for now; the message is retried later with backoff."""


class Misdeployed(TickwireError):
    """The deployment keeps this worker from starting: ops must change it, retrying won't."""


class Rejected(TickwireError):
    """The message is bad input: it goes to the dead letters with ``reason`` and is acked."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
