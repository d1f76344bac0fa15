"""Training: loop, indexer stages, checkpoints, configuration."""
