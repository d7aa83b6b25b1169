"""Pointsman dispatcher service (see services/dispatcher/README.md)."""
