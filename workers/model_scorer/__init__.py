"""model-scorer: feature vectors to scores by the active LightGBM model of each series."""
