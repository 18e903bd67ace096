"""Leasehold: just-in-time, task-scoped credentials."""

__version__ = "0.1.0"
