"""Pointsman classifier service (see services/classifier/README.md)."""
