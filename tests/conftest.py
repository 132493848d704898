"""Fixtures shared by all tests.

The real servers start once per session, and only when a test asks for one of them:
`pytest tests/unit` starts nothing. Each test gets its own names (`unique`) and its own
PostgreSQL database (`pg_dsn`) so that tests never see each other's data.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from infra.stack import LocalStack, QuestDBUrls, StackUrls
from tests.processes import kill_spawned


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """No worker process outlives its test: one a failed test left running would go on
    consuming on the session's servers beside every later test, or hold the test's database
    open when it is dropped. Killed right after the test, before its fixtures end."""
    yield
    kill_spawned()


@pytest.fixture(scope="session")
def local_stack() -> Iterator[LocalStack]:
    """The running LocalStack itself, for tests that stop, kill or restart its servers."""
    with LocalStack() as running:
        yield running


@pytest.fixture(scope="session")
def stack(local_stack: LocalStack) -> StackUrls:
    return local_stack.urls


@pytest.fixture
def unique() -> str:
    """A short token, unique per test, usable in stream, subject, table and database names."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def nats_url(stack: StackUrls) -> str:
    assert stack.nats_url is not None
    return stack.nats_url


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    client = await nats.connect(nats_url, connect_timeout=5)
    yield client
    await client.close()


@pytest.fixture
def js(nc: NATS) -> JetStreamContext:
    return nc.jetstream()


@pytest.fixture
def pg_dsn(local_stack: LocalStack, unique: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for this test, dropped afterwards."""
    postgres = local_stack.postgres
    assert postgres is not None
    yield postgres.create_database(unique)
    if postgres.running:
        postgres.drop_database(unique)


@pytest.fixture
def questdb(stack: StackUrls) -> QuestDBUrls:
    assert stack.questdb is not None
    return stack.questdb
