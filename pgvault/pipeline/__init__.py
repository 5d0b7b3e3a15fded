"""The data path as small pure stages: compress, encrypt, identify."""
