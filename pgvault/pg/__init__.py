"""Talking to PostgreSQL: replication protocol, tar stream, WAL names, recovery settings."""
