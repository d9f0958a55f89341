"""What is built on the engine: catalogues, datasets, contact sheets, run history."""
