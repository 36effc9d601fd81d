"""Metrics (Prometheus) and logging set-up."""
