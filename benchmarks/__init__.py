"""Benchmarks: scripts run as ``python benchmarks/NAME.py`` (a package only so that import-linter checks them)."""
