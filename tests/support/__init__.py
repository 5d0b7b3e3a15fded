"""Test support code: locating PostgreSQL binaries and running throwaway servers.

Kept free of pytest imports so scripts (``python -m tests.support.pgbins``)
can use it too.
"""
