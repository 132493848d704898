def main() -> None:
    raise SystemExit("tickwire: not built yet")
