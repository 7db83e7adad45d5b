"""Prometheus metrics of gpushared: exporter, collectors, the vLLM scraper, alert rules and a Grafana dashboard.

Nothing is imported here on purpose: ``gpushared.metrics.text`` (the exposition reader) is standard-library only
and used by ``gpusharectl top``, which must not need prometheus-client.
"""
