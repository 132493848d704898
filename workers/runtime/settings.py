"""Settings shared by every worker: read once from ``TICKWIRE_*`` variables, frozen, checked.

A worker adds its own fields by subclassing ``RuntimeSettings``. ``load()`` turns a missing
or bad variable into one clear line and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts import subjects

S = TypeVar("S", bound="RuntimeSettings")

Port = Annotated[int, Field(ge=0, le=65535)]


class RuntimeSettings(BaseSettings):
    """Connection, consumption and observability settings of one worker process."""

    model_config = SettingsConfigDict(
        env_prefix="TICKWIRE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    nats_url: str = "nats://127.0.0.1:4222"
    """Comma-separated server URLs of the NATS cluster."""
    nats_user: str | None = None
    nats_password: SecretStr | None = None
    nats_creds_file: str | None = None
    nats_tls_ca: str | None = None
    """CA bundle; set it to require TLS to NATS."""
    nats_connect_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    nats_inbox_prefix: str = "_INBOX"
    """Where replies come back; a user that may only read its own inbox (a signal
    subscriber in infra/nats/accounts.conf) connects with that inbox's prefix."""

    namespace: str | None = None
    """Replay namespace: subjects, streams and tables of that namespace only."""

    @field_validator("namespace")
    @classmethod
    def _namespace_is_a_name(cls, value: str | None) -> str | None:
        return None if value is None else subjects.check_name(value, "namespace")

    fetch_batch: Annotated[int, Field(ge=1, le=10_000)] = 1000
    """Messages asked for in one pull request."""
    handler_batch: Annotated[int, Field(ge=1, le=100_000)] = 1000
    """Most messages handed to the handler at once."""
    commit_depth: Annotated[int, Field(ge=1, le=64)] = 2
    """Handled batches that may be on their way to their ack at once: 2 handles the next
    batch while one commits; more lets a worker whose commits are slow (QuestDB, PostgreSQL)
    keep handling and publishing while they catch up. Each holds up to ``handler_batch``
    unacked messages."""
    pull_expires_s: Annotated[float, Field(ge=1)] = 5.0
    unanswered_unhealthy_s: Annotated[float, Field(gt=0)] = 60.0
    """Pull requests unanswered this long (JetStream away, the consumer or its stream gone):
    /healthz says unhealthy until they are answered again."""
    retry_backoff_s: Annotated[float, Field(gt=0)] = 0.5
    retry_backoff_max_s: Annotated[float, Field(gt=0)] = 30.0
    poison_deliveries: Annotated[int, Field(ge=1)] = 5
    """A message whose handling fails (not transiently) this many times is dead-lettered."""
    publish_timeout_s: Annotated[float, Field(gt=0)] = 10.0
    drain_timeout_s: Annotated[float, Field(gt=0)] = 20.0

    metrics_host: str = "127.0.0.1"
    metrics_port: Port = 0
    """Port of /metrics and /healthz; 0 picks a free one (logged at start)."""
    log_level: str = "INFO"


def load(cls: type[S], **overrides: object) -> S:
    """Build settings or stop the process with one line naming what is wrong."""
    try:
        return cls(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        prefix = cls.model_config.get("env_prefix", "")
        # a check of several settings together names them itself
        what = f" {prefix}{str(first['loc'][0]).upper()}" if first["loc"] else "s"
        sys.stderr.write(f"tickwire: bad setting{what}: {first['msg']}\n")
        raise SystemExit(2) from None
