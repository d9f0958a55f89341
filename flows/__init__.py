"""Prefect flows and the command line over the `pipeline` engine."""
