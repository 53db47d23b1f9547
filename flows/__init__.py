"""Prefect flows: the nightly batch and the per-subject flow."""
