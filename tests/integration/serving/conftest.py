"""Fixtures of the serving integration tests (a real local Ray cluster running the app)."""

from serving_cluster import serving_cluster

__all__ = ["serving_cluster"]
