"""Pointsman auditor service (see services/auditor/README.md)."""
