"""The engine: edits a manifest's rows once each, within limits, into storage."""
