"""Thin Prefect tasks over prcore (retries, caching, logging, artifacts)."""
