"""Prometheus metrics for the whole gateway (`controlplane.metrics.service`)."""
