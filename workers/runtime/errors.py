"""Exceptions that decide what happens to a message. The docstring is the default message."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nats.aio.msg import Msg

    from workers.runtime.pull import AckInfo


class TickwireError(Exception):
    """tickwire failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class TransientError(TickwireError):
    """A dependency is unavailable for now; the message is retried later with backoff."""


class Misdeployed(TickwireError):
    """The deployment keeps this worker from starting or going on: ops must change it,
    retrying won't."""


class Rejected(TickwireError):
    """The message is bad input: it goes to the dead letters with ``reason`` and is acked."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ReplayFailed(TickwireError):
    """Rebuilding a stateful worker's state at start raised on one message: the start is made
    again without it (``Context.skipped``), and it is dead-lettered unless it was acked (with
    the reason of a ``Rejected`` cause, else ``handler_error``)."""

    def __init__(self, msg: Msg, info: AckInfo, cause: Exception, *, acked: bool) -> None:
        super().__init__(f"seq {info.stream_seq}: {cause!r}")
        self.msg = msg
        self.info = info
        self.cause = cause
        self.acked = acked
        """Acked before: its effects went out, or it was dead-lettered then."""
