"""The committed JSON Schemas are exactly what contracts/messages.py generates."""

from __future__ import annotations

import json
from pathlib import Path

from contracts import schemas
from workers.cli import main as tickwire

COMMITTED = Path(schemas.__file__).with_name("schemas")
FIX = "run `make schemas` and commit contracts/schemas/"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.json"))}


def test_committed_schemas_match_the_messages(tmp_path: Path) -> None:
    schemas.export(tmp_path)
    fresh, committed = _files(tmp_path), _files(COMMITTED)
    missing = sorted(fresh.keys() - committed.keys())
    extra = sorted(committed.keys() - fresh.keys())
    changed = sorted(n for n in fresh.keys() & committed.keys() if fresh[n] != committed[n])
    drift = {"missing": missing, "extra": extra, "changed": changed}
    assert drift == {"missing": [], "extra": [], "changed": []}, (
        f"JSON Schemas drifted from contracts/messages.py ({FIX}): {drift}"
    )


def test_there_is_one_schema_per_message_tick_input_and_registry_record(tmp_path: Path) -> None:
    names = sorted(p.name for p in schemas.export(tmp_path))
    assert names == [
        "active_model.json",
        "bar.json",
        "candle.json",
        "dead_letter.json",
        "feature_vector.json",
        "model_card.json",
        "score.json",
        "signal.json",
        "tick.json",
        "tick_batch.json",
        "tick_input.json",
        "watermark.json",
    ]
    tick_input = json.loads((tmp_path / "tick_input.json").read_text())
    assert sorted(tick_input["$defs"]) == [
        "Bar",
        "Tick",
        "TickBatch",
        "TickRow",
        "Timeframe",
        "Watermark",
    ]


def test_export_is_deterministic_and_cleans_up_after_itself(tmp_path: Path) -> None:
    first = _files_after_export(tmp_path / "a")
    second = _files_after_export(tmp_path / "b")
    assert first == second
    for name, text in first.items():
        assert text.endswith(b"}\n"), name
        assert json.dumps(json.loads(text), sort_keys=True, indent=2).encode() + b"\n" == text
    # a schema of a message that no longer exists goes; files not made by export stay
    (tmp_path / "a" / "quote.json").write_bytes(first["tick.json"])
    (tmp_path / "a" / "notes.json").write_text("{}\n")
    assert _files_after_export(tmp_path / "a").keys() == first.keys() | {"notes.json"}


def test_main_exports_into_the_given_directory(tmp_path: Path) -> None:
    assert tickwire(["contracts", "export", "--dir", str(tmp_path / "cli")]) == 0
    assert _files(tmp_path / "cli") == _files_after_export(tmp_path / "api")


def _files_after_export(directory: Path) -> dict[str, bytes]:
    schemas.export(directory)
    return _files(directory)
