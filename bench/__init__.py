"""gochat's benchmarks: ``python -m bench SCENARIO`` (see ``bench/__main__.py`` and docs/benchmarks.md)."""
