"""Pointsman: an LLM router on Apache Kafka (core: contracts, config, Kafka plumbing, CLI)."""

__version__ = "0.1.0"
