"""The one place a NATS connection is made: a worker's reconnects forever and says so in the
log; a command's (``connect_once``) gives up after the connect timeout."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any, Final

import nats
from nats.aio.client import Client

from workers.runtime.settings import RuntimeSettings

log = logging.getLogger(__name__)

ERROR_LOG_EVERY_S: Final = 30.0


async def connect(settings: RuntimeSettings, *, name: str) -> Client:
    """Connect with endless reconnects; a worker rides out server restarts and failovers."""

    said: dict[str, tuple[float, int]] = {}

    async def on_error(exc: Exception) -> None:
        # the same error for every message of a batch (a full store refusing each publish)
        # is said once, then once every ERROR_LOG_EVERY_S with how many were not said
        key = f"{type(exc).__name__}{getattr(exc, 'err_code', '')}"
        now = time.monotonic()
        at, held = said.get(key, (-ERROR_LOG_EVERY_S, 0))
        if now - at < ERROR_LOG_EVERY_S:
            said[key] = (at, held + 1)
            return
        said[key] = (now, 0)
        more = f" ({held} more like it not logged)" if held else ""
        log.warning("nats: %s%s", exc, more)

    async def on_disconnected() -> None:
        if nc.is_closed or nc.is_draining:
            log.debug("nats: connection closed")
        else:
            log.warning("nats: disconnected")

    async def on_reconnected() -> None:
        log.info("nats: reconnected to %s", nc.connected_url)

    options: dict[str, Any] = {
        "servers": [u.strip() for u in settings.nats_url.split(",") if u.strip()],
        "name": name,
        "connect_timeout": settings.nats_connect_timeout_s,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "allow_reconnect": True,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
        # a worker that keeps a few MB in flight should not be cut off as a slow consumer
        "pending_size": 64 * 1024 * 1024,
        "inbox_prefix": settings.nats_inbox_prefix,
    }
    if settings.nats_user is not None:
        options["user"] = settings.nats_user
    if settings.nats_password is not None:
        options["password"] = settings.nats_password.get_secret_value()
    if settings.nats_creds_file is not None:
        options["user_credentials"] = settings.nats_creds_file
    if settings.nats_tls_ca is not None:
        options["tls"] = ssl.create_default_context(cafile=settings.nats_tls_ca)
    nc = await nats.connect(**options)
    return nc


class _FirstSaid(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.said: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.said is None:
            self.said = record.getMessage().removeprefix("nats: ")


async def connect_once(settings: RuntimeSettings, name: str) -> Client:
    """A connection for a command, not a worker: give up after the connect timeout.

    The runtime's ``connect`` retries forever (right for a worker riding out a restart);
    a command's user wants one line instead, so its reconnect warnings are kept quiet. The
    first one is the TimeoutError's message: a refused password is not a server down.
    """
    level, propagate = log.level, log.propagate
    heard = _FirstSaid()
    log.setLevel(logging.WARNING)
    log.propagate = False
    log.addHandler(heard)
    try:
        return await asyncio.wait_for(connect(settings, name=name), settings.nats_connect_timeout_s)
    except TimeoutError:
        if heard.said is None:
            raise
        raise TimeoutError(heard.said) from None
    finally:
        log.removeHandler(heard)
        log.propagate = propagate
        log.setLevel(level)
