"""Fog gateway: authenticated ingest → Kafka → TimescaleDB sink; device status."""
