"""Deployment assets and the local real-services launcher (`edgefleet services`)."""
