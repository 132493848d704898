"""The active model of every series, kept current by a watch on the registry's pointers.

At start the watch delivers every pointer; scoring begins once all are read and their
models loaded. After that each promotion, rollback or deletion arrives on the watch: the
new version is loaded first, then the pointer switches, so the next vector of that series
is scored by it without a restart and without waiting for a load. Models no pointer names
any more are dropped.

The watch runs in one task owned here, started by ``start`` and cancelled by ``stop``; if
it fails (the server went away) it is made again and re-reads every pointer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Final

import nats.errors
from nats.js.errors import Error as JetStreamError
from nats.js.kv import KeyValue
from tqdm import tqdm

from contracts.messages import Timeframe
from workers.model_scorer.scoring import Model, ModelError
from workers.registry import Registry, RegistryError, active_key, pointer_of
from workers.runtime.errors import TransientError

log = logging.getLogger(__name__)

UNREADABLE: Final = ""
"""Pointer value of a key whose entry cannot be read: its vectors are refused."""
RETRY_UNUSABLE_S: Final = 30.0
"""How long a version that cannot score is refused before it is loaded again."""
_NATS_ERRORS: Final = (nats.errors.Error, JetStreamError, TimeoutError, ConnectionError)

OnChange = Callable[[str, str | None], None]
"""Called with the registry key and its new version (None: no active model)."""


class ActiveModels:
    def __init__(
        self, registry: Registry, *, threads: int = 1, on_change: OnChange | None = None
    ) -> None:
        self.registry = registry
        self.threads = threads
        self.on_change = on_change
        self.pointers: dict[str, str] = {}
        """Registry key -> active version."""
        self._models: dict[str, Model | ModelError] = {}
        """Version -> loaded model, or why it cannot score; only versions a pointer names."""
        self._failed_at: dict[str, float] = {}
        """Version -> monotonic time its load last failed; it is tried again after
        ``RETRY_UNUSABLE_S`` (a lost model file put back, a registry repaired)."""
        self._keys: dict[tuple[str, str, Timeframe], str] = {}
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- life cycle ------------------------------------------------------------------

    async def start(self, timeout_s: float) -> None:
        """Start the watch; return once every pointer is read and its model loaded."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._watch())
        waiting = asyncio.ensure_future(self._ready.wait())
        done, _ = await asyncio.wait(
            {waiting, self._task}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
        if waiting not in done:
            waiting.cancel()
            raise TransientError("the registry's active pointers could not be read in time")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        failures = 0
        while True:
            try:
                watcher = await self.registry.watch_active()
            except Exception as exc:
                failures += 1
                log.warning("registry watch could not start: %r", exc)
                await asyncio.sleep(min(0.5 * 2**failures, 30.0))
                continue
            try:
                await self._follow(watcher)
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning("registry watch failed: %r; watching again", exc)
                await asyncio.sleep(min(0.5 * 2**failures, 30.0))
            finally:
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]

    async def _follow(self, watcher: KeyValue.KeyWatcher) -> None:
        initial: dict[str, str] | None = {}
        newest = 0  # the stream sequence of the latest entry received
        until: int | None = None  # once the watch says all are delivered: up to which seq
        async for entry in watcher:
            if entry is not None:
                newest = max(newest, entry.revision or 0)
            elif initial is not None:
                until = await _delivered_through(watcher)
            if initial is not None:
                if entry is not None and (version := _version(entry)) is not None:
                    initial[entry.key] = version
                if until is not None and newest >= until:  # every pointer received once
                    await self._replace(initial)
                    initial = None
                    self._ready.set()
                continue
            if entry is None:
                continue
            version = _version(entry)
            if version is not None:
                # loaded before the switch; if the registry cannot be read now, the first
                # vector of the series tries again
                with contextlib.suppress(TransientError):
                    await self._load(version)
                self.pointers[entry.key] = version
            else:
                self.pointers.pop(entry.key, None)
            log.info("active model of %s: %s", entry.key, version)
            self._changed(entry.key, version)

    async def _replace(self, pointers: dict[str, str]) -> None:
        versions = sorted(set(pointers.values()) - {UNREADABLE})
        for version in tqdm(versions, desc="loading models", unit="model", disable=None):
            await self._load(version)
        gone = self.pointers.keys() - pointers.keys()
        self.pointers = dict(pointers)
        for key in gone:
            self._changed(key, None)
        for key, version in pointers.items():
            self._changed(key, version)

    def _changed(self, key: str, version: str | None) -> None:
        wanted = set(self.pointers.values())
        for stale in self._models.keys() - wanted:
            del self._models[stale]
            self._failed_at.pop(stale, None)
        if self.on_change is not None:
            # a version that cannot score is no version the series is scored by
            usable = not isinstance(self._models.get(version or ""), ModelError)
            self.on_change(key, version if usable else None)

    # --- scoring side ----------------------------------------------------------------

    def key(self, feed: str, symbol: str, tf: Timeframe) -> str:
        series = (feed, symbol, tf)
        key = self._keys.get(series)
        if key is None:
            key = self._keys[series] = active_key(feed, symbol, tf)
        return key

    async def model_for(self, key: str) -> Model | None:
        """The active model of a series now; None when none is active.

        Raises ``ModelError`` when it cannot score and ``TransientError`` when the registry
        cannot be read now.
        """
        version = self.pointers.get(key)
        if version is None:
            return None
        if version == UNREADABLE:
            raise ModelError(f"the active pointer {key} cannot be read")
        model = self._models.get(version)
        if model is None or isinstance(model, ModelError):
            model = await self._load(version)
        if isinstance(model, ModelError):
            raise model
        return model

    async def _load(self, version: str) -> Model | ModelError | None:
        if version == UNREADABLE:
            return None
        known = self._models.get(version)
        if known is not None and not (
            isinstance(known, ModelError)
            and time.monotonic() - self._failed_at.get(version, 0.0) >= RETRY_UNUSABLE_S
        ):
            return known
        model: Model | ModelError
        try:
            card, booster = await self.registry.get(version)
            model = Model.load(card, booster, threads=self.threads)
        except RegistryError as exc:
            model = ModelError(str(exc))
        except _NATS_ERRORS as exc:
            raise TransientError(f"model {version} cannot be read now: {exc!r}") from exc
        except ModelError as exc:
            model = exc
        self._models[version] = model
        if isinstance(model, ModelError):
            log.error("active model %s cannot score: %s", version, model)
            self._failed_at[version] = time.monotonic()
        else:
            self._failed_at.pop(version, None)
        if isinstance(known, ModelError) != isinstance(model, ModelError):
            for key, pointed in self.pointers.items():
                if pointed == version:
                    self._changed(key, version)
        return model


async def _delivered_through(watcher: KeyValue.KeyWatcher) -> int:
    """The stream sequence of the last entry the watch's consumer has sent.

    nats-py says every entry is delivered (``None``) when the server has none left to send,
    which can be before those already sent have arrived (nats-io/nats.py#842): scoring would
    start without their models and dead-letter vectors as having none.
    """
    sub = watcher._sub  # the watch's own subscription
    if sub is None:
        return 0
    info = await sub.consumer_info()
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


def _version(entry: KeyValue.Entry) -> str | None:
    try:
        pointer = pointer_of(entry)
    except RegistryError as exc:
        log.error("%s", exc)
        return UNREADABLE
    return None if pointer is None else pointer.version
