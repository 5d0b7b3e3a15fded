"""The library API: one module per command, typed options in, result dataclasses out."""
