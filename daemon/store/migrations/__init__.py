"""Versioned schema migrations: `mNNNN_name.py` modules, each with `up(db)`.

Applied in order by `daemon.store.db.migrate`, under a lock that holds across
processes and hosts, and recorded in the `schema_version` table.
"""
