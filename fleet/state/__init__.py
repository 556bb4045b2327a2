"""Durable state of the fleet manager: SQLite (WAL) records and content-addressed tensor files.

``store.Store`` is the facade callers hold; behind it one module per concern: ``records``
(returned values, enums, StoreConflictError), ``schema`` (DDL and migrations), ``db``
(connections and transactions), ``tensors`` (files), ``columns`` (JSON columns), and one
repository per record kind (``runs``, ``rounds``, ``updates``, ``rejections``, ``devices``,
``chunks``, ``checkpoints``). Imports only ``device`` (errors); nothing in ``fleet`` above it.
docs/state.md has the schema.
"""
