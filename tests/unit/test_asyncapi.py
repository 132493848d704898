"""The AsyncAPI document is generated from the topology and committed; it must not drift."""

from __future__ import annotations

import json

from contracts import asyncapi, subjects, topology


def test_committed_document_matches_the_topology() -> None:
    committed = asyncapi.DOCUMENT.read_text()
    assert committed == asyncapi.render(), (
        "contracts/asyncapi.json is stale: run `make schemas` and commit the result"
    )


def test_every_arrow_of_every_worker_is_documented() -> None:
    doc = json.loads(asyncapi.DOCUMENT.read_text())
    addresses = {(name, ch["address"]) for name, ch in doc["channels"].items()}
    for io in topology.WORKERS:
        for ch in io.consumes:
            assert (f"{io.name} <- {ch.domain}", subjects.wildcard(ch.domain)) in addresses
        for ch in io.publishes:
            assert (f"{io.name} -> {ch.domain}", subjects.wildcard(ch.domain)) in addresses
        assert (f"{io.name} -> dead letters", subjects.dlq(io.name)) in addresses
    actions = {op["action"] for op in doc["operations"].values()}
    assert actions == {"send", "receive"}


def test_payload_schemas_are_the_contracts() -> None:
    doc = json.loads(asyncapi.DOCUMENT.read_text())
    schemas = doc["components"]["schemas"]
    candle = schemas["candle-ingest -> candles:Message:Payload"]
    assert {"feed", "symbol", "tf", "open_time_ms", "revision"} <= set(candle["properties"])
    assert candle["properties"]["type"] == {"enum": ["candle"]}
    assert "$ref" not in json.dumps(candle)
