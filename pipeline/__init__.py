"""imgedit's engine: manifest, edit API client, runner and storage, with no orchestrator in it."""

__version__ = "0.1.0"
