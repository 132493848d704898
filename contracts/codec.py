"""Encoding and decoding of contract messages, with machine-readable refusal reasons.

Decoders are built once per type and reused (msgspec decoders are cheap to call, not to
make). A payload that cannot become the expected message raises ``ContractError`` whose
``reason`` is one of ``REASONS``; workers dead-letter with exactly that reason.
"""

from __future__ import annotations

from typing import Any, Final, Generic, TypeVar

import msgspec

from contracts.messages import SUPPORTED_VERSIONS

T = TypeVar("T")

MALFORMED_JSON: Final = "malformed_json"
UNKNOWN_SCHEMA_VERSION: Final = "unknown_schema_version"
UNKNOWN_TYPE: Final = "unknown_type"
MISSING_FIELD: Final = "missing_field"
INVALID_VALUE: Final = "invalid_value"
OVERSIZED: Final = "oversized"

REASONS: Final = frozenset(
    {MALFORMED_JSON, UNKNOWN_SCHEMA_VERSION, UNKNOWN_TYPE, MISSING_FIELD, INVALID_VALUE, OVERSIZED}
)


class ContractError(ValueError):
    """A payload does not satisfy its contract."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Versioned(msgspec.Struct):
    v: Any = None
    type: Any = None


_versioned = msgspec.json.Decoder(_Versioned)
_encoder = msgspec.json.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """Canonical JSON bytes: field order of the struct, shortest round-trip floats."""
    return _encoder.encode(message)


class Codec(Generic[T]):
    """Decode one contract type (or a tagged union of them) from JSON bytes."""

    __slots__ = ("_decoder", "max_bytes")

    def __init__(self, tp: Any, *, max_bytes: int = 1 << 20) -> None:
        self._decoder: msgspec.json.Decoder[T] = msgspec.json.Decoder(tp)
        self.max_bytes = max_bytes

    def decode(self, data: bytes) -> T:
        if len(data) > self.max_bytes:
            raise ContractError(OVERSIZED, f"{len(data)} bytes > limit {self.max_bytes}")
        try:
            message = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise _classify(data, exc) from None
        except msgspec.DecodeError as exc:
            raise ContractError(MALFORMED_JSON, str(exc)) from None
        version = getattr(message, "v", None)
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise ContractError(UNKNOWN_SCHEMA_VERSION, f"v={version!r}")
        return message


def _classify(data: bytes, exc: msgspec.ValidationError) -> ContractError:
    """Say why valid JSON is not a valid message; an unknown version explains everything."""
    text = str(exc)
    try:
        head = _versioned.decode(data)
    except msgspec.MsgspecError:
        return ContractError(INVALID_VALUE, text)
    if head.v is not None and head.v not in SUPPORTED_VERSIONS:
        return ContractError(UNKNOWN_SCHEMA_VERSION, f"v={head.v!r}")
    if "missing required field" in text:
        return ContractError(MISSING_FIELD, text)
    if text.endswith("`$.type`") or ("Invalid value" in text and "$.type" in text):
        return ContractError(UNKNOWN_TYPE, text)
    return ContractError(INVALID_VALUE, text)
