"""Everything the tickwire processes exchange, defined once.

- ``contracts.messages``: the message structs (schema-versioned, frozen).
- ``contracts.codec``: decoding with machine-readable refusal reasons, canonical encoding.
- ``contracts.subjects``: subject builders and parsers, symbol escaping.
- ``contracts.streams``: JetStream streams and consumers as data, and ``ensure``.
- ``contracts.schemas``: JSON Schema export (``contracts/schemas/*.json``).
"""
