"""pgvault: PostgreSQL backups into a content-addressed, deduplicated, encrypted repository."""

__version__ = "0.1.0"
