"""Implicit-reward diagnostics (placeholder docstring, replaced below)."""
