"""Corpus readers, synthetic task generators and deterministic batching."""
