"""The trainer: stored candles -> features (the shared library's batch form) -> labels ->
walk-forward LightGBM with a purge gap -> an evaluation report -> a candidate model in the
registry. ``tickwire train`` runs it; the pure parts here need no server.
"""
