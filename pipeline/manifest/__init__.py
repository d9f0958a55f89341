"""Manifests: reading CSV and Parquet, checking rows, selecting them."""
