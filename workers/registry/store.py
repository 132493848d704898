"""The model registry over NATS JetStream: no shared disk between machines.

Two buckets (both named ``models``; ``ns-<namespace>-models`` in a namespace):

- Object store: per version, ``<version>.model`` (the LightGBM text model) and
  ``<version>.card`` (its ``ModelCard`` as JSON). The card is written last: a version
  without a card is an unfinished put and is not listed.
- Key-value: per (feed, symbol, timeframe), ``active.<feed>.<escaped symbol>.<tf>`` holds
  an ``ActiveModel``: the active version and those active before it. Promotion and
  rollback write it with the revision they read (``kv.update(..., last=revision)``), so two
  concurrent writers cannot overwrite each other: the later one gets ``RegistryConflict``.

A model is handed out only whole: its bytes hash to its version, LightGBM loads them, and
the booster's feature names are the card's. Anything else is a ``RegistryError`` and
changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import lightgbm
import msgspec
from nats.js import JetStreamContext
from nats.js.errors import (
    BucketNotFoundError,
    DigestMismatchError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from contracts import subjects
from contracts.messages import Timeframe
from contracts.models import ActiveModel, ModelCard, ModelStatus
from contracts.streams import stored_subjects
from workers.registry.gate import should_promote

BUCKET: Final = "models"
MODEL_SUFFIX: Final = ".model"
CARD_SUFFIX: Final = ".card"
ACTIVE_PREFIX: Final = "active"
KEEP_HISTORY: Final = 32
"""Previous and retired versions remembered per key."""
KV_HISTORY: Final = 16
"""Revisions the KV bucket keeps per key, for audit."""

_card_decoder: Final = msgspec.json.Decoder(ModelCard)
_active_decoder: Final = msgspec.json.Decoder(ActiveModel)
_encoder: Final = msgspec.json.Encoder()


class RegistryError(Exception):
    """The model registry refused the operation; nothing was changed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class RegistryConflict(RegistryError):
    """Another promotion or rollback changed the active model first; nothing was changed."""


def version_of(artifact: bytes) -> str:
    """The version of a model file: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(artifact).hexdigest()[:16]


def bucket_name(namespace: str | None = None) -> str:
    if namespace is None:
        return BUCKET
    return f"ns-{subjects.check_name(namespace, 'namespace')}-{BUCKET}"


def active_key(feed: str, symbol: str, tf: Timeframe | str) -> str:
    """The KV key of the active model of one series (symbols escaped: ``US500=2Ecash``)."""
    try:
        tf = Timeframe(tf)
    except ValueError:
        raise RegistryError(f"unknown timeframe: {tf!r}") from None
    try:
        return f"{ACTIVE_PREFIX}.{subjects.check_name(feed, 'feed')}.{subjects.escape(symbol)}.{tf.value}"
    except subjects.SubjectError as exc:
        raise RegistryError(str(exc)) from None


def load_booster(artifact: bytes, what: str) -> lightgbm.Booster:
    """A booster from LightGBM's text model format, or ``RegistryError``.

    LightGBM aborts or crashes the whole process on some truncated model texts instead of
    raising, so the text is first checked to run from the first tree to the last line
    ``model_to_string`` writes. ``get`` hands LightGBM only bytes that hash to their
    version, which were loaded once already by ``put``.
    """
    try:
        text = artifact.decode()
    except UnicodeDecodeError as exc:
        raise RegistryError(f"{what}: LightGBM cannot load it: {exc}") from None
    if not _whole_model_text(text):
        raise RegistryError(f"{what}: LightGBM cannot load it: not a whole LightGBM text model")
    try:
        return lightgbm.Booster(model_str=text)
    except lightgbm.basic.LightGBMError as exc:
        raise RegistryError(f"{what}: LightGBM cannot load it: {exc}") from None


def _whole_model_text(text: str) -> bool:
    trees_end = text.find("\nend of trees\n")
    if not text.startswith("tree\n") or trees_end < 0 or not text.endswith("\n"):
        return False
    if text.find("\nend of parameters\n", trees_end) < 0:
        return False
    return text.rstrip("\n").rsplit("\n", 1)[-1].startswith("pandas_categorical:")


async def _versions(js: JetStreamContext, bucket: str) -> list[str]:
    """Every version with a card stored in ``bucket`` (a deleted one: its card is gone)."""
    prefix = f"$O.{bucket}.M."
    try:
        encoded = await stored_subjects(js, f"OBJ_{bucket}", prefix)
    except NotFoundError:
        return []
    names = (base64.urlsafe_b64decode(e).decode() for e in encoded)
    return sorted(n.removesuffix(CARD_SUFFIX) for n in names if n.endswith(CARD_SUFFIX))


@dataclass(frozen=True, slots=True)
class Promotion:
    """What ``prepare_promotion`` decided, and the pointer revision it decided on."""

    card: ModelCard
    key: str
    current: ActiveModel | None
    revision: int
    """KV revision of ``current``; 0 when the key does not exist."""
    promote: bool
    reason: str

    @property
    def already_active(self) -> bool:
        return self.current is not None and self.current.version == self.card.version


class Registry:
    """Model files, their cards and the active pointers, in JetStream."""

    def __init__(
        self, js: JetStreamContext, objects: ObjectStore, pointers: KeyValue, bucket: str
    ) -> None:
        self._js = js
        self._objects = objects
        self._pointers = pointers
        self.bucket = bucket

    @classmethod
    async def open(
        cls, js: JetStreamContext, *, namespace: str | None = None, create: bool = True
    ) -> Registry:
        """Open the registry's buckets; create them when missing (a reader passes False)."""
        name = bucket_name(namespace)
        try:
            objects = await js.object_store(name)
            pointers = await js.key_value(name)
        except BucketNotFoundError:
            if not create:
                raise RegistryError(f"model registry {name!r} does not exist") from None
            objects = await js.create_object_store(name, description="tickwire model files")
            pointers = await js.create_key_value(
                bucket=name, history=KV_HISTORY, description="tickwire active models"
            )
        return cls(js, objects, pointers, name)

    # --- models --------------------------------------------------------------------------

    async def put(self, artifact: bytes, card: ModelCard) -> str:
        """Store a model as a candidate; return its version. The same bytes again: a no-op,
        or the repair of a version whose model file was lost.

        ``card.version`` and ``card.artifact_sha256`` are set here from the bytes (a card
        that names a different version is refused). A put of bytes already stored keeps the
        card stored first.
        """
        sha = hashlib.sha256(artifact).hexdigest()
        version = sha[:16]
        if card.version and card.version != version:
            raise RegistryError(f"card names version {card.version}, the artifact is {version}")
        booster = load_booster(artifact, f"model {version}")
        card = msgspec.structs.replace(
            card, version=version, artifact_sha256=sha, status=ModelStatus.CANDIDATE
        )
        card = _valid_card(card)
        _check_features(card, booster)
        if await self._card_or_none(version) is not None:
            if not await self._artifact_whole(version, sha):
                # the same bytes again repair a version whose model file was lost
                await self._objects.put(version + MODEL_SUFFIX, artifact)
            return version
        await self._objects.put(version + MODEL_SUFFIX, artifact)
        await self._objects.put(version + CARD_SUFFIX, _encoder.encode(card))
        return version

    async def card(self, version: str) -> ModelCard:
        """The card of ``version`` with its current status (no artifact check)."""
        card = await self._card_or_none(version)
        if card is None:
            raise RegistryError(f"unknown model version: {version!r}")
        current, _ = await self._read_active(active_key(card.feed, card.symbol, card.tf))
        return _with_status(card, current)

    async def get(self, version: str) -> tuple[ModelCard, lightgbm.Booster]:
        """The card and the loaded booster of ``version``, verified whole, or RegistryError."""
        card = await self.card(version)
        try:
            result = await self._objects.get(version + MODEL_SUFFIX)
        except DigestMismatchError:
            raise RegistryError(
                f"model {version}: stored chunks do not match their digest"
            ) from None
        except NotFoundError:
            raise RegistryError(f"model {version}: artifact is missing") from None
        artifact = bytes(result.data or b"")
        if hashlib.sha256(artifact).hexdigest() != card.artifact_sha256:
            raise RegistryError(f"model {version}: artifact does not hash to its version")
        booster = load_booster(artifact, f"model {version}")
        _check_features(card, booster)
        return card, booster

    async def list(
        self,
        feed: str | None = None,
        symbol: str | None = None,
        tf: Timeframe | str | None = None,
    ) -> list[ModelCard]:
        """Cards of every stored version that matches, oldest first, with their status."""
        if feed is not None or symbol is not None or tf is not None:
            active_key(feed or "x", symbol or "x", tf or Timeframe.M1)  # refuse bad filters
        cards = []
        for version in await _versions(self._js, self.bucket):
            card = await self._card_or_none(version)
            if card is None:
                continue
            if feed is not None and card.feed != feed:
                continue
            if symbol is not None and card.symbol != symbol:
                continue
            if tf is not None and card.tf != tf:
                continue
            cards.append(card)
        pointers: dict[str, ActiveModel | None] = {}
        out = []
        for card in cards:
            key = active_key(card.feed, card.symbol, card.tf)
            if key not in pointers:
                pointers[key] = (await self._read_active(key))[0]
            out.append(_with_status(card, pointers[key]))
        return sorted(out, key=lambda c: (c.created_at_ms, c.version))

    # --- active pointers -----------------------------------------------------------------

    async def active(self, feed: str, symbol: str, tf: Timeframe | str) -> ActiveModel | None:
        """The active pointer of one series, or None when nothing was promoted yet."""
        current, _ = await self._read_active(active_key(feed, symbol, tf))
        return current

    async def prepare_promotion(
        self, version: str, *, force: bool = False, metric: str = "auc", min_gain: float = 0.0
    ) -> Promotion:
        """Verify ``version`` and decide, against the active model read now, whether to promote.

        Without ``force`` the gate compares the card's metrics with the active model's
        stored ones. Nothing is written: ``commit`` does that, only if the pointer is still
        at the revision read here.
        """
        card, _ = await self.get(version)
        key = active_key(card.feed, card.symbol, card.tf)
        current, revision = await self._read_active(key)
        if current is not None and current.version == version:
            return Promotion(card, key, current, revision, False, f"{version} is already active")
        if force:
            ok, reason = True, "forced"
        else:
            active_metrics = None
            if current is not None:
                active_card = await self._card_or_none(current.version)
                active_metrics = active_card.metrics if active_card is not None else None
            ok, reason = should_promote(
                card.metrics, active_metrics, metric=metric, min_gain=min_gain
            )
        return Promotion(card, key, current, revision, ok, reason)

    async def commit(self, promotion: Promotion) -> ActiveModel:
        """Make the prepared version active, if nobody changed the pointer since."""
        if not promotion.promote:
            raise RegistryError(f"not promoted: {promotion.reason}")
        current = promotion.current
        previous = [] if current is None else [*current.previous, current.version]
        retired = [] if current is None else current.retired
        pointer = ActiveModel(
            version=promotion.card.version,
            previous=_bounded(v for v in previous if v != promotion.card.version),
            retired=_bounded(v for v in retired if v != promotion.card.version),
            changed_at_ms=time.time_ns() // 1_000_000,
            reason=f"promoted: {promotion.reason}",
        )
        await self._write_active(promotion.key, pointer, promotion.revision)
        return pointer

    async def promote(
        self, version: str, *, force: bool = False, metric: str = "auc", min_gain: float = 0.0
    ) -> tuple[bool, str]:
        """Promote ``version`` if it passes the gate (or ``force``); return (promoted, reason).

        A candidate that does not beat the active model stays a candidate: (False, reason).
        """
        promotion = await self.prepare_promotion(
            version, force=force, metric=metric, min_gain=min_gain
        )
        if not promotion.promote:
            return False, promotion.reason
        await self.commit(promotion)
        return True, promotion.reason

    async def rollback(self, feed: str, symbol: str, tf: Timeframe | str) -> ActiveModel:
        """Make the previously active version active again; the current one is retired."""
        key = active_key(feed, symbol, tf)
        current, revision = await self._read_active(key)
        if current is None:
            raise RegistryError(f"no active model for {feed} {symbol} {tf}")
        if not current.previous:
            raise RegistryError(f"no previous version to roll back to for {feed} {symbol} {tf}")
        target = current.previous[-1]
        await self.get(target)
        pointer = ActiveModel(
            version=target,
            previous=current.previous[:-1],
            retired=_bounded([*current.retired, current.version]),
            changed_at_ms=time.time_ns() // 1_000_000,
            reason=f"rolled back from {current.version}",
        )
        await self._write_active(key, pointer, revision)
        return pointer

    async def watch_active(self) -> KeyValue.KeyWatcher:
        """A watch of every active pointer: each key's current entry, then ``None`` once all
        are delivered, then each promotion, rollback or deletion as it is written. Read the
        entries with ``pointer_of``; ``stop()`` the watcher when done."""
        return await self._pointers.watch(f"{ACTIVE_PREFIX}.>")

    # --- storage -------------------------------------------------------------------------

    async def _card_or_none(self, version: str) -> ModelCard | None:
        if not _looks_like_version(version):
            raise RegistryError(f"not a model version (16 hex digits): {version!r}")
        try:
            result = await self._objects.get(version + CARD_SUFFIX)
        except NotFoundError:
            return None
        except DigestMismatchError:
            raise RegistryError(f"model {version}: stored card does not match its digest") from None
        try:
            card = _card_decoder.decode(result.data or b"")
        except msgspec.DecodeError as exc:
            raise RegistryError(f"model {version}: unreadable card: {exc}") from None
        if card.version != version:
            raise RegistryError(f"model {version}: its card names version {card.version}")
        return card

    async def _artifact_whole(self, version: str, sha: str) -> bool:
        try:
            result = await self._objects.get(version + MODEL_SUFFIX)
        except (NotFoundError, DigestMismatchError):
            return False
        return hashlib.sha256(bytes(result.data or b"")).hexdigest() == sha

    async def _read_active(self, key: str) -> tuple[ActiveModel | None, int]:
        try:
            entry = await self._pointers.get(key)
        except KeyNotFoundError as exc:
            # a deleted pointer (ops stopped scoring the series) is "nothing active", but
            # the next write must name the delete marker's revision, not 0
            marker = exc.entry
            return None, (marker.revision or 0) if marker is not None else 0
        if entry.value is None or entry.revision is None:
            return None, 0
        try:
            return _active_decoder.decode(entry.value), entry.revision
        except msgspec.DecodeError as exc:
            raise RegistryError(f"unreadable active pointer {key}: {exc}") from None

    async def _write_active(self, key: str, pointer: ActiveModel, revision: int) -> None:
        try:
            await self._pointers.update(key, _encoder.encode(pointer), last=revision)
        except KeyWrongLastSequenceError:
            raise RegistryConflict(
                f"{key} changed since it was read (revision {revision}); nothing was changed"
            ) from None


def pointer_of(entry: KeyValue.Entry) -> ActiveModel | None:
    """The active pointer an entry of ``watch_active`` holds; None when it was deleted."""
    if entry.operation is not None or not entry.value:
        return None
    try:
        return _active_decoder.decode(entry.value)
    except msgspec.DecodeError as exc:
        raise RegistryError(f"unreadable active pointer {entry.key}: {exc}") from None


def _looks_like_version(version: str) -> bool:
    return len(version) == 16 and all(c in "0123456789abcdef" for c in version)


def _valid_card(card: ModelCard) -> ModelCard:
    """The card as a reader will decode it: constraints of ``contracts.models`` checked."""
    try:
        return _card_decoder.decode(_encoder.encode(card))
    except msgspec.ValidationError as exc:
        raise RegistryError(f"invalid model card: {exc}") from None


def _check_features(card: ModelCard, booster: lightgbm.Booster) -> None:
    names = list(booster.feature_name())
    if names != card.feature_names:
        raise RegistryError(
            f"model {card.version}: booster features {names} are not the card's {card.feature_names}"
        )


def _with_status(card: ModelCard, pointer: ActiveModel | None) -> ModelCard:
    status = ModelStatus.CANDIDATE
    if pointer is not None:
        if pointer.version == card.version:
            status = ModelStatus.ACTIVE
        elif card.version in pointer.previous or card.version in pointer.retired:
            status = ModelStatus.RETIRED
    return msgspec.structs.replace(card, status=status)


def _bounded(versions: Iterable[str]) -> list[str]:
    return list(versions)[-KEEP_HISTORY:]
