"""Benchmarks of imgedit against the bundled emulator and an S3 endpoint on loopback."""
