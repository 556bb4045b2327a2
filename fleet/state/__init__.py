"""Durable state of the fleet manager: SQLite (WAL) records and content-addressed tensor files.

Imports only ``device`` (errors); nothing in ``fleet`` above it. docs/state.md has the schema.
"""
